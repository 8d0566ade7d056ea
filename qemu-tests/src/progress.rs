//! Progress on the terminal: one line per step with the time since start,
//! and the scenario it is about when several run at once.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

thread_local! {
    /// The scenario this thread works on: each runs on a thread of its own.
    static LABEL: RefCell<Option<String>> = const { RefCell::new(None) };
}

pub fn elapsed_secs() -> f64 {
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// Names the scenario that this thread's progress lines are about.
pub fn set_label(label: Option<&str>) {
    LABEL.with(|l| *l.borrow_mut() = label.map(str::to_string));
}

/// `msg` prefixed with this thread's label, if it has one.
fn labelled(msg: &str) -> String {
    LABEL.with(|l| match l.borrow().as_deref() {
        Some(label) => format!("{label}: {msg}"),
        None => msg.to_string(),
    })
}

pub fn step(msg: &str) {
    eprintln!("[{:7.1}s] {}", elapsed_secs(), labelled(msg));
}

/// A line of the guest's console (`--verbose`).
pub fn console(line: &str) {
    eprintln!("  | {}", labelled(line));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_the_scenario_of_their_thread_only() {
        set_label(Some("counter"));
        assert_eq!(labelled("booting"), "counter: booting");
        let other = std::thread::spawn(|| labelled("booting")).join().unwrap();
        assert_eq!(other, "booting");
        set_label(None);
        assert_eq!(labelled("booting"), "booting");
    }
}
