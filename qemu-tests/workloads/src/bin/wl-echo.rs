//! A line echo server: every line received is sent back unchanged. Logs each
//! accepted connection and a running count to LOG.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(port), Some(log)) = (args.next(), args.next()) else {
        eprintln!("usage: wl-echo PORT LOG");
        std::process::exit(2);
    };
    let log = match OpenOptions::new().create(true).append(true).open(&log) {
        Ok(f) => Arc::new(Mutex::new(f)),
        Err(e) => {
            eprintln!("wl-echo: cannot open {log}: {e}");
            std::process::exit(1);
        }
    };
    let listener = match TcpListener::bind(format!("0.0.0.0:{port}")) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wl-echo: cannot listen on {port}: {e}");
            std::process::exit(1);
        }
    };
    for (n, conn) in listener.incoming().enumerate() {
        let Ok(conn) = conn else { continue };
        let log = Arc::clone(&log);
        let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        if let Ok(mut l) = log.lock() {
            let _ = writeln!(l, "accepted conn={n} peer={peer}");
        }
        std::thread::spawn(move || {
            let Ok(mut w) = conn.try_clone() else { return };
            let mut lines = 0u64;
            for line in BufReader::new(conn).lines() {
                let Ok(line) = line else { break };
                if writeln!(w, "{line}").is_err() {
                    break;
                }
                lines += 1;
            }
            if let Ok(mut l) = log.lock() {
                let _ = writeln!(l, "closed conn={n} lines={lines}");
            }
        });
    }
}
