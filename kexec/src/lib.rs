//! kexec: load a kernel with `kexec_file_load`, unload it, reboot into it,
//! and validate a bzImage before asking the kernel to load it.
//!
//! This is kupgrade's only foreign-function boundary. Loading and rebooting
//! are separate calls: between them the agent writes and flushes the image.
//!
//! ```text
//! lib.rs      load, unload, is_loaded, reboot_into_loaded; KexecError and
//!             the errno mapping (pure, so it is unit-tested)
//! bzimage.rs  bzImage header checks: parse (bytes) and read (a file)
//! sys.rs      kernel ABI as data: setup_header, flags, syscall numbers
//! ffi.rs      the three system calls, the crate's only `unsafe`
//! ```

pub mod bzimage;
mod ffi;
pub mod sys;

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

pub use bzimage::{BzImage, HeaderError, HeaderErrorKind};

/// How to load a kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadFlags {
    /// Load as the crash (kdump) kernel instead of the reboot kernel.
    pub on_crash: bool,
}

/// What the kernel's lockdown allows, as far as it bears on an EPERM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Lockdown {
    /// Not looked at: it does not forbid this operation.
    NotRelevant,
    /// Could not be read (no securityfs, or not allowed to look).
    #[default]
    Unknown,
    /// "none": lockdown forbids nothing.
    Off,
    /// "integrity" or "confidentiality": only signed kernels load.
    Active(String),
}

/// What the system says about why a kexec call got EPERM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PermissionHints {
    /// Whether this process holds CAP_SYS_BOOT, if known. The kernel checks
    /// it first, so without it nothing else matters.
    pub cap_sys_boot: Option<bool>,
    /// `kernel.kexec_load_disabled`, if known.
    pub load_disabled: Option<bool>,
    pub lockdown: Lockdown,
}

/// The capability bit that kexec_file_load and reboot check.
const CAP_SYS_BOOT: u32 = 22;

impl PermissionHints {
    /// Reads the hints under `root` ("/" on a live system): the lockdown
    /// mode, `kexec_load_disabled` and this process's capabilities.
    pub fn read_at(root: &Path) -> Self {
        let rel = |p: &str| root.join(p.trim_start_matches('/'));
        PermissionHints {
            cap_sys_boot: read_cap_sys_boot(&rel("/proc/self/status")),
            load_disabled: read_flag(&rel(sys::KEXEC_LOAD_DISABLED_PATH)),
            lockdown: read_lockdown(&rel(sys::LOCKDOWN_PATH)),
        }
    }

    /// What to tell the user, most specific cause first.
    fn advice(&self) -> String {
        let cap = "this needs CAP_SYS_BOOT: run as root";
        if self.cap_sys_boot == Some(false) {
            return cap.into();
        }
        if self.load_disabled == Some(true) {
            return "kexec is disabled on this system (kernel.kexec_load_disabled=1, which stays set until the next boot): upgrade with a normal reboot".into();
        }
        match &self.lockdown {
            Lockdown::Active(mode) => format!(
                "kernel lockdown is active ({mode}, usually because of Secure Boot) and only kernels signed with a trusted key may be loaded: use a signed kernel (on Debian linux-image-*-amd64, not -unsigned)"
            ),
            Lockdown::Unknown => format!(
                "{cap}; as root, kernel lockdown (Secure Boot) may still forbid unsigned kernels: check {}",
                sys::LOCKDOWN_PATH
            ),
            Lockdown::Off | Lockdown::NotRelevant => cap.into(),
        }
    }
}

/// The bracketed word of /sys/kernel/security/lockdown.
fn read_lockdown(path: &Path) -> Lockdown {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Lockdown::Unknown;
    };
    match text
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
    {
        Some("none") => Lockdown::Off,
        Some(mode) => Lockdown::Active(mode.to_string()),
        None => Lockdown::Unknown,
    }
}

