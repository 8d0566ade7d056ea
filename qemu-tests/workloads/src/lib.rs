//! Small workloads that the QEMU scenarios run and upgrade under, each with a
//! checker that proves continuity from what the workload wrote.
//!
//! Every workload appends lines to a log through a [`Ticker`]:
//!
//! ```text
//! seq=N pid=P boot=BOOT_ID mono_ms=T [src=STREAM] key=value ...
//! ```
//!
//! `seq` counts the lines of one stream (one process or role) from 0, `boot`
//! is the kernel's boot id when the line was written, `mono_ms` is
//! CLOCK_MONOTONIC. A checker reads the log back with [`read_log`], splits it
//! into streams and runs [`check_stream`] on each: seq consecutive from 0 (no
//! gap, no restart), one pid, monotonic time never going back, boot ids never
//! returning to an earlier one and at least `min_boots` of them. Then it adds
//! the checks of its own workload and prints one line, `ok: ...` or
//! `FAIL: ...` ([`checker_main`]).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::process::Command;
use std::str::FromStr;

/// Shared memory and SysV semaphores: the crate's only unsafe code.
#[allow(unsafe_code)]
pub mod shared;

/// The running kernel's boot id: changes with every boot, kexec included.
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// CLOCK_MONOTONIC in milliseconds (CRIU's time namespace keeps it counting
/// from the dump after a restore).
pub fn mono_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// Parses `key=value` words of a log line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// One step of xorshift64: cheap, deterministic, never 0 from a non-zero state.
pub fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// FNV-1a over bytes: a checksum for records and file contents.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `len` pseudo-random bytes (xorshift words from `seed`, little-endian):
/// a pattern a workload writes once and a checker recomputes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v: Vec<u8> = (0..len.div_ceil(8))
        .flat_map(|_| xorshift(&mut x).to_le_bytes())
        .collect();
    v.truncate(len);
    v
}

/// A 32-byte numbered message for pipes and sockets: number, send time
/// (monotonic ms), a payload derived from the number and a checksum of the
/// first 24 bytes.
pub const RECORD: usize = 32;

pub fn record(n: u64, sent_ms: u64) -> [u8; RECORD] {
    let mut x = n.wrapping_add(0x1234_5678_9abc_def1);
    let mut r = [0u8; RECORD];
    r[0..8].copy_from_slice(&n.to_le_bytes());
    r[8..16].copy_from_slice(&sent_ms.to_le_bytes());
    r[16..24].copy_from_slice(&xorshift(&mut x).to_le_bytes());
    let sum = fnv1a(&r[..24]);
    r[24..].copy_from_slice(&sum.to_le_bytes());
    r
}

/// Reads a record back: `(number, send time)`, or None when the checksum
/// does not match.
pub fn parse_record(r: &[u8; RECORD]) -> Option<(u64, u64)> {
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&r[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    (fnv1a(&r[..24]) == word(3)).then(|| (word(0), word(1)))
}

/// A `struct flock` for a write lock (or, for F_GETLK, a query) over a
/// whole file, for POSIX and OFD fcntl locks.
pub fn whole_file_lock() -> nix::libc::flock {
    nix::libc::flock {
        l_type: nix::libc::F_WRLCK as i16,
        l_whence: nix::libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// A field of `/proc/self/status` (or another status file), e.g. `SigBlk`.
pub fn status_field(path: &str, key: &str) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| Some(l.strip_prefix(key)?.strip_prefix(':')?.trim().to_string()))
}

/// Prints `PROGRAM: msg` to stderr (the workload's log file under
/// `kupgrade launch`) and exits 1.
pub fn die(msg: impl fmt::Display) -> ! {
    let prog = std::env::args().next().unwrap_or_default();
    let prog = prog.rsplit('/').next().unwrap_or("workload");
    eprintln!("{prog}: {msg}");
    std::process::exit(1);
}

/// A command that re-executes this program as `PROG --role ROLE ARGS...`:
/// how workloads get child processes without an unsafe `fork`.
pub fn spawn_role(role: &str) -> Command {
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| die(format!("cannot find my own executable: {e}")));
    let mut cmd = Command::new(exe);
    cmd.arg("--role").arg(role);
    cmd
}

