//! `kupgrade image inspect` and `kupgrade-image inspect`: the superblock,
//! the manifest (workloads, phases), the section table, and with `verify`
//! every checksum and the digest.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;

use crate::error::{Error, Size};
use crate::read::Image;

/// Prints what the store at `store` holds. With `verify`, checks every
/// chunk and the digest too, printing each section's result, and fails
/// with the first problem found.
pub fn print(store: &Path, verify: bool, out: &mut dyn Write) -> Result<(), Error> {
    let f = File::open(store).map_err(Error::io(format!("open {}", store.display())))?;
    let img = Image::open(f)?;
    print_image(img, &store.display().to_string(), verify, out)
}

/// [`print`](fn@print) for an image already open (in memory, say).
pub fn print_image<R: Read + Seek + Send>(
    mut img: Image<R>,
    name: &str,
    verify: bool,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let text = describe(&img, name);
    let w = |out: &mut dyn Write, s: &str| {
        out.write_all(s.as_bytes())
            .map_err(Error::io("write the inspection"))
    };
    w(out, &text)?;
    if !verify {
        return Ok(());
    }
    let report = img.check();
    for s in &report.sections {
        let line = match &s.result {
            Ok(()) => format!(
                "verify     {:<24} ok: {} chunks ({} zero)\n",
                s.name, s.chunks, s.zero_chunks
            ),
            Err(e) => format!("verify     {:<24} DAMAGED: {e}\n", s.name),
        };
        w(out, &line)?;
    }
    let line = match &report.digest {
        Ok(()) => format!(
            "verify     digest ok, {} sections, {} chunks\n",
            report.sections.len(),
            report.chunks
        ),
        Err(e) => format!("verify     DAMAGED: {e}\n"),
    };
    w(out, &line)?;
    let mut report = report;
    for s in &mut report.sections {
        std::mem::replace(&mut s.result, Ok(()))?;
    }
    report.digest
}

fn describe<R>(img: &Image<R>, name: &str) -> String
where
    R: Read + Seek + Send,
{
    use std::fmt::Write as _;
    let sb = img.superblock();
    let m = img.manifest();
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(s, "store      {name} ({})", Size(img.store_len()));
    let _ = writeln!(s, "format     {}.{}", sb.major, sb.minor);
    let _ = writeln!(s, "state      {}", sb.state);
    let _ = writeln!(s, "generation {}", sb.generation);
    let _ = writeln!(
        s,
        "length     {} bytes ({}), chunks of at most {}",
        sb.total_len,
        Size(sb.total_len),
        Size(u64::from(sb.chunk_size))
    );
    let _ = writeln!(
        s,
        "manifest   {} bytes at {}, crc32c {:08x}",
        sb.manifest_len, sb.manifest_offset, sb.manifest_crc
    );
    let _ = writeln!(s, "digest     blake3:{}", sb.digest_hex());
    let _ = writeln!(s, "kernel     {} -> {}", m.kernel_from, m.kernel_to);
    let _ = writeln!(
        s,
        "host       {} (machine {}, boot {})",
        m.hostname, m.machine_id, m.boot_id
    );
    let _ = writeln!(s, "created    {} ns since the epoch", m.created_unix_ns);
    for wl in &m.workloads {
        let _ = writeln!(
            s,
            "workload   {} root pid {} ({} processes) cgroup {} section {}{}{}",
            wl.name,
            wl.root_pid,
            wl.pids.len(),
            wl.cgroup,
            wl.section,
            if wl.tcp_established {
                ", TCP connections"
            } else {
                ""
            },
            if wl.pid_namespace {
                ", own PID namespace"
            } else {
                ""
            }
        );
    }
    let t0 = m.phases.first().map_or(0, |p| p.t_mono_ns);
    for p in &m.phases {
        let _ = writeln!(
            s,
            "phase      +{:>9.1} ms {}",
            p.t_mono_ns.saturating_sub(t0) as f64 / 1e6,
            p.event
        );
    }
    for sec in &m.sections {
        let ratio = if sec.raw_len > 0 {
            sec.stored_len as f64 / sec.raw_len as f64
        } else {
            0.0
        };
        let _ = writeln!(
            s,
            "section    {:<24} {:<4} at {:>12}  raw {:>12}  stored {:>12} ({:.2})  {} chunks",
            sec.name, sec.kind, sec.offset, sec.raw_len, sec.stored_len, ratio, sec.chunks
        );
    }
    s
}
