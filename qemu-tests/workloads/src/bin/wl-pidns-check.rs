//! Proves from a wl-pidns log that a process tree in its own PID namespace
//! came through the upgrades: the common checks on the parent and on each
//! child (seq from 0 without gap, monotonic time, at least N boots, and one
//! pid each: the pid inside the namespace never changed); every line was
//! written inside a PID namespace below the root (NSpid has at least two
//! levels, the innermost being the logged pid); the children are the ones
//! the parent started and their parent is still the parent. Pids in the
//! root namespace are reported, not required to stay the same.
//!
//! Usage: `wl-pidns-check LOG [min boots, 2]`.

use kupgrade_workloads::{check_streams, checker_main, constant, group_streams, Line, Stream};

fn nspids(s: &Stream) -> Result<(), String> {
    for l in &s.lines {
        let v: Vec<u32> = l.list("nspids")?;
        if v.len() < 2 {
            return Err(format!(
                "{}: line {}: NSpid {v:?}: not in its own PID namespace",
                s.src, l.no
            ));
        }
        if v.last() != Some(&l.pid) {
            return Err(format!(
                "{}: line {}: NSpid {v:?} does not end with pid {}",
                s.src, l.no, l.pid
            ));
        }
    }
    Ok(())
}

fn check(lines: Vec<Line>, min_boots: usize) -> Result<String, String> {
    let parent_lines = group_streams(lines.clone())
        .remove("parent")
        .unwrap_or_default();
    let n: usize = parent_lines
        .first()
        .ok_or("stream parent: no lines")?
        .num("children")?;
    let names: Vec<String> = std::iter::once("parent".to_string())
        .chain((0..n).map(|i| format!("child-{i}")))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let s = check_streams(lines, &refs, min_boots)?;
    let parent = &s[0];
    if n == 0 {
        return Err("the parent started no children".into());
    }
    constant(parent, "children")?;
    let kids: Vec<u32> = constant(parent, "kids")?
        .split(',')
        .filter_map(|k| k.parse().ok())
        .collect();
    for st in &s {
        nspids(st)?;
    }
    for (i, child) in s[1..].iter().enumerate() {
        if kids.get(i) != Some(&child.pid) {
            return Err(format!(
                "child-{i} has pid {}, the parent started {:?}",
                child.pid,
                kids.get(i)
            ));
        }
        if constant(child, "ppid")? != parent.pid.to_string() {
            return Err(format!(
                "child-{i}'s parent is {}, not {}",
                constant(child, "ppid")?,
                parent.pid
            ));
        }
    }
    let roots = |l: &Line| {
        l.str("nspids")
            .map(|v| v.split(',').next().unwrap_or("?").to_string())
    };
    let before: Vec<String> = s
        .iter()
        .map(|st| roots(&st.lines[0]))
        .collect::<Result<_, _>>()?;
    let after: Vec<String> = s
        .iter()
        .map(|st| roots(st.last()))
        .collect::<Result<_, _>>()?;
    Ok(format!(
        "{} processes in a PID namespace kept their pids {} over {} boots (root-namespace pids {} at the start, {} now); {}",
        s.len(),
        s.iter().map(|st| st.pid.to_string()).collect::<Vec<_>>().join(","),
        parent.boots.len(),
        before.join(","),
        after.join(","),
        s.iter().map(Stream::summary).collect::<Vec<_>>().join("; ")
    ))
}

fn main() {
    checker_main("wl-pidns-check LOG [min boots]", check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kupgrade_workloads::{parse_log, testlog};

    fn log(child1_pid: u32, nsdepth: usize) -> String {
        let b = testlog::boots(2, 4);
        let ns = |root: u32, pid: u32| {
            if nsdepth > 1 {
                format!("nspids={root},{pid}")
            } else {
                format!("nspids={pid}")
            }
        };
        let mut t = testlog::lines("parent", 2, &b, |_| {
            format!("children=2 kids=3,4 {}", ns(10002, 2))
        });
        t += &testlog::lines("child-0", 3, &b, |_| format!("ppid=2 {}", ns(10003, 3)));
        t += &testlog::lines("child-1", child1_pid, &b, |s| {
            format!("ppid=2 {}", ns(10004 + s as u32 / 4, child1_pid))
        });
        t
    }

    fn run(text: &str) -> Result<String, String> {
        check(parse_log(text)?, 2)
    }

    #[test]
    fn good_and_bad() {
        let ok = run(&log(4, 2)).expect("ok");
        assert!(
            ok.starts_with("3 processes in a PID namespace kept their pids 2,3,4 over 2 boots"),
            "{ok}"
        );
        assert!(
            ok.contains("10002,10003,10004 at the start, 10002,10003,10005 now"),
            "{ok}"
        );
        assert!(run(&log(4, 1))
            .unwrap_err()
            .contains("not in its own PID namespace"));
        assert!(run(&log(5, 2)).unwrap_err().contains("child-1 has pid 5"));
        let missing: String = log(4, 2)
            .lines()
            .filter(|l| !l.contains("child-1"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(run(&missing).unwrap_err().contains("child-1: no lines"));
        assert!(run("").is_err());
    }
}
