//! Write and read throughput of the image format on process-like data,
//! next to plain memcpy and plain sequential writes of the same bytes.
//!
//! ```text
//! cargo run --release -p image-format --example throughput -- [--size MiB] [--disk DIR] [--tune]
//! ```
//!
//! The data: 4 KiB pages in runs of 1 to 64 pages, 40% all-zero pages, 30%
//! copies of a few dozen "code-like" pages, 30% random pages. Stores: a
//! file in DIR (default `target/`, on disk) and a file in `/dev/shm`
//! (tmpfs, like a `memmap=` RAM range). Every figure is raw bytes per
//! second, writes include the final fsync.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image_format::format::MAX_BLOB;
use image_format::{Image, ImageWriter, Manifest, WriteOptions};

const PAGE: usize = 4096;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// (data, zero pages, repeated pages, random pages)
fn process_like(size: usize) -> (Vec<u8>, usize, usize, usize) {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    // Templates: instruction-like bytes, a small alphabet with structure.
    let templates: Vec<Vec<u8>> = (0..48)
        .map(|t| {
            (0..PAGE)
                .map(|i| {
                    let x = (i as u64 * 2654435761 + t * 97) >> 7;
                    [0x48, 0x89, 0x8b, 0xe8, 0x0f, 0x00, 0xff, 0x41][(x % 8) as usize]
                        ^ (r.next().is_multiple_of(16) as u8 * (r.next() as u8))
                })
                .collect()
        })
        .collect();
    let mut data = vec![0u8; size];
    let (mut zero, mut rep, mut rnd) = (0, 0, 0);
    let mut page = 0;
    let pages = size / PAGE;
    while page < pages {
        let run = (1 + r.next() % 64) as usize;
        let kind = r.next() % 10;
        for p in page..(page + run).min(pages) {
            let dst = &mut data[p * PAGE..(p + 1) * PAGE];
            match kind {
                0..=3 => zero += 1,
                4..=6 => {
                    dst.copy_from_slice(&templates[(r.next() % 48) as usize]);
                    rep += 1;
                }
                _ => {
                    r.fill(dst);
                    rnd += 1;
                }
            }
        }
        page += run;
    }
    (data, zero, rep, rnd)
}

