//! kexec: load a kernel with `kexec_file_load`, unload it, reboot into it,
//! and validate a bzImage before asking the kernel to load it.
//!
//! This is kupgrade's only foreign-function boundary. Loading and rebooting
//! are separate calls: between them the agent writes and flushes the image.

pub mod bzimage;
pub mod sys;

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Where the kernel says whether a kexec kernel is loaded.
pub const KEXEC_LOADED: &str = "/sys/kernel/kexec_loaded";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadFlags {
    /// Load as the crash kernel (kdump) instead of the reboot kernel.
    pub on_crash: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum KexecError {
    #[error(transparent)]
    Header(#[from] bzimage::HeaderError),
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the command line is {len} bytes but this kernel takes at most {max}: shorten it")]
    CmdlineTooLong { len: usize, max: u32 },
    #[error("the command line contains a NUL byte")]
    CmdlineNul,
    #[error("{context}: permission denied: needs root (CAP_SYS_BOOT){lockdown}")]
    NotPermitted { context: String, lockdown: String },
    #[error("{context}: signature verification failed: the kernel is not signed with a key this system trusts (Secure Boot / KEXEC_SIG); stage a signed kernel")]
    BadSignature { context: String },
    #[error("{context}: the kernel refused the image as not executable here (wrong architecture or format)")]
    NotExecutable { context: String },
    #[error(
        "{context}: busy: a kexec is already loaded or in progress; run `kupgrade unstage` first"
    )]
    Busy { context: String },
    #[error("{context}: not enough contiguous memory for the kernel and its initramfs; free memory or use a smaller initramfs")]
    NoMemory { context: String },
    #[error("{context}: invalid argument (a command line longer than the kernel accepts, or an initramfs it cannot take)")]
    Invalid { context: String },
    #[error("{context}: this kernel was built without kexec_file_load (CONFIG_KEXEC_FILE)")]
    Unsupported { context: String },
    #[error("{context}: {source}")]
    Os {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {detail}")]
    State { path: PathBuf, detail: String },
}

/// Describes the active kernel lockdown for an EPERM, if any.
fn lockdown_note() -> String {
    let mode = std::fs::read_to_string("/sys/kernel/security/lockdown")
        .ok()
        .and_then(|t| {
            t.split_whitespace()
                .find(|w| w.starts_with('['))
                .map(|w| w.trim_matches(['[', ']']).to_string())
        });
    match mode {
        Some(m) if m != "none" => format!(", and kernel lockdown ({m}) only allows signed kernels"),
        _ => String::new(),
    }
}

/// Maps an errno from a kexec syscall to an error that says what to do.
pub fn error_from_errno(errno: i32, context: &str) -> KexecError {
    let context = context.to_string();
    match errno {
        libc::EPERM => KexecError::NotPermitted {
            context,
            lockdown: lockdown_note(),
        },
        libc::EKEYREJECTED | libc::EBADMSG => KexecError::BadSignature { context },
        libc::ENOEXEC => KexecError::NotExecutable { context },
        libc::EBUSY => KexecError::Busy { context },
        libc::ENOMEM => KexecError::NoMemory { context },
        libc::EINVAL => KexecError::Invalid { context },
        libc::ENOSYS => KexecError::Unsupported { context },
        e => KexecError::Os {
            context,
            source: std::io::Error::from_raw_os_error(e),
        },
    }
}

fn open(path: &Path) -> Result<File, KexecError> {
    File::open(path).map_err(|source| KexecError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Checks the kernel and the command line, then loads them with
/// `kexec_file_load` for a later [`reboot_into_loaded`].
#[allow(unsafe_code)]
pub fn load(
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    flags: LoadFlags,
) -> Result<(), KexecError> {
    let image = bzimage::read(kernel)?;
    check_cmdline(cmdline, image.cmdline_size)?;
    let c_cmdline = CString::new(cmdline).map_err(|_| KexecError::CmdlineNul)?;
    let kernel_file = open(kernel)?;
    let initrd_file = initrd.map(open).transpose()?;
    let mut sys_flags = 0;
    if flags.on_crash {
        sys_flags |= sys::KEXEC_FILE_ON_CRASH;
    }
    let initrd_fd = match &initrd_file {
        Some(f) => f.as_raw_fd(),
        None => {
            sys_flags |= sys::KEXEC_FILE_NO_INITRAMFS;
            -1
        }
    };
    // SAFETY: the fds are open for the whole call (the Files live until the
    // end of this function); the command line pointer and its length
    // (including the NUL, as the syscall wants) come from a live CString.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            kernel_file.as_raw_fd(),
            initrd_fd,
            c_cmdline.as_bytes_with_nul().len() as libc::c_ulong,
            c_cmdline.as_ptr(),
            sys_flags,
        )
    };
    if rc != 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Err(error_from_errno(
            errno,
            &format!("loading {}", kernel.display()),
        ));
    }
    Ok(())
}

