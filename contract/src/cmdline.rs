//! The kernel command line: the keys kupgrade passes to the next kernel, and
//! a parser that follows the kernel's own rules (`lib/cmdline.c`: words split
//! on white space, double quotes group, `--` ends the kernel's part).

use std::fmt;
use std::str::FromStr;

/// Present on the command line of a kernel booted by `kupgrade go`: look for an image.
pub const RESUME: &str = "kupgrade.resume";
/// The store holding the image, e.g. `kupgrade.store=/dev/pmem0` or a file path.
pub const STORE: &str = "kupgrade.store";
/// Modules `kupgrade-init` loads with the root's `modprobe` when it runs
/// after a distribution's initramfs, comma-separated: the network
/// interfaces' drivers, which such an initramfs need not have loaded (dracut
/// leaves them out unless it boots from the network), while the restore
/// configures the interfaces before the real init and its udev run.
pub const MODULES: &str = "kupgrade.modules";
/// How long the restore may take, in seconds (`kupgrade-init` has a default):
/// every child it runs is killed in time for it to end within this.
pub const RESTORE_TIMEOUT: &str = "kupgrade.restore_timeout";
/// Makes `kupgrade-init` fail on purpose, for the fault campaign:
/// `kupgrade.failpoint=criu-restore`, or several, comma-separated (see
/// [`InitFailpoint`]). Staged with `kupgrade stage --append`, so it lasts
/// one boot like the other keys.
pub const FAILPOINT: &str = "kupgrade.failpoint";

macro_rules! init_failpoints {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// A fault `kupgrade-init` injects when [`FAILPOINT`] names it.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum InitFailpoint { $($(#[$doc])* $variant,)* }

        impl InitFailpoint {
            pub const ALL: &'static [InitFailpoint] = &[$(InitFailpoint::$variant,)*];

            pub fn name(self) -> &'static str {
                match self { $(InitFailpoint::$variant => $name,)* }
            }
        }
    };
}

init_failpoints! {
    /// Every `criu restore` fails (CRIU is not run).
    CriuRestore => "criu-restore",
    /// The first `criu restore` hangs (CRIU runs an action script that never
    /// returns) until its deadline kills it.
    CriuRestoreHang => "criu-restore-hang",
    /// `kupgrade-init` panics at the last workload's `criu restore` (after
    /// the network lock went in and the others were restored).
    RestorePanic => "restore-panic",
    /// `kupgrade-init` stops there for ever, for its watchdog to end.
    RestoreHang => "restore-hang",
    /// Every report `kupgrade-init` writes fails to be written, as on a full
    /// or read-only root.
    ReportWrite => "report-write",
    /// The first module of the initramfs fails to load.
    ModuleLoad => "module-load",
    /// `nd_pmem` fails to load, so that a pmem store never appears, as in a
    /// kernel without its driver.
    PmemModuleLoad => "pmem-module-load",
}

impl fmt::Display for InitFailpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for InitFailpoint {
    type Err = UnknownFailpoint;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        InitFailpoint::ALL
            .iter()
            .copied()
            .find(|f| f.name() == s)
            .ok_or_else(|| UnknownFailpoint(s.to_string()))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown failpoint {0:?}")]
pub struct UnknownFailpoint(pub String);

/// One `key` or `key=value` word.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub key: String,
    pub value: Option<String>,
}

impl Param {
    pub fn new(key: &str, value: Option<&str>) -> Self {
        Param {
            key: key.to_string(),
            value: value.map(str::to_string),
        }
    }

    /// Keys that describe one boot only and must not be carried to the next:
    /// kupgrade's own, the boot loader's image name, and `initrd=` (kexec
    /// passes the initramfs separately).
    pub fn is_one_shot(&self) -> bool {
        self.key.starts_with("kupgrade.") || self.key == "BOOT_IMAGE" || self.key == "initrd"
    }
}

impl fmt::Display for Param {
    /// As the kernel reads it back: a key that is empty or holds white space
    /// quotes the whole word, a value that does quotes itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            _ if needs_quotes(&self.key) => match &self.value {
                None => write!(f, "\"{}\"", self.key),
                Some(v) => write!(f, "\"{}={v}\"", self.key),
            },
            None => f.write_str(&self.key),
            Some(v) if needs_quotes(v) => write!(f, "{}=\"{v}\"", self.key),
            Some(v) => write!(f, "{}={v}", self.key),
        }
    }
}

/// A word that splits or vanishes unless quoted.
fn needs_quotes(word: &str) -> bool {
    word.is_empty() || word.contains(char::is_whitespace)
}

/// A parsed command line: the kernel's parameters, and what follows `--`
/// (arguments for init), kept apart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cmdline {
    pub params: Vec<Param>,
    pub init_args: Vec<String>,
}

