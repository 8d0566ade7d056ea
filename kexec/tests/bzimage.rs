//! bzImage header checks on real Debian kernels and on bad inputs.
//!
//! The committed `vmlinuz-*.head` fixtures are the first 20 KiB of Debian's
//! 6.1.0-47 and 6.1.0-56 cloud-amd64 kernels: their whole real-mode setup
//! code ((39 + 1) * 512 bytes), which holds the header and the version
//! string (at 0x44c0). Set KUPGRADE_KERNELS_DIR to a directory of
//! `RELEASE/boot/vmlinuz-RELEASE` (target/kupgrade-vm/kernels) to also
//! check whole kernels.

use std::mem::offset_of;
use std::path::{Path, PathBuf};

use kexec::bzimage::{self, HeaderErrorKind as Kind};
use kexec::sys::{self, SetupHeader};
use kexec::{KexecError, LoadFlags};
use proptest::prelude::*;

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn fixture(name: &str) -> Vec<u8> {
    let path = fixture_path(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

const K47: &str = "vmlinuz-6.1.0-47-cloud-amd64.head";
const K56: &str = "vmlinuz-6.1.0-56-cloud-amd64.head";

/// The offset of a header field in the file.
macro_rules! at {
    ($field:ident) => {
        sys::SETUP_HEADER_OFFSET + offset_of!(SetupHeader, $field)
    };
}

/// A real kernel's start with `patch` applied.
fn patched(patch: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut k = fixture(K47);
    patch(&mut k);
    k
}

/// The error for bytes that must not parse, without a path.
fn err(bytes: &[u8]) -> bzimage::HeaderError {
    let e = bzimage::parse(bytes).expect_err("parsed");
    assert!(e.path().is_none());
    e
}

#[test]
fn real_debian_kernel_headers_parse_with_their_release() {
    for (file, release) in [(K47, "6.1.0-47-cloud-amd64"), (K56, "6.1.0-56-cloud-amd64")] {
        let k = bzimage::parse(&fixture(file)).unwrap();
        assert_eq!(k.release, release);
        assert!(
            k.version_string.starts_with(&format!(
                "{release} (debian-kernel@lists.debian.org) #1 SMP"
            )),
            "{}",
            k.version_string
        );
        assert_eq!(k.protocol_version, (2, 15));
        assert!(k.entry_64 && k.relocatable && k.above_4g);
        assert_eq!(k.cmdline_size, 2047);
        assert_eq!(k.max_cmdline_len(), 2016);
        assert_eq!(k.setup_sects, 39);
        assert!(k.init_size > 16 << 20, "{}", k.init_size);
        assert_eq!(k.file_size, 20480);
    }
}

#[test]
fn read_refuses_a_real_kernel_cut_after_its_setup_code() {
    let path = fixture_path(K47);
    let e = bzimage::read(&path).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            Kind::Incomplete {
                size: 20480,
                expected: 14_144_000
            }
        ),
        "{e}"
    );
    assert_eq!(e.path(), Some(path.as_path()));
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
}

#[test]
fn read_takes_a_file_as_long_as_its_header_says() {
    // The fixture with syssize 0: a "kernel" that is all setup code.
    let k = patched(|k| k[at!(syssize)..at!(syssize) + 4].fill(0));
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("vmlinuz");
    std::fs::write(&path, &k).unwrap();
    let image = bzimage::read(&path).unwrap();
    assert_eq!(image.release, "6.1.0-47-cloud-amd64");
    assert_eq!(image.file_size, 20480);
    // Longer than needed (a signature appended, say) is fine too.
    let mut longer = k.clone();
    longer.extend_from_slice(&[0xee; 4096]);
    std::fs::write(&path, &longer).unwrap();
    assert_eq!(bzimage::read(&path).unwrap().file_size, 20480 + 4096);
}

#[test]
fn whole_kernels_parse_when_available() {
    let Some(dir) = std::env::var_os("KUPGRADE_KERNELS_DIR") else {
        eprintln!(
            "note: KUPGRADE_KERNELS_DIR is not set: whole kernels were not read, only the truncated fixtures"
        );
        return;
    };
    let dir = PathBuf::from(dir);
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let release = entry.unwrap().file_name().to_string_lossy().into_owned();
        let path = dir.join(&release).join(format!("boot/vmlinuz-{release}"));
        if !path.exists() {
            continue;
        }
        let k = bzimage::read(&path).unwrap();
        assert_eq!(k.release, release);
        assert_eq!(k.file_size, std::fs::metadata(&path).unwrap().len());
        assert!(k.entry_64 && k.relocatable && k.above_4g);
        // The header alone, as parse sees it, says the same.
        let whole = std::fs::read(&path).unwrap();
        let parsed = bzimage::parse(&whole).unwrap();
        assert_eq!(parsed, k);
        seen += 1;
    }
    assert!(seen > 0, "no RELEASE/boot/vmlinuz-RELEASE under {dir:?}");
    eprintln!("read {seen} whole kernels from {dir:?}");
}