/// Positional command-line arguments with defaults; a bad one prints the
/// usage and exits 2.
pub struct Args {
    usage: &'static str,
    rest: std::vec::IntoIter<String>,
}

impl Args {
    pub fn new(usage: &'static str) -> Args {
        Args::from_vec(usage, std::env::args().skip(1).collect())
    }

    pub fn from_vec(usage: &'static str, v: Vec<String>) -> Args {
        Args {
            usage,
            rest: v.into_iter(),
        }
    }

    fn usage(&self) -> ! {
        eprintln!("usage: {}", self.usage);
        std::process::exit(2);
    }

    /// A required argument.
    pub fn req(&mut self) -> String {
        self.rest.next().unwrap_or_else(|| self.usage())
    }

    /// A required argument parsed as `T`.
    pub fn req_as<T: FromStr>(&mut self) -> T {
        let s = self.req();
        s.parse().unwrap_or_else(|_| self.usage())
    }

    /// An optional argument parsed as `T`, `default` when absent.
    pub fn opt<T: FromStr>(&mut self, default: T) -> T {
        match self.rest.next() {
            None => default,
            Some(s) => s.parse().unwrap_or_else(|_| self.usage()),
        }
    }

    /// The arguments not taken yet.
    pub fn rest(self) -> Vec<String> {
        self.rest.collect()
    }

    /// If the command line is `--role ROLE ...`, takes and returns ROLE.
    pub fn role(&mut self) -> Option<String> {
        if self.rest.as_slice().first().map(String::as_str) == Some("--role") {
            self.rest.next();
            return Some(self.req());
        }
        None
    }
}

/// Writes the stamped lines of one stream to a log opened in append mode.
/// Each line goes out in a single `write`, so that several processes can
/// share one log (O_APPEND keeps whole lines whole).
pub struct Ticker {
    out: File,
    src: Option<String>,
    seq: u64,
    pid: u32,
}

impl Ticker {
    pub fn open(path: &str, src: Option<&str>) -> io::Result<Ticker> {
        let out = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Ticker {
            out,
            src: src.map(str::to_string),
            seq: 0,
            pid: std::process::id(),
        })
    }

    /// Like [`Ticker::open`], dying with a message when the log cannot be opened.
    pub fn open_or_die(path: &str, src: Option<&str>) -> Ticker {
        Ticker::open(path, src).unwrap_or_else(|e| die(format!("cannot open {path}: {e}")))
    }

    /// The seq of the next line.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The line that the next `tick` would write (without its newline).
    pub fn line(&self, extra: &str) -> String {
        let mut l = format!(
            "seq={} pid={} boot={} mono_ms={}",
            self.seq,
            self.pid,
            boot_id(),
            mono_ms()
        );
        if let Some(src) = &self.src {
            l.push_str(" src=");
            l.push_str(src);
        }
        if !extra.is_empty() {
            l.push(' ');
            l.push_str(extra);
        }
        l
    }

    pub fn tick(&mut self, extra: &str) -> io::Result<()> {
        let mut l = self.line(extra);
        l.push('\n');
        self.out.write_all(l.as_bytes())?;
        self.seq += 1;
        Ok(())
    }

    /// `tick`, dying when the log cannot be written: without it nothing can
    /// be proven anyway.
    pub fn tick_or_die(&mut self, extra: &str) {
        if let Err(e) = self.tick(extra) {
            die(format!("cannot write the log: {e}"));
        }
    }
}

/// One parsed log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// Line number in the log, from 1.
    pub no: usize,
    pub seq: u64,
    pub pid: u32,
    pub boot: String,
    pub mono_ms: u64,
    /// The stream, "" for a log without `src=`.
    pub src: String,
    pub text: String,
}

impl Line {
    pub fn get(&self, key: &str) -> Option<&str> {
        field(&self.text, key)
    }

    pub fn str(&self, key: &str) -> Result<&str, String> {
        self.get(key)
            .ok_or_else(|| format!("line {}: no {key}= in {:?}", self.no, self.text))
    }

    pub fn num<T: FromStr>(&self, key: &str) -> Result<T, String> {
        let s = self.str(key)?;
        s.parse()
            .map_err(|_| format!("line {}: bad {key}={s}", self.no))
    }

