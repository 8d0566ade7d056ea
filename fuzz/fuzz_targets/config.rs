//! Any text as /etc/kupgrade/config.toml: parsed and validated, or refused
//! with a reason, never a panic.

#![no_main]

use kupgrade_agent::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(reason) = Config::parse(text) {
            assert!(!reason.is_empty());
        }
    }
});
