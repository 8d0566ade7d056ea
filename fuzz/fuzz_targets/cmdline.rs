//! Any text as a kernel command line: see `contract::testing::cmdline_one`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| contract::testing::cmdline_one(data));
