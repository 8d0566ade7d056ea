//! `kupgrade-image inspect PATH [--verify]`: what a store holds (superblock,
//! manifest, sections) and, with `--verify`, whether every checksum holds.
//! Exits 0 when the image is readable (and verified), 1 otherwise, 2 on a
//! usage error.

use std::error::Error as _;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: kupgrade-image inspect PATH [--verify]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut path: Option<PathBuf> = None;
    let mut verify = false;
    let mut it = args.iter();
    match it.next().map(String::as_str) {
        Some("inspect") => {}
        Some("-h" | "--help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    }
    for a in it {
        match a.as_str() {
            "--verify" => verify = true,
            _ if path.is_none() && !a.starts_with("--") => path = Some(a.into()),
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(path) = path else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match image_format::inspect::print(&path, verify, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("kupgrade-image: {}: {e}", path.display());
            let mut source = e.source();
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