    /// A comma-separated list, e.g. `tids=12,13,14`.
    pub fn list<T: FromStr>(&self, key: &str) -> Result<Vec<T>, String> {
        let s = self.str(key)?;
        if s.is_empty() {
            return Ok(Vec::new());
        }
        s.split(',')
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("line {}: bad {key}={s}", self.no))
            })
            .collect()
    }
}

/// Parses a whole log. A last line without its newline is still being
/// written and is left out; any other line without the stamps is an error.
pub fn parse_log(text: &str) -> Result<Vec<Line>, String> {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut out = Vec::new();
    for (i, t) in complete.lines().enumerate() {
        if t.trim().is_empty() {
            continue;
        }
        let mut line = Line {
            no: i + 1,
            seq: 0,
            pid: 0,
            boot: String::new(),
            mono_ms: 0,
            src: field(t, "src").unwrap_or("").to_string(),
            text: t.to_string(),
        };
        line.seq = line.num("seq")?;
        line.pid = line.num("pid")?;
        line.boot = line.str("boot")?.to_string();
        line.mono_ms = line.num("mono_ms")?;
        if line.boot.is_empty() {
            return Err(format!("line {}: empty boot id", line.no));
        }
        out.push(line);
    }
    Ok(out)
}

pub fn read_log(path: &str) -> Result<Vec<Line>, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    parse_log(&text)
}

/// Splits lines by stream, each in log order.
pub fn group_streams(lines: Vec<Line>) -> BTreeMap<String, Vec<Line>> {
    let mut m: BTreeMap<String, Vec<Line>> = BTreeMap::new();
    for l in lines {
        m.entry(l.src.clone()).or_default().push(l);
    }
    m
}

/// A stream that passed [`check_stream`].
#[derive(Debug)]
pub struct Stream {
    pub src: String,
    pub lines: Vec<Line>,
    /// Boot ids in the order seen.
    pub boots: Vec<String>,
    /// Index in `lines` where each boot starts.
    pub boot_start: Vec<usize>,
    pub pid: u32,
    /// Longest step of CLOCK_MONOTONIC between two lines: about the blackout.
    pub max_gap_ms: u64,
}

/// The last boot must show the stream running, not a single dying line.
pub const MIN_LINES_LAST_BOOT: usize = 3;

impl Stream {
    /// The lines of each boot.
    pub fn segments(&self) -> Vec<&[Line]> {
        let mut ends: Vec<usize> = self.boot_start[1..].to_vec();
        ends.push(self.lines.len());
        self.boot_start
            .iter()
            .zip(ends)
            .map(|(s, e)| &self.lines[*s..e])
            .collect()
    }

    pub fn last(&self) -> &Line {
        &self.lines[self.lines.len() - 1]
    }

    /// `NAME: N lines, seq 0..=X, pid P, B boots, longest monotonic gap G ms`.
    pub fn summary(&self) -> String {
        let name = if self.src.is_empty() {
            String::new()
        } else {
            format!("{}: ", self.src)
        };
        format!(
            "{name}{} lines, seq 0..={}, pid {}, {} boots, longest monotonic gap {} ms",
            self.lines.len(),
            self.last().seq,
            self.pid,
            self.boots.len(),
            self.max_gap_ms
        )
    }
}

