//! Any bytes as the start of a kernel file: the header parser returns a
//! kernel or an error, never panics, and what it accepts is consistent.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(k) = kexec::bzimage::parse(data) {
        // The release is the version string's first word.
        assert!(k.version_string.starts_with(&k.release), "{k:?}");
    }
});
