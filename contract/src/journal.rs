//! A service's standard output to the journal, carried across the kexec.
//!
//! systemd connects a service's stdout and stderr to journald's stream
//! socket, and journald is no part of the workload. The agent dumps the
//! service's end as an external socket (CRIU's `--ext-unix-sk=INODE`) and
//! records how journald knew the stream. `kupgrade-init` restores that end
//! as one end of a new socket pair (`--inherit-fd`), whose other end goes to
//! a relay process: once the new journald listens, the relay connects to it,
//! introduces the stream as systemd did (identifier, unit, priority, ...)
//! and forwards what the service writes, as from the service's main process
//! (`SCM_CREDENTIALS`). The lines land under the unit in `journalctl -u UNIT`.
//!
//! On the next upgrade the service's peer is the relay's end, and the relay
//! keeps the same record of its stream in [`RELAY_DIR`].

use serde::{Deserialize, Serialize};

/// journald's stream socket.
pub const JOURNAL_STDOUT: &str = "/run/systemd/journal/stdout";
/// Where journald records each stream it serves, by `DEVICE:INODE` of its
/// own end (for its own restarts; systemd calls the format private, so a
/// record that does not parse is a stream kupgrade cannot carry).
pub const JOURNALD_STREAMS_DIR: &str = "/run/systemd/journal/streams";
/// Where each relay records its stream, by the inode of its own end.
pub const RELAY_DIR: &str = "/run/kupgrade/journal";
/// kupgrade-init's hidden subcommand that runs a relay.
pub const RELAY_ARG: &str = "__journal-relay";

/// One stream, as the restore needs it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct JournalStream {
    /// The workload's end of the connection (CRIU's `socket:[INODE]`).
    pub inode: u64,
    /// `SYSLOG_IDENTIFIER=` of its lines.
    pub identifier: String,
    /// The unit its lines are logged under.
    pub unit: String,
    /// Facility and level, as syslog encodes them (systemd's default,
    /// `daemon.info`, is 30).
    pub priority: u16,
    /// Lines may start with `<N>` to give their own priority.
    pub level_prefix: bool,
    pub forward_to_syslog: bool,
    pub forward_to_kmsg: bool,
    pub forward_to_console: bool,
}

impl JournalStream {
    /// A stream from its record (journald's, or a relay's: the same
    /// `KEY=VALUE` lines), for the socket `inode` of the workload.
    pub fn from_record(inode: u64, text: &str) -> Option<Self> {
        let mut s = JournalStream {
            inode,
            priority: 6,
            ..Default::default()
        };
        let mut saw_priority = false;
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let flag = || value.trim() == "1";
            match key {
                "PRIORITY" => {
                    // As journald takes it: facility and level, up to 999.
                    s.priority = value.trim().parse().ok().filter(|p| *p <= 999)?;
                    saw_priority = true;
                }
                "LEVEL_PREFIX" => s.level_prefix = flag(),
                "FORWARD_TO_SYSLOG" => s.forward_to_syslog = flag(),
                "FORWARD_TO_KMSG" => s.forward_to_kmsg = flag(),
                "FORWARD_TO_CONSOLE" => s.forward_to_console = flag(),
                "IDENTIFIER" => s.identifier = unescape(value)?,
                "UNIT" => s.unit = unescape(value)?,
                _ => {}
            }
        }
        // A record without its priority is not one this code understands.
        saw_priority.then_some(s)
    }

    /// The record a relay keeps of its stream.
    pub fn record(&self) -> String {
        let b = |v: bool| u8::from(v);
        let mut out = format!(
            "PRIORITY={}\nLEVEL_PREFIX={}\nFORWARD_TO_SYSLOG={}\nFORWARD_TO_KMSG={}\nFORWARD_TO_CONSOLE={}\n",
            self.priority,
            b(self.level_prefix),
            b(self.forward_to_syslog),
            b(self.forward_to_kmsg),
            b(self.forward_to_console)
        );
        if !self.identifier.is_empty() {
            out.push_str(&format!("IDENTIFIER={}\n", escape(&self.identifier)));
        }
        if !self.unit.is_empty() {
            out.push_str(&format!("UNIT={}\n", escape(&self.unit)));
        }
        out
    }

    /// What a client of journald's stream socket sends first: identifier,
    /// unit, priority, level prefix, and the three forwards, a line each
    /// (`systemd-journald.service(8)`, "stream protocol").
    pub fn header(&self) -> String {
        let b = |v: bool| u8::from(v);
        let one_line = |s: &str| s.replace('\n', " ");
        format!(
            "{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
            one_line(&self.identifier),
            one_line(&self.unit),
            self.priority,
            b(self.level_prefix),
            b(self.forward_to_syslog),
            b(self.forward_to_kmsg),
            b(self.forward_to_console)
        )
    }
}

/// C-style escapes, as journald writes its records.
fn escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

fn unescape(s: &str) -> Option<String> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let next = *b.get(i + 1)?;
        i += 2;
        out.push(match next {
            b'n' => b'\n',
            b't' => b'\t',
            b'r' => b'\r',
            b'a' => 7,
            b'b' => 8,
            b'f' => 12,
            b'v' => 11,
            b'\\' | b'"' | b'\'' => next,
            b'x' => {
                let hex = std::str::from_utf8(b.get(i..i + 2)?).ok()?;
                i += 2;
                u8::from_str_radix(hex, 16).ok()?
            }
            _ => return None,
        });
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOURNALD: &str = "# This is private data. Do not parse\nPRIORITY=30\nLEVEL_PREFIX=1\nFORWARD_TO_SYSLOG=0\nFORWARD_TO_KMSG=0\nFORWARD_TO_CONSOLE=0\nSTREAM_ID=8a1f\nIDENTIFIER=my\\x20daemon\nUNIT=tick.service\n";

    #[test]
    fn journalds_record_gives_the_stream_and_its_header() {
        let s = JournalStream::from_record(42, JOURNALD).unwrap();
        assert_eq!(s.inode, 42);
        assert_eq!(s.identifier, "my daemon");
        assert_eq!(s.unit, "tick.service");
        assert_eq!(
            (s.priority, s.level_prefix, s.forward_to_syslog),
            (30, true, false)
        );
        assert_eq!(s.header(), "my daemon\ntick.service\n30\n1\n0\n0\n0\n");
    }

    #[test]
    fn a_relays_record_reads_back_the_same() {
        let s = JournalStream {
            inode: 7,
            identifier: "odd\\name\n\u{1}".into(),
            unit: "a@b.service".into(),
            priority: 3,
            level_prefix: false,
            forward_to_syslog: true,
            forward_to_kmsg: false,
            forward_to_console: true,
        };
        assert_eq!(JournalStream::from_record(7, &s.record()), Some(s));
    }

    #[test]
    fn a_record_that_does_not_parse_is_no_stream() {
        assert_eq!(JournalStream::from_record(1, "UNIT=x.service\n"), None);
        assert_eq!(JournalStream::from_record(1, "PRIORITY=1000\n"), None);
        assert_eq!(
            JournalStream::from_record(1, "PRIORITY=6\nUNIT=bad\\q\n"),
            None
        );
        assert_eq!(
            JournalStream::from_record(1, "PRIORITY=6\nUNIT=\\x4\n"),
            None
        );
    }

    #[test]
    fn a_header_is_seven_lines_whatever_the_names_hold() {
        let s = JournalStream {
            identifier: "two\nlines".into(),
            ..Default::default()
        };
        assert_eq!(s.header().lines().count(), 7);
    }
}
