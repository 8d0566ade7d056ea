//! Validating a bzImage before asking the kernel to load it, so that a bad
//! file is refused with a reason and the release it holds is known.
//!
//! ```text
//! 0x000  boot sector (legacy)              ... 0x1fe boot_flag 0xAA55
//! 0x1f1  struct setup_header               (0x202 "HdrS", 0x206 version, ...)
//! 0x200 + kernel_version: "6.1.0-56-cloud-amd64 (debian-kernel@...) #1 SMP ..."
//! (setup_sects + 1) * 512: the protected-mode kernel
//! ```

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use zerocopy::FromBytes;

use crate::sys::{self, SetupHeader};

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the file is empty: give the path of a kernel image, usually /boot/vmlinuz-RELEASE")]
    Empty,
    #[error(
        "the file is too short for a kernel header ({len} bytes): it is truncated or not a kernel"
    )]
    Truncated { len: usize },
    #[error("this is an ELF file (an uncompressed vmlinux?): kexec_file_load needs the compressed bzImage, usually /boot/vmlinuz-RELEASE")]
    Elf,
    #[error("no boot sector signature (0xAA55): this is not a Linux kernel image")]
    NoBootFlag,
    #[error("no \"HdrS\" boot header: this is not a Linux bzImage")]
    NoMagic,
    #[error(
        "boot protocol {major}.{minor:02} is too old: kexec of a 64-bit kernel needs 2.12 or newer"
    )]
    OldProtocol { major: u8, minor: u8 },
    #[error("the kernel has no 64-bit entry point (a 32-bit kernel?): it cannot be kexec'd from this 64-bit system")]
    Not64Bit,
    #[error("the kernel is not relocatable: kexec_file_load cannot place it")]
    NotRelocatable,
    #[error("the kernel version string is missing or unreadable")]
    NoVersion,
}

/// What a bzImage's header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BzImage {
    pub protocol_version: (u8, u8),
    /// The first word of the version string: what `uname -r` will say.
    pub release: String,
    pub version_string: String,
    pub relocatable: bool,
    pub entry_64: bool,
    pub above_4g: bool,
    /// Longest command line the kernel takes, without the NUL.
    pub cmdline_size: u32,
    pub setup_sects: u8,
    pub init_size: u32,
    pub file_size: u64,
}

/// Bytes of a bzImage that hold the header and, in practice, the version
/// string (it sits in the setup code, well below this).
pub const HEADER_READ_LEN: usize = 64 * 1024;

/// Parses the start of a bzImage (at least the setup header and the version
/// string; [`HEADER_READ_LEN`] bytes are enough). Never panics.
pub fn parse(bytes: &[u8]) -> Result<BzImage, HeaderError> {
    if bytes.is_empty() {
        return Err(HeaderError::Empty);
    }
    if bytes.starts_with(b"\x7fELF") {
        return Err(HeaderError::Elf);
    }
    let end = sys::SETUP_HEADER_OFFSET + std::mem::size_of::<SetupHeader>();
    let raw = bytes
        .get(sys::SETUP_HEADER_OFFSET..end)
        .ok_or(HeaderError::Truncated { len: bytes.len() })?;
    let h = SetupHeader::ref_from_bytes(raw)
        .map_err(|_| HeaderError::Truncated { len: bytes.len() })?;
    if h.boot_flag.get() != sys::BOOT_FLAG {
        return Err(HeaderError::NoBootFlag);
    }
    if h.header.get() != sys::HDRS_MAGIC {
        return Err(HeaderError::NoMagic);
    }
    let version = h.version.get();
    let (major, minor) = ((version >> 8) as u8, version as u8);
    if version < sys::MIN_PROTOCOL {
        return Err(HeaderError::OldProtocol { major, minor });
    }
    let xl = h.xloadflags.get();
    if xl & sys::XLF_KERNEL_64 == 0 {
        return Err(HeaderError::Not64Bit);
    }
    if h.relocatable_kernel == 0 {
        return Err(HeaderError::NotRelocatable);
    }
    let version_string =
        version_string(bytes, h.kernel_version.get()).ok_or(HeaderError::NoVersion)?;
    let release = version_string
        .split_whitespace()
        .next()
        .ok_or(HeaderError::NoVersion)?
        .to_string();
    Ok(BzImage {
        protocol_version: (major, minor),
        release,
        version_string,
        relocatable: true,
        entry_64: true,
        above_4g: xl & sys::XLF_CAN_BE_LOADED_ABOVE_4G != 0,
        cmdline_size: h.cmdline_size.get(),
        setup_sects: h.setup_sects,
        init_size: h.init_size.get(),
        file_size: bytes.len() as u64,
    })
}

/// The NUL-terminated string at `kernel_version + 0x200`, if printable.
fn version_string(bytes: &[u8], ptr: u16) -> Option<String> {
    if ptr == 0 {
        return None;
    }
    let start = ptr as usize + 0x200;
    let rest = bytes.get(start..)?;
    let len = rest.iter().take(512).position(|&b| b == 0)?;
    let s = std::str::from_utf8(&rest[..len]).ok()?;
    (!s.is_empty() && s.chars().all(|c| !c.is_control())).then(|| s.to_string())
}

