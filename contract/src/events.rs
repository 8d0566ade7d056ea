//! Lifecycle events: one machine-readable line per step of an upgrade.
//!
//! Both the agent (old kernel) and `kupgrade-init` (new kernel) emit them on
//! the console and `/dev/kmsg`; the QEMU harness reads them back from the
//! serial log to check their order and compute the blackout. A line looks like
//!
//! ```text
//! kupgrade: event=frozen t_mono_ns=1234 t_real_ns=1700000000000000000 workloads=3
//! ```
//!
//! `t_mono_ns` restarts with each kernel; `t_real_ns` (CLOCK_REALTIME) is the
//! one to compare across the kexec.

use std::fmt;
use std::str::FromStr;

/// The prefix every event line carries, wherever it sits in a log line.
pub const PREFIX: &str = "kupgrade: event=";

macro_rules! events {
    ($($variant:ident => $name:literal,)*) => {
        /// A step of the upgrade, in the order they normally happen.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Event { $($variant,)* }

        impl Event {
            /// Every event, in pipeline order.
            pub const ALL: &'static [Event] = &[$(Event::$variant,)*];

            pub fn name(self) -> &'static str {
                match self { $(Event::$variant => $name,)* }
            }
        }

        impl FromStr for Event {
            type Err = UnknownEvent;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s { $($name => Ok(Event::$variant),)* _ => Err(UnknownEvent(s.to_string())) }
            }
        }
    };
}

events! {
    // agent, old kernel
    Staged => "staged",
    PreflightOk => "preflight-ok",
    Predump => "predump",
    Frozen => "frozen",
    Dumped => "dumped",
    StateCaptured => "state-captured",
    ImageWritten => "image-written",
    Kexec => "kexec",
    // agent, when `go` gives up before the point of no return
    Aborted => "aborted",
    Resumed => "resumed",
    // kupgrade-init, new kernel
    InitStart => "init-start",
    ModulesLoaded => "modules-loaded",
    RootMounted => "root-mounted",
    ImageVerified => "image-verified",
    NetRestored => "net-restored",
    Restored => "restored",
    RestoreFailed => "restore-failed",
    ExecInit => "exec-init",
}

impl Event {
    /// Events emitted by the agent before the kexec.
    pub fn is_before_kexec(self) -> bool {
        self <= Event::Resumed
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown lifecycle event {0:?}")]
pub struct UnknownEvent(pub String);

/// One emitted event with its timestamps and extra `key=value` fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventLine {
    pub event: Event,
    pub t_mono_ns: u64,
    pub t_real_ns: u64,
    pub fields: Vec<(String, String)>,
}

impl EventLine {
    /// An event stamped with the current monotonic and real time.
    pub fn now(event: Event) -> Self {
        let (t_mono_ns, t_real_ns) = now_ns();
        EventLine {
            event,
            t_mono_ns,
            t_real_ns,
            fields: Vec::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl fmt::Display) -> Self {
        self.fields.push((key.to_string(), value.to_string()));
        self
    }

    pub fn field(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Finds an event line anywhere in `line` (kmsg and console add prefixes).
    pub fn parse(line: &str) -> Option<EventLine> {
        let start = line.find(PREFIX)?;
        let mut words = line[start + PREFIX.len()..].split_whitespace();
        let event = words.next()?.parse().ok()?;
        let mut out = EventLine {
            event,
            t_mono_ns: 0,
            t_real_ns: 0,
            fields: Vec::new(),
        };
        let (mut mono, mut real) = (None, None);
        for word in words {
            let (k, v) = word.split_once('=')?;
            match k {
                "t_mono_ns" => mono = Some(v.parse().ok()?),
                "t_real_ns" => real = Some(v.parse().ok()?),
                _ => out.fields.push((k.to_string(), v.to_string())),
            }
        }
        out.t_mono_ns = mono?;
        out.t_real_ns = real?;
        Some(out)
    }
}

impl fmt::Display for EventLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}{} t_mono_ns={} t_real_ns={}",
            self.event, self.t_mono_ns, self.t_real_ns
        )?;
        for (k, v) in &self.fields {
            // Values are single words so that the line stays parseable.
            let v: String = v
                .chars()
                .map(|c| if c.is_whitespace() { '_' } else { c })
                .collect();
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

/// (CLOCK_MONOTONIC, CLOCK_REALTIME) in nanoseconds.
pub fn now_ns() -> (u64, u64) {
    // Instant has no epoch to read, so go through the clock ids directly.
    fn read(id: nix::time::ClockId) -> u64 {
        nix::time::clock_gettime(id)
            .map(|ts| ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
            .unwrap_or(0)
    }
    (
        read(nix::time::ClockId::CLOCK_MONOTONIC),
        read(nix::time::ClockId::CLOCK_REALTIME),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_round_trips_with_fields() {
        let line = EventLine {
            event: Event::Frozen,
            t_mono_ns: 12,
            t_real_ns: 34,
            fields: vec![],
        }
        .with("workloads", 3)
        .with("reason", "two words");
        let text = line.to_string();
        assert_eq!(
            text,
            "kupgrade: event=frozen t_mono_ns=12 t_real_ns=34 workloads=3 reason=two_words"
        );
        let back = EventLine::parse(&format!("[    2.5] {text}")).unwrap();
        assert_eq!(back.event, Event::Frozen);
        assert_eq!(back.t_real_ns, 34);
        assert_eq!(back.field("workloads"), Some("3"));
    }

    #[test]
    fn parse_rejects_unknown_event_and_missing_times() {
        assert!(EventLine::parse("kupgrade: event=bogus t_mono_ns=1 t_real_ns=2").is_none());
        assert!(EventLine::parse("kupgrade: event=frozen t_mono_ns=1").is_none());
        assert!(EventLine::parse("no event here").is_none());
    }

    #[test]
    fn every_name_parses_back_and_order_splits_at_kexec() {
        for e in Event::ALL {
            assert_eq!(e.name().parse::<Event>().unwrap(), *e);
        }
        assert!(Event::Kexec.is_before_kexec());
        assert!(!Event::InitStart.is_before_kexec());
    }

    #[test]
    fn now_is_monotonic_and_real_is_after_2020() {
        let (m1, r1) = now_ns();
        let (m2, _) = now_ns();
        assert!(m2 >= m1);
        assert!(r1 > 1_577_836_800_000_000_000);
    }
}
