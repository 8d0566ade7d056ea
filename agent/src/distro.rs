//! The distribution's initramfs of a kernel release, with kupgrade's hook.
//!
//! `kupgrade stage` boots the new kernel through the initramfs the
//! distribution made for it, the one that knows how to assemble the root
//! (LVM, LUKS, RAID), when that initramfs carries kupgrade's hook
//! (initramfs-tools' `hooks/kupgrade` or dracut's `90kupgrade`). The hook
//! writes [`MARKER`] into it; this module reads the image (newc cpio
//! archives, concatenated, each plain or compressed) to find it.
//!
//! Which image, in order:
//! 1. `/boot/initrd.img-RELEASE` (Debian's name, initramfs-tools and
//!    dracut), else `/boot/initramfs-RELEASE.img` (dracut elsewhere), when
//!    it has the marker: used as it is.
//! 2. Else, with `mkinitramfs` or `dracut` installed, a new one built with
//!    it into `/run/kupgrade/` (so `/boot` and the boot loader's image stay
//!    as they are), which must have the marker: the hook is installed
//!    (the package registers it) but the image in `/boot` predates it.
//! 3. Else, when the release has no distribution image and the machine no
//!    generator (it boots without one): [`Choice::OwnInitramfs`].
//!    A distribution image without the hook and no way to rebuild it is an
//!    error: kupgrade's own initramfs could not mount every root it mounts.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the hooks' boot scripts have the distribution execute as the init
/// on the root (the package installs it there).
pub const CHAINED_INIT: &str = "/usr/lib/kupgrade/kupgrade-init";

/// Written into the initramfs by kupgrade's hooks (`key=value` lines:
/// `generator`, `version`, `modules`).
pub const MARKER: &str = "usr/lib/kupgrade/initramfs-hook";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an initramfs kupgrade can read: {what}")]
    Archive { path: PathBuf, what: String },
    #[error("cannot run {tool}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Build {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{path} has no kupgrade hook{}: is the kupgrade package installed completely? (it registers the hook with initramfs-tools and dracut) Or stage with --own-initramfs, if kupgrade's own initramfs can mount this root", rebuilt.as_ref().map(|t| format!(" even built anew with {t}")).unwrap_or_default())]
    NoHook {
        path: PathBuf,
        /// The generator it was built with, when kupgrade built it.
        rebuilt: Option<String>,
    },
}

/// What the hook wrote into an image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Marker {
    /// `initramfs-tools` or `dracut`.
    pub generator: String,
    /// kupgrade's version when the image was made.
    pub version: String,
    /// The modules the hook included for the restore.
    pub modules: Vec<String>,
}

impl Marker {
    pub fn parse(text: &str) -> Marker {
        let mut m = Marker::default();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("generator", v)) => m.generator = v.trim().into(),
                Some(("version", v)) => m.version = v.trim().into(),
                Some(("modules", v)) => {
                    m.modules = v.split_whitespace().map(str::to_string).collect()
                }
                _ => {}
            }
        }
        m
    }
}

/// The initramfs `stage` loads.
#[derive(Debug, PartialEq, Eq)]
pub enum Choice {
    Distribution {
        path: PathBuf,
        marker: Marker,
        /// Built by `stage` into the run directory with this generator.
        built_with: Option<String>,
    },
    /// The release has no distribution initramfs and the machine no
    /// generator: kupgrade builds its own.
    OwnInitramfs,
}

/// A distribution's initramfs generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generator {
    InitramfsTools,
    Dracut,
}

impl Generator {
    pub fn name(self) -> &'static str {
        match self {
            Generator::InitramfsTools => "mkinitramfs",
            Generator::Dracut => "dracut",
        }
    }

    /// The command that builds the initramfs of `release` into `out`.
    pub fn command(self, release: &str, out: &Path) -> Command {
        let mut c = Command::new(self.name());
        match self {
            Generator::InitramfsTools => {
                c.arg("-o").arg(out).arg(release);
            }
            Generator::Dracut => {
                c.args(["--force", "--quiet"]).arg(out).arg(release);
            }
        }
        c.env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        c
    }
}

