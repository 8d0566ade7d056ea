//! Any bytes as a store: opening, checking, reading every blob and
//! extracting every tree must never panic, hang or run out of memory, and
//! extraction must never write outside its scratch directory.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| std::env::temp_dir().join(format!("kupgrade-fuzz-{}", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    image_format::testing::fuzz_one(data, scratch());
});
