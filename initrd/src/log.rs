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

pub fn event(e: &EventLine) {
    write(&e.to_string());
}

/// An error and its causes on one line, `what: why: root cause`, for the
/// log and for the report's reasons.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::line(&format!($($arg)*)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_chain_names_every_cause_once() {
        let e = Outer(std::io::Error::other("root cause"));
        assert_eq!(chain(&e), "outer: root cause");
        assert_eq!(chain(&std::io::Error::other("alone")), "alone");
    }
}
