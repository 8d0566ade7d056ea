//! The fuzz targets' seeds and findings (`fuzz/seeds`, `fuzz/regressions`),
//! replayed through the checks the targets make.

#![allow(clippy::unwrap_used)]

use std::path::Path;

fn inputs(kind: &str, target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect()
}

#[test]
fn command_lines_round_trip() {
    let seeds = inputs("seeds", "cmdline");
    assert!(!seeds.is_empty(), "the cmdline seeds are missing");
    for data in seeds.iter().chain(&inputs("regressions", "cmdline")) {
        contract::testing::cmdline_one(data);
    }
}

#[test]
fn device_states_round_trip_and_the_seeds_are_valid() {
    let seeds = inputs("seeds", "device_state");
    assert!(!seeds.is_empty(), "the device_state seeds are missing");
    for data in &seeds {
        assert!(
            contract::testing::device_state_one(data),
            "a seed must parse"
        );
    }
    for data in inputs("regressions", "device_state") {
        contract::testing::device_state_one(&data);
    }
}
