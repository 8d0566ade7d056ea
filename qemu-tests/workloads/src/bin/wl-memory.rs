//! Memory of several kinds, verified every tick.
//!
//! - Private anonymous memory: a `Vec` of MiB MiB (256 by default) of
//!   non-zero pseudo-random words. The allocator takes a block that big
//!   straight from mmap, so it is one large private anonymous mapping. Each
//!   tick verifies 1/64 of it against checksums taken at the start, round
//!   robin, and the whole of it on the first tick and on the first tick
//!   after every boot change (cheap enough under TCG, thorough where it
//!   matters). With a dirty rate, each tick also writes one word of every
//!   page of the next stretch of it, round robin, with the value it holds:
//!   the pages are dirty for pre-copy's tracking, the checksums still hold.
//! - A memfd (memfd_create), filled with a pattern and a counter.
//! - A POSIX shared memory object, `/dev/shm/wl-memory-PID` (shm_open),
//!   opened by this process and by a peer child: each writes its own counter
//!   slot and reads the other's, and both verify a pattern.
//! - A file on the root file system, `DIR/wl-memory-PID.dat`, rewritten in
//!   place (its size never changes: CRIU checks sizes of open files).
//!
//! The memfd, the /dev/shm object and the file are read and written through
//! their descriptors here (pread/pwrite), so that this program stays free of
//! unsafe code; shared mappings of each kind, and SysV shared memory with a
//! semaphore, are `wl-ipc`'s job. The two processes each write only their
//! own slot as `(n, !n)` so that a torn read is seen and retried.
//!
//! Streams: `src=main private_mib=M chunk=I private=ok full=ok|- memfd=ok
//! shm=ok file=ok mine=N theirs=N` and `src=peer shm=ok mine=N theirs=N`.
//!
//! Usage: `wl-memory LOG [MiB of private memory, 256] [dir for the file, /var/tmp] [tick ms, 100]
//! [MiB/s of it dirtied, 0]`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::process::Stdio;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::shm_open;
use nix::sys::stat::Mode;

use kupgrade_workloads::{boot_id, die, fnv1a, spawn_role, xorshift, Args, Ticker};

const CHUNKS: usize = 64;
/// Size of the pattern in the memfd, the shm object and the file.
const PATTERN: usize = 256 * 1024;
/// Pattern offset: slots for counters come first.
const BASE: u64 = 64;
/// Words per 4 KiB page.
const PAGE_WORDS: usize = 4096 / 8;

fn pattern(seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..PATTERN / 8)
        .flat_map(|_| xorshift(&mut x).to_le_bytes())
        .collect()
}

fn ok(b: bool) -> &'static str {
    if b {
        "ok"
    } else {
        "BAD"
    }
}

/// Reads the pattern back and compares checksums.
fn pattern_ok(f: &File, want: u64) -> bool {
    let mut buf = vec![0u8; PATTERN];
    f.read_exact_at(&mut buf, BASE).is_ok() && fnv1a(&buf) == want
}

fn put_slot(f: &File, slot: u64, n: u64) -> bool {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b[8..].copy_from_slice(&(!n).to_le_bytes());
    f.write_all_at(&b, slot * 16).is_ok()
}

/// A counter slot, `(n, !n)`; retried when a concurrent write tore it.
fn get_slot(f: &File, slot: u64) -> Option<u64> {
    for _ in 0..100 {
        let mut b = [0u8; 16];
        f.read_exact_at(&mut b, slot * 16).ok()?;
        let (mut n, mut m) = ([0u8; 8], [0u8; 8]);
        n.copy_from_slice(&b[..8]);
        m.copy_from_slice(&b[8..]);
        let (n, m) = (u64::from_le_bytes(n), u64::from_le_bytes(m));
        if n == !m {
            return Some(n);
        }
        std::thread::yield_now();
    }
    None
}

fn create(f: std::io::Result<File>, what: &str, pat: &[u8]) -> File {
    let f = f.unwrap_or_else(|e| die(format!("{what}: {e}")));
    let init = f
        .set_len(BASE + PATTERN as u64)
        .and_then(|_| f.write_all_at(pat, BASE))
        .and_then(|_| f.sync_all());
    if let Err(e) = init {
        die(format!("{what}: {e}"));
    }
    f
}

fn chunk_sum(c: &[u64]) -> u64 {
    c.iter().fold(0u64, |a, v| a.rotate_left(7) ^ v)
}

fn checksums(mem: &[u64]) -> Vec<u64> {
    mem.chunks(mem.len().div_ceil(CHUNKS))
        .map(chunk_sum)
        .collect()
}

/// Rewrites one word in each of `pages` pages from page `*next` on, round
/// robin, leaving every value as it was.
fn dirty(mem: &mut [u64], next: &mut usize, pages: usize) {
    let total = mem.len() / PAGE_WORDS;
    for _ in 0..pages.min(total) {
        let at = *next * PAGE_WORDS;
        // Opaque to the compiler: the store is not elided as a no-op.
        mem[at] = std::hint::black_box(mem[at]);
        *next = (*next + 1) % total;
    }
}

