//! The crate's only `unsafe`: three system calls, each wrapped so that its
//! arguments are valid by construction (borrowed fds, a `CStr`).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::sys;

/// `kexec_file_load(kernel, initrd, cmdline)`; no initrd adds
/// `KEXEC_FILE_NO_INITRAMFS` to `flags`.
#[allow(unsafe_code)]
pub(crate) fn kexec_file_load(
    kernel: BorrowedFd<'_>,
    initrd: Option<BorrowedFd<'_>>,
    cmdline: &CStr,
    mut flags: libc::c_ulong,
) -> io::Result<()> {
    let initrd_fd = match initrd {
        Some(fd) => fd.as_raw_fd(),
        None => {
            flags |= sys::KEXEC_FILE_NO_INITRAMFS;
            -1
        }
    };
    let cmdline_len = cmdline.to_bytes_with_nul().len() as libc::c_ulong;
    // SAFETY: both fds are borrowed, so open for the whole call (-1 only
    // with KEXEC_FILE_NO_INITRAMFS, where the kernel ignores it); the
    // pointer and its length, NUL included as the kernel wants, come from a
    // CStr that outlives the call; the kernel only reads them.
    let rc = unsafe {
        libc::syscall(
            sys::SYS_KEXEC_FILE_LOAD,
            kernel.as_raw_fd(),
            initrd_fd,
            cmdline_len,
            cmdline.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `kexec_file_load(.., KEXEC_FILE_UNLOAD)`.
#[allow(unsafe_code)]
pub(crate) fn kexec_file_unload() -> io::Result<()> {
    // SAFETY: with KEXEC_FILE_UNLOAD the kernel looks at no other argument;
    // the fds are invalid and the command line is null with length 0.
    let rc = unsafe {
        libc::syscall(
            sys::SYS_KEXEC_FILE_LOAD,
            -1,
            -1,
            0 as libc::c_ulong,
            std::ptr::null::<libc::c_char>(),
            sys::KEXEC_FILE_UNLOAD,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `sync(2)`.
#[allow(unsafe_code)]
pub(crate) fn sync() {
    // SAFETY: sync takes no arguments, touches no memory of ours and
    // cannot fail.
    unsafe { libc::sync() }
}

/// `reboot(LINUX_REBOOT_CMD_KEXEC)`: returns only when the kernel refused.
#[allow(unsafe_code)]
pub(crate) fn reboot_kexec() -> io::Error {
    // SAFETY: this command takes no pointer argument (glibc supplies the
    // magic numbers); on success the call does not return.
    let rc = unsafe { libc::reboot(sys::LINUX_REBOOT_CMD_KEXEC) };
    if rc == 0 {
        // Not expected: the kernel jumps away on success. No errno.
        io::Error::other("reboot(LINUX_REBOOT_CMD_KEXEC) returned")
    } else {
        io::Error::last_os_error()
    }
}
