//! Builds the initramfs of a kernel release: `kupgrade-init` as `/init`, the
//! modules it needs from `/lib/modules/<release>`, and their load order, as a
//! newc cpio archive compressed with a method that kernel can unpack.
//!
//! The same builder makes the initramfs of `kupgrade stage` and of the QEMU
//! harness's first boot, so the normal boot path is exercised every time.

mod cpio;
pub mod format;
pub mod modules;

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::cpio::Cpio;
use crate::format::ModuleFormat;
use crate::modules::{ModuleIndex, Resolution};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the initramfs to {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no modules for release {release} under {dir}: install the kernel's modules package first"
    )]
    NoModules { release: String, dir: PathBuf },
    #[error(transparent)]
    Modules(#[from] modules::Error),
    #[error("cannot unpack the {format} module {path}")]
    Decompress {
        path: PathBuf,
        format: ModuleFormat,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a static executable (it names an interpreter): build kupgrade-init with crt-static")]
    NotStatic { path: PathBuf },
}

/// How the archive is compressed; the kernel must have the matching `CONFIG_RD_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Zstd,
    Gzip,
    None,
}

impl Compression {
    /// Picks the best method the kernel's config (`/boot/config-<release>`)
    /// supports; without a config, gzip, which every distribution kernel has.
    pub fn for_kernel_config(config: Option<&str>) -> Compression {
        let Some(config) = config else {
            return Compression::Gzip;
        };
        let has = |key: &str| config.lines().any(|l| l.trim() == format!("{key}=y"));
        if has("CONFIG_RD_ZSTD") {
            Compression::Zstd
        } else if has("CONFIG_RD_GZIP") {
            Compression::Gzip
        } else {
            Compression::None
        }
    }
}

/// What goes into one initramfs.
#[derive(Clone, Debug)]
pub struct Spec {
    pub release: String,
    /// `/lib/modules/<release>` (or an unpacked package's copy of it).
    pub modules_dir: PathBuf,
    /// The static `kupgrade-init` binary.
    pub init_binary: PathBuf,
    /// Module names to include; their dependencies are added.
    pub modules: Vec<String>,
    pub compression: Compression,
    /// The compressed format the kernel unpacks itself
    /// ([`format::in_kernel_decompression`]): those modules go in as they
    /// are; any other compressed one is unpacked here.
    pub kernel_decompresses: Option<ModuleFormat>,
}

/// What was built, for the user and the record.
#[derive(Debug)]
pub struct Built {
    pub bytes: u64,
    pub modules: Resolution,
    pub compression: Compression,
    /// Compressed modules unpacked here because the kernel cannot.
    pub unpacked: usize,
}

/// The module names `kupgrade-init` needs on this machine: CRIU's, the pmem
/// store's when asked, and those of the loaded modules that drive storage,
/// file systems and the network (the root device and the interfaces to
/// restore), so the new kernel sees the same devices before the real init.
pub fn wanted_modules(loaded: &[String], index: &ModuleIndex, pmem_store: bool) -> Vec<String> {
    let mut names: BTreeSet<String> = modules::CRIU_MODULES
        .iter()
        .map(|s| s.to_string())
        .collect();
    if pmem_store {
        names.extend(modules::PMEM_MODULES.iter().map(|s| s.to_string()));
    }
    let early = index.resolve(loaded);
    for path in early.load_order {
        let wanted_dir = [
            "kernel/drivers/block/",
            "kernel/drivers/nvme/",
            "kernel/drivers/scsi/",
            "kernel/drivers/ata/",
            "kernel/drivers/virtio/",
            "kernel/drivers/net/",
            "kernel/drivers/nvdimm/",
            "kernel/drivers/md/",
            "kernel/drivers/mmc/",
            "kernel/fs/",
            "kernel/net/",
            "kernel/lib/",
            "kernel/crypto/",
        ];
        if wanted_dir.iter().any(|d| path.starts_with(d)) {
            names.insert(modules::name_of(&path));
        }
    }
    names.into_iter().collect()
}

