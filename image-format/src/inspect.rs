//! `kupgrade image inspect`: superblock, manifest and sections, and with
//! `verify` every checksum.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::{Error, Image};

pub fn print(store: &Path, verify: bool, out: &mut dyn Write) -> Result<(), Error> {
    let io = |source| Error::Io {
        what: store.display().to_string(),
        source,
    };
    let mut img = Image::open(File::open(store).map_err(io)?)?;
    let sb = img.superblock().clone();
    let m = img.manifest().clone();
    let w = |out: &mut dyn Write, s: String| out.write_all(s.as_bytes()).map_err(io);
    w(
        out,
        format!(
            "store      {} ({} bytes)\n",
            store.display(),
            img.store_len()
        ),
    )?;
    w(out, format!("format     {}.{}\n", sb.major, sb.minor))?;
    w(out, format!("state      {}\n", sb.state))?;
    w(out, format!("generation {}\n", sb.generation))?;
    w(out, format!("length     {} bytes\n", sb.total_len))?;
    let digest: String = sb.digest.iter().map(|b| format!("{b:02x}")).collect();
    w(out, format!("digest     blake3:{digest}\n"))?;
    w(
        out,
        format!("kernel     {} -> {}\n", m.kernel_from, m.kernel_to),
    )?;
    w(
        out,
        format!(
            "host       {} (machine {}, boot {})\n",
            m.hostname, m.machine_id, m.boot_id
        ),
    )?;
    for wl in &m.workloads {
        w(
            out,
            format!(
                "workload   {} pid {} ({} processes) cgroup {} section {}{}{}\n",
                wl.name,
                wl.root_pid,
                wl.pids.len(),
                wl.cgroup,
                wl.section,
                if wl.tcp_established { " tcp" } else { "" },
                if wl.pid_namespace { " pidns" } else { "" }
            ),
        )?;
    }
    let t0 = m.phases.first().map(|p| p.t_mono_ns).unwrap_or(0);
    for p in &m.phases {
        w(
            out,
            format!(
                "phase      {:>9.1} ms {}\n",
                p.t_mono_ns.saturating_sub(t0) as f64 / 1e6,
                p.event
            ),
        )?;
    }
    for s in &m.sections {
        let ratio = if s.raw_len > 0 {
            s.stored_len as f64 / s.raw_len as f64
        } else {
            0.0
        };
        w(
            out,
            format!(
                "section    {:<20} {:?} at {} raw {} stored {} ({:.2}) {} chunks\n",
                s.name, s.kind, s.offset, s.raw_len, s.stored_len, ratio, s.chunks
            ),
        )?;
    }
    if verify {
        let r = img.verify()?;
        w(
            out,
            format!(
                "verified   {} sections, {} chunks, digest ok\n",
                r.sections, r.chunks
            ),
        )?;
    }
    Ok(())
}