/// The checks every stream must pass: seq consecutive from 0, one pid,
/// monotonic time never going back, no return to an earlier boot, at least
/// `min_boots` boots, and [`MIN_LINES_LAST_BOOT`] lines in the last one.
pub fn check_stream(src: &str, lines: Vec<Line>, min_boots: usize) -> Result<Stream, String> {
    let name = if src.is_empty() {
        "log".to_string()
    } else {
        format!("stream {src}")
    };
    if lines.is_empty() {
        return Err(format!("{name}: no lines"));
    }
    let mut s = Stream {
        src: src.into(),
        boots: Vec::new(),
        boot_start: Vec::new(),
        pid: lines[0].pid,
        max_gap_ms: 0,
        lines,
    };
    let mut prev: Option<&Line> = None;
    for (i, l) in s.lines.iter().enumerate() {
        let want = prev.map_or(0, |p| p.seq + 1);
        if l.seq != want {
            let what = if l.seq == 0 {
                "a restart"
            } else {
                "a gap or a repeat"
            };
            return Err(format!(
                "{name}: line {}: seq {} where {want} was due: {what}",
                l.no, l.seq
            ));
        }
        if l.pid != s.pid {
            return Err(format!(
                "{name}: line {}: pid {} after pid {}",
                l.no, l.pid, s.pid
            ));
        }
        if let Some(p) = prev {
            if l.mono_ms < p.mono_ms {
                return Err(format!(
                    "{name}: line {}: CLOCK_MONOTONIC went back from {} to {}",
                    l.no, p.mono_ms, l.mono_ms
                ));
            }
            s.max_gap_ms = s.max_gap_ms.max(l.mono_ms - p.mono_ms);
        }
        if s.boots.last() != Some(&l.boot) {
            if s.boots.contains(&l.boot) {
                return Err(format!(
                    "{name}: line {}: back on an earlier boot {}",
                    l.no, l.boot
                ));
            }
            s.boots.push(l.boot.clone());
            s.boot_start.push(i);
        }
        prev = Some(l);
    }
    if s.boots.len() < min_boots {
        return Err(format!(
            "{name}: lines from {} boot(s), expected at least {min_boots}",
            s.boots.len()
        ));
    }
    let last = s.lines.len() - s.boot_start[s.boot_start.len() - 1];
    if last < MIN_LINES_LAST_BOOT {
        return Err(format!(
            "{name}: only {last} line(s) in the last boot, expected {MIN_LINES_LAST_BOOT}"
        ));
    }
    Ok(s)
}

/// Checks that the log holds exactly the streams `expected`, each passing
/// [`check_stream`], and returns them in that order.
pub fn check_streams(
    lines: Vec<Line>,
    expected: &[&str],
    min_boots: usize,
) -> Result<Vec<Stream>, String> {
    let mut groups = group_streams(lines);
    let mut out = Vec::new();
    for src in expected {
        let lines = groups.remove(*src).unwrap_or_default();
        out.push(check_stream(src, lines, min_boots)?);
    }
    if let Some(other) = groups.keys().next() {
        return Err(format!("unexpected stream {other:?} in the log"));
    }
    Ok(out)
}

/// The whole of a checker: `PROG LOG [MIN_BOOTS]` (default 2), reads the
/// log, runs `check` and prints `ok: ...` (exit 0) or `FAIL: ...` (exit 1).
pub fn checker_main(
    usage: &'static str,
    check: impl FnOnce(Vec<Line>, usize) -> Result<String, String>,
) -> ! {
    let mut args = Args::new(usage);
    let log = args.req();
    let min_boots: usize = args.opt(2);
    finish(read_log(&log).and_then(|lines| check(lines, min_boots)))
}

/// Prints the evidence line and exits.
pub fn finish(r: Result<String, String>) -> ! {
    match r {
        Ok(msg) => {
            println!("ok: {msg}");
            std::process::exit(0)
        }
        Err(msg) => {
            println!("FAIL: {msg}");
            std::process::exit(1)
        }
    }
}

/// Values of `key` must stay the same on every line of a stream.
pub fn constant<'a>(s: &'a Stream, key: &str) -> Result<&'a str, String> {
    let first = s.lines[0].str(key)?;
    for l in &s.lines {
        let v = l.str(key)?;
        if v != first {
            return Err(format!(
                "{}: line {}: {key}={v} changed from {first}",
                s.src, l.no
            ));
        }
    }
    Ok(first)
}

/// A counter `key` never goes back on a stream and grows within every boot:
/// whatever it counts kept happening after each upgrade, with no reset.
pub fn advancing(s: &Stream, key: &str) -> Result<(), String> {
    let mut prev: Option<u64> = None;
    for l in &s.lines {
        let v: u64 = l.num(key)?;
        if let Some(p) = prev.filter(|p| v < *p) {
            return Err(format!(
                "{}: line {}: {key} went back from {p} to {v}",
                s.src, l.no
            ));
        }
        prev = Some(v);
    }
    for seg in s.segments() {
        let (a, b) = (&seg[0], &seg[seg.len() - 1]);
        if b.num::<u64>(key)? <= a.num::<u64>(key)? {
            return Err(format!(
                "{}: boot {}: {key} did not grow from line {} to {}",
                s.src, a.boot, a.no, b.no
            ));
        }
    }
    Ok(())
}