/// What [`choose`] looks at, so that it is tested without a `/boot`.
pub trait Machine {
    fn exists(&mut self, path: &Path) -> bool;
    /// The marker in the image at `path`, if it has one.
    fn marker(&mut self, path: &Path) -> Result<Option<Marker>, Error>;
    fn generator(&mut self) -> Option<Generator>;
    /// Builds the initramfs of `release` into `out`.
    fn build(&mut self, generator: Generator, release: &str, out: &Path) -> Result<(), Error>;
}

/// The distribution images of `release`, in the order they are looked at.
pub fn boot_images(release: &str) -> [PathBuf; 2] {
    [
        PathBuf::from(format!("/boot/initrd.img-{release}")),
        PathBuf::from(format!("/boot/initramfs-{release}.img")),
    ]
}

/// Which initramfs to load for `release` (see the module docs); a built
/// one goes into `run_dir`.
pub fn choose(m: &mut dyn Machine, release: &str, run_dir: &Path) -> Result<Choice, Error> {
    let existing: Vec<PathBuf> = boot_images(release)
        .into_iter()
        .filter(|p| m.exists(p))
        .collect();
    for path in &existing {
        if let Some(marker) = m.marker(path)? {
            return Ok(Choice::Distribution {
                path: path.clone(),
                marker,
                built_with: None,
            });
        }
    }
    let Some(generator) = m.generator() else {
        return match existing.into_iter().next() {
            Some(path) => Err(Error::NoHook {
                path,
                rebuilt: None,
            }),
            None => Ok(Choice::OwnInitramfs),
        };
    };
    let out = run_dir.join(format!("initrd-{release}.img"));
    m.build(generator, release, &out)?;
    match m.marker(&out)? {
        Some(marker) => Ok(Choice::Distribution {
            path: out,
            marker,
            built_with: Some(generator.name().into()),
        }),
        None => Err(Error::NoHook {
            path: out,
            rebuilt: Some(generator.name().into()),
        }),
    }
}

/// The machine.
pub struct RealMachine;

impl Machine for RealMachine {
    fn exists(&mut self, path: &Path) -> bool {
        path.exists()
    }

    fn marker(&mut self, path: &Path) -> Result<Option<Marker>, Error> {
        let bytes = fs::read(path).map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?;
        match find_file(&bytes, MARKER) {
            Ok(found) => Ok(found.map(|b| Marker::parse(&String::from_utf8_lossy(&b)))),
            // A compression kupgrade does not read (lz4, xz, ...): the
            // distribution's own lister reads every one its generator makes.
            Err(ArchiveError::Compression(_)) => listed(path),
            Err(e) => Err(Error::Archive {
                path: path.into(),
                what: e.to_string(),
            }),
        }
    }

    fn generator(&mut self) -> Option<Generator> {
        let on_path = |name: &str| {
            ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
                .iter()
                .any(|d| Path::new(d).join(name).exists())
        };
        if on_path("mkinitramfs") {
            Some(Generator::InitramfsTools)
        } else if on_path("dracut") {
            Some(Generator::Dracut)
        } else {
            None
        }
    }

