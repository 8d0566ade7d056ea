//! Validating an x86 bzImage before asking the kernel to load it, so that a
//! bad file is refused with a reason and the release it holds is known.
//!
//! ```text
//! 0x000                 legacy boot sector       0x1fe: boot_flag 0xAA55
//! 0x1f1 .. 0x26c        struct setup_header      (see `sys`)
//! 0x200 + kernel_version  "6.1.0-56-cloud-amd64 (debian-kernel@...) #1 SMP ..."\0
//! (setup_sects + 1) * 512 end of the real-mode setup code; the
//!                         protected-mode kernel follows, syssize * 16 bytes
//! ```
//!
//! The checks are those the kernel's own x86-64 `kexec_file_load` loader
//! makes (so that it never answers a bare ENOEXEC for a file we let
//! through), plus a readable version string and a complete file.
//! [`parse`] works on any prefix that holds the header and the version
//! string; [`read`] reads only that much of a file, and also checks that
//! the file is as long as its header says.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use zerocopy::FromBytes;

use crate::sys::{self, SetupHeader};

/// What made a file unfit for `kexec_file_load`.
#[derive(Debug, thiserror::Error)]
pub enum HeaderErrorKind {
    #[error("cannot read it")]
    Read(#[source] io::Error),
    #[error("the file is empty: give the path of a kernel image, usually /boot/vmlinuz-RELEASE")]
    Empty,
    #[error("the file ends after {len} bytes, inside the kernel's boot header or setup code: it is truncated or not a kernel; copy or reinstall it")]
    Truncated { len: usize },
    #[error("the file is {size} bytes but its header says the kernel is {expected}: it is truncated; copy or reinstall it")]
    Incomplete { size: u64, expected: u64 },
    #[error("this is an ELF vmlinux: kexec_file_load needs the compressed bzImage, usually /boot/vmlinuz-RELEASE")]
    Elf,
    #[error("no \"HdrS\" boot header: this is not an x86 Linux kernel image; give the path of a bzImage, usually /boot/vmlinuz-RELEASE")]
    NoMagic,
    #[error("the boot sector signature 0xAA55 is missing although the header says \"HdrS\": the image is damaged; copy or reinstall it")]
    NoBootFlag,
    #[error("boot protocol {major}.{minor:02} is too old to kexec as a 64-bit kernel (2.12 or newer is needed): use a newer kernel")]
    OldProtocol { major: u8, minor: u8 },
    #[error("this is a zImage, not a bzImage (LOADED_HIGH is not set): kexec_file_load cannot load it; use a bzImage")]
    NotLoadedHigh,
    #[error("the kernel has no 64-bit entry point (a 32-bit-only kernel?): this 64-bit system cannot kexec it; use an x86-64 kernel")]
    Not64Bit,
    #[error("the kernel cannot be placed above 4 GiB (XLF_CAN_BE_LOADED_ABOVE_4G is not set), which kexec_file_load on x86-64 requires; use an x86-64 kernel")]
    NotAbove4G,
    #[error("the kernel is not relocatable (built without CONFIG_RELOCATABLE): kexec_file_load cannot place it; use a relocatable kernel")]
    NotRelocatable,
    #[error("the kernel version string is unreadable ({detail}): the image is damaged or not a Linux kernel; copy or reinstall it")]
    BadVersion { detail: &'static str },
}

/// A file (or buffer) that is not a kernel `kexec_file_load` can take:
/// the reason, and the path it was read from.
#[derive(Debug)]
pub struct HeaderError {
    path: Option<PathBuf>,
    kind: HeaderErrorKind,
}

impl HeaderError {
    fn at(path: &Path, kind: HeaderErrorKind) -> Self {
        HeaderError {
            path: Some(path.to_path_buf()),
            kind,
        }
    }

    pub fn kind(&self) -> &HeaderErrorKind {
        &self.kind
    }

    /// The file, for errors from [`read`].
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

impl From<HeaderErrorKind> for HeaderError {
    fn from(kind: HeaderErrorKind) -> Self {
        HeaderError { path: None, kind }
    }
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "kernel {}: ", path.display())?;
        }
        self.kind.fmt(f)
    }
}

impl std::error::Error for HeaderError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.kind)
    }
}