#[test]
fn an_empty_file_is_refused() {
    assert!(matches!(err(&[]).kind(), Kind::Empty));
    let path = fixture_path("empty");
    let e = bzimage::read(&path).unwrap_err();
    assert!(matches!(e.kind(), Kind::Empty));
    assert!(e.to_string().contains("empty"), "{e}");
}

#[test]
fn every_prefix_that_cuts_the_header_or_version_string_is_truncated() {
    let k = fixture(K47);
    // The version string's NUL is at 0x452a.
    let needed = 0x452b;
    assert_eq!(k[needed - 1], 0);
    for cut in 1..needed {
        assert!(
            matches!(err(&k[..cut]).kind(), Kind::Truncated { len } if *len == cut),
            "cut at {cut:#x}"
        );
    }
    for cut in [needed, needed + 1, k.len()] {
        assert!(bzimage::parse(&k[..cut]).is_ok(), "cut at {cut:#x}");
    }
    assert!(matches!(
        err(&fixture("truncated-header")).kind(),
        Kind::Truncated { len: 600 }
    ));
}

/// A minimal x86-64 ELF executable header, as a vmlinux starts.
fn elf_header() -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2; // ELFCLASS64
    h[5] = 1; // little-endian
    h[6] = 1; // EV_CURRENT
    h[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    h[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    h[20..24].copy_from_slice(&1u32.to_le_bytes());
    h[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    h.resize(8192, 0);
    h
}

#[test]
fn an_elf_vmlinux_is_refused_with_a_pointer_to_the_bzimage() {
    assert!(matches!(err(&elf_header()).kind(), Kind::Elf));
    assert!(matches!(err(&elf_header()[..4]).kind(), Kind::Elf));
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("vmlinux");
    std::fs::write(&path, elf_header()).unwrap();
    let e = bzimage::read(&path).unwrap_err();
    assert!(matches!(e.kind(), Kind::Elf));
    let msg = e.to_string();
    assert!(
        msg.contains("ELF vmlinux") && msg.contains("/boot/vmlinuz-"),
        "{msg}"
    );
}

#[test]
fn random_bytes_have_no_boot_header() {
    let mut x: u64 = 0x1234_5678_9abc_def1;
    for len in [sys::SETUP_HEADER_END, 4096, 65536] {
        let random: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(matches!(err(&random).kind(), Kind::NoMagic), "{len} bytes");
    }
    assert!(matches!(err(&[0u8; 4096]).kind(), Kind::NoMagic));
}

#[test]
fn a_header_without_the_boot_flag_is_damaged() {
    let k = patched(|k| k[at!(boot_flag)] = 0);
    assert!(matches!(err(&k).kind(), Kind::NoBootFlag));
}

#[test]
fn boot_protocols_older_than_2_12_are_refused() {
    for (version, minor) in [(0x020au16, 10u8), (0x020b, 11)] {
        let k =
            patched(|k| k[at!(version)..at!(version) + 2].copy_from_slice(&version.to_le_bytes()));
        let e = bzimage::parse(&k).unwrap_err();
        assert!(
            matches!(e.kind(), Kind::OldProtocol { major: 2, minor: m } if *m == minor),
            "{e}"
        );
        assert!(e.to_string().contains(&format!("2.{minor}")), "{e}");
    }
    let k =
        patched(|k| k[at!(version)..at!(version) + 2].copy_from_slice(&0x020cu16.to_le_bytes()));
    assert_eq!(bzimage::parse(&k).unwrap().protocol_version, (2, 12));
}

#[test]
fn a_32_bit_only_kernel_is_refused() {
    let k = patched(|k| k[at!(xloadflags)] &= !(sys::XLF_KERNEL_64 as u8));
    let e = bzimage::parse(&k).unwrap_err();
    assert!(matches!(e.kind(), Kind::Not64Bit), "{e}");
    assert!(e.to_string().contains("64-bit"), "{e}");
}

#[test]
fn a_kernel_that_cannot_sit_above_4g_is_refused() {
    let k = patched(|k| k[at!(xloadflags)] &= !(sys::XLF_CAN_BE_LOADED_ABOVE_4G as u8));
    assert!(matches!(err(&k).kind(), Kind::NotAbove4G));
}

#[test]
fn a_zimage_is_refused() {
    let k = patched(|k| k[at!(loadflags)] &= !sys::LOADED_HIGH);
    assert!(matches!(err(&k).kind(), Kind::NotLoadedHigh));
}

#[test]
fn a_kernel_that_is_not_relocatable_is_refused() {
    let k = patched(|k| k[at!(relocatable_kernel)] = 0);
    assert!(matches!(err(&k).kind(), Kind::NotRelocatable));
}

#[test]
fn unreadable_version_strings_are_refused() {
    let version_at = 0x44c0;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "unset pointer",
            patched(|k| k[at!(kernel_version)..at!(kernel_version) + 2].fill(0)),
        ),
        (
            "pointer past the setup code",
            patched(|k| {
                k[at!(kernel_version)..at!(kernel_version) + 2]
                    .copy_from_slice(&0x5000u16.to_le_bytes())
            }),
        ),
        ("control character", patched(|k| k[version_at + 3] = b'\n')),
        ("empty", patched(|k| k[version_at] = 0)),
        ("not UTF-8", patched(|k| k[version_at + 3] = 0xff)),
        (
            "release with a slash",
            patched(|k| k[version_at + 1] = b'/'),
        ),
        ("leading space", patched(|k| k[version_at] = b' ')),
        (
            "no NUL before the setup code ends",
            patched(|k| k[version_at..].fill(b'x')),
        ),
    ];
    for (what, k) in cases {
        let e = bzimage::parse(&k).unwrap_err();
        assert!(matches!(e.kind(), Kind::BadVersion { .. }), "{what}: {e}");
        assert!(e.to_string().contains("version string"), "{what}: {e}");
    }
}

