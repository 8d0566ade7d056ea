//! How a release stores its modules: plain `.ko`, or compressed with xz,
//! zstd or gzip (`.ko.xz`, `.ko.zst`, `.ko.gz`, as `CONFIG_MODULE_COMPRESS_*`
//! makes them), and whether its `finit_module` unpacks them itself.
//!
//! A kernel built with `CONFIG_MODULE_DECOMPRESS=y` takes a compressed file
//! when `finit_module` gets `MODULE_INIT_COMPRESSED_FILE`, but only in the
//! one format it was configured to compress with: it carries one
//! decompressor. Every other compressed module must be unpacked before it
//! reaches the kernel; the builder does that when it makes the initramfs.

use std::fmt;
use std::io::{self, Read};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ModuleFormat {
    Plain,
    Xz,
    Zstd,
    Gzip,
}

impl ModuleFormat {
    pub const ALL: [ModuleFormat; 4] = [
        ModuleFormat::Plain,
        ModuleFormat::Xz,
        ModuleFormat::Zstd,
        ModuleFormat::Gzip,
    ];

    /// The file name ending of a module stored this way.
    pub fn suffix(self) -> &'static str {
        match self {
            ModuleFormat::Plain => ".ko",
            ModuleFormat::Xz => ".ko.xz",
            ModuleFormat::Zstd => ".ko.zst",
            ModuleFormat::Gzip => ".ko.gz",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ModuleFormat::Plain => "plain",
            ModuleFormat::Xz => "xz",
            ModuleFormat::Zstd => "zstd",
            ModuleFormat::Gzip => "gzip",
        }
    }

    /// The format of a module file from its name; `None` for a file that is
    /// not a module.
    pub fn of(path: &str) -> Option<ModuleFormat> {
        // Longest endings first: every compressed name also contains ".ko".
        [
            ModuleFormat::Xz,
            ModuleFormat::Zstd,
            ModuleFormat::Gzip,
            ModuleFormat::Plain,
        ]
        .into_iter()
        .find(|f| path.ends_with(f.suffix()))
    }

    pub fn is_compressed(self) -> bool {
        self != ModuleFormat::Plain
    }

    /// The `CONFIG_MODULE_COMPRESS_*` choice that makes modules this way.
    fn config_key(self) -> Option<&'static str> {
        match self {
            ModuleFormat::Plain => None,
            ModuleFormat::Xz => Some("CONFIG_MODULE_COMPRESS_XZ"),
            ModuleFormat::Zstd => Some("CONFIG_MODULE_COMPRESS_ZSTD"),
            ModuleFormat::Gzip => Some("CONFIG_MODULE_COMPRESS_GZIP"),
        }
    }
}

impl fmt::Display for ModuleFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A module's file name without its `.ko` ending and compression suffix.
pub fn strip_suffix(file: &str) -> &str {
    match ModuleFormat::of(file) {
        Some(f) => &file[..file.len() - f.suffix().len()],
        None => file,
    }
}

/// `kernel/x/a.ko.xz` -> `kernel/x/a.ko`: where a module unpacked by the
/// builder goes in the initramfs.
pub fn plain_path(rel: &str) -> String {
    format!("{}{}", strip_suffix(rel), ModuleFormat::Plain.suffix())
}

/// The compressed format this kernel's `finit_module` unpacks itself, from
/// its config (`/boot/config-<release>`); `None` when it unpacks none, or
/// when there is no config to say so (unpacking in userspace is always safe).
pub fn in_kernel_decompression(config: Option<&str>) -> Option<ModuleFormat> {
    let config = config?;
    let has = |key: &str| config.lines().any(|l| l.trim() == format!("{key}=y"));
    if !has("CONFIG_MODULE_DECOMPRESS") {
        return None;
    }
    ModuleFormat::ALL
        .into_iter()
        .find(|f| f.config_key().is_some_and(has))
}

