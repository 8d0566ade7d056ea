//! Logging for PID 1 in early boot: every line goes to the console (the
//! kernel opened it as our stdout) and to `/dev/kmsg` so `dmesg` keeps it.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Mutex;

use contract::events::EventLine;

static KMSG: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Starts copying lines to `/dev/kmsg`, once `/dev` is mounted.
pub fn open_kmsg() {
    if let Ok(f) = OpenOptions::new().write(true).open("/dev/kmsg") {
        if let Ok(mut k) = KMSG.lock() {
            *k = Some(f);
        }
    }
}

fn write(text: &str) {
    // A console write can fail (no console); there is nowhere else to say so.
    let _ = writeln!(std::io::stdout(), "{text}");
    if let Ok(mut k) = KMSG.lock() {
        if let Some(f) = k.as_mut() {
            // <6> = KERN_INFO; one write() per record.
            let _ = f.write_all(format!("<6>{text}\n").as_bytes());
        }
    }
}

pub fn line(msg: &str) {
    write(&format!("kupgrade-init: {msg}"));
}

/// Emits a lifecycle event and returns it, so the caller can record it.
pub fn event(e: EventLine) -> EventLine {
    write(&e.to_string());
    e
}

#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::line(&format!($($arg)*)) };
}
