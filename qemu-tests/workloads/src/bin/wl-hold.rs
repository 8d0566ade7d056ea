//! A counter (same log as wl-counter, so wl-counter-check reads it) that
//! also holds something CRIU cannot checkpoint, to prove kupgrade refuses it
//! before freezing anything and leaves the workload running:
//!
//! ```text
//! wl-hold LOG io-uring            an io_uring instance
//! wl-hold LOG device PATH         an open device file, e.g. /dev/kmsg
//! wl-hold LOG unix-connect PATH   a unix stream connected to a server outside the workload
//! wl-hold LOG unix-serve PATH     that server (run it unpreserved)
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use kupgrade_workloads::{boot_id, mono_ms};

fn fail(msg: String) -> ! {
    eprintln!("wl-hold: {msg}");
    std::process::exit(1);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(log), Some(what)) = (args.first(), args.get(1)) else {
        fail(
            "usage: wl-hold LOG io-uring | device PATH | unix-connect PATH | unix-serve PATH"
                .into(),
        );
    };
    let arg = |i: usize| {
        args.get(i)
            .cloned()
            .unwrap_or_else(|| fail(format!("{what} needs a path")))
    };
    // Whatever is held lives until the process ends.
    let _held: Box<dyn std::any::Any> = match what.as_str() {
        "io-uring" => {
            Box::new(io_uring::IoUring::new(8).unwrap_or_else(|e| fail(format!("io_uring: {e}"))))
        }
        "device" => {
            Box::new(File::open(arg(2)).unwrap_or_else(|e| fail(format!("{}: {e}", arg(2)))))
        }
        "unix-connect" => {
            let path = arg(2);
            // The server may still be starting.
            let s = (0..100)
                .find_map(|_| {
                    UnixStream::connect(&path).ok().or_else(|| {
                        std::thread::sleep(Duration::from_millis(50));
                        None
                    })
                })
                .unwrap_or_else(|| fail(format!("cannot connect to {path}")));
            Box::new(s)
        }
        "unix-serve" => {
            let path = arg(2);
            let _ = std::fs::remove_file(&path);
            let l = UnixListener::bind(&path).unwrap_or_else(|e| fail(format!("{path}: {e}")));
            std::thread::spawn(move || {
                let mut clients = Vec::new();
                for c in l.incoming().flatten() {
                    clients.push(c);
                }
            });
            Box::new(())
        }
        other => fail(format!("unknown resource {other}")),
    };
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| fail(format!("{log}: {e}")));
    let pid = std::process::id();
    for seq in 0u64.. {
        let line = format!(
            "seq={seq} pid={pid} boot={} mono_ms={} mem=ok\n",
            boot_id(),
            mono_ms()
        );
        if out.write_all(line.as_bytes()).is_err() {
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
