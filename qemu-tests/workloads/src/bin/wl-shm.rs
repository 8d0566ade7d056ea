//! A daemon running as its own user that keeps state in POSIX shared
//! memory and opens it again by name for every new client, as a database
//! hands each connection its shared segments.
//!
//! Started as root, it opens its log, drops to UID (group UID, no
//! supplementary groups), creates `/dev/shm/NAME` (shm_open, mode 0600,
//! hence owned by UID), maps it and closes the descriptor: only the mapping
//! holds it. Every tick it increments the counter in the mapping, then, as a
//! new client would, opens NAME again read-write, maps it, reads the counter
//! back and unmaps it. A line a tick:
//!
//! ```text
//! name=NAME uid=UID n=N reopen=ok|ERROR seen=N
//! ```
//!
//! Usage: `wl-shm LOG NAME UID [tick ms, 200]`.

use std::fs::File;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::mman::shm_open;
use nix::sys::stat::Mode;
use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};

use kupgrade_workloads::shared::SharedRegion;
use kupgrade_workloads::{die, Args, Ticker};

const LEN: usize = 4096;

fn open(name: &str, flags: OFlag) -> std::io::Result<File> {
    shm_open(name, flags, Mode::from_bits_truncate(0o600))
        .map(File::from)
        .map_err(std::io::Error::from)
}

/// What a new client sees: the counter, through a fresh open by name.
fn reopen(name: &str) -> Result<u64, String> {
    let f = open(name, OFlag::O_RDWR).map_err(|e| format!("{:?}", e.kind()))?;
    let r = SharedRegion::map_file(&f, LEN).map_err(|e| format!("{:?}", e.kind()))?;
    Ok(r.get(0))
}

fn main() {
    let mut args = Args::new("wl-shm LOG NAME UID [tick ms]");
    let (log, name) = (args.req(), args.req());
    let uid: u32 = args.req_as();
    let tick: u64 = args.opt(200);
    let mut out = Ticker::open_or_die(&log, None);
    let dropped = setgroups(&[])
        .and_then(|_| setgid(Gid::from_raw(uid)))
        .and_then(|_| setuid(Uid::from_raw(uid)));
    if let Err(e) = dropped {
        die(format!("cannot become uid {uid}: {e}"));
    }
    let f = open(&name, OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR)
        .and_then(|f| f.set_len(LEN as u64).map(|_| f))
        .unwrap_or_else(|e| die(format!("shm_open {name}: {e}")));
    let region =
        SharedRegion::map_file(&f, LEN).unwrap_or_else(|e| die(format!("mmap {name}: {e}")));
    drop(f);
    loop {
        let n = region.get(0) + 1;
        region.set(0, n);
        let (reopen, seen) = match reopen(&name) {
            Ok(v) => ("ok".to_string(), v.to_string()),
            Err(e) => (e, "none".to_string()),
        };
        out.tick_or_die(&format!(
            "name={name} uid={uid} n={n} reopen={reopen} seen={seen}"
        ));
        std::thread::sleep(Duration::from_millis(tick));
    }
}