impl Cmdline {
    pub fn parse(text: &str) -> Cmdline {
        let mut out = Cmdline::default();
        let mut after_dashes = false;
        for word in split_words(text) {
            if after_dashes {
                out.init_args.push(word);
            } else if word == "--" {
                after_dashes = true;
            } else {
                let param = match word.split_once('=') {
                    Some((k, v)) => Param::new(k, Some(v)),
                    None => Param::new(&word, None),
                };
                out.params.push(param);
            }
        }
        out
    }

    /// The last value of `key` (the kernel lets later words win). `Some(None)`
    /// for a bare flag.
    pub fn get(&self, key: &str) -> Option<Option<&str>> {
        self.params
            .iter()
            .rev()
            .find(|p| p.key == key)
            .map(|p| p.value.as_deref())
    }

    pub fn value(&self, key: &str) -> Option<&str> {
        self.get(key).flatten()
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key`, replacing every earlier occurrence.
    pub fn set(&mut self, key: &str, value: Option<&str>) {
        self.params.retain(|p| p.key != key);
        self.params.push(Param::new(key, value));
    }

    pub fn remove_one_shot(&mut self) {
        self.params.retain(|p| !p.is_one_shot());
    }
}

impl fmt::Display for Cmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut sep = |f: &mut fmt::Formatter<'_>| {
            let r = if first { Ok(()) } else { f.write_str(" ") };
            first = false;
            r
        };
        for p in &self.params {
            sep(f)?;
            write!(f, "{p}")?;
        }
        if !self.init_args.is_empty() {
            sep(f)?;
            f.write_str("--")?;
            for a in &self.init_args {
                if needs_quotes(a) {
                    write!(f, " \"{a}\"")?;
                } else {
                    write!(f, " {a}")?;
                }
            }
        }
        Ok(())
    }
}

/// Splits on white space outside double quotes and drops the quotes.
fn split_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut started = false;
    for c in text.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                started = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if started {
                    words.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            c => {
                cur.push(c);
                started = true;
            }
        }
    }
    if started {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags_values_quotes_and_init_args() {
        let c = Cmdline::parse(
            "BOOT_IMAGE=/vmlinuz root=LABEL=root  ro quiet dyndbg=\"file a.c +p\" -- single x\n",
        );
        assert_eq!(c.value("root"), Some("LABEL=root"));
        assert_eq!(c.get("ro"), Some(None));
        assert_eq!(c.value("dyndbg"), Some("file a.c +p"));
        assert_eq!(c.init_args, vec!["single", "x"]);
        assert!(!c.has("single"));
    }

    #[test]
    fn later_words_win_and_set_replaces() {
        let mut c = Cmdline::parse("init=/a init=/b");
        assert_eq!(c.value("init"), Some("/b"));
        c.set("init", Some("/c"));
        assert_eq!(c.to_string(), "init=/c");
    }

    #[test]
    fn one_shot_keys_are_dropped_and_the_rest_round_trips() {
        let mut c = Cmdline::parse(
            "BOOT_IMAGE=/boot/vmlinuz initrd=\\initrd.img console=ttyS0 memmap=64M!1G kupgrade.resume kupgrade.store=/dev/pmem0 x=\"a b\" -- s",
        );
        c.remove_one_shot();
        assert_eq!(c.to_string(), "console=ttyS0 memmap=64M!1G x=\"a b\" -- s");
        assert_eq!(Cmdline::parse(&c.to_string()), c);
    }

    #[test]
    fn failpoints_parse_back_and_unknown_ones_are_refused() {
        for &f in InitFailpoint::ALL {
            assert_eq!(f.name().parse::<InitFailpoint>(), Ok(f));
        }
        let c = Cmdline::parse("ro kupgrade.failpoint=criu-restore");
        assert_eq!(
            c.value(FAILPOINT).map(str::parse),
            Some(Ok(InitFailpoint::CriuRestore))
        );
        assert_eq!(
            "criu".parse::<InitFailpoint>(),
            Err(UnknownFailpoint("criu".into()))
        );
        assert!(Param::new(FAILPOINT, Some("criu-restore")).is_one_shot());
        assert!(Param::new(RESTORE_TIMEOUT, Some("60")).is_one_shot());
    }

    #[test]
    fn empty_and_blank_lines_have_no_params() {
        assert_eq!(Cmdline::parse(""), Cmdline::default());
        assert_eq!(Cmdline::parse(" \n\t "), Cmdline::default());
    }

    /// Found by the `cmdline` fuzz target: `kupgrade stage` prints what it
    /// parsed, so every word must come back as it was.
    #[test]
    fn printing_and_parsing_again_keeps_every_word() {
        for text in [
            "BOBOngle \"",
            "\"\" root=/dev/vda",
            "\"a b\" \"c d=e f\" x=\"\"",
            "quiet -- \"two words\" \"\" single",
        ] {
            let once = Cmdline::parse(text);
            assert_eq!(Cmdline::parse(&once.to_string()), once, "from {text:?}");
        }
        assert_eq!(
            Cmdline::parse("\"a b=c\" -- \"d e\"").to_string(),
            "\"a b=c\" -- \"d e\""
        );
    }
}