/// What a bzImage's header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BzImage {
    /// Boot protocol (major, minor), e.g. (2, 15).
    pub protocol_version: (u8, u8),
    /// The first word of the version string: what `uname -r` will say,
    /// and the name of its /lib/modules directory.
    pub release: String,
    pub version_string: String,
    pub relocatable: bool,
    pub entry_64: bool,
    pub above_4g: bool,
    /// Longest command line the kernel takes, without the NUL. Through
    /// kexec_file_load a little less: see [`max_cmdline_len`].
    pub cmdline_size: u32,
    /// Sectors of real-mode setup code as written in the header (0 means 4).
    pub setup_sects: u8,
    /// Memory the kernel needs from its load address to boot.
    pub init_size: u32,
    /// Length of the file ([`read`]) or of the buffer given to [`parse`].
    pub file_size: u64,
}

impl BzImage {
    /// The longest command line this kernel takes through kexec_file_load.
    pub fn max_cmdline_len(&self) -> usize {
        max_cmdline_len(self.cmdline_size)
    }
}

/// The longest command line, without its NUL, that the x86-64
/// kexec_file_load accepts for a kernel whose header says `cmdline_size`:
/// the kernel counts the NUL and keeps room to append `elfcorehdr=`.
pub fn max_cmdline_len(cmdline_size: u32) -> usize {
    (cmdline_size as usize).saturating_sub(1 + sys::ELFCOREHDR_RESERVE)
}

/// Longest version string looked at; real ones are about 100 bytes.
const VERSION_MAX: usize = 512;

/// Parses the start of a bzImage: at least its setup header and version
/// string (the real-mode setup code, `(setup_sects + 1) * 512` bytes, holds
/// both). Never panics, whatever the bytes.
pub fn parse(bytes: &[u8]) -> Result<BzImage, HeaderError> {
    Ok(parse_kind(bytes)?)
}

/// Reads and checks the kernel at `path`: the header, the version string
/// and the file's length, reading only the first few KiB.
pub fn read(path: &Path) -> Result<BzImage, HeaderError> {
    let file = File::open(path).map_err(|e| HeaderError::at(path, HeaderErrorKind::Read(e)))?;
    read_file(&file, path)
}

/// [`read`] on a file already open, so that the caller can hand the same
/// file to the kernel.
pub fn read_file(file: &File, path: &Path) -> Result<BzImage, HeaderError> {
    read_kind(file).map_err(|kind| HeaderError::at(path, kind))
}

fn read_kind(file: &File) -> Result<BzImage, HeaderErrorKind> {
    let size = file.metadata().map_err(HeaderErrorKind::Read)?.len();
    let head = read_prefix(file, sys::SETUP_HEADER_END)?;
    let need = version_window(check_header(&head)?).1;
    let buf = if need > head.len() {
        read_prefix(file, need)?
    } else {
        head
    };
    let mut image = parse_kind(&buf)?;
    image.file_size = size;
    let h = check_header(&buf)?;
    let expected = setup_end(h) as u64 + u64::from(h.syssize.get()) * 16;
    if size < expected {
        return Err(HeaderErrorKind::Incomplete { size, expected });
    }
    Ok(image)
}

/// Up to `len` bytes from the start of `file`, fewer if it is shorter.
fn read_prefix(file: &File, len: usize) -> Result<Vec<u8>, HeaderErrorKind> {
    let mut buf = vec![0; len];
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HeaderErrorKind::Read(e)),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

fn parse_kind(bytes: &[u8]) -> Result<BzImage, HeaderErrorKind> {
    let h = check_header(bytes)?;
    let version_string = version_string(bytes, h)?;
    let release = version_string
        .split(' ')
        .next()
        .filter(|r| is_release(r))
        .ok_or(HeaderErrorKind::BadVersion {
            detail: "its first word is not a release name",
        })?
        .to_string();
    let xl = h.xloadflags.get();
    Ok(BzImage {
        protocol_version: protocol(h),
        release,
        version_string,
        relocatable: h.relocatable_kernel != 0,
        entry_64: xl & sys::XLF_KERNEL_64 != 0,
        above_4g: xl & sys::XLF_CAN_BE_LOADED_ABOVE_4G != 0,
        cmdline_size: h.cmdline_size.get(),
        setup_sects: h.setup_sects,
        init_size: h.init_size.get(),
        file_size: bytes.len() as u64,
    })
}