/// Every line of a stream has `key=ok`.
pub fn all_ok(s: &Stream, key: &str) -> Result<(), String> {
    match s.lines.iter().find(|l| l.get(key) != Some("ok")) {
        Some(l) => Err(format!(
            "{}: line {}: {key}={}",
            s.src,
            l.no,
            l.get(key).unwrap_or("missing")
        )),
        None => Ok(()),
    }
}

/// Synthetic logs for the checkers' unit tests: `lines(src, pid, boots)`
/// writes one line per entry of `boots`, seq from 0, 100 ms apart.
pub mod testlog {
    pub fn lines(src: &str, pid: u32, boots: &[&str], extra: impl Fn(u64) -> String) -> String {
        let mut out = String::new();
        for (seq, boot) in boots.iter().enumerate() {
            let seq = seq as u64;
            let src = if src.is_empty() {
                String::new()
            } else {
                format!(" src={src}")
            };
            out.push_str(&format!(
                "seq={seq} pid={pid} boot={boot} mono_ms={}{src} {}\n",
                1000 + seq * 100,
                extra(seq)
            ));
        }
        out
    }

    /// `n` boots named a, b, c...: `per` lines each.
    pub fn boots(n: usize, per: usize) -> Vec<&'static str> {
        const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
        NAMES[..n]
            .iter()
            .flat_map(|b| (0..per).map(move |_| *b))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(boots: &[&str]) -> String {
        testlog::lines("", 42, boots, |_| "x=1".into())
    }

    fn check(text: &str, min_boots: usize) -> Result<Stream, String> {
        let lines = parse_log(text)?;
        let mut v = check_streams(lines, &[""], min_boots)?;
        Ok(v.remove(0))
    }

    #[test]
    fn good_log_passes() {
        let s = check(&log(&testlog::boots(2, 5)), 2).expect("passes");
        assert_eq!(s.boots, ["a", "b"]);
        assert_eq!(s.boot_start, [0, 5]);
        assert_eq!(s.segments().len(), 2);
        assert_eq!(s.max_gap_ms, 100);
        assert_eq!(s.lines[3].get("x"), Some("1"));
        assert!(s.summary().contains("10 lines, seq 0..=9, pid 42, 2 boots"));
    }

