//! What the fuzz targets check of one input (`fuzz/`), here so that
//! `cargo test` replays their seeds and findings with the same checks.

use crate::cmdline::Cmdline;
use crate::devstate::{lock_table_name, DeviceState};

/// A command line parses, and printing it and parsing again gives the same
/// parameters (`kupgrade stage` writes back what it read).
pub fn cmdline_one(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut line = Cmdline::parse(text);
    assert_eq!(Cmdline::parse(&line.to_string()), line, "from {text:?}");
    line.remove_one_shot();
    assert!(line.params.iter().all(|p| !p.is_one_shot()));
}

/// A device-state section parses or is refused, never panics; a parsed one
/// survives a round trip and each lock table yields a name or none.
/// Returns whether it parsed.
pub fn device_state_one(data: &[u8]) -> bool {
    let Ok(state) = serde_json::from_slice::<DeviceState>(data) else {
        return false;
    };
    for table in &state.network_locks {
        let _ = lock_table_name(table);
    }
    let bytes = serde_json::to_vec(&state).expect("a parsed state serializes");
    let back: DeviceState = serde_json::from_slice(&bytes).expect("and reads back");
    assert_eq!(back, state);
    true
}
