//! New TCP connections to the workloads' listening sockets, held back while
//! they are checkpointed.
//!
//! A connection the kernel has completed but the workload has not yet
//! accepted sits in the listen socket's queue, and CRIU refuses to dump it
//! ("in-flight connection"); a frozen workload accepts nothing, so under a
//! steady stream of clients every dump would race them. Before the freeze,
//! an nftables table drops the SYNs of new connections to those ports (the
//! clients send them again after a second or more and connect once the
//! workload runs again, on the old kernel or the new one), then the
//! workload is given a moment to accept what is already queued. The new
//! kernel never has the table.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::child::{self, Limits};
use crate::proc;
use crate::workload::Workload;

/// The nftables table (family inet) that holds new connections back.
pub const HOLD_TABLE: &str = "kupgrade-hold";

/// How long a workload gets to accept the connections already queued.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The TCP ports each workload listens on, as (port, workload name).
pub fn listening_ports(ws: &[Workload]) -> BTreeMap<u16, String> {
    let table = proc::tcp_sockets();
    let mut out = BTreeMap::new();
    for w in ws {
        let inodes = proc::socket_inodes(&w.pids);
        for s in &table {
            if s.state == proc::TCP_LISTEN && inodes.contains(&s.inode) {
                out.entry(s.local_port).or_insert_with(|| w.name.clone());
            }
        }
    }
    out
}

/// Connections on `ports` not yet accepted: queued on a listening socket,
/// or half open (their handshake completes even while the SYNs of new ones
/// are dropped). Ports with none are left out.
pub fn waiting(ports: &[u16]) -> BTreeMap<u16, u32> {
    waiting_in(&proc::tcp_sockets(), ports)
}

fn waiting_in(table: &[proc::TcpSocket], ports: &[u16]) -> BTreeMap<u16, u32> {
    let mut out = BTreeMap::new();
    for s in table.iter().filter(|s| ports.contains(&s.local_port)) {
        let n = match s.state {
            proc::TCP_LISTEN => s.rx_queue,
            proc::TCP_SYN_RECV => 1,
            _ => 0,
        };
        if n > 0 {
            *out.entry(s.local_port).or_insert(0) += n;
        }
    }
    out
}

/// The table that drops the first SYN of new connections to `ports`.
pub fn hold_table(ports: &[u16]) -> String {
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "table inet {HOLD_TABLE} {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority -10; policy accept;\n\
         \t\ttcp dport {{ {} }} tcp flags & (syn | ack) == syn drop\n\
         \t}}\n\
         }}\n",
        list.join(", ")
    )
}

fn nft(args: &[&str], input: Option<&str>, limits: Limits) -> Result<(), String> {
    let out = child::run(
        Command::new("nft").args(args),
        input.map(str::as_bytes),
        limits,
    )
    .map_err(|e| match e {
        child::Error::Spawn { .. } => {
            format!("{} (apt-get install nftables)", child::chain(&e))
        }
        e => child::chain(&e),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nft {}: {}", args.join(" "), out.stderr().trim()))
    }
}

/// Drops new connections to `ports` until [`release`]; a signal (`stop`)
/// stops a hung nft.
pub fn hold(ports: &[u16], stop: &AtomicBool) -> Result<(), String> {
    let limits = Limits::deadline(child::TOOL_DEADLINE).stopped_by(stop);
    nft(&["-f", "-"], Some(&hold_table(ports)), limits)
}

/// Lets new connections in again; a table already gone is fine.
pub fn release() -> Result<(), String> {
    let limits = Limits::deadline(child::TOOL_DEADLINE);
    match nft(&["delete", "table", "inet", HOLD_TABLE], None, limits) {
        Err(e) if e.contains("No such file") => Ok(()),
        r => r,
    }
}

/// Waits until nothing waits on `ports`, or says what still does.
pub fn drain(ports: &BTreeMap<u16, String>, timeout: Duration) -> Result<(), String> {
    let list: Vec<u16> = ports.keys().copied().collect();
    let start = Instant::now();
    loop {
        let left = waiting(&list);
        if left.is_empty() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            let what: Vec<String> = left
                .iter()
                .map(|(port, n)| format!("{n} on port {port} of workload {}", ports[port]))
                .collect();
            return Err(format!(
                "connections not accepted within {} ms ({}): CRIU cannot checkpoint a connection still waiting in a listen queue; is the workload accepting?",
                timeout.as_millis(),
                what.join(", ")
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1B58 00000000:0000 0A 00000000:00000002 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0F02000A:1B58 0202000A:A5C4 03 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 100 0 0 10 0
   2: 0F02000A:1B58 0202000A:A5C6 01 00000000:00000000 00:00000000 00000000     0        0 4300 1 0000000000000000 100 0 0 10 0
   3: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn the_listen_queue_is_read_from_proc_net_tcp() {
        let t = proc::parse_tcp_table(TABLE);
        assert_eq!(t.len(), 4);
        assert_eq!(
            t[0],
            proc::TcpSocket {
                local_port: 7000,
                state: proc::TCP_LISTEN,
                rx_queue: 2,
                inode: 4242
            }
        );
        assert_eq!(t[1].state, proc::TCP_SYN_RECV);
    }

    #[test]
    fn queued_and_half_open_connections_count_established_ones_do_not() {
        let t = proc::parse_tcp_table(TABLE);
        // Two in the accept queue, one half open; the established one and
        // the idle port 22 do not count.
        assert_eq!(waiting_in(&t, &[7000, 22]), BTreeMap::from([(7000, 3)]));
        assert!(waiting_in(&t, &[22]).is_empty());
        assert!(waiting_in(&t, &[]).is_empty());
    }

    #[test]
    fn the_hold_table_drops_only_the_syn_of_new_connections_to_the_ports() {
        let t = hold_table(&[7000, 11211]);
        assert!(t.starts_with("table inet kupgrade-hold {"), "{t}");
        assert!(t.contains("hook input"), "{t}");
        assert!(
            t.contains("tcp dport { 7000, 11211 } tcp flags & (syn | ack) == syn drop"),
            "{t}"
        );
    }

    #[test]
    fn only_the_workloads_own_listening_sockets_are_held() {
        // This test process listens on a port; as a workload it owns it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let me = Workload {
            name: "me".into(),
            cgroup: "/sys/fs/cgroup/kupgrade/me".into(),
            root_pid: std::process::id() as i32,
            pids: vec![std::process::id() as i32],
            pid_namespace: false,
            ipc_namespace: false,
            tcp_established: false,
            memory_bytes: 0,
        };
        let ports = listening_ports(std::slice::from_ref(&me));
        assert_eq!(ports.get(&port), Some(&"me".to_string()));
        // A workload without that socket does not hold the port.
        let other = Workload {
            pids: vec![1],
            ..me
        };
        assert!(!listening_ports(&[other]).contains_key(&port));
    }

    #[test]
    fn draining_reports_the_connections_left_in_the_queue() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let ports = BTreeMap::from([(port, "web".to_string())]);
        assert!(drain(&ports, Duration::from_millis(50)).is_ok());
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let e = drain(&ports, Duration::from_millis(50)).unwrap_err();
        assert!(
            e.contains(&format!("1 on port {port} of workload web")),
            "{e}"
        );
        // Accepted, nothing waits any more.
        let _s = l.accept().unwrap();
        assert!(drain(&ports, Duration::from_millis(500)).is_ok());
    }
}