    #[test]
    fn ticker_writes_parseable_lines() {
        let dir = std::env::temp_dir().join(format!("wl-lib-test-{}", std::process::id()));
        let path = dir.to_string_lossy().to_string();
        let mut t = Ticker::open(&path, Some("main")).expect("open");
        for _ in 0..3 {
            t.tick("k=v").expect("tick");
        }
        let lines = read_log(&path).expect("read");
        let _ = fs::remove_file(&dir);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2].seq, 2);
        assert_eq!(lines[0].src, "main");
        assert_eq!(lines[0].pid, std::process::id());
        assert_eq!(lines[1].get("k"), Some("v"));
        assert!(check_streams(lines, &["main"], 1).is_ok());
    }

    #[test]
    fn empty_log_fails() {
        assert!(check("", 1).unwrap_err().contains("no lines"));
        assert!(check("\n\n", 1).is_err());
    }

    #[test]
    fn gap_fails() {
        let text = log(&testlog::boots(2, 4)).replace("seq=5 ", "seq=6 ");
        assert!(check(&text, 2).unwrap_err().contains("gap"));
    }

    #[test]
    fn repeat_fails() {
        let text = log(&testlog::boots(2, 4)).replace("seq=5 ", "seq=4 ");
        assert!(check(&text, 2).is_err());
    }

    #[test]
    fn restart_fails() {
        // A second run appending to the same log starts again from 0.
        let text = log(&testlog::boots(1, 4))
            + &testlog::lines("", 43, &testlog::boots(1, 4), |_| String::new());
        assert!(check(&text, 1).unwrap_err().contains("restart"));
    }

    #[test]
    fn single_boot_fails() {
        let text = log(&testlog::boots(1, 10));
        assert!(check(&text, 1).is_ok());
        assert!(check(&text, 2).unwrap_err().contains("1 boot(s)"));
        assert!(check(&log(&testlog::boots(3, 4)), 4).is_err());
    }

    #[test]
    fn pid_change_fails() {
        let text = log(&testlog::boots(2, 4)).replace("seq=6 pid=42", "seq=6 pid=44");
        assert!(check(&text, 2).unwrap_err().contains("pid"));
    }

    #[test]
    fn monotonic_going_back_fails() {
        let text = log(&testlog::boots(2, 4)).replace("mono_ms=1500", "mono_ms=10");
        assert!(check(&text, 2).unwrap_err().contains("went back"));
    }

    #[test]
    fn earlier_boot_again_fails() {
        let text = log(&["a", "a", "b", "b", "a", "a", "a"]);
        assert!(check(&text, 2).unwrap_err().contains("earlier boot"));
    }

    #[test]
    fn too_short_last_boot_fails() {
        let text = log(&["a", "a", "a", "b"]);
        assert!(check(&text, 2).unwrap_err().contains("last boot"));
    }

    #[test]
    fn partial_last_line_is_ignored_but_garbage_is_not() {
        let text = log(&testlog::boots(1, 4)) + "seq=4 pid=4";
        assert_eq!(check(&text, 1).expect("passes").lines.len(), 4);
        let text = log(&testlog::boots(1, 4)) + "garbage\n";
        assert!(check(&text, 1).unwrap_err().contains("no seq="));
    }

    #[test]
    fn streams_are_checked_separately_and_must_all_be_there() {
        let text = testlog::lines("p", 1, &testlog::boots(2, 3), |_| String::new())
            + &testlog::lines("c", 2, &testlog::boots(2, 3), |_| String::new());
        let lines = parse_log(&text).expect("parses");
        let v = check_streams(lines.clone(), &["p", "c"], 2).expect("passes");
        assert_eq!(v[1].pid, 2);
        assert!(check_streams(lines.clone(), &["p", "c", "g"], 2)
            .unwrap_err()
            .contains("stream g: no lines"));
        assert!(check_streams(lines, &["p"], 2)
            .unwrap_err()
            .contains("unexpected stream"));
    }

    #[test]
    fn lists_and_constants() {
        let text = testlog::lines("", 1, &testlog::boots(2, 3), |s| {
            format!("tids=1,2,3 n={}", s / 4)
        });
        let s = check(&text, 2).expect("passes");
        assert_eq!(s.lines[0].list::<u32>("tids"), Ok(vec![1, 2, 3]));
        assert_eq!(constant(&s, "tids"), Ok("1,2,3"));
        assert!(constant(&s, "n").is_err());
    }

    #[test]
    fn advancing_and_all_ok() {
        let grow = testlog::lines("", 1, &testlog::boots(2, 3), |s| format!("n={s} r=ok"));
        let s = check(&grow, 2).expect("passes");
        assert!(advancing(&s, "n").is_ok());
        assert!(all_ok(&s, "r").is_ok());
        assert!(all_ok(&s, "n").is_err());
        let reset = testlog::lines("", 1, &testlog::boots(2, 3), |s| format!("n={}", s % 3 + 1));
        assert!(advancing(&check(&reset, 2).expect("passes"), "n")
            .unwrap_err()
            .contains("went back"));
        let stuck = testlog::lines("", 1, &testlog::boots(2, 3), |s| format!("n={}", s.min(3)));
        assert!(advancing(&check(&stuck, 2).expect("passes"), "n")
            .unwrap_err()
            .contains("did not grow"));
    }

    #[test]
    fn args_and_helpers() {
        let mut a = Args::from_vec(
            "u",
            vec!["--role".into(), "child".into(), "log".into(), "7".into()],
        );
        assert_eq!(a.role().as_deref(), Some("child"));
        assert_eq!(a.req(), "log");
        assert_eq!(a.opt(3u32), 7);
        assert_eq!(a.opt(3u32), 3);
        let mut x = 1;
        assert_ne!(xorshift(&mut x), 0);
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
        assert!(status_field("/proc/self/status", "Pid").is_some());
        let mut r = record(7, 1234);
        assert_eq!(parse_record(&r), Some((7, 1234)));
        r[17] ^= 1;
        assert_eq!(parse_record(&r), None);
    }
}