/// Builds the initramfs described by `spec` into `out`.
pub fn build(spec: &Spec, out: &Path) -> Result<Built, Error> {
    if !spec.modules_dir.join("modules.dep").exists() {
        return Err(Error::NoModules {
            release: spec.release.clone(),
            dir: spec.modules_dir.clone(),
        });
    }
    let init = fs::read(&spec.init_binary).map_err(|source| Error::Read {
        path: spec.init_binary.clone(),
        source,
    })?;
    if elf_has_interpreter(&init) {
        return Err(Error::NotStatic {
            path: spec.init_binary.clone(),
        });
    }
    let index = ModuleIndex::open(&spec.modules_dir)?;
    let resolution = index.resolve(&spec.modules);

    let mut cpio = Cpio::default();
    for dir in ["dev", "proc", "sys", "run", "newroot", "lib", "lib/modules"] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console before running /init; without the node
    // the init would start with no stdio.
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("init", 0o755, &init);
    let mod_root = format!("lib/modules/{}", spec.release);
    cpio.dir(&mod_root);
    let mut order = String::new();
    let mut unpacked = 0;
    for rel in &resolution.load_order {
        let src = spec.modules_dir.join(rel);
        let mut data = fs::read(&src).map_err(|source| Error::Read {
            path: src.clone(),
            source,
        })?;
        let mut rel = rel.clone();
        let format = ModuleFormat::of(&rel).unwrap_or(ModuleFormat::Plain);
        if format.is_compressed() && spec.kernel_decompresses != Some(format) {
            data = unpack_module(format, &data).map_err(|source| Error::Decompress {
                path: src.clone(),
                format,
                source,
            })?;
            rel = format::plain_path(&rel);
            unpacked += 1;
        }
        let dest = format!("{mod_root}/{rel}");
        cpio.parents(&dest);
        cpio.file(&dest, 0o644, &data);
        order.push_str(&rel);
        order.push('\n');
    }
    cpio.file(
        &format!("{mod_root}/{}", modules::LOAD_ORDER_FILE),
        0o644,
        order.as_bytes(),
    );
    let archive = cpio.finish();

    let compressed = match spec.compression {
        Compression::Zstd => {
            zstd::encode_all(&archive[..], 9).map_err(|source| write_err(out, source))?
        }
        Compression::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            enc.write_all(&archive)
                .map_err(|source| write_err(out, source))?;
            enc.finish().map_err(|source| write_err(out, source))?
        }
        Compression::None => archive,
    };
    fs::write(out, &compressed).map_err(|source| write_err(out, source))?;
    Ok(Built {
        bytes: compressed.len() as u64,
        modules: resolution,
        compression: spec.compression,
        unpacked,
    })
}

/// Unpacks a compressed module and checks that an ELF object came out: a
/// file named `.ko.zst` that holds something else must not reach the kernel.
fn unpack_module(format: ModuleFormat, data: &[u8]) -> io::Result<Vec<u8>> {
    let plain = format::decompress(format, data)?;
    if !plain.starts_with(b"\x7fELF") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "what it holds is not an ELF object",
        ));
    }
    Ok(plain)
}