/// Every check that needs only the header, in the kernel loader's order.
fn check_header(bytes: &[u8]) -> Result<&SetupHeader, HeaderErrorKind> {
    if bytes.is_empty() {
        return Err(HeaderErrorKind::Empty);
    }
    if bytes.starts_with(b"\x7fELF") {
        return Err(HeaderErrorKind::Elf);
    }
    let h = bytes
        .get(sys::SETUP_HEADER_OFFSET..sys::SETUP_HEADER_END)
        .and_then(|raw| SetupHeader::ref_from_bytes(raw).ok())
        .ok_or(HeaderErrorKind::Truncated { len: bytes.len() })?;
    if h.header.get() != sys::HDRS_MAGIC {
        return Err(HeaderErrorKind::NoMagic);
    }
    if h.boot_flag.get() != sys::BOOT_FLAG {
        return Err(HeaderErrorKind::NoBootFlag);
    }
    if h.version.get() < sys::MIN_PROTOCOL {
        let (major, minor) = protocol(h);
        return Err(HeaderErrorKind::OldProtocol { major, minor });
    }
    if h.loadflags & sys::LOADED_HIGH == 0 {
        return Err(HeaderErrorKind::NotLoadedHigh);
    }
    let xl = h.xloadflags.get();
    if xl & sys::XLF_KERNEL_64 == 0 {
        return Err(HeaderErrorKind::Not64Bit);
    }
    if xl & sys::XLF_CAN_BE_LOADED_ABOVE_4G == 0 {
        return Err(HeaderErrorKind::NotAbove4G);
    }
    // The kernel's loader relies on XLF_KERNEL_64 alone, but a kernel that
    // says it is not relocatable cannot run where kexec puts it.
    if h.relocatable_kernel == 0 {
        return Err(HeaderErrorKind::NotRelocatable);
    }
    Ok(h)
}

fn protocol(h: &SetupHeader) -> (u8, u8) {
    let [minor, major] = h.version.get().to_le_bytes();
    (major, minor)
}

/// End of the real-mode setup code, where the protected-mode kernel starts.
fn setup_end(h: &SetupHeader) -> usize {
    let sects = match h.setup_sects {
        0 => sys::DEFAULT_SETUP_SECTS,
        n => n,
    };
    (usize::from(sects) + 1) * sys::SECTOR_SIZE
}

/// Where the version string may lie: from its pointer to at most
/// [`VERSION_MAX`] bytes on, inside the setup code. Empty if the pointer is
/// unset.
fn version_window(h: &SetupHeader) -> (usize, usize) {
    let ptr = usize::from(h.kernel_version.get());
    if ptr == 0 {
        return (0, 0);
    }
    let start = sys::REAL_MODE_BASE + ptr;
    (start, (start + VERSION_MAX).min(setup_end(h)))
}

fn version_string(bytes: &[u8], h: &SetupHeader) -> Result<String, HeaderErrorKind> {
    let bad = |detail| HeaderErrorKind::BadVersion { detail };
    let (start, end) = version_window(h);
    if start >= end {
        return Err(bad("its pointer is unset or outside the setup code"));
    }
    let window = &bytes[start.min(bytes.len())..end.min(bytes.len())];
    let Some(len) = window.iter().position(|&b| b == 0) else {
        return Err(if bytes.len() < end {
            HeaderErrorKind::Truncated { len: bytes.len() }
        } else {
            bad("it has no end")
        });
    };
    let text = std::str::from_utf8(&window[..len]).map_err(|_| bad("it is not UTF-8"))?;
    if text.is_empty() || text.chars().any(char::is_control) {
        return Err(bad("it is empty or holds control characters"));
    }
    Ok(text.to_string())
}

/// A release name that is safe to use as a path component
/// (/lib/modules/RELEASE) and no longer than `uname -r` allows.
fn is_release(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 64
        && r != "."
        && r != ".."
        && r.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_names_that_would_escape_a_path_are_refused() {
        assert!(is_release("6.1.0-56-cloud-amd64"));
        assert!(is_release("6.12.0+deb13-amd64"));
        for bad in [
            "",
            ".",
            "..",
            "../../etc",
            "a/b",
            "tab\there",
            &"9".repeat(65),
        ] {
            assert!(!is_release(bad), "{bad:?}");
        }
    }

    #[test]
    fn max_cmdline_len_leaves_room_for_the_nul_and_elfcorehdr() {
        assert_eq!(max_cmdline_len(2047), 2016);
        assert_eq!(max_cmdline_len(255), 224);
        assert_eq!(max_cmdline_len(10), 0);
    }
}