#[test]
fn read_names_the_file_it_could_not_read() {
    let e = bzimage::read(Path::new("/nonexistent/vmlinuz")).unwrap_err();
    assert!(matches!(e.kind(), Kind::Read(_)));
    assert!(e.to_string().contains("/nonexistent/vmlinuz"), "{e}");
    assert!(std::error::Error::source(&e).is_some());
}

#[test]
fn load_refuses_bad_input_before_the_system_call() {
    // Every case fails before kexec_file_load: the test never loads.
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("not-a-kernel");
    std::fs::write(&bad, b"not a kernel at all").unwrap();
    let e = kexec::load(&bad, None, "", LoadFlags::default()).unwrap_err();
    assert!(matches!(e, KexecError::Header(_)), "{e}");
    assert!(e.to_string().contains("not-a-kernel"), "{e}");

    let missing = d.path().join("missing");
    let e = kexec::load(&missing, None, "", LoadFlags::default()).unwrap_err();
    assert!(matches!(e, KexecError::Open { .. }), "{e}");

    let kernel = d.path().join("vmlinuz");
    std::fs::write(
        &kernel,
        patched(|k| k[at!(syssize)..at!(syssize) + 4].fill(0)),
    )
    .unwrap();
    let e = kexec::load(&kernel, None, &"x".repeat(2017), LoadFlags::default()).unwrap_err();
    assert!(
        matches!(
            e,
            KexecError::CmdlineTooLong {
                len: 2017,
                max: 2016,
                ..
            }
        ),
        "{e}"
    );
    let e = kexec::load(&kernel, None, "root=/dev/vda\0x", LoadFlags::default()).unwrap_err();
    assert!(matches!(e, KexecError::CmdlineNul { at: 13 }), "{e}");
    let e = kexec::load(&kernel, Some(&missing), "", LoadFlags::default()).unwrap_err();
    assert!(
        matches!(&e, KexecError::Open { path, .. } if path == &missing),
        "{e}"
    );
}

proptest! {
    #[test]
    fn parse_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = bzimage::parse(&bytes);
    }

    #[test]
    fn parse_never_panics_on_a_damaged_real_header(
        cut in 0usize..=20480,
        flips in proptest::collection::vec((0usize..0x4600, any::<u8>()), 0..8),
    ) {
        let mut k = fixture(K56);
        for (at, value) in flips {
            k[at] = value;
        }
        k.truncate(cut);
        if let Ok(image) = bzimage::parse(&k) {
            prop_assert!(!image.release.is_empty() && !image.release.contains('/'));
            prop_assert!(image.entry_64 && image.relocatable && image.above_4g);
        }
    }
}