fn main_role(log: String, mib: usize, dir: String, tick: u64, dirty_mib_s: usize) {
    if mib == 0 {
        die("need at least 1 MiB of private memory");
    }
    let pid = std::process::id();
    let mut x = 0x2545_f491_4f6c_dd1d ^ u64::from(pid);
    let mut mem: Vec<u64> = (0..mib * 1024 * 1024 / 8)
        .map(|_| xorshift(&mut x))
        .collect();
    let sums = checksums(&mem);
    let pat = pattern(u64::from(pid));
    let want = fnv1a(&pat);
    let memfd = memfd_create(c"wl-memory", MemFdCreateFlag::MFD_CLOEXEC)
        .map(File::from)
        .map_err(std::io::Error::from);
    let memfd = create(memfd, "memfd_create", &pat);
    let name = format!("/wl-memory-{pid}");
    let shm = shm_open(
        name.as_str(),
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR,
        Mode::from_bits_truncate(0o600),
    )
    .map(File::from)
    .map_err(std::io::Error::from);
    let shm = create(shm, &format!("shm_open {name}"), &pat);
    put_slot(&shm, 0, 0);
    put_slot(&shm, 1, 0);
    let path = format!("{dir}/wl-memory-{pid}.dat");
    let file = create(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path),
        &path,
        &pat,
    );
    let peer = spawn_role("peer")
        .arg(&log)
        .arg(&name)
        .arg(pid.to_string())
        .arg(tick.to_string())
        .stdin(Stdio::null())
        .spawn();
    if let Err(e) = peer {
        die(format!("cannot start the peer: {e}"));
    }
    let mut out = Ticker::open_or_die(&log, Some("main"));
    let chunk = mem.len().div_ceil(CHUNKS);
    let dirty_pages = dirty_mib_s * 256 * tick as usize / 1000;
    let mut next_dirty = 0;
    let mut last_boot = String::new();
    loop {
        dirty(&mut mem, &mut next_dirty, dirty_pages);
        let n = out.seq();
        let boot = boot_id();
        let full = boot != last_boot;
        last_boot = boot;
        let i = (n as usize) % sums.len();
        let private = if full {
            checksums(&mem) == sums
        } else {
            mem.chunks(chunk).nth(i).map(chunk_sum) == Some(sums[i])
        };
        let memfd_ok =
            put_slot(&memfd, 0, n) && get_slot(&memfd, 0) == Some(n) && pattern_ok(&memfd, want);
        let file_ok =
            put_slot(&file, 0, n) && get_slot(&file, 0) == Some(n) && pattern_ok(&file, want);
        let shm_ok = put_slot(&shm, 0, n) && pattern_ok(&shm, want);
        let theirs = get_slot(&shm, 1).map_or("BAD".into(), |v| v.to_string());
        // The line is stamped with the boot it is written in, which a kexec
        // between here and the write makes newer than `checked_in`.
        out.tick_or_die(&format!(
            "private_mib={mib} chunk={i} private={} full={} checked_in={last_boot} memfd={} shm={} file={} mine={n} theirs={theirs} shm_name={name} file_path={path}",
            ok(private),
            if full { ok(private) } else { "-" },
            ok(memfd_ok),
            ok(shm_ok),
            ok(file_ok)
        ));
        std::thread::sleep(Duration::from_millis(tick));
    }
}

fn peer_role(log: String, name: String, seed: u64, tick: u64) {
    let shm = shm_open(name.as_str(), OFlag::O_RDWR, Mode::empty())
        .map(File::from)
        .unwrap_or_else(|e| die(format!("shm_open {name}: {e}")));
    let want = fnv1a(&pattern(seed));
    let mut out = Ticker::open_or_die(&log, Some("peer"));
    loop {
        let n = out.seq();
        let shm_ok = put_slot(&shm, 1, n) && pattern_ok(&shm, want);
        let theirs = get_slot(&shm, 0).map_or("BAD".into(), |v| v.to_string());
        out.tick_or_die(&format!("shm={} mine={n} theirs={theirs}", ok(shm_ok)));
        std::thread::sleep(Duration::from_millis(tick));
    }
}

fn main() {
    let mut args = Args::new(
        "wl-memory LOG [MiB of private memory] [dir for the file] [tick ms] [MiB/s dirtied]",
    );
    match args.role().as_deref() {
        None => {
            let log = args.req();
            let mib = args.opt(256);
            let dir = args.opt("/var/tmp".to_string());
            let tick = args.opt(100);
            let dirty_mib_s = args.opt(0);
            main_role(log, mib, dir, tick, dirty_mib_s)
        }
        Some("peer") => peer_role(args.req(), args.req(), args.req_as(), args.req_as()),
        Some(other) => die(format!("unknown role {other}")),
    }
}
