//! Progress on the terminal: one line per step with the time since start.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

pub fn elapsed_secs() -> f64 {
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

pub fn step(msg: &str) {
    eprintln!("[{:7.1}s] {msg}", elapsed_secs());
}
