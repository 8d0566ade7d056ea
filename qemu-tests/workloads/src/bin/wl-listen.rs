//! Servers for host probes: a TCP listener that keeps accepting and a bound
//! UDP socket that keeps answering.
//!
//! Each accepted TCP connection gets its own thread that echoes every line
//! back unchanged. Each UDP datagram is answered with PREFIX followed by the
//! same bytes. One log stream, every line stamped with the boot id:
//! `event=accept conn=N peer=ADDR`, `event=close conn=N lines=L`,
//! `event=udp n=N peer=ADDR bytes=B`, and `event=tick accepts=A datagrams=D`
//! every tick so that the log also shows the process running between probes.
//!
//! Usage: `wl-listen LOG TCP_PORT UDP_PORT [UDP reply prefix, "pong:"] [tick ms, 100]`.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kupgrade_workloads::{die, Args, Ticker};

type Log = Arc<Mutex<Ticker>>;

fn log(out: &Log, line: &str) {
    // A thread that died holding the lock leaves the ticker usable.
    let mut t = out.lock().unwrap_or_else(|p| p.into_inner());
    t.tick_or_die(line);
}

fn serve(out: Log, conn: TcpStream, n: u64) {
    let Ok(mut w) = conn.try_clone() else { return };
    let mut lines = 0u64;
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { break };
        if writeln!(w, "{line}").is_err() {
            break;
        }
        lines += 1;
    }
    log(&out, &format!("event=close conn={n} lines={lines}"));
}

fn udp(out: Log, sock: UdpSocket, prefix: String, count: Arc<AtomicU64>) {
    let mut buf = [0u8; 2048];
    loop {
        let (len, peer) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => die(format!("UDP receive: {e}")),
        };
        let mut reply = prefix.as_bytes().to_vec();
        reply.extend_from_slice(&buf[..len]);
        // A lost reply is the client's to retry; the server carries on.
        let _ = sock.send_to(&reply, peer);
        let n = count.fetch_add(1, Ordering::SeqCst);
        log(&out, &format!("event=udp n={n} peer={peer} bytes={len}"));
    }
}

fn main() {
    let mut args = Args::new("wl-listen LOG TCP_PORT UDP_PORT [UDP reply prefix] [tick ms]");
    let path = args.req();
    let tcp_port: u16 = args.req_as();
    let udp_port: u16 = args.req_as();
    let prefix = args.opt("pong:".to_string());
    let tick: u64 = args.opt(100);
    let listener = TcpListener::bind(("0.0.0.0", tcp_port))
        .unwrap_or_else(|e| die(format!("TCP port {tcp_port}: {e}")));
    let sock = UdpSocket::bind(("0.0.0.0", udp_port))
        .unwrap_or_else(|e| die(format!("UDP port {udp_port}: {e}")));
    let out: Log = Arc::new(Mutex::new(Ticker::open_or_die(&path, None)));
    let (accepts, datagrams) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
            die(format!("cannot start a thread: {e}"));
        }
    };
    let (o, d) = (Arc::clone(&out), Arc::clone(&datagrams));
    spawn("udp", Box::new(move || udp(o, sock, prefix, d)));
    let (o, a, d) = (
        Arc::clone(&out),
        Arc::clone(&accepts),
        Arc::clone(&datagrams),
    );
    spawn(
        "tick",
        Box::new(move || loop {
            let (a, d) = (a.load(Ordering::SeqCst), d.load(Ordering::SeqCst));
            log(
                &o,
                &format!("event=tick accepts={a} datagrams={d} tcp={tcp_port} udp={udp_port}"),
            );
            std::thread::sleep(Duration::from_millis(tick));
        }),
    );
    loop {
        let (conn, peer) = match listener.accept() {
            Ok(x) => x,
            // EINTR, a connection reset before accept, too many files: go on.
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let n = accepts.fetch_add(1, Ordering::SeqCst);
        log(&out, &format!("event=accept conn={n} peer={peer}"));
        let o = Arc::clone(&out);
        spawn("conn", Box::new(move || serve(o, conn, n)));
    }
}