/// Refuses a command line the kernel would truncate or reject.
pub fn check_cmdline(cmdline: &str, cmdline_size: u32) -> Result<(), KexecError> {
    // cmdline_size excludes the terminating NUL.
    if cmdline.len() > cmdline_size as usize {
        return Err(KexecError::CmdlineTooLong {
            len: cmdline.len(),
            max: cmdline_size,
        });
    }
    Ok(())
}

/// Unloads the loaded kexec kernel, if any.
#[allow(unsafe_code)]
pub fn unload() -> Result<(), KexecError> {
    // SAFETY: with KEXEC_FILE_UNLOAD the kernel ignores the fds and the
    // command line; we pass invalid fds and a null pointer of length 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            -1,
            -1,
            0 as libc::c_ulong,
            std::ptr::null::<libc::c_char>(),
            sys::KEXEC_FILE_UNLOAD,
        )
    };
    if rc != 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Err(error_from_errno(errno, "unloading the kexec kernel"));
    }
    Ok(())
}

/// Whether a kexec kernel is loaded (`/sys/kernel/kexec_loaded`).
pub fn is_loaded() -> Result<bool, KexecError> {
    is_loaded_at(Path::new(KEXEC_LOADED))
}

pub fn is_loaded_at(path: &Path) -> Result<bool, KexecError> {
    let text = std::fs::read_to_string(path).map_err(|e| KexecError::State {
        path: path.to_path_buf(),
        detail: format!("{e} (no kexec support?)"),
    })?;
    match text.trim() {
        "0" => Ok(false),
        "1" => Ok(true),
        other => Err(KexecError::State {
            path: path.to_path_buf(),
            detail: format!("unexpected content {other:?}"),
        }),
    }
}

/// Syncs file systems and reboots into the loaded kernel. Returns only if
/// the kernel refused (nothing loaded, no permission).
#[allow(unsafe_code)]
pub fn reboot_into_loaded() -> Result<std::convert::Infallible, KexecError> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) with LINUX_REBOOT_CMD_KEXEC takes no pointer; glibc
    // adds the magic numbers. On success it does not return.
    let rc = unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_KEXEC) };
    let errno = if rc != 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    };
    Err(match errno {
        libc::EINVAL => KexecError::State {
            path: PathBuf::from(KEXEC_LOADED),
            detail: "no kexec kernel is loaded: run `kupgrade stage` again".into(),
        },
        e => error_from_errno(e, "rebooting into the loaded kernel"),
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
        std::fs::write(&p, "yes\n").unwrap();
        assert!(matches!(is_loaded_at(&p), Err(KexecError::State { .. })));
        assert!(is_loaded_at(&d.path().join("missing"))
            .unwrap_err()
            .to_string()
            .contains("no kexec support"));
    }

    #[test]
    fn errnos_map_to_actionable_errors() {
        let m = |e| error_from_errno(e, "loading k").to_string();
        assert!(m(libc::EPERM).contains("CAP_SYS_BOOT"));
        assert!(m(libc::EKEYREJECTED).contains("signature verification failed"));
        assert!(m(libc::EBADMSG).contains("signature verification failed"));
        assert!(m(libc::ENOEXEC).contains("architecture"));
        assert!(m(libc::EBUSY).contains("kupgrade unstage"));
        assert!(m(libc::ENOMEM).contains("contiguous memory"));
        assert!(m(libc::EINVAL).contains("command line"));
        assert!(m(libc::ENOSYS).contains("CONFIG_KEXEC_FILE"));
        assert!(m(libc::EIO).starts_with("loading k: "));
    }

    #[test]
    fn cmdline_longer_than_the_kernel_takes_is_refused_before_the_syscall() {
        check_cmdline(&"x".repeat(2047), 2047).unwrap();
        let e = check_cmdline(&"x".repeat(2048), 2047).unwrap_err();
        assert!(matches!(
            e,
            KexecError::CmdlineTooLong {
                len: 2048,
                max: 2047
            }
        ));
    }

    #[test]
    fn load_refuses_a_bad_kernel_before_the_syscall() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vmlinuz");
        std::fs::write(&p, b"not a kernel at all").unwrap();
        // An unprivileged or privileged caller alike gets the header error,
        // never an errno: the syscall is not reached.
        assert!(matches!(
            load(&p, None, "", LoadFlags::default()),
            Err(KexecError::Header(_))
        ));
    }
}
