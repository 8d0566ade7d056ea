//! The few QMP commands the harness sends to a running QEMU: a machine
//! reset at a chosen moment (`[upgrade] reset_on`), as a power cut or a
//! watchdog reset would strike a real machine mid-restore.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The `-qmp` argument for a socket at `path` that QEMU listens on.
pub fn listen_arg(path: &Path) -> String {
    format!("unix:{},server=on,wait=off", path.display())
}

/// Resets the machine as `system_reset` does. QEMU runs with `-no-reboot`
/// (a guest's reboot or panic ends the run), which turns a reset into a
/// shutdown: resets are let through until [`reboot_stops`], since the
/// firmware resets the machine again by itself on a warm start.
pub fn system_reset(socket: &Path) -> Result<()> {
    send(
        socket,
        &[
            r#"{"execute":"set-action","arguments":{"reboot":"reset"}}"#,
            r#"{"execute":"system_reset"}"#,
        ],
    )
}

/// A reboot stops QEMU again, as `-no-reboot` says (once the machine is up
/// after [`system_reset`]).
pub fn reboot_stops(socket: &Path) -> Result<()> {
    send(
        socket,
        &[r#"{"execute":"set-action","arguments":{"reboot":"shutdown"}}"#],
    )
}

fn send(socket: &Path, commands: &[&str]) -> Result<()> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to QEMU's QMP socket {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut greeting = String::new();
    reader.read_line(&mut greeting)?;
    for cmd in [r#"{"execute":"qmp_capabilities"}"#].iter().chain(commands) {
        writeln!(writer, "{cmd}")?;
        answer(&mut reader).with_context(|| format!("QMP {cmd}"))?;
    }
    Ok(())
}

/// Reads QMP lines until the command's answer, skipping events.
fn answer(reader: &mut impl BufRead) -> Result<()> {
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("QEMU closed the QMP socket");
        }
        if line.contains("\"return\"") {
            return Ok(());
        }
        if line.contains("\"error\"") {
            bail!("QEMU refused: {}", line.trim());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_skips_events_and_errors_are_told() {
        let mut r = BufReader::new(
            &b"{\"event\": \"RESET\"}\n{\"return\": {}}\n{\"error\": {\"desc\": \"no\"}}\n"[..],
        );
        answer(&mut r).unwrap();
        let e = answer(&mut r).unwrap_err().to_string();
        assert!(e.contains("no"), "{e}");
        assert!(answer(&mut r).is_err(), "end of stream");
    }
}