/// Reads and parses the header of the kernel at `path`.
pub fn read(path: &Path) -> Result<BzImage, HeaderError> {
    let err = |source| HeaderError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(err)?;
    let size = f.metadata().map_err(err)?.len();
    let mut buf = Vec::with_capacity(HEADER_READ_LEN);
    f.by_ref()
        .take(HEADER_READ_LEN as u64)
        .read_to_end(&mut buf)
        .map_err(err)?;
    let mut image = parse(&buf)?;
    image.file_size = size;
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(Path::new(FIXTURES).join(name)).unwrap()
    }

    /// A truncated real Debian kernel.
    fn real() -> Vec<u8> {
        fixture("vmlinuz-6.1.0-47-cloud-amd64.head")
    }

    #[test]
    fn real_debian_kernels_parse() {
        for (file, release) in [
            ("vmlinuz-6.1.0-47-cloud-amd64.head", "6.1.0-47-cloud-amd64"),
            ("vmlinuz-6.1.0-56-cloud-amd64.head", "6.1.0-56-cloud-amd64"),
        ] {
            let k = parse(&fixture(file)).unwrap();
            assert_eq!(k.release, release);
            assert!(k.version_string.contains("debian"), "{}", k.version_string);
            assert!(k.protocol_version >= (2, 15));
            assert!(k.entry_64 && k.relocatable && k.above_4g);
            assert_eq!(k.cmdline_size, 2047);
        }
    }

    #[test]
    fn whole_kernels_parse_when_available() {
        let Ok(dir) = std::env::var("KUPGRADE_KERNELS_DIR") else {
            eprintln!("KUPGRADE_KERNELS_DIR is not set: only the truncated fixtures were parsed");
            return;
        };
        for e in std::fs::read_dir(dir).unwrap() {
            let release = e.unwrap().file_name().to_string_lossy().into_owned();
            let path = Path::new(&std::env::var("KUPGRADE_KERNELS_DIR").unwrap())
                .join(&release)
                .join(format!("boot/vmlinuz-{release}"));
            let k = read(&path).unwrap();
            assert_eq!(k.release, release);
            assert!(k.file_size > 1 << 20);
        }
    }

    #[test]
    fn empty_truncated_elf_and_random_inputs_are_refused() {
        assert!(matches!(parse(&[]), Err(HeaderError::Empty)));
        let k = real();
        for cut in [1, 0x1f1, 0x200, 0x26b] {
            assert!(
                matches!(parse(&k[..cut]), Err(HeaderError::Truncated { .. })),
                "cut at {cut}"
            );
        }
        // The version string lies past the header: cut there, it is unreadable.
        assert!(matches!(parse(&k[..0x300]), Err(HeaderError::NoVersion)));
        let mut elf = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0];
        elf.resize(4096, 0);
        assert!(matches!(parse(&elf), Err(HeaderError::Elf)));
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let random: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(matches!(
            parse(&random),
            Err(HeaderError::NoBootFlag | HeaderError::NoMagic)
        ));
    }

    #[test]
    fn a_header_without_magic_is_not_a_bzimage() {
        let mut k = real();
        k[0x202..0x206].copy_from_slice(b"XXXX");
        assert!(matches!(parse(&k), Err(HeaderError::NoMagic)));
        k[0x1fe] = 0;
        assert!(matches!(parse(&k), Err(HeaderError::NoBootFlag)));
    }

    #[test]
    fn old_protocol_32_bit_and_fixed_kernels_are_refused() {
        let mut k = real();
        k[sys::VERSION_OFFSET..sys::VERSION_OFFSET + 2].copy_from_slice(&0x020au16.to_le_bytes());
        let e = parse(&k).unwrap_err();
        assert!(matches!(
            e,
            HeaderError::OldProtocol {
                major: 2,
                minor: 10
            }
        ));
        assert!(e.to_string().contains("2.10"));

        let mut k = real();
        k[sys::XLOADFLAGS_OFFSET] &= !(sys::XLF_KERNEL_64 as u8);
        assert!(matches!(parse(&k), Err(HeaderError::Not64Bit)));

        let mut k = real();
        k[sys::RELOCATABLE_OFFSET] = 0;
        assert!(matches!(parse(&k), Err(HeaderError::NotRelocatable)));
    }

    #[test]
    fn committed_bad_fixtures_are_refused() {
        assert!(matches!(parse(&fixture("empty")), Err(HeaderError::Empty)));
        assert!(matches!(
            parse(&fixture("truncated-header")),
            Err(HeaderError::Truncated { .. })
        ));
    }

    #[test]
    fn no_input_prefix_or_corruption_panics() {
        let k = real();
        let mut x: u32 = 7;
        for i in 0..2000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let mut b = k[..(x as usize % k.len())].to_vec();
            if !b.is_empty() {
                let at = (x as usize >> 3) % b.len();
                b[at] ^= (i as u8) | 1;
            }
            let _ = parse(&b);
        }
    }

    #[test]
    fn read_reports_the_path_of_a_missing_file() {
        let e = read(Path::new("/nonexistent/vmlinuz")).unwrap_err();
        assert!(matches!(e, HeaderError::Read { .. }));
        assert!(e.to_string().contains("/nonexistent/vmlinuz"));
    }
}