fn write_err(path: &Path, source: io::Error) -> Error {
    Error::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// True for a dynamically linked ELF (it has a PT_INTERP program header).
fn elf_has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // Only 64-bit little-endian ELF is expected here.
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).any(|i| u32_at(phoff as usize + i * phentsize) == Some(3 /* PT_INTERP */))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::tests::parse_cpio;
    use crate::format::tests::{compressed, MODULE};

    #[test]
    fn compression_follows_the_kernel_config() {
        assert_eq!(
            Compression::for_kernel_config(Some("CONFIG_RD_GZIP=y\nCONFIG_RD_ZSTD=y\n")),
            Compression::Zstd
        );
        assert_eq!(
            Compression::for_kernel_config(Some("CONFIG_RD_GZIP=y\n# CONFIG_RD_ZSTD is not set\n")),
            Compression::Gzip
        );
        assert_eq!(Compression::for_kernel_config(Some("")), Compression::None);
        assert_eq!(Compression::for_kernel_config(None), Compression::Gzip);
    }

    #[test]
    fn dynamic_elf_is_refused_as_init() {
        let exe = std::env::current_exe().unwrap();
        let bytes = fs::read(&exe).unwrap();
        // Test binaries are linked dynamically unless built with crt-static.
        let dynamic = elf_has_interpreter(&bytes);
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("modules.dep"), "").unwrap();
        let spec = Spec {
            release: "r".into(),
            modules_dir: dir.path().into(),
            init_binary: exe,
            modules: vec![],
            compression: Compression::None,
            kernel_decompresses: None,
        };
        let res = build(&spec, &dir.path().join("out"));
        assert_eq!(dynamic, matches!(res, Err(Error::NotStatic { .. })));
        assert!(!elf_has_interpreter(b"#!/bin/sh\n"));
    }

    #[test]
    fn build_writes_init_modules_and_load_order() {
        let dir = tempfile::tempdir().unwrap();
        let mods = dir.path().join("mods");
        fs::create_dir_all(mods.join("kernel/x")).unwrap();
        fs::write(
            mods.join("modules.dep"),
            "kernel/x/a.ko: kernel/x/b.ko\nkernel/x/b.ko:\n",
        )
        .unwrap();
        fs::write(mods.join("kernel/x/a.ko"), b"A").unwrap();
        fs::write(mods.join("kernel/x/b.ko"), b"B").unwrap();
        let init = dir.path().join("init");
        fs::write(&init, b"\x7fELF\x02 static enough for this test").unwrap();
        let spec = Spec {
            release: "9.9".into(),
            modules_dir: mods,
            init_binary: init,
            modules: vec!["a".into(), "zzz".into()],
            compression: Compression::Gzip,
            kernel_decompresses: None,
        };
        let out = dir.path().join("initrd");
        let built = build(&spec, &out).unwrap();
        assert_eq!(built.modules.missing, vec!["zzz"]);
        let mut raw = vec![];
        io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(&fs::read(&out).unwrap()[..]),
            &mut raw,
        )
        .unwrap();
        let entries = parse_cpio(&raw);
        let get = |n: &str| entries.iter().find(|e| e.0 == n).map(|e| e.2.clone());
        assert_eq!(get("lib/modules/9.9/kernel/x/b.ko").unwrap(), b"B");
        assert_eq!(
            get("lib/modules/9.9/kupgrade.load-order").unwrap(),
            b"kernel/x/b.ko\nkernel/x/a.ko\n"
        );
        assert!(get("init").is_some() && get("dev/console").is_some());
    }

    /// A release whose modules come in every format, and an init.
    fn mixed_release(dir: &Path) -> Spec {
        let mods = dir.join("mods");
        fs::create_dir_all(mods.join("kernel/x")).unwrap();
        let mut dep = String::new();
        for (name, f) in [
            ("p", ModuleFormat::Plain),
            ("x", ModuleFormat::Xz),
            ("z", ModuleFormat::Zstd),
            ("g", ModuleFormat::Gzip),
        ] {
            let rel = format!("kernel/x/{name}{}", f.suffix());
            fs::write(mods.join(&rel), compressed(f)).unwrap();
            dep.push_str(&format!("{rel}:\n"));
        }
        fs::write(mods.join("modules.dep"), dep).unwrap();
        let init = dir.join("init");
        fs::write(&init, b"\x7fELF\x02 static enough for this test").unwrap();
        Spec {
            release: "9.9".into(),
            modules_dir: mods,
            init_binary: init,
            modules: vec!["p".into(), "x".into(), "z".into(), "g".into()],
            compression: Compression::None,
            kernel_decompresses: None,
        }
    }

    /// Built with `spec`: the load order, and every module's bytes by path.
    fn built_modules(spec: &Spec, out: &Path) -> (Built, String, Vec<(String, Vec<u8>)>) {
        let built = build(spec, out).unwrap();
        let entries = parse_cpio(&fs::read(out).unwrap());
        let order = entries
            .iter()
            .find(|e| e.0.ends_with(modules::LOAD_ORDER_FILE))
            .map(|e| String::from_utf8(e.2.clone()).unwrap())
            .unwrap();
        let mods = entries
            .into_iter()
            .filter(|e| ModuleFormat::of(&e.0).is_some())
            .map(|e| (e.0, e.2))
            .collect();
        (built, order, mods)
    }

    /// A kernel that unpacks no module (no CONFIG_MODULE_DECOMPRESS) gets
    /// every module plain, whatever its format was.
    #[test]
    fn without_in_kernel_decompression_every_module_is_unpacked() {
        let dir = tempfile::tempdir().unwrap();
        let spec = mixed_release(dir.path());
        let (built, order, mods) = built_modules(&spec, &dir.path().join("out"));
        assert_eq!(built.unpacked, 3);
        assert_eq!(
            order,
            "kernel/x/p.ko\nkernel/x/x.ko\nkernel/x/z.ko\nkernel/x/g.ko\n"
        );
        assert_eq!(mods.len(), 4);
        for (path, bytes) in mods {
            assert!(path.ends_with(".ko"), "{path}");
            assert_eq!(bytes, MODULE, "{path}");
        }
    }

    /// A kernel that unpacks xz itself (Debian's 6.12) gets its xz modules
    /// as they are; the formats it cannot unpack are unpacked here.
    #[test]
    fn modules_in_the_kernels_own_format_stay_compressed() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec {
            kernel_decompresses: Some(ModuleFormat::Xz),
            ..mixed_release(dir.path())
        };
        let (built, order, mods) = built_modules(&spec, &dir.path().join("out"));
        assert_eq!(built.unpacked, 2);
        assert_eq!(
            order,
            "kernel/x/p.ko\nkernel/x/x.ko.xz\nkernel/x/z.ko\nkernel/x/g.ko\n"
        );
        let xz = mods.iter().find(|m| m.0.ends_with("x.ko.xz")).unwrap();
        assert_eq!(xz.1, compressed(ModuleFormat::Xz));
        assert!(!mods
            .iter()
            .any(|m| m.0.ends_with(".zst") || m.0.ends_with(".gz")));
    }

    #[test]
    fn a_compressed_module_that_does_not_unpack_to_elf_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let spec = mixed_release(dir.path());
        let bad = spec.modules_dir.join("kernel/x/z.ko.zst");
        fs::write(&bad, zstd::encode_all(&b"not an object"[..], 3).unwrap()).unwrap();
        match build(&spec, &dir.path().join("out")) {
            Err(Error::Decompress { path, format, .. }) => {
                assert_eq!((path, format), (bad, ModuleFormat::Zstd));
            }
            other => panic!("{other:?}"),
        }
    }
}