/// A sysctl or sysfs file holding "0" or "1".
fn read_flag(path: &Path) -> Option<bool> {
    match std::fs::read_to_string(path).ok()?.trim_end() {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

/// CAP_SYS_BOOT in the `CapEff:` line of /proc/self/status.
fn read_cap_sys_boot(status: &Path) -> Option<bool> {
    let text = std::fs::read_to_string(status).ok()?;
    let hex = text.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    let caps = u64::from_str_radix(hex, 16).ok()?;
    Some(caps & (1 << CAP_SYS_BOOT) != 0)
}

#[derive(Debug, thiserror::Error)]
pub enum KexecError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the command line is {len} bytes but kexec_file_load takes at most {max} for this kernel (its cmdline_size is {cmdline_size}): shorten it")]
    CmdlineTooLong {
        len: usize,
        max: usize,
        cmdline_size: u32,
    },
    #[error("the command line holds a NUL byte at offset {at}: remove it")]
    CmdlineNul { at: usize },
    #[error("{context}: permission denied: {}", .hints.advice())]
    NotPermitted {
        context: String,
        hints: PermissionHints,
    },
    #[error("{context}: signature verification failed ({}): the kernel is not signed with a key this system trusts (Secure Boot or KEXEC_SIG_FORCE); use a kernel signed by your distribution", errno_name(*.errno))]
    BadSignature { context: String, errno: i32 },
    #[error("{context}: not a kernel this architecture can kexec (ENOEXEC); the kernel log (dmesg) says why")]
    NotExecutable { context: String },
    #[error("{context}: a kexec is already loaded or in progress (EBUSY): unload it first, or wait for the other load to end")]
    Busy { context: String },
    #[error("{context}: not enough contiguous memory for the kernel and its initramfs (ENOMEM): free memory or use a smaller initramfs")]
    NoMemory { context: String },
    #[error("{context}: invalid argument (EINVAL): the kernel refused the command line (too long?), the flags or the initramfs; the kernel log (dmesg) says why")]
    InvalidArgument { context: String },
    #[error("{context}: this kernel was built without kexec_file_load (CONFIG_KEXEC_FILE): upgrade it with a normal reboot")]
    Unsupported { context: String },
    #[error("{context}: the kernel refused (EINVAL): no kexec kernel is loaded, it was unloaded after staging; stage it again (kupgrade stage)")]
    NotLoaded { context: String },
    #[error("{context}: {}", describe_errno(*.errno))]
    Os { context: String, errno: i32 },
    #[error("cannot read {path} (a kernel without kexec support?)")]
    StateUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds {content:?}, neither 0 nor 1")]
    StateGarbled { path: PathBuf, content: String },
}

fn describe_errno(errno: i32) -> String {
    match errno {
        0 => "the call returned without doing it and without an error".into(),
        e => std::io::Error::from_raw_os_error(e).to_string(),
    }
}

fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EKEYREJECTED => "EKEYREJECTED, the signature does not match",
        libc::EBADMSG => "EBADMSG, the signature is malformed",
        libc::ENOKEY => "ENOKEY, signed with an unknown key",
        libc::ENODATA => "ENODATA, not signed",
        _ => "signature error",
    }
}

/// Maps an errno from a kexec system call to an error that says what to
/// do. Pure: an EPERM carries [`Lockdown::Unknown`], which callers refine.
pub fn error_from_errno(errno: i32, context: &str) -> KexecError {
    let context = context.to_string();
    match errno {
        libc::EPERM => KexecError::NotPermitted {
            context,
            hints: PermissionHints::default(),
        },
        // Signature verification (KEXEC_SIG) fails with these when it is
        // enforced; under lockdown without enforcement it is EPERM.
        libc::EKEYREJECTED | libc::EBADMSG | libc::ENOKEY | libc::ENODATA => {
            KexecError::BadSignature { context, errno }
        }
        libc::ENOEXEC => KexecError::NotExecutable { context },
        libc::EBUSY => KexecError::Busy { context },
        libc::ENOMEM => KexecError::NoMemory { context },
        libc::EINVAL => KexecError::InvalidArgument { context },
        libc::ENOSYS => KexecError::Unsupported { context },
        errno => KexecError::Os { context, errno },
    }
}

/// [`error_from_errno`] with the EPERM hints filled in.
fn error_with_hints(
    errno: i32,
    context: &str,
    hints: impl FnOnce() -> PermissionHints,
) -> KexecError {
    match error_from_errno(errno, context) {
        KexecError::NotPermitted { context, .. } => KexecError::NotPermitted {
            context,
            hints: hints(),
        },
        e => e,
    }
}

fn raw_errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Refuses a command line the kernel would reject: longer than
/// [`bzimage::max_cmdline_len`] for a kernel with this `cmdline_size`.
pub fn check_cmdline(cmdline: &str, cmdline_size: u32) -> Result<(), KexecError> {
    let max = bzimage::max_cmdline_len(cmdline_size);
    if cmdline.len() > max {
        return Err(KexecError::CmdlineTooLong {
            len: cmdline.len(),
            max,
            cmdline_size,
        });
    }
    Ok(())
}