    fn build(&mut self, generator: Generator, release: &str, out: &Path) -> Result<(), Error> {
        if let Some(dir) = out.parent() {
            fs::create_dir_all(dir).map_err(|source| Error::Read {
                path: dir.into(),
                source,
            })?;
        }
        let mut cmd = generator.command(release, out);
        let output = cmd.output().map_err(|source| Error::Spawn {
            tool: generator.name().into(),
            source,
        })?;
        if output.status.success() {
            return Ok(());
        }
        Err(Error::Build {
            command: format!("{} {release}", generator.name()),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// The marker's presence by `lsinitramfs` (initramfs-tools) or `lsinitrd`
/// (dracut); its contents are not read this way.
fn listed(path: &Path) -> Result<Option<Marker>, Error> {
    for tool in ["lsinitramfs", "lsinitrd"] {
        let Ok(out) = Command::new(tool)
            .arg(path)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
        else {
            continue;
        };
        if !out.status.success() {
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let found = text
            .lines()
            .any(|l| l.trim().trim_start_matches("./") == MARKER);
        return Ok(found.then(|| Marker {
            generator: "unknown".into(),
            version: "unknown".into(),
            modules: Vec::new(),
        }));
    }
    Err(Error::Archive {
        path: path.into(),
        what: "compressed with a method kupgrade does not read, and neither lsinitramfs nor lsinitrd is installed".into(),
    })
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArchiveError {
    #[error("a compression kupgrade does not read ({0})")]
    Compression(&'static str),
    #[error("{0} at byte {1}")]
    Malformed(&'static str, usize),
    #[error("the {0} stream does not decompress: {1}")]
    Decompress(&'static str, String),
}

/// The bytes of the file `name` in an initramfs image: newc cpio archives
/// one after the other, each plain or compressed (a compressed one runs to
/// the end of the image, as the kernel reads it). The last copy wins, as
/// when the kernel unpacks them.
pub fn find_file(image: &[u8], name: &str) -> Result<Option<Vec<u8>>, ArchiveError> {
    let mut found = None;
    let mut at = 0;
    while at < image.len() {
        if image[at] == 0 {
            at += 1;
            continue;
        }
        let rest = &image[at..];
        if rest.starts_with(b"07070") {
            let (end, hit) = scan_newc(image, at, name)?;
            if hit.is_some() {
                found = hit;
            }
            at = end;
            continue;
        }
        let inner = decompress(rest)?;
        if let Some(hit) = find_file(&inner, name)? {
            found = Some(hit);
        }
        break;
    }
    Ok(found)
}

fn decompress(data: &[u8]) -> Result<Vec<u8>, ArchiveError> {
    let magic = |m: &[u8]| data.starts_with(m);
    let mut out = Vec::new();
    // Padding may follow the stream, which the decoders take for a broken
    // next stream: what they unpacked before it is the archive.
    let tolerant = |r: std::io::Result<usize>, out: &Vec<u8>, what| match r {
        Err(e) if out.is_empty() => Err(ArchiveError::Decompress(what, e.to_string())),
        _ => Ok(()),
    };
    if magic(&[0x1f, 0x8b]) {
        let r = flate2::read::MultiGzDecoder::new(data).read_to_end(&mut out);
        tolerant(r, &out, "gzip")?;
    } else if magic(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let mut d = zstd::stream::read::Decoder::new(data)
            .map_err(|e| ArchiveError::Decompress("zstd", e.to_string()))?;
        let r = d.read_to_end(&mut out);
        tolerant(r, &out, "zstd")?;
    } else {
        let name = if magic(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            "xz"
        } else if magic(&[0x02, 0x21, 0x4c, 0x18]) || magic(&[0x04, 0x22, 0x4d, 0x18]) {
            "lz4"
        } else if magic(b"BZh") {
            "bzip2"
        } else if magic(&[0x89, b'L', b'Z', b'O']) {
            "lzop"
        } else if magic(&[0x5d, 0x00]) {
            "lzma"
        } else {
            "unknown"
        };
        return Err(ArchiveError::Compression(name));
    }
    Ok(out)
}

/// Reads one newc archive from `at` to its trailer; returns where it ends
/// and the contents of `name` if it holds it.
fn scan_newc(
    image: &[u8],
    mut at: usize,
    name: &str,
) -> Result<(usize, Option<Vec<u8>>), ArchiveError> {
    const HEADER: usize = 110;
    let align = |n: usize| n.div_ceil(4) * 4;
    let mut found = None;
    loop {
        let header = image
            .get(at..at + HEADER)
            .ok_or(ArchiveError::Malformed("truncated cpio header", at))?;
        if !header.starts_with(b"07070") {
            return Err(ArchiveError::Malformed("not a newc cpio header", at));
        }
        let field = |i: usize| -> Result<usize, ArchiveError> {
            let hex = &header[6 + 8 * i..6 + 8 * (i + 1)];
            std::str::from_utf8(hex)
                .ok()
                .and_then(|s| usize::from_str_radix(s, 16).ok())
                .ok_or(ArchiveError::Malformed("bad cpio header field", at))
        };
        let file_size = field(6)?;
        let name_size = field(11)?;
        let name_start = at + HEADER;
        let name_bytes = image
            .get(name_start..name_start + name_size)
            .ok_or(ArchiveError::Malformed("truncated cpio name", at))?;
        let entry = String::from_utf8_lossy(name_bytes.split(|&b| b == 0).next().unwrap_or(&[]))
            .into_owned();
        let data_start = align(name_start + name_size);
        let data = image
            .get(data_start..data_start + file_size)
            .ok_or(ArchiveError::Malformed("truncated cpio data", at))?;
        at = align(data_start + file_size);
        if entry == "TRAILER!!!" {
            return Ok((at, found));
        }
        if entry.trim_start_matches("./").trim_start_matches('/') == name {
            found = Some(data.to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A newc archive of `(name, contents)`, with its trailer.
    fn newc(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let push = |name: &str, data: &[u8], out: &mut Vec<u8>| {
            let header = format!(
                "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                1, 0o100644, 0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0
            );
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
            out.extend_from_slice(data);
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
        };
        for (name, data) in files {
            push(name, data, &mut out);
        }
        push("TRAILER!!!", b"", &mut out);
        out
    }

    const MARKER_TEXT: &[u8] =
        b"# kupgrade\ngenerator=initramfs-tools\nversion=0.1.0\nmodules=nf_tables nd_pmem\n";

    /// An early microcode archive, plain, then the main one compressed, as
    /// mkinitramfs and dracut write them.
    fn image(compress: fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
        let mut img = newc(&[("kernel/x86/microcode/GenuineIntel.bin", b"ucode")]);
        img.resize(img.len().div_ceil(512) * 512, 0);
        img.extend(compress(&newc(&[
            ("init", b"#!/bin/sh"),
            (MARKER, MARKER_TEXT),
            ("scripts/init-bottom/kupgrade", b"#!/bin/sh"),
        ])));
        img
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        zstd::encode_all(data, 3).unwrap()
    }

    #[test]
    fn the_marker_is_found_behind_an_early_archive_whatever_the_compression() {
        for (name, compress) in [
            ("plain", (|d: &[u8]| d.to_vec()) as fn(&[u8]) -> Vec<u8>),
            ("gzip", gzip),
            ("zstd", zstd),
        ] {
            let found = find_file(&image(compress), MARKER).unwrap();
            assert_eq!(found.as_deref(), Some(MARKER_TEXT), "{name}");
            let m = Marker::parse(&String::from_utf8_lossy(MARKER_TEXT));
            assert_eq!(m.generator, "initramfs-tools");
            assert_eq!(m.modules, ["nf_tables", "nd_pmem"]);
            assert_eq!(find_file(&image(compress), "usr/lib/none").unwrap(), None);
        }
    }

    #[test]
    fn padding_after_a_compressed_archive_is_no_error() {
        for compress in [gzip as fn(&[u8]) -> Vec<u8>, zstd] {
            let mut img = image(compress);
            img.extend([0u8; 300]);
            assert_eq!(
                find_file(&img, MARKER).unwrap().as_deref(),
                Some(MARKER_TEXT)
            );
        }
    }

    #[test]
    fn names_with_a_leading_dot_slash_match_and_the_last_copy_wins() {
        let mut img = newc(&[("./usr/lib/kupgrade/initramfs-hook", b"old")]);
        img.extend(zstd(&newc(&[(MARKER, b"new")])));
        assert_eq!(
            find_file(&img, MARKER).unwrap().as_deref(),
            Some(&b"new"[..])
        );
    }

    #[test]
    fn unknown_compressions_and_broken_archives_say_so() {
        let mut img = newc(&[("early", b"")]);
        img.extend([0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2]);
        assert_eq!(
            find_file(&img, MARKER).unwrap_err(),
            ArchiveError::Compression("xz")
        );
        let whole = newc(&[(MARKER, b"x")]);
        let e = find_file(&whole[..120], MARKER).unwrap_err();
        assert!(matches!(e, ArchiveError::Malformed(..)), "{e}");
        let e = find_file(&zstd(&whole)[..20], MARKER).unwrap_err();
        assert!(matches!(e, ArchiveError::Decompress("zstd", _)), "{e}");
    }

    /// A [`Machine`] with the given images (path -> has the marker) and
    /// generator; a build makes an image with `built_has_marker`.
    #[derive(Default)]
    struct Fake {
        images: Vec<(PathBuf, bool)>,
        generator: Option<Generator>,
        built_has_marker: bool,
        builds: Vec<String>,
    }

    impl Machine for Fake {
        fn exists(&mut self, path: &Path) -> bool {
            self.images.iter().any(|(p, _)| p == path)
        }
        fn marker(&mut self, path: &Path) -> Result<Option<Marker>, Error> {
            let has = self
                .images
                .iter()
                .find(|(p, _)| p == path)
                .is_some_and(|(_, m)| *m);
            Ok(has.then(|| Marker {
                generator: "initramfs-tools".into(),
                ..Marker::default()
            }))
        }
        fn generator(&mut self) -> Option<Generator> {
            self.generator
        }
        fn build(&mut self, g: Generator, release: &str, out: &Path) -> Result<(), Error> {
            self.builds
                .push(format!("{} {release} {}", g.name(), out.display()));
            self.images.push((out.into(), self.built_has_marker));
            Ok(())
        }
    }

    const REL: &str = "6.12.9-cloud-amd64";

    fn run(f: &mut Fake) -> Result<Choice, Error> {
        choose(f, REL, Path::new("/run/kupgrade"))
    }

    #[test]
    fn an_image_in_boot_with_the_hook_is_used_as_it_is() {
        let mut f = Fake {
            images: vec![(boot_images(REL)[0].clone(), true)],
            generator: Some(Generator::InitramfsTools),
            ..Fake::default()
        };
        let Choice::Distribution {
            path, built_with, ..
        } = run(&mut f).unwrap()
        else {
            panic!("not the distribution's")
        };
        assert_eq!(path, PathBuf::from(format!("/boot/initrd.img-{REL}")));
        assert_eq!(built_with, None);
        assert!(f.builds.is_empty());
    }

    #[test]
    fn without_the_hook_one_is_built_into_the_run_directory_and_must_have_it() {
        let mut f = Fake {
            images: vec![(boot_images(REL)[0].clone(), false)],
            generator: Some(Generator::Dracut),
            built_has_marker: true,
            ..Fake::default()
        };
        let out = format!("/run/kupgrade/initrd-{REL}.img");
        assert_eq!(
            run(&mut f).unwrap(),
            Choice::Distribution {
                path: out.clone().into(),
                marker: Marker {
                    generator: "initramfs-tools".into(),
                    ..Marker::default()
                },
                built_with: Some("dracut".into()),
            }
        );
        assert_eq!(f.builds, [format!("dracut {REL} {out}")]);

        f.images.clear();
        f.builds.clear();
        f.built_has_marker = false;
        let e = run(&mut f).unwrap_err().to_string();
        assert!(
            e.contains("has no kupgrade hook even built anew with dracut"),
            "{e}"
        );
    }

    #[test]
    fn only_a_machine_with_neither_image_nor_generator_gets_kupgrade_s_own() {
        assert_eq!(run(&mut Fake::default()).unwrap(), Choice::OwnInitramfs);
        let mut f = Fake {
            images: vec![(boot_images(REL)[1].clone(), false)],
            ..Fake::default()
        };
        let e = run(&mut f).unwrap_err().to_string();
        assert!(
            e.contains(&format!("/boot/initramfs-{REL}.img has no kupgrade hook:"))
                && e.contains("--own-initramfs"),
            "{e}"
        );
    }

    /// A real image from initramfs-tools or dracut (scripts/package-test
    /// runs this with the one a kernel's postinst made in a Debian tree).
    #[test]
    #[ignore = "needs KUPGRADE_TEST_INITRD, a distribution's initramfs with the hook"]
    fn a_distribution_image_has_the_marker() {
        let path = std::env::var("KUPGRADE_TEST_INITRD").expect("KUPGRADE_TEST_INITRD");
        let generator = std::env::var("KUPGRADE_TEST_GENERATOR").expect("KUPGRADE_TEST_GENERATOR");
        let marker = RealMachine
            .marker(Path::new(&path))
            .unwrap()
            .expect("no marker in the image");
        assert_eq!(marker.generator, generator);
        assert!(marker.modules.iter().any(|m| m == "nd_pmem"), "{marker:?}");
    }

    #[test]
    fn the_generators_build_into_the_given_file() {
        let c = Generator::InitramfsTools.command(REL, Path::new("/run/x.img"));
        let args: Vec<_> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args, ["-o", "/run/x.img", REL]);
        let c = Generator::Dracut.command(REL, Path::new("/run/x.img"));
        let args: Vec<_> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args, ["--force", "--quiet", "/run/x.img", REL]);
    }
}
