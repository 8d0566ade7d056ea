//! SysV IPC and shared mappings between two processes, under a SysV
//! semaphore. Meant to run in its own IPC namespace (`kupgrade launch
//! --ipc-namespace`), where CRIU carries the SysV objects.
//!
//! The main process and a peer child (started with `--role peer`) share
//! three regions, each mapped `MAP_SHARED` by both:
//!
//! - a SysV shared memory segment (shmget IPC_PRIVATE, shmat), whose id the
//!   peer gets on its command line; it is not marked for removal;
//! - a file on the root file system, `DIR/wl-ipc-PID.map` (PID of the main
//!   process), created at its full size and mapped by path;
//! - a POSIX shared memory object, `/dev/shm/wl-ipc-PID` (shm_open);
//!
//! and the main process alone also maps a memfd `MAP_SHARED`. Descriptors
//! are closed once mapped: only the mappings hold the files.
//!
//! Each region holds 8-byte words (native endianness): slot 0 the main
//! process's counter, slot 1 the peer's, slot 2 the holder (0 nobody, 1
//! main, 2 peer), and from byte 64 a 64 KiB pseudo-random pattern written
//! once by the main process before the peer starts, seeded by its pid.
//!
//! A SysV semaphore set of one semaphore, initialised to 1 (semget
//! IPC_PRIVATE, semctl SETVAL), is the mutex: semop -1 and +1, no SEM_UNDO.
//! Every tick each process takes it (its value must then read 0), finds the
//! holder slot 0 in every region and writes its own id there, checks that
//! its own counter in every region equals the number of ticks it has done
//! and increments it, sleeps 1 ms, checks that the holder is still itself
//! everywhere (`excl`), reads the other's counter, which must be the same
//! in every shared region and never go back (`theirs`), clears the holder
//! and releases the semaphore. It also verifies the pattern of one region a
//! tick, round robin (`pat_in` names it).
//!
//! Streams, one line a tick, `n` the own counter read back from the SysV
//! segment after the increment (the tick's seq + 1):
//!
//! ```text
//! src=main n=N theirs=T shmid=ID semid=ID sysv=ok file=ok shm=ok memfd=ok excl=ok pattern=ok pat_in=REGION
//! src=peer n=N theirs=T shmid=ID semid=ID sysv=ok file=ok shm=ok excl=ok pattern=ok pat_in=REGION
//! ```
//!
//! with `BAD` for a failed check (the reason goes to stderr).
//!
//! Usage: `wl-ipc LOG [dir, /var/tmp] [tick ms, 100]`.

use std::fs::{File, OpenOptions};
use std::process::Stdio;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::shm_open;
use nix::sys::stat::Mode;

use kupgrade_workloads::shared::{SharedRegion, SysvSem};
use kupgrade_workloads::{die, fnv1a, pattern, spawn_role, Args, Ticker};

/// Slots of every region (8-byte words).
const MAIN_SLOT: usize = 0;
const PEER_SLOT: usize = 1;
const HOLDER: usize = 2;
/// Where the pattern starts, in bytes, and its length.
const HEADER: usize = 64;
const PATTERN: usize = 64 * 1024;
const LEN: usize = HEADER + PATTERN;

fn ok(b: bool) -> &'static str {
    if b {
        "ok"
    } else {
        "BAD"
    }
}

struct Region {
    name: &'static str,
    mem: SharedRegion,
    /// Mapped by both processes (the memfd is the main process's alone).
    shared: bool,
}

impl Region {
    fn new(name: &'static str, mem: SharedRegion, shared: bool) -> Region {
        Region { name, mem, shared }
    }
}

/// One of the two processes.
struct Side {
    src: &'static str,
    id: u64,
    mine: usize,
    theirs: usize,
}

const MAIN: Side = Side {
    src: "main",
    id: 1,
    mine: MAIN_SLOT,
    theirs: PEER_SLOT,
};
const PEER: Side = Side {
    src: "peer",
    id: 2,
    mine: PEER_SLOT,
    theirs: MAIN_SLOT,
};

