//! Open files and the state the kernel keeps for them, in a directory
//! `DIR/wl-files-PID` on the root file system:
//! - `source`: 100000 numbered 32-byte records written at the start and read
//!   one per tick through one descriptor, so the kernel's file offset is the
//!   read progress (`rec=N off=O`);
//! - `append.log`: opened twice with O_APPEND; every tick each descriptor
//!   appends a fixed-width line. Without O_APPEND after a restore, the first
//!   descriptor would write at its stale offset over the second's line: the
//!   workload checks the flag and the file length (`append=ok`);
//! - `flock`: held with flock(LOCK_EX); `posix`: a POSIX fcntl write lock;
//!   `ofd`: an open-file-description fcntl write lock, all held forever;
//! - `deleted`: 64 KiB of pattern, unlinked while open, read back and checked
//!   every tick (`deleted=ok`);
//! - `watched/`: an inotify watch on it, and every tick the workload rewrites
//!   `watched/touch` and counts the events (`inotify=N`).
//!
//! Usage: `wl-files LOG [dir, /var/tmp] [tick ms, 100]`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, Flock, FlockArg, OFlag};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use kupgrade_workloads::{
    die, fnv1a, parse_record, record, whole_file_lock, xorshift, Args, Ticker, RECORD,
};

const RECORDS: u64 = 100_000;
const DELETED: usize = 64 * 1024;
/// Width of a line in append.log: 12 digits, space, one letter, newline.
const APPEND_LINE: u64 = 15;

fn or_die<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| die(format!("{what}: {e}")))
}

fn deleted_pattern() -> Vec<u8> {
    let mut x = 0x51a7_e5ee_d00d_f00d;
    (0..DELETED / 8)
        .flat_map(|_| xorshift(&mut x).to_le_bytes())
        .collect()
}

fn has_append(f: &File) -> bool {
    fcntl(f.as_raw_fd(), FcntlArg::F_GETFL)
        .is_ok_and(|fl| OFlag::from_bits_truncate(fl).contains(OFlag::O_APPEND))
}

fn main() {
    let mut args = Args::new("wl-files LOG [dir] [tick ms]");
    let log = args.req();
    let base = args.opt("/var/tmp".to_string());
    let tick: u64 = args.opt(100);
    let dir = format!("{base}/wl-files-{}", std::process::id());
    or_die(&dir, fs::create_dir_all(format!("{dir}/watched")));
    let path = |name: &str| format!("{dir}/{name}");
    let open_rw = |name: &str| {
        or_die(
            name,
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path(name)),
        )
    };

    let source: Vec<u8> = (0..RECORDS).flat_map(|i| record(i, 0)).collect();
    or_die("source", fs::write(path("source"), &source));
    drop(source);
    let mut reader = or_die("source", File::open(path("source")));

    let open_append = || {
        or_die(
            "append.log",
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path("append.log")),
        )
    };
    let (mut app_a, mut app_b) = (open_append(), open_append());

    // Held for the life of the process: the guard must not drop.
    let _flock = or_die(
        "flock",
        Flock::lock(open_rw("flock"), FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e),
    );
    let posix = open_rw("posix");
    or_die(
        "fcntl(F_SETLK)",
        fcntl(posix.as_raw_fd(), FcntlArg::F_SETLK(&whole_file_lock())),
    );
    let ofd = open_rw("ofd");
    or_die(
        "fcntl(F_OFD_SETLK)",
        fcntl(ofd.as_raw_fd(), FcntlArg::F_OFD_SETLK(&whole_file_lock())),
    );

    let pattern = deleted_pattern();
    let want = fnv1a(&pattern);
    let mut deleted = open_rw("deleted");
    or_die("deleted", deleted.write_all(&pattern));
    or_die("unlink", fs::remove_file(path("deleted")));

    let inotify = or_die(
        "inotify_init",
        Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC),
    );
    let mask = AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CLOSE_WRITE;
    or_die(
        "inotify_add_watch",
        inotify.add_watch(path("watched").as_str(), mask),
    );

    let mut out = Ticker::open_or_die(&log, None);
    let mut events = 0u64;
    loop {
        let n = out.seq();
        let mut r = [0u8; RECORD];
        if matches!(reader.stream_position(), Ok(p) if p >= RECORDS * RECORD as u64) {
            // A full lap: start again (the checker knows the file's length).
            or_die("seek", reader.seek(SeekFrom::Start(0)));
        }
        let rec = match reader
            .read_exact(&mut r)
            .ok()
            .and_then(|_| parse_record(&r))
        {
            Some((i, _)) => i.to_string(),
            None => "BAD".into(),
        };
        let off = reader
            .stream_position()
            .map_or("BAD".into(), |p| p.to_string());

        let wrote = writeln!(app_a, "{n:012} a").and_then(|_| writeln!(app_b, "{n:012} b"));
        let len = fs::metadata(path("append.log"))
            .map(|m| m.len())
            .unwrap_or(0);
        let append = wrote.is_ok()
            && has_append(&app_a)
            && has_append(&app_b)
            && len == (n + 1) * 2 * APPEND_LINE;

        let mut buf = vec![0u8; DELETED];
        let gone = deleted.metadata().is_ok_and(|m| m.nlink() == 0);
        let deleted_ok = gone && deleted.read_exact_at(&mut buf, 0).is_ok() && fnv1a(&buf) == want;

        let _ = fs::write(path("watched/touch"), n.to_string());
        loop {
            match inotify.read_events() {
                Ok(v) if !v.is_empty() => events += v.len() as u64,
                Ok(_) | Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => {}
                Err(e) => die(format!("inotify read: {e}")),
            }
        }
        let ok = |b: bool| if b { "ok" } else { "BAD" };
        out.tick_or_die(&format!(
            "rec={rec} off={off} append={} deleted={} inotify={events} dir={dir}",
            ok(append),
            ok(deleted_ok)
        ));
        std::thread::sleep(Duration::from_millis(tick));
    }
}
