//! Any bytes as the image's device-state section, as `kupgrade-init` reads
//! it after the kexec: see `contract::testing::device_state_one`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    contract::testing::device_state_one(data);
});