/// Unpacks a module stored as `format`; a plain one is returned as it is.
pub fn decompress(format: ModuleFormat, data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() * 3);
    match format {
        ModuleFormat::Plain => out.extend_from_slice(data),
        ModuleFormat::Xz => {
            lzma_rs::xz_decompress(&mut io::BufReader::new(data), &mut out)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        }
        ModuleFormat::Zstd => {
            zstd::stream::read::Decoder::new(data)?.read_to_end(&mut out)?;
        }
        ModuleFormat::Gzip => {
            flate2::read::GzDecoder::new(data).read_to_end(&mut out)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const MODULE: &[u8] = b"\x7fELF\x02\x01\x01 a module, repeated, repeated, repeated\n";

    /// `MODULE` compressed as `format`, by the tools and with the options
    /// the kernel's `make modules_install` uses (`xz --check=crc32
    /// --lzma2=dict=1MiB`, `zstd -T0`, `gzip -n`), not by the crates that
    /// read them.
    pub fn compressed(format: ModuleFormat) -> Vec<u8> {
        match format {
            ModuleFormat::Plain => MODULE.to_vec(),
            ModuleFormat::Xz => include_bytes!("../tests/fixtures/module.ko.xz").to_vec(),
            ModuleFormat::Zstd => include_bytes!("../tests/fixtures/module.ko.zst").to_vec(),
            ModuleFormat::Gzip => include_bytes!("../tests/fixtures/module.ko.gz").to_vec(),
        }
    }

    #[test]
    fn formats_are_told_by_their_endings() {
        let cases = [
            ("kernel/a/b.ko", Some(ModuleFormat::Plain)),
            ("kernel/a/b.ko.xz", Some(ModuleFormat::Xz)),
            ("kernel/a/b.ko.zst", Some(ModuleFormat::Zstd)),
            ("kernel/a/b.ko.gz", Some(ModuleFormat::Gzip)),
            ("kernel/a/b.ko.bz2", None),
            ("modules.dep", None),
        ];
        for (path, want) in cases {
            assert_eq!(ModuleFormat::of(path), want, "{path}");
        }
        assert_eq!(strip_suffix("af-packet-diag.ko.zst"), "af-packet-diag");
        // Only the ending is stripped, whatever the name holds.
        assert_eq!(strip_suffix("x.kobj.ko.gz"), "x.kobj");
        assert_eq!(plain_path("kernel/x/a.ko.xz"), "kernel/x/a.ko");
        assert_eq!(plain_path("kernel/x/a.ko"), "kernel/x/a.ko");
    }

    #[test]
    fn each_format_unpacks_to_the_module() {
        for f in ModuleFormat::ALL {
            let packed = compressed(f);
            if f.is_compressed() {
                assert_ne!(packed, MODULE, "{f}");
            }
            assert_eq!(decompress(f, &packed).unwrap(), MODULE, "{f}");
        }
    }

    #[test]
    fn damaged_or_mislabelled_data_is_an_error_not_garbage() {
        for f in [ModuleFormat::Xz, ModuleFormat::Zstd, ModuleFormat::Gzip] {
            let mut packed = compressed(f);
            let mid = packed.len() / 2;
            packed[mid] ^= 0xff;
            assert!(decompress(f, &packed).is_err(), "{f} damaged");
            assert!(decompress(f, MODULE).is_err(), "{f} given a plain module");
        }
    }

    #[test]
    fn the_kernel_decompresses_only_its_own_format_and_only_when_configured() {
        let debian_6_12 = "CONFIG_MODULE_COMPRESS=y\n# CONFIG_MODULE_COMPRESS_GZIP is not set\n\
                           CONFIG_MODULE_COMPRESS_XZ=y\n# CONFIG_MODULE_COMPRESS_ZSTD is not set\n\
                           CONFIG_MODULE_DECOMPRESS=y\n";
        assert_eq!(
            in_kernel_decompression(Some(debian_6_12)),
            Some(ModuleFormat::Xz)
        );
        let zstd = "CONFIG_MODULE_COMPRESS_ZSTD=y\nCONFIG_MODULE_DECOMPRESS=y\n";
        assert_eq!(
            in_kernel_decompression(Some(zstd)),
            Some(ModuleFormat::Zstd)
        );
        // Compressed, but the kernel cannot unpack: kmod does it in userspace.
        let no_decompress = "CONFIG_MODULE_COMPRESS_XZ=y\n# CONFIG_MODULE_DECOMPRESS is not set\n";
        assert_eq!(in_kernel_decompression(Some(no_decompress)), None);
        let debian_6_1 = "CONFIG_MODULE_COMPRESS_NONE=y\n";
        assert_eq!(in_kernel_decompression(Some(debian_6_1)), None);
        assert_eq!(in_kernel_decompression(None), None);
    }
}