/// `threads` as WriteOptions takes it: 0 means all cores.
fn threads_label(threads: usize, cores: usize) -> String {
    if threads == 1 {
        "1 thread".to_string()
    } else {
        format!("{cores} threads")
    }
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn best_of<T>(n: usize, mut f: impl FnMut() -> (Duration, T)) -> (Duration, T) {
    let mut best: Option<(Duration, T)> = None;
    for _ in 0..n {
        let (d, t) = f();
        if best.as_ref().is_none_or(|(b, _)| d < *b) {
            best = Some((d, t));
        }
    }
    best.expect("n > 0")
}

fn open_store(path: &Path) -> File {
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("open the store")
}

/// A store whose memory is already there, as `/dev/pmemN`'s is: a tmpfs
/// file written once in full, then overwritten in place.
fn open_ram_store(path: &Path, len: usize) -> File {
    let mut f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .expect("open the store");
    if f.metadata().expect("stat the store").len() < len as u64 {
        let block = vec![0x5au8; 4 << 20];
        for _ in 0..len.div_ceil(block.len()) {
            f.write_all(&block).expect("fill the store");
        }
    }
    f
}

fn write_image(path: &Path, data: &[u8], opts: WriteOptions) -> (Duration, u64) {
    write_image_to(open_store(path), data, opts)
}

fn write_image_to(f: File, data: &[u8], opts: WriteOptions) -> (Duration, u64) {
    let t = Instant::now();
    let mut w = ImageWriter::create(f, 4 << 30, opts).expect("create");
    for (i, part) in data.chunks(BLOB).enumerate() {
        w.add_blob(&format!("pages/{i}"), part).expect("add_blob");
    }
    let s = w.finish(Manifest::default()).expect("finish");
    (t.elapsed(), s.total_len)
}

/// The data goes in as blobs of this size: a blob is at most MAX_BLOB.
const BLOB: usize = MAX_BLOB as usize;

fn read_image(path: &Path, threads: usize) -> (Duration, usize) {
    let t = Instant::now();
    let mut img = Image::open(File::open(path).expect("open")).expect("open image");
    img.set_threads(threads);
    let mut n = 0;
    for i in 0..img.manifest().sections.len() {
        n += img.read_blob(&format!("pages/{i}")).expect("read").len();
    }
    (t.elapsed(), n)
}

fn plain_write(path: &Path, data: &[u8]) -> Duration {
    plain_write_to(open_store(path), data)
}

fn plain_write_to(mut f: File, data: &[u8]) -> Duration {
    let t = Instant::now();
    for c in data.chunks(4 << 20) {
        f.write_all(c).expect("write");
    }
    f.sync_all().expect("sync");
    t.elapsed()
}

fn drop_file(path: &Path) {
    let _ = fs::remove_file(path);
}

/// Into and out of a store whose memory is there (a RAM store), from and
/// into memory that is there: the frozen dump's write (uncompressed, as
/// go writes it to a RAM store) and the restore's read, without the page
/// allocations a fresh tmpfs file or a fresh buffer add.
fn ram_store_rows(rows: &mut Vec<Row>, path: &Path, data: &[u8], cores: usize) {
    let size = data.len();
    // The image's headers and manifest on top of the raw bytes.
    let store_len = size + size / 64 + (16 << 20);
    drop(open_ram_store(path, store_len));
    let (d, _) = best_of(3, || {
        (plain_write_to(open_ram_store(path, store_len), data), ())
    });
    rows.push(Row {
        what: "plain sequential write + fsync, RAM-like store (tmpfs, pages there)".into(),
        mbps: mbps(size, d),
    });
    for threads in [1, 0] {
        let o = WriteOptions {
            threads,
            compress: false,
            generation: 1,
            ..WriteOptions::default()
        };
        let (d, _) = best_of(3, || {
            write_image_to(open_ram_store(path, store_len), data, o.clone())
        });
        rows.push(Row {
            what: format!(
                "image write, uncompressed, RAM-like store, {}",
                threads_label(threads, cores)
            ),
            mbps: mbps(size, d),
        });
    }
    let mut out = vec![0u8; size];
    out.fill(1); // the pages are there, as memory being written back is
    let (d, _) = best_of(3, || {
        let mut f = File::open(path).expect("open");
        let t = Instant::now();
        f.read_exact(&mut out).expect("read");
        (t.elapsed(), ())
    });
    rows.push(Row {
        what: "plain sequential read, RAM-like store, into memory that is there".into(),
        mbps: mbps(size, d),
    });
    for threads in [1, 0] {
        let (d, _) = best_of(3, || {
            let t = Instant::now();
            let mut img = Image::open(File::open(path).expect("open")).expect("open image");
            img.set_threads(threads);
            let mut rest: &mut [u8] = &mut out;
            for i in 0..img.manifest().sections.len() {
                img.copy_section(&format!("pages/{i}"), &mut rest)
                    .expect("copy");
            }
            assert!(rest.is_empty());
            (t.elapsed(), ())
        });
        rows.push(Row {
            what: format!(
                "image read into memory that is there, RAM-like store, {}",
                threads_label(threads, cores)
            ),
            mbps: mbps(size, d),
        });
    }
    assert!(out == data, "the image read back differs from the data");
    drop_file(path);
}

struct Row {
    what: String,
    mbps: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let size_mib: usize = arg("--size").map_or(1024, |s| s.parse().expect("--size MiB"));
    let disk = PathBuf::from(arg("--disk").unwrap_or_else(|| "target".into()));
    let tune = args.iter().any(|a| a == "--tune");
    let size = size_mib << 20;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    eprintln!("generating {size_mib} MiB of process-like data...");
    let (data, zero, rep, rnd) = process_like(size);
    let pages = (zero + rep + rnd) as f64;
    println!(
        "data: {size_mib} MiB, {:.0}% zero pages, {:.0}% repeated pages, {:.0}% random pages; {cores} cores",
        100.0 * zero as f64 / pages,
        100.0 * rep as f64 / pages,
        100.0 * rnd as f64 / pages
    );

    let (memcpy, _) = best_of(3, || {
        let mut dst = vec![0u8; size];
        dst.copy_from_slice(&data); // fault the pages in first
        let t = Instant::now();
        dst.copy_from_slice(&data);
        (t.elapsed(), std::hint::black_box(dst)[size / 2])
    });
    let memcpy_mbps = mbps(size, memcpy);
    // What a restore's writes into fresh process memory pay on top.
    let (fresh, _) = best_of(3, || {
        let t = Instant::now();
        let mut dst = vec![0u8; size];
        dst.copy_from_slice(&data);
        (t.elapsed(), std::hint::black_box(dst)[size / 2])
    });

    let shm = PathBuf::from("/dev/shm");
    fs::create_dir_all(&disk).expect("disk dir");
    let stores = [
        ("tmpfs", shm.join("kupgrade-bench.img")),
        ("disk", disk.join("kupgrade-bench.img")),
    ];

    if tune {
        println!("\ntuning on tmpfs, all cores (write MB/s, read MB/s, stored size):");
        for chunk in [256 << 10, 1 << 20, 4 << 20] {
            for level in [-5, -1, 1, 3] {
                let o = WriteOptions {
                    threads: 0,
                    chunk_size: chunk,
                    zstd_level: level,
                    compress: true,
                    generation: 1,
                };
                let p = &stores[0].1;
                let (wd, len) = best_of(2, || write_image(p, &data, o.clone()));
                let (rd, _) = best_of(2, || read_image(p, 0));
                println!(
                    "  chunk {:>5} KiB level {level:>2}: write {:>6.0}  read {:>6.0}  stored {:>5.1}%",
                    chunk >> 10,
                    mbps(size, wd),
                    mbps(size, rd),
                    100.0 * len as f64 / size as f64
                );
            }
        }
        drop_file(&stores[0].1);
        return;
    }

    let mut rows = vec![
        Row {
            what: "memcpy (one core)".into(),
            mbps: memcpy_mbps,
        },
        Row {
            what: "memcpy into fresh memory (its page faults)".into(),
            mbps: mbps(size, fresh),
        },
    ];
    ram_store_rows(&mut rows, &shm.join("kupgrade-bench-ram.img"), &data, cores);
    for (name, path) in &stores {
        let (d, _) = best_of(3, || (plain_write(path, &data), ()));
        rows.push(Row {
            what: format!("plain sequential write + fsync, {name}"),
            mbps: mbps(size, d),
        });
        // Uncompressed last: the decode and verify rows below read it.
        for compress in [true, false] {
            let how = if compress { "zstd" } else { "uncompressed" };
            for threads in [1, 0] {
                let label = threads_label(threads, cores);
                let o = WriteOptions {
                    threads,
                    compress,
                    generation: 1,
                    ..WriteOptions::default()
                };
                let (d, len) = best_of(3, || write_image(path, &data, o.clone()));
                rows.push(Row {
                    what: format!(
                        "image write, {how}, {name}, {label} (stored {:.1}%)",
                        100.0 * len as f64 / size as f64
                    ),
                    mbps: mbps(size, d),
                });
            }
            for threads in [1, 0] {
                let label = threads_label(threads, cores);
                let (d, n) = best_of(3, || read_image(path, threads));
                assert_eq!(n, size);
                rows.push(Row {
                    what: format!("image read (read_blob), {how}, {name}, {label}"),
                    mbps: mbps(size, d),
                });
            }
        }
        let (d, _) = best_of(3, || {
            let t = Instant::now();
            let mut img = Image::open(File::open(path).expect("open")).expect("open image");
            let mut n = 0;
            for i in 0..img.manifest().sections.len() {
                n += img
                    .copy_section(&format!("pages/{i}"), &mut std::io::sink())
                    .expect("copy");
            }
            assert_eq!(n as usize, size);
            (t.elapsed(), ())
        });
        rows.push(Row {
            what: format!(
                "image read, decode only (to io::sink), uncompressed, {name}, {cores} threads"
            ),
            mbps: mbps(size, d),
        });
        let (d, _) = best_of(3, || {
            let t = Instant::now();
            let mut img = Image::open(File::open(path).expect("open")).expect("open image");
            img.verify().expect("verify");
            (t.elapsed(), ())
        });
        rows.push(Row {
            what: format!(
                "image verify (every chunk + digest), uncompressed, {name}, {cores} threads"
            ),
            mbps: mbps(size, d),
        });
        drop_file(path);
    }
    // Zero pages should cost next to nothing: the same size, all zero.
    {
        let zeros = vec![0u8; size];
        let path = &stores[0].1;
        let o = WriteOptions {
            threads: 0,
            generation: 1,
            ..WriteOptions::default()
        };
        let (d, len) = best_of(3, || write_image(path, &zeros, o.clone()));
        rows.push(Row {
            what: format!(
                "image write of all-zero data, {}, {cores} threads (stored {:.3}%)",
                stores[0].0,
                100.0 * len as f64 / size as f64
            ),
            mbps: mbps(size, d),
        });
        drop_file(path);
    }
    // The restore path: CRIU image files in tmpfs, as a tree, both ways.
    let src = shm.join("kupgrade-bench-src");
    let dst = shm.join("kupgrade-bench-dst");
    let img_path = shm.join("kupgrade-bench.img");
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(&src).expect("mkdir");
    for (i, part) in data.chunks(size / 8).enumerate() {
        fs::write(src.join(format!("pages-{i}.img")), part).expect("write part");
    }
    // Uncompressed last: extract_tree below reads it.
    for compress in [true, false] {
        let how = if compress { "zstd" } else { "uncompressed" };
        for threads in [1, 0] {
            let label = threads_label(threads, cores);
            let (d, _) = best_of(3, || {
                let f = open_store(&img_path);
                let t = Instant::now();
                let o = WriteOptions {
                    threads,
                    compress,
                    generation: 1,
                    ..WriteOptions::default()
                };
                let mut w = ImageWriter::create(f, 4 << 30, o).expect("create");
                w.add_tree("criu/bench", &src).expect("add_tree");
                w.finish(Manifest::default()).expect("finish");
                (t.elapsed(), ())
            });
            rows.push(Row {
                what: format!("add_tree of 8 files in tmpfs to tmpfs, {how}, {label}"),
                mbps: mbps(size, d),
            });
        }
    }
    for threads in [1, 0] {
        let label = threads_label(threads, cores);
        let (d, _) = best_of(3, || {
            let _ = fs::remove_dir_all(&dst);
            let t = Instant::now();
            let mut img = Image::open(File::open(&img_path).expect("open")).expect("open image");
            img.set_threads(threads);
            img.extract_tree("criu/bench", &dst).expect("extract");
            (t.elapsed(), ())
        });
        rows.push(Row {
            what: format!("extract_tree from tmpfs to tmpfs, uncompressed, {label}"),
            mbps: mbps(size, d),
        });
    }
    let _ = fs::remove_dir_all(&src);
    let _ = fs::remove_dir_all(&dst);
    drop_file(&img_path);

    println!();
    println!("| what | MB/s | ratio to memcpy |");
    println!("| --- | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.2} |",
            r.what,
            r.mbps,
            r.mbps / memcpy_mbps
        );
    }
}