fn shm_name(pid: u32) -> String {
    format!("/wl-ipc-{pid}")
}

fn file_path(dir: &str, pid: u32) -> String {
    format!("{dir}/wl-ipc-{pid}.map")
}

fn map(f: std::io::Result<File>, what: &str, create: bool) -> SharedRegion {
    let f = f.unwrap_or_else(|e| die(format!("{what}: {e}")));
    if create {
        if let Err(e) = f.set_len(LEN as u64) {
            die(format!("{what}: {e}"));
        }
    }
    SharedRegion::map_file(&f, LEN).unwrap_or_else(|e| die(format!("mmap {what}: {e}")))
}

fn open_shm(name: &str, flags: OFlag) -> std::io::Result<File> {
    shm_open(name, flags, Mode::from_bits_truncate(0o600))
        .map(File::from)
        .map_err(std::io::Error::from)
}

fn open_file(path: &str, create: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(create)
        .open(path)
}

fn say(side: &Side, count: u64, msg: String) {
    eprintln!("wl-ipc {}: tick {count}: {msg}", side.src);
}

/// The ticks of one side, forever.
fn run(
    side: &Side,
    log: &str,
    regions: &[Region],
    sem: &SysvSem,
    shmid: i32,
    tick: u64,
    want: u64,
) -> ! {
    let mut out = Ticker::open_or_die(log, Some(side.src));
    let mut count: u64 = 0;
    let mut last_theirs: u64 = 0;
    loop {
        if let Err(e) = sem.lock() {
            die(format!("semop -1 on {}: {e}", sem.id()));
        }
        let mut excl = true;
        match sem.value() {
            Ok(0) => {}
            v => {
                excl = false;
                say(side, count, format!("semaphore value {v:?} while held"));
            }
        }
        for r in regions {
            let h = r.mem.get(HOLDER);
            if h != 0 {
                excl = false;
                say(side, count, format!("{}: holder {h} on entry", r.name));
            }
            r.mem.set(HOLDER, side.id);
        }
        let mut good = vec![true; regions.len()];
        for (r, g) in regions.iter().zip(&mut good) {
            let v = r.mem.get(side.mine);
            if v != count {
                *g = false;
                say(
                    side,
                    count,
                    format!("{}: own counter {v}, {count} expected", r.name),
                );
            }
            r.mem.set(side.mine, count + 1);
        }
        std::thread::sleep(Duration::from_millis(1));
        for r in regions {
            let h = r.mem.get(HOLDER);
            if h != side.id {
                excl = false;
                say(
                    side,
                    count,
                    format!("{}: holder {h} after 1 ms, not me", r.name),
                );
            }
        }
        let theirs = regions[0].mem.get(side.theirs);
        if theirs < last_theirs {
            good[0] = false;
            say(
                side,
                count,
                format!("their counter went back from {last_theirs} to {theirs}"),
            );
        }
        last_theirs = last_theirs.max(theirs);
        for (r, g) in regions.iter().zip(&mut good) {
            let v = r.mem.get(side.theirs);
            if r.shared && v != theirs {
                *g = false;
                say(
                    side,
                    count,
                    format!(
                        "{}: their counter {v}, {theirs} in {}",
                        r.name, regions[0].name
                    ),
                );
            }
            let v = r.mem.get(side.mine);
            if v != count + 1 {
                *g = false;
                say(
                    side,
                    count,
                    format!(
                        "{}: own counter {v} just after writing {}",
                        r.name,
                        count + 1
                    ),
                );
            }
            r.mem.set(HOLDER, 0);
        }
        let n = regions[0].mem.get(side.mine);
        if let Err(e) = sem.unlock() {
            die(format!("semop +1 on {}: {e}", sem.id()));
        }
        let pat = &regions[(count % regions.len() as u64) as usize];
        let pat_ok = fnv1a(&pat.mem.bytes(HEADER, PATTERN)) == want;
        if !pat_ok {
            say(side, count, format!("{}: pattern damaged", pat.name));
        }
        let status: Vec<String> = regions
            .iter()
            .zip(&good)
            .map(|(r, g)| format!("{}={}", r.name, ok(*g)))
            .collect();
        out.tick_or_die(&format!(
            "n={n} theirs={theirs} shmid={shmid} semid={} {} excl={} pattern={} pat_in={}",
            sem.id(),
            status.join(" "),
            ok(excl),
            ok(pat_ok),
            pat.name
        ));
        count += 1;
        std::thread::sleep(Duration::from_millis(tick));
    }
}