fn open(path: &Path) -> Result<File, KexecError> {
    File::open(path).map_err(|source| KexecError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// A kernel file, open and checked: what [`load_kernel`] gives the kernel
/// is this open file, so a file replaced at its path after the check (by a
/// package upgrade, say) is never what loads.
#[derive(Debug)]
pub struct Kernel {
    file: File,
    path: PathBuf,
    image: BzImage,
}

impl Kernel {
    /// Opens `path` once and checks its header.
    pub fn open(path: &Path) -> Result<Kernel, KexecError> {
        let file = open(path)?;
        let image = bzimage::read_file(&file, path)?;
        Ok(Kernel {
            file,
            path: path.to_path_buf(),
            image,
        })
    }

    /// What its header says (release, command line size, ...).
    pub fn image(&self) -> &BzImage {
        &self.image
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file, to read what will be loaded (e.g. to fingerprint it).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Opens and checks `kernel`, then loads it: [`Kernel::open`] and
/// [`load_kernel`].
pub fn load(
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    flags: LoadFlags,
) -> Result<(), KexecError> {
    load_kernel(&Kernel::open(kernel)?, initrd, cmdline, flags)
}

/// Checks the command line against the kernel's header, then loads them
/// with `kexec_file_load` for a later [`reboot_into_loaded`]. A kernel
/// already loaded is replaced.
pub fn load_kernel(
    kernel: &Kernel,
    initrd: Option<&Path>,
    cmdline: &str,
    flags: LoadFlags,
) -> Result<(), KexecError> {
    check_cmdline(cmdline, kernel.image.cmdline_size)?;
    let cmdline = CString::new(cmdline).map_err(|e| KexecError::CmdlineNul {
        at: e.nul_position(),
    })?;
    let initrd_file = initrd.map(open).transpose()?;
    let sys_flags = if flags.on_crash {
        sys::KEXEC_FILE_ON_CRASH
    } else {
        0
    };
    ffi::kexec_file_load(
        kernel.file.as_fd(),
        initrd_file.as_ref().map(|f| f.as_fd()),
        &cmdline,
        sys_flags,
    )
    .map_err(|e| {
        error_with_hints(
            raw_errno(&e),
            &format!(
                "loading {} ({})",
                kernel.path.display(),
                kernel.image.release
            ),
            || PermissionHints::read_at(Path::new("/")),
        )
    })
}

/// Unloads the loaded kexec kernel; nothing loaded is not an error.
pub fn unload() -> Result<(), KexecError> {
    ffi::kexec_file_unload().map_err(|e| {
        // Lockdown does not forbid unloading; kexec_load_disabled does.
        error_with_hints(raw_errno(&e), "unloading the kexec kernel", || {
            PermissionHints {
                lockdown: Lockdown::NotRelevant,
                ..PermissionHints::read_at(Path::new("/"))
            }
        })
    })
}

/// Whether a kexec kernel is loaded ([`sys::KEXEC_LOADED_PATH`]).
pub fn is_loaded() -> Result<bool, KexecError> {
    is_loaded_at(Path::new(sys::KEXEC_LOADED_PATH))
}

/// [`is_loaded`] from another file, for tests.
pub fn is_loaded_at(path: &Path) -> Result<bool, KexecError> {
    let text = std::fs::read_to_string(path).map_err(|source| KexecError::StateUnreadable {
        path: path.to_path_buf(),
        source,
    })?;
    match text.trim_end() {
        "0" => Ok(false),
        "1" => Ok(true),
        other => Err(KexecError::StateGarbled {
            path: path.to_path_buf(),
            content: other.chars().take(40).collect(),
        }),
    }
}

/// The count of kexec load calls (loads and unloads of a reboot kernel)
/// that the kernel still allows, from [`sys::KEXEC_LOAD_LIMIT_PATH`] under
/// `root`: `None` when the kernel has no such limit (before 6.7), or it
/// cannot be read, or it is unlimited (-1).
///
/// The kernel says whether a kexec kernel is loaded, never which one; this
/// counter is the one trace of every later load or unload: kupgrade starts
/// it (see [`count_load_calls_at`]), reads it after staging, and refuses the
/// upgrade if it moved since.
pub fn load_calls_left_at(root: &Path) -> Option<i64> {
    let path = root.join(sys::KEXEC_LOAD_LIMIT_PATH.trim_start_matches('/'));
    let n: i64 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    (n >= 0).then_some(n)
}

/// [`load_calls_left_at`] on this system.
pub fn load_calls_left() -> Option<i64> {
    load_calls_left_at(Path::new("/"))
}

/// Makes the kernel count kexec load calls: an unlimited limit (-1)
/// becomes [`i32::MAX`] calls, which no one runs out of. The kernel only
/// lets the limit go down until the next boot, so this lasts until then;
/// a limit already set is left alone. Best effort: without the limit (a
/// kernel before 6.7), nothing is counted.
pub fn count_load_calls_at(root: &Path) {
    let path = root.join(sys::KEXEC_LOAD_LIMIT_PATH.trim_start_matches('/'));
    let unlimited = std::fs::read_to_string(&path).is_ok_and(|t| t.trim() == "-1");
    if unlimited {
        let _ = std::fs::write(&path, i32::MAX.to_string());
    }
}

/// [`count_load_calls_at`] on this system.
pub fn count_load_calls() {
    count_load_calls_at(Path::new("/"))
}

/// Syncs file systems and reboots into the loaded kernel. Returns only if
/// the kernel refused (nothing loaded, no permission).
pub fn reboot_into_loaded() -> Result<std::convert::Infallible, KexecError> {
    ffi::sync();
    let e = ffi::reboot_kexec();
    let context = "rebooting into the loaded kernel";
    Err(match raw_errno(&e) {
        // The kernel's answer when no kexec kernel is loaded.
        libc::EINVAL => KexecError::NotLoaded {
            context: context.into(),
        },
        0 => KexecError::Os {
            context: context.into(),
            errno: 0,
        },
        errno => error_with_hints(errno, context, || PermissionHints {
            lockdown: Lockdown::NotRelevant,
            load_disabled: None,
            ..PermissionHints::read_at(Path::new("/"))
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_loaded_reads_the_sysfs_flag() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kexec_loaded");
        std::fs::write(&p, "0\n").unwrap();
        assert!(!is_loaded_at(&p).unwrap());
        std::fs::write(&p, "1\n").unwrap();
        assert!(is_loaded_at(&p).unwrap());
        for garbage in ["yes\n", "", "2\n", "01\n", "\u{0}\n"] {
            std::fs::write(&p, garbage).unwrap();
            assert!(
                matches!(is_loaded_at(&p), Err(KexecError::StateGarbled { .. })),
                "{garbage:?}"
            );
        }
        let e = is_loaded_at(&d.path().join("missing")).unwrap_err();
        assert!(matches!(e, KexecError::StateUnreadable { .. }));
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn errnos_map_to_actionable_errors() {
        let m = |errno| error_from_errno(errno, "loading k");
        assert!(matches!(m(libc::EPERM), KexecError::NotPermitted { .. }));
        for errno in [
            libc::EKEYREJECTED,
            libc::EBADMSG,
            libc::ENOKEY,
            libc::ENODATA,
        ] {
            assert!(
                matches!(m(errno), KexecError::BadSignature { .. }),
                "{errno}"
            );
        }
        assert!(matches!(m(libc::ENOEXEC), KexecError::NotExecutable { .. }));
        assert!(matches!(m(libc::EBUSY), KexecError::Busy { .. }));
        assert!(matches!(m(libc::ENOMEM), KexecError::NoMemory { .. }));
        assert!(matches!(
            m(libc::EINVAL),
            KexecError::InvalidArgument { .. }
        ));
        assert!(matches!(m(libc::ENOSYS), KexecError::Unsupported { .. }));
        assert!(matches!(
            m(libc::EIO),
            KexecError::Os {
                errno: libc::EIO,
                ..
            }
        ));

        let s = |errno| m(errno).to_string();
        assert!(s(libc::EPERM).contains("CAP_SYS_BOOT"));
        assert!(s(libc::EPERM).contains(sys::LOCKDOWN_PATH));
        assert!(s(libc::EKEYREJECTED).contains("signature verification failed"));
        assert!(s(libc::EKEYREJECTED).contains("EKEYREJECTED"));
        assert!(s(libc::EBADMSG).contains("EBADMSG"));
        assert!(s(libc::ENOEXEC).contains("architecture"));
        assert!(s(libc::EBUSY).contains("unload it first"));
        assert!(s(libc::ENOMEM).contains("contiguous memory"));
        assert!(s(libc::EINVAL).contains("command line"));
        assert!(s(libc::ENOSYS).contains("CONFIG_KEXEC_FILE"));
        let other = s(libc::EIO);
        assert!(other.starts_with("loading k: "), "{other}");
        assert!(other.contains("os error 5"), "{other}");
        assert!(s(0).contains("without an error"), "{}", s(0));
    }

    #[test]
    fn eperm_says_which_restriction_applies() {
        let advice = |cap_sys_boot, load_disabled, lockdown| {
            KexecError::NotPermitted {
                context: "loading k".into(),
                hints: PermissionHints {
                    cap_sys_boot,
                    load_disabled,
                    lockdown,
                },
            }
            .to_string()
        };
        let locked = advice(
            Some(true),
            Some(false),
            Lockdown::Active("integrity".into()),
        );
        assert!(locked.contains("lockdown is active (integrity"), "{locked}");
        assert!(locked.contains("signed"), "{locked}");
        // Without the capability the kernel never got as far as lockdown.
        let user = advice(Some(false), None, Lockdown::Active("integrity".into()));
        assert!(
            user.contains("CAP_SYS_BOOT") && !user.contains("lockdown"),
            "{user}"
        );
        let root = advice(Some(true), Some(false), Lockdown::Off);
        assert!(
            root.contains("CAP_SYS_BOOT") && !root.contains("lockdown"),
            "{root}"
        );
        let disabled = advice(Some(true), Some(true), Lockdown::Off);
        assert!(disabled.contains("kexec_load_disabled"), "{disabled}");
        let unknown = advice(None, None, Lockdown::Unknown);
        assert!(unknown.contains("CAP_SYS_BOOT"), "{unknown}");
        assert!(unknown.contains(sys::LOCKDOWN_PATH), "{unknown}");
        let unload = advice(None, None, Lockdown::NotRelevant);
        assert!(!unload.contains("lockdown"), "{unload}");
    }

    #[test]
    fn permission_hints_are_read_from_securityfs_and_procfs() {
        let root = tempfile::tempdir().unwrap();
        let hints = || PermissionHints::read_at(root.path());
        assert_eq!(hints(), PermissionHints::default());

        let write = |path: &str, text: &str| {
            let p = root.path().join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        write(sys::LOCKDOWN_PATH, "none [integrity] confidentiality\n");
        write(sys::KEXEC_LOAD_DISABLED_PATH, "0\n");
        write(
            "/proc/self/status",
            "Name:\tkupgrade\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n",
        );
        assert_eq!(
            hints(),
            PermissionHints {
                cap_sys_boot: Some(true),
                load_disabled: Some(false),
                lockdown: Lockdown::Active("integrity".into()),
            }
        );
        write(sys::LOCKDOWN_PATH, "[none] integrity confidentiality\n");
        write(sys::KEXEC_LOAD_DISABLED_PATH, "1\n");
        // Everything but bit 22.
        write("/proc/self/status", "CapEff:\t000001ffffbfffff\n");
        assert_eq!(
            hints(),
            PermissionHints {
                cap_sys_boot: Some(false),
                load_disabled: Some(true),
                lockdown: Lockdown::Off,
            }
        );
        write(sys::LOCKDOWN_PATH, "garbage\n");
        assert_eq!(hints().lockdown, Lockdown::Unknown);
    }

    #[test]
    fn load_calls_are_counted_once_asked_and_unknown_without_the_limit() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(load_calls_left_at(root.path()), None);
        count_load_calls_at(root.path());
        assert_eq!(
            load_calls_left_at(root.path()),
            None,
            "nothing to count with"
        );
        let p = root
            .path()
            .join(sys::KEXEC_LOAD_LIMIT_PATH.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "-1\n").unwrap();
        assert_eq!(
            load_calls_left_at(root.path()),
            None,
            "unlimited counts nothing"
        );
        count_load_calls_at(root.path());
        assert_eq!(load_calls_left_at(root.path()), Some(i32::MAX as i64));
        // A limit someone set is theirs.
        std::fs::write(&p, "5\n").unwrap();
        count_load_calls_at(root.path());
        assert_eq!(load_calls_left_at(root.path()), Some(5));
    }

    #[test]
    fn cmdline_longer_than_the_kernel_takes_is_refused() {
        // Debian's kernels say 2047; kexec counts the NUL and keeps 30 bytes.
        check_cmdline(&"x".repeat(2016), 2047).unwrap();
        let e = check_cmdline(&"x".repeat(2017), 2047).unwrap_err();
        assert!(matches!(
            e,
            KexecError::CmdlineTooLong {
                len: 2017,
                max: 2016,
                cmdline_size: 2047
            }
        ));
        assert!(e.to_string().contains("at most 2016"), "{e}");
        check_cmdline("", 0).unwrap();
        assert!(check_cmdline("x", 0).is_err());
    }
}
