//! How a boot that cannot go on ends: the way Debian's initramfs-tools ends
//! it, by the `panic=` on the kernel command line, never in a loop.
//!
//! initramfs-tools, when the root never appears (`scripts/local`) or cannot
//! be mounted, calls its `panic` (`scripts/functions`), which reads `panic=`:
//!
//! ```text
//! panic=-N (negative)          restart at once
//! panic=N  (N > 0 seconds)     restart after N seconds
//! panic=0, or not a number     halt
//! no panic=                    an emergency shell on the console
//! ```
//!
//! kupgrade's initramfs has no shell, so without `panic=` it halts: the
//! console keeps the reason, as it would above the shell's prompt. A restart
//! goes through the firmware and the boot loader's default entry, which is
//! how a machine given `panic=` comes back on its usual kernel.

use std::time::Duration;

use contract::cmdline::Cmdline;

use crate::system::{Error, Reboot, System};

/// What `panic=` asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Ending {
    /// `panic` is what the command line said, if anything.
    Halt {
        panic: Option<String>,
    },
    Restart {
        after: Duration,
    },
}

impl Ending {
    pub fn from_cmdline(cmdline: &Cmdline) -> Ending {
        let Some(value) = cmdline.value("panic").filter(|v| !v.is_empty()) else {
            return Ending::Halt { panic: None };
        };
        let halt = || Ending::Halt {
            panic: Some(value.to_string()),
        };
        let seconds = |s: &str| s.chars().all(|c| c.is_ascii_digit() || c == '.');
        if let Some(magnitude) = value.strip_prefix('-') {
            return if seconds(magnitude) {
                Ending::Restart {
                    after: Duration::ZERO,
                }
            } else {
                halt()
            };
        }
        if value == "0" || !seconds(value) {
            return halt();
        }
        match value.parse::<f64>() {
            Ok(s) if s.is_finite() => Ending::Restart {
                after: Duration::from_secs_f64(s),
            },
            _ => halt(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Ending::Restart { after } if after.is_zero() => {
                "restarting now (panic= on the command line)".into()
            }
            Ending::Restart { after } => format!(
                "restarting in {} s (panic= on the command line)",
                after.as_secs_f64()
            ),
            Ending::Halt { panic: Some(v) } => format!("halting (panic={v} on the command line)"),
            Ending::Halt { panic: None } => "halting: this initramfs has no shell to fix it from \
                 (panic=N on the command line restarts after N s instead, panic=-1 at once)"
                .into(),
        }
    }
}

/// Stops the machine as `panic=` asks, saying how. Returns only if it
/// could not, with why.
pub fn stop(sys: &mut dyn System, cmdline: &Cmdline) -> Error {
    let ending = Ending::from_cmdline(cmdline);
    sys.log(&ending.describe());
    let how = match ending {
        Ending::Restart { after } => {
            if !after.is_zero() {
                sys.sleep(after);
            }
            Reboot::Restart
        }
        Ending::Halt { .. } => Reboot::Halt,
    };
    sys.reboot(how)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::fake::Fake;

    fn ending(cmdline: &str) -> Ending {
        Ending::from_cmdline(&Cmdline::parse(cmdline))
    }

    /// The cases of initramfs-tools' `panic` (scripts/functions), one each.
    #[test]
    fn panic_is_read_as_initramfs_tools_reads_it() {
        let restart = |s: f64| Ending::Restart {
            after: Duration::from_secs_f64(s),
        };
        let halt = |v: &str| Ending::Halt {
            panic: Some(v.into()),
        };
        assert_eq!(ending("root=/dev/vda"), Ending::Halt { panic: None });
        assert_eq!(ending("panic="), Ending::Halt { panic: None });
        assert_eq!(ending("panic=-1"), restart(0.0));
        assert_eq!(ending("panic=-30"), restart(0.0));
        assert_eq!(ending("panic=10"), restart(10.0));
        assert_eq!(ending("panic=2.5"), restart(2.5));
        assert_eq!(ending("panic=0"), halt("0"));
        assert_eq!(ending("panic=soon"), halt("soon"));
        assert_eq!(ending("panic=-x"), halt("-x"));
        // The kernel lets the last word win.
        assert_eq!(ending("panic=0 panic=-1"), restart(0.0));
    }

    #[test]
    fn the_machine_stops_as_asked() {
        let cases: &[(&str, &[&str], &str)] = &[
            ("panic=-1", &["restart"], "restarting now"),
            ("panic=7", &["sleep 7s", "restart"], "restarting in 7 s"),
            (
                "panic=0",
                &["halt"],
                "halting (panic=0 on the command line)",
            ),
            ("quiet", &["halt"], "halting: this initramfs has no shell"),
        ];
        for (cmdline, calls, says) in cases {
            let mut f = Fake::default();
            let e = stop(&mut f, &Cmdline::parse(cmdline));
            assert_eq!(&f.calls, calls, "{cmdline}");
            assert!(f.logs[0].starts_with(says), "{cmdline}: {:?}", f.logs);
            // The fake cannot stop a machine: the boot learns why.
            assert!(matches!(e, Error::Reboot { .. }), "{e}");
        }
    }
}