fn main_role(log: String, dir: String, tick: u64) {
    let pid = std::process::id();
    let pat = pattern(u64::from(pid), PATTERN);
    let want = fnv1a(&pat);
    let (shmid, sysv) =
        SharedRegion::sysv_create(LEN).unwrap_or_else(|e| die(format!("shmget: {e}")));
    let sem = SysvSem::create().unwrap_or_else(|e| die(format!("semget: {e}")));
    let path = file_path(&dir, pid);
    let file = map(open_file(&path, true), &path, true);
    let name = shm_name(pid);
    let shm = map(
        open_shm(&name, OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR),
        &format!("shm_open {name}"),
        true,
    );
    let memfd = memfd_create(c"wl-ipc", MemFdCreateFlag::MFD_CLOEXEC)
        .map(File::from)
        .map_err(std::io::Error::from);
    let memfd = map(memfd, "memfd_create", true);
    let regions = [
        Region::new("sysv", sysv, true),
        Region::new("file", file, true),
        Region::new("shm", shm, true),
        Region::new("memfd", memfd, false),
    ];
    for r in &regions {
        r.mem.write_bytes(HEADER, &pat);
    }
    let peer = spawn_role("peer")
        .arg(&log)
        .arg(shmid.to_string())
        .arg(sem.id().to_string())
        .arg(pid.to_string())
        .arg(&dir)
        .arg(tick.to_string())
        .stdin(Stdio::null())
        .spawn();
    if let Err(e) = peer {
        die(format!("cannot start the peer: {e}"));
    }
    run(&MAIN, &log, &regions, &sem, shmid, tick, want)
}

fn peer_role(log: String, shmid: i32, semid: i32, main_pid: u32, dir: String, tick: u64) {
    let want = fnv1a(&pattern(u64::from(main_pid), PATTERN));
    let sysv =
        SharedRegion::sysv_attach(shmid).unwrap_or_else(|e| die(format!("shmat {shmid}: {e}")));
    if sysv.len() != LEN {
        die(format!(
            "SysV segment {shmid} is {} bytes, not {LEN}",
            sysv.len()
        ));
    }
    let sem = SysvSem::open(semid).unwrap_or_else(|e| die(format!("semaphore {semid}: {e}")));
    let path = file_path(&dir, main_pid);
    let name = shm_name(main_pid);
    let regions = [
        Region::new("sysv", sysv, true),
        Region::new("file", map(open_file(&path, false), &path, false), true),
        Region::new(
            "shm",
            map(
                open_shm(&name, OFlag::O_RDWR),
                &format!("shm_open {name}"),
                false,
            ),
            true,
        ),
    ];
    run(&PEER, &log, &regions, &sem, shmid, tick, want)
}

fn main() {
    let mut args = Args::new("wl-ipc LOG [dir, /var/tmp] [tick ms, 100]");
    match args.role().as_deref() {
        None => {
            let log = args.req();
            let dir = args.opt("/var/tmp".to_string());
            let tick = args.opt(100);
            main_role(log, dir, tick)
        }
        Some("peer") => peer_role(
            args.req(),
            args.req_as(),
            args.req_as(),
            args.req_as(),
            args.req(),
            args.req_as(),
        ),
        Some(other) => die(format!("unknown role {other}")),
    }
}
