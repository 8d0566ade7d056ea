//! Host-side probes through QEMU's `hostfwd`. The connected ones (`echo`,
//! `counter`, `http`) hold one connection, send a request every interval and
//! check every reply; they never reconnect: the point is that the same
//! connection survives the upgrade. The others (`connect`, `udp`, `dns`)
//! send each request afresh and count how many got no right answer.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::scenario::{Probe, ProbeMode};

mod dns;
mod http;
mod mqtt;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProbeResult {
    pub name: String,
    pub connected: bool,
    pub sent: u64,
    pub replies: u64,
    /// Longest time between two consecutive replies: the pause the client saw.
    pub max_gap_ms: u64,
    /// Seconds since the probe connected when that longest gap ended.
    pub max_gap_end_s: f64,
    pub reset: bool,
    pub eof: bool,
    /// Replies that skipped a sequence number (lost) or went back (reordered).
    pub lost: u64,
    pub reordered: u64,
    pub wrong: u64,
    pub error: Option<String>,
    #[serde(default)]
    pub mode: ProbeMode,
    /// Requests that got no right answer (`connect` and `udp` modes, where
    /// the service may vanish for the pause).
    #[serde(default)]
    pub failures: u64,
    /// The last request was answered: the service is back.
    #[serde(default)]
    pub recovered: bool,
}

impl ProbeResult {
    /// A reply came now: counted, and the gap since the one before kept if
    /// it is the longest (`t0`: when the probe connected).
    fn reply_at(&mut self, t0: Instant, last_reply: &mut Instant) {
        let now = Instant::now();
        let gap = now.duration_since(*last_reply).as_millis() as u64;
        if gap > self.max_gap_ms {
            self.max_gap_ms = gap;
            self.max_gap_end_s = now.duration_since(t0).as_secs_f64();
        }
        *last_reply = now;
        self.replies += 1;
    }

    /// A reply numbered `n` (`None`: it had no right number), where
    /// `next_expected` was due: lost, reordered or wrong ones counted.
    fn sequence(&mut self, n: Option<u64>, next_expected: &mut u64) {
        match n {
            Some(n) if n == *next_expected => *next_expected += 1,
            Some(n) if n > *next_expected => {
                self.lost += n - *next_expected;
                *next_expected = n + 1;
            }
            Some(_) => self.reordered += 1,
            None => self.wrong += 1,
        }
    }

    pub fn clean(&self) -> bool {
        if matches!(
            self.mode,
            ProbeMode::Connect | ProbeMode::Udp | ProbeMode::Dns
        ) {
            return self.replies > 0 && self.recovered && self.wrong == 0;
        }
        self.connected
            && self.replies > 0
            && !self.reset
            && !self.eof
            && self.lost == 0
            && self.reordered == 0
            && self.wrong == 0
            && self.error.is_none()
    }
}

/// Connects to 127.0.0.1:`port`, retrying until a first reply comes back or
/// `connect_deadline` passes, then probes until `stop` is set.
pub fn run(
    probe: &Probe,
    port: u16,
    connect_deadline: Duration,
    stop: Arc<AtomicBool>,
) -> ProbeResult {
    match probe.mode {
        ProbeMode::Connect | ProbeMode::Udp | ProbeMode::Dns => {
            return run_requests(probe, port, stop)
        }
        ProbeMode::Http => return run_http(probe, port, connect_deadline, stop),
        ProbeMode::Mqtt => return run_mqtt(probe, port, connect_deadline, stop),
        ProbeMode::Echo | ProbeMode::Counter => {}
    }
    let mut res = ProbeResult {
        name: probe.name.clone(),
        ..Default::default()
    };
    let Some((stream, mut reader, first)) =
        connect_retrying(&mut res, connect_deadline, &stop, || handshake(probe, port))
    else {
        return res;
    };
    let t0 = Instant::now();
    let mut last_reply = Instant::now();
    let mut next_expected = first + 1;
    let mut seq = 1u64;
    let mut writer = stream;
    let _ = writer.set_write_timeout(Some(Duration::from_millis(200)));
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        // Sending into a paused peer just queues: TCP keeps it until the
        // guest comes back, which is the behaviour under test.
        if writer.write_all(request(probe, seq).as_bytes()).is_ok() {
            res.sent += 1;
            seq += 1;
        }
        let until = Instant::now() + Duration::from_millis(probe.interval_ms);
        while Instant::now() < until {
            // A read that times out keeps what it got in `line`: only a whole
            // line is a reply.
            match reader.read_line(&mut line) {
                Ok(0) => {
                    res.eof = true;
                    return finish(res, &writer);
                }
                Ok(_) if !line.ends_with('\n') => {}
                Ok(_) => {
                    res.reply_at(t0, &mut last_reply);
                    res.sequence(parse_reply(probe, line.trim_end()), &mut next_expected);
                    line.clear();
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    res.reset = true;
                    return finish(res, &writer);
                }
                Err(e) => {
                    res.error = Some(e.to_string());
                    return finish(res, &writer);
                }
            }
        }
    }
    finish(res, &writer)
}

/// `connect` and `udp` modes: one request per interval, each on a new
/// connection or as one datagram, until `stop`.
fn run_requests(probe: &Probe, port: u16, stop: Arc<AtomicBool>) -> ProbeResult {
    let mut res = ProbeResult {
        name: probe.name.clone(),
        mode: probe.mode,
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut last_ok: Option<Instant> = None;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        // Ok(Ok): the right answer; Ok(Err): an answer, wrong; Err: none.
        let answer: Result<Result<(), String>, String> = match probe.mode {
            ProbeMode::Dns => dns_once(port, &probe.query, seq as u16).map(|addrs| {
                let right = if probe.expect.is_empty() {
                    !addrs.is_empty()
                } else {
                    addrs.iter().any(|a| a.to_string() == probe.expect)
                };
                if right {
                    Ok(())
                } else {
                    Err(format!(
                        "answer {addrs:?} for {}, expected {}",
                        probe.query,
                        if probe.expect.is_empty() {
                            "an address"
                        } else {
                            &probe.expect
                        }
                    ))
                }
            }),
            _ => {
                let line = format!("{} {seq}", probe.payload);
                let reply = if probe.mode == ProbeMode::Udp {
                    udp_once(port, &line)
                } else {
                    tcp_once(port, &line)
                };
                let want = format!("{}{line}", probe.reply_prefix);
                reply.map(|r| {
                    if r == want {
                        Ok(())
                    } else {
                        Err(format!("reply {r:?}, expected {want:?}"))
                    }
                })
            }
        };
        res.sent += 1;
        match answer {
            Ok(Ok(())) => {
                let now = Instant::now();
                if let Some(prev) = last_ok {
                    let gap = now.duration_since(prev).as_millis() as u64;
                    if gap > res.max_gap_ms {
                        res.max_gap_ms = gap;
                        res.max_gap_end_s = now.duration_since(t0).as_secs_f64();
                    }
                }
                last_ok = Some(now);
                res.replies += 1;
                res.connected = true;
                res.recovered = true;
            }
            Ok(Err(wrong)) => {
                res.wrong += 1;
                res.recovered = false;
                res.error = Some(wrong);
            }
            Err(e) => {
                res.failures += 1;
                res.recovered = false;
                res.error = Some(e);
            }
        }
        if res.recovered {
            res.error = None;
        }
        seq += 1;
        let spent = started.elapsed();
        std::thread::sleep(Duration::from_millis(probe.interval_ms).saturating_sub(spent));
    }
    res
}

fn tcp_once(port: u16, line: &str) -> Result<String, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    let n = BufReader::new(&s)
        .read_line(&mut reply)
        .map_err(|e| e.to_string())?;
    // QEMU's port forward accepts on the host side at once and closes when
    // the guest never answers the SYN (held back during the pause): no
    // reply, not a wrong one.
    if n == 0 {
        return Err("closed without a reply".into());
    }
    Ok(reply.trim_end().to_string())
}

fn udp_once(port: u16, line: &str) -> Result<String, String> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    s.send_to(line.as_bytes(), ("127.0.0.1", port))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_string())
}

/// One DNS query over UDP; the A addresses of the answer.
fn dns_once(port: u16, name: &str, id: u16) -> Result<Vec<std::net::Ipv4Addr>, String> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    s.send_to(&dns::query(id, name)?, ("127.0.0.1", port))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    let n = s.recv(&mut buf).map_err(|e| e.to_string())?;
    dns::parse_answer(id, &buf[..n])
}

/// Whether an HTTP response is the right one: a 2xx status and a body
/// holding `expect`.
fn judge_http(probe: &Probe, r: &http::Response) -> Result<(), String> {
    if r.status / 100 != 2 {
        return Err(format!("status {}", r.status));
    }
    if !probe.expect.is_empty() && !String::from_utf8_lossy(&r.body).contains(probe.expect.as_str())
    {
        return Err(format!("the body does not contain {:?}", probe.expect));
    }
    Ok(())
}

/// What waiting for one whole message (an HTTP response, an MQTT packet)
/// on a held connection gave.
enum Framed<T> {
    Whole(T),
    Eof,
    Reset,
    Stopped,
    Failed(String),
}

/// Reads until `parse` finds one whole message at the start of `buf` (it
/// says how many bytes it used), or `until` passes (then `Failed`), or
/// `stop` is set.
fn read_framed<T>(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    until: Option<Instant>,
    stop: &AtomicBool,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, String>,
) -> Framed<T> {
    use std::io::Read;
    let mut chunk = [0u8; 16 << 10];
    loop {
        match parse(buf) {
            Ok(Some((m, used))) => {
                buf.drain(..used);
                return Framed::Whole(m);
            }
            Ok(None) => {}
            Err(e) => return Framed::Failed(e),
        }
        if stop.load(Ordering::Relaxed) {
            return Framed::Stopped;
        }
        if until.is_some_and(|u| Instant::now() > u) {
            return Framed::Failed("nothing whole in time".into());
        }
        match s.read(&mut chunk) {
            Ok(0) => return Framed::Eof,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Framed::Reset,
            Err(e) => return Framed::Failed(e.to_string()),
        }
    }
}

/// One HTTP response on the keep-alive connection.
fn read_response(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    until: Option<Instant>,
    stop: &AtomicBool,
) -> Framed<http::Response> {
    read_framed(s, buf, until, stop, http::parse_response)
}

/// Connects and gets one right response, so we know the guest's server,
/// not just QEMU's forwarder, is there.
/// Retries `handshake` (its first request and reply included) until it
/// works or `deadline` passes; records the outcome in `res`.
fn connect_retrying<T>(
    res: &mut ProbeResult,
    deadline: Duration,
    stop: &AtomicBool,
    mut handshake: impl FnMut() -> Result<T, String>,
) -> Option<T> {
    let start = Instant::now();
    loop {
        match handshake() {
            Ok(done) => {
                res.connected = true;
                res.error = None;
                res.sent = 1;
                res.replies = 1;
                return Some(done);
            }
            Err(e) if start.elapsed() < deadline && !stop.load(Ordering::Relaxed) => {
                res.error = Some(e);
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => {
                res.error = Some(format!("never connected: {e}"));
                return None;
            }
        }
    }
}

fn http_handshake(probe: &Probe, port: u16, stop: &AtomicBool) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    s.write_all(http::request(&probe.path).as_bytes())
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    match read_response(&mut s, &mut buf, Some(until), stop) {
        Framed::Whole(r) if r.close => Err("the server closes the connection".into()),
        Framed::Whole(r) => judge_http(probe, &r).map(|()| s),
        Framed::Eof => Err("closed by the guest".into()),
        Framed::Reset => Err("reset by the guest".into()),
        Framed::Stopped => Err("stopped".into()),
        Framed::Failed(e) => Err(e),
    }
}

/// `http` mode: one keep-alive connection, a `GET` every interval, each
/// response read whole and checked before the next request.
fn run_http(
    probe: &Probe,
    port: u16,
    connect_deadline: Duration,
    stop: Arc<AtomicBool>,
) -> ProbeResult {
    let mut res = ProbeResult {
        name: probe.name.clone(),
        mode: probe.mode,
        ..Default::default()
    };
    let Some(mut s) = connect_retrying(&mut res, connect_deadline, &stop, || {
        http_handshake(probe, port, &stop)
    }) else {
        return res;
    };
    let t0 = Instant::now();
    let mut last_reply = Instant::now();
    let mut buf = Vec::new();
    let req = http::request(&probe.path);
    while !stop.load(Ordering::Relaxed) {
        let sent_at = Instant::now();
        if let Err(e) = s.write_all(req.as_bytes()) {
            res.error = Some(format!("cannot send: {e}"));
            return finish(res, &s);
        }
        res.sent += 1;
        // No deadline: while the guest is paused, TCP holds the request
        // and the response comes when it is back.
        match read_response(&mut s, &mut buf, None, &stop) {
            Framed::Whole(r) => {
                res.reply_at(t0, &mut last_reply);
                if let Err(e) = judge_http(probe, &r) {
                    res.wrong += 1;
                    res.error = Some(format!("response {}: {e}", res.replies));
                }
                if r.close {
                    // The server ended keep-alive: the connection is gone.
                    res.eof = true;
                    return finish(res, &s);
                }
            }
            Framed::Eof => {
                res.eof = true;
                return finish(res, &s);
            }
            Framed::Reset => {
                res.reset = true;
                return finish(res, &s);
            }
            Framed::Stopped => break,
            Framed::Failed(e) => {
                res.error = Some(e);
                return finish(res, &s);
            }
        }
        let wait = Duration::from_millis(probe.interval_ms).saturating_sub(sent_at.elapsed());
        std::thread::sleep(wait);
    }
    finish(res, &s)
}

/// The topic the `mqtt` probe publishes to and hears back from.
const MQTT_TOPIC: &str = "kupgrade/probe";

/// One MQTT packet: its type and body.
fn read_packet(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    until: Option<Instant>,
    stop: &AtomicBool,
) -> Framed<(u8, Vec<u8>)> {
    read_framed(s, buf, until, stop, |b| {
        mqtt::parse(b).map(|p| p.map(|(kind, body, used)| ((kind, body), used)))
    })
}

/// Connects, subscribes and hears its first message back through the
/// broker, so we know the guest's broker, not just QEMU's forwarder, is there.
fn mqtt_handshake(
    probe: &Probe,
    port: u16,
    stop: &AtomicBool,
) -> Result<(TcpStream, Vec<u8>), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let until = Instant::now() + Duration::from_secs(3);
    let mut buf = Vec::new();
    let mut expect =
        |s: &mut TcpStream, want: u8, what: &str| match read_packet(s, &mut buf, Some(until), stop)
        {
            Framed::Whole((kind, body)) if kind == want => Ok(body),
            Framed::Whole((kind, _)) => Err(format!("packet type {kind} instead of the {what}")),
            Framed::Eof => Err("closed by the guest".into()),
            Framed::Reset => Err("reset by the guest".into()),
            Framed::Stopped => Err("stopped".into()),
            Framed::Failed(e) => Err(e),
        };
    s.write_all(&mqtt::connect(&format!("kupgrade-{}", probe.name)))
        .map_err(|e| e.to_string())?;
    let ack = expect(&mut s, mqtt::CONNACK, "CONNACK")?;
    if ack.get(1) != Some(&0) {
        return Err(format!("the broker refused the connection: {ack:?}"));
    }
    s.write_all(&mqtt::subscribe(MQTT_TOPIC))
        .map_err(|e| e.to_string())?;
    expect(&mut s, mqtt::SUBACK, "SUBACK")?;
    let first = format!("{} 0", probe.payload);
    s.write_all(&mqtt::publish(MQTT_TOPIC, first.as_bytes()))
        .map_err(|e| e.to_string())?;
    let body = expect(&mut s, mqtt::PUBLISH, "message published")?;
    match mqtt::published(&body)? {
        (topic, payload) if topic == MQTT_TOPIC && payload == first.as_bytes() => Ok((s, buf)),
        (topic, payload) => Err(format!(
            "heard {:?} on {topic} instead of {first:?}",
            String::from_utf8_lossy(&payload)
        )),
    }
}

/// `mqtt` mode: one connection to a broker, subscribed to a topic it
/// publishes `<payload> <seq>` to every interval; every message must come
/// back, in order.
fn run_mqtt(
    probe: &Probe,
    port: u16,
    connect_deadline: Duration,
    stop: Arc<AtomicBool>,
) -> ProbeResult {
    let mut res = ProbeResult {
        name: probe.name.clone(),
        mode: probe.mode,
        ..Default::default()
    };
    let Some((mut s, mut buf)) = connect_retrying(&mut res, connect_deadline, &stop, || {
        mqtt_handshake(probe, port, &stop)
    }) else {
        return res;
    };
    let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
    let t0 = Instant::now();
    let mut last_reply = Instant::now();
    let (mut seq, mut next_expected) = (1u64, 1u64);
    while !stop.load(Ordering::Relaxed) {
        // Into a paused broker this just queues, as TCP holds it.
        let message = format!("{} {seq}", probe.payload);
        if s.write_all(&mqtt::publish(MQTT_TOPIC, message.as_bytes()))
            .is_ok()
        {
            res.sent += 1;
            seq += 1;
        }
        let until = Instant::now() + Duration::from_millis(probe.interval_ms);
        while Instant::now() < until {
            match read_packet(&mut s, &mut buf, Some(until), &stop) {
                Framed::Whole((mqtt::PUBLISH, body)) => {
                    res.reply_at(t0, &mut last_reply);
                    let n = mqtt::published(&body).ok().and_then(|(topic, payload)| {
                        let text = String::from_utf8(payload).ok()?;
                        let rest = text.strip_prefix(probe.payload.as_str())?;
                        (topic == MQTT_TOPIC).then(|| rest.trim().parse::<u64>().ok())?
                    });
                    res.sequence(n, &mut next_expected);
                }
                Framed::Whole((kind, _)) => {
                    res.wrong += 1;
                    res.error = Some(format!("an unexpected packet of type {kind}"));
                }
                Framed::Eof => {
                    res.eof = true;
                    return finish(res, &s);
                }
                Framed::Reset => {
                    res.reset = true;
                    return finish(res, &s);
                }
                Framed::Stopped => break,
                // The interval is over: time for the next message.
                Framed::Failed(_) if Instant::now() >= until => break,
                Framed::Failed(e) => {
                    res.error = Some(e);
                    return finish(res, &s);
                }
            }
        }
    }
    finish(res, &s)
}

fn finish(res: ProbeResult, stream: &TcpStream) -> ProbeResult {
    let _ = stream.shutdown(Shutdown::Both);
    res
}

fn request(probe: &Probe, seq: u64) -> String {
    match probe.mode {
        ProbeMode::Counter => probe.send.clone(),
        _ => format!("{} {seq}\n", probe.payload),
    }
}

/// The number a reply carries: the echoed sequence, or the counter value.
fn parse_reply(probe: &Probe, line: &str) -> Option<u64> {
    let rest = line.strip_prefix(probe.reply_prefix.as_str())?;
    match probe.mode {
        // e.g. Redis `:42`, memcached `42`
        ProbeMode::Counter => rest
            .trim()
            .trim_start_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .ok(),
        _ => rest
            .strip_prefix(probe.payload.as_str())?
            .trim()
            .parse()
            .ok(),
    }
}

/// Connects and gets one reply, so we know the guest's server, not just
/// QEMU's forwarder, is there. Returns the number the reply carried.
fn handshake(probe: &Probe, port: u16) -> Result<(TcpStream, BufReader<TcpStream>, u64), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    for req in &probe.setup {
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        line.clear();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("closed by the guest during setup".into());
        }
    }
    line.clear();
    s.write_all(request(probe, 0).as_bytes())
        .map_err(|e| e.to_string())?;
    let first = match reader.read_line(&mut line) {
        Ok(0) => return Err("closed by the guest".into()),
        Ok(_) => match parse_reply(probe, line.trim_end()) {
            Some(n) if probe.mode == ProbeMode::Counter || n == 0 => n,
            _ => return Err(format!("unexpected first reply {line:?}")),
        },
        Err(e) => return Err(e.to_string()),
    };
    s.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| e.to_string())?;
    Ok((s, reader, first))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::AtomicU64;

    /// A stop flag that a thread sets after `ms`.
    fn stop_after(ms: u64) -> Arc<AtomicBool> {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            s2.store(true, Ordering::Relaxed);
        });
        stop
    }

    fn probe() -> Probe {
        Probe {
            name: "p".into(),
            guest_port: 0,
            interval_ms: 20,
            payload: "ping".into(),
            reply_prefix: String::new(),
            mode: ProbeMode::Echo,
            send: String::new(),
            setup: vec![],
            path: "/".into(),
            query: String::new(),
            expect: String::new(),
        }
    }

    #[test]
    fn counter_mode_follows_the_server_counter() {
        // A Redis-like INCR server starting at 41.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            let mut w = c.try_clone().unwrap();
            let mut n = 40;
            for line in BufReader::new(c).lines() {
                assert_eq!(line.unwrap(), "INCR k");
                n += 1;
                // skip one increment to show it is noticed
                if n == 45 {
                    n += 1;
                }
                write!(w, ":{n}\r\n").unwrap();
            }
        });
        let p = Probe {
            mode: ProbeMode::Counter,
            send: "INCR k\r\n".into(),
            ..probe()
        };
        let stop = stop_after(300);
        let r = run(&p, port, Duration::from_secs(5), stop);
        assert!(r.replies > 5, "{r:?}");
        assert_eq!(r.lost, 1, "{r:?}");
        assert_eq!(r.wrong + r.reordered, 0, "{r:?}");
    }

    /// An echo server on 127.0.0.1 that can drop a line or close early.
    fn server(drop_seq: Option<u64>, close_after: Option<u64>) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            let mut w = c.try_clone().unwrap();
            for line in BufReader::new(c).lines() {
                let line = line.unwrap();
                let n: u64 = line.split(' ').nth(1).unwrap().parse().unwrap();
                if Some(n) == close_after {
                    return;
                }
                if Some(n) != drop_seq {
                    writeln!(w, "{line}").unwrap();
                }
            }
        });
        port
    }

    fn run_for(port: u16, ms: u64) -> ProbeResult {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            s2.store(true, Ordering::Relaxed);
        });
        run(&probe(), port, Duration::from_secs(5), stop)
    }

    #[test]
    fn a_clean_echo_is_clean() {
        let r = run_for(server(None, None), 400);
        assert!(r.clean(), "{r:?}");
        assert!(r.replies >= 5);
    }

    #[test]
    fn a_lost_reply_is_counted() {
        let r = run_for(server(Some(3), None), 400);
        assert_eq!(r.lost, 1, "{r:?}");
        assert!(!r.clean());
    }

    #[test]
    fn a_closed_connection_is_eof() {
        let r = run_for(server(None, Some(4)), 1000);
        assert!(r.eof, "{r:?}");
        assert!(!r.clean());
    }

    #[test]
    fn udp_mode_counts_answers_and_recovery() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut buf = [0u8; 100];
            for i in 0.. {
                let (n, from) = sock.recv_from(&mut buf).unwrap();
                // Silent for a while, as a server paused by an upgrade.
                if !(3..6).contains(&i) {
                    let mut reply = b"pong:".to_vec();
                    reply.extend_from_slice(&buf[..n]);
                    sock.send_to(&reply, from).unwrap();
                }
            }
        });
        let p = Probe {
            mode: ProbeMode::Udp,
            reply_prefix: "pong:".into(),
            ..probe()
        };
        let stop = stop_after(2500);
        let r = run(&p, port, Duration::from_secs(5), stop);
        assert_eq!(r.failures, 3, "{r:?}");
        assert!(r.replies >= 5 && r.recovered && r.clean(), "{r:?}");
    }

    #[test]
    fn connect_mode_fails_while_nobody_listens() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = Probe {
            mode: ProbeMode::Connect,
            ..probe()
        };
        let stop = stop_after(200);
        let r = run(&p, port, Duration::from_secs(5), stop);
        assert!(r.failures > 0 && r.replies == 0 && !r.clean(), "{r:?}");
    }

    /// As QEMU's port forward during the pause: connections accepted and
    /// closed without a byte. They are no reply, not a wrong one; a reply
    /// with other text is wrong.
    #[test]
    fn connect_mode_counts_a_close_without_reply_as_no_reply() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for (i, c) in l.incoming().flatten().enumerate() {
                let mut c = c;
                let mut line = String::new();
                BufReader::new(&c).read_line(&mut line).unwrap();
                match i {
                    3..=5 => drop(c),
                    7 => c.write_all(b"garbage\n").unwrap(),
                    _ => c.write_all(line.as_bytes()).unwrap(),
                }
            }
        });
        let p = Probe {
            mode: ProbeMode::Connect,
            ..probe()
        };
        let stop = stop_after(600);
        let r = run(&p, port, Duration::from_secs(5), stop);
        assert_eq!((r.failures, r.wrong), (3, 1), "{r:?}");
        assert!(r.replies >= 5, "{r:?}");
    }

    /// A keep-alive HTTP server that serves one connection only, counting
    /// the requests; response `bad` lacks the text the probe expects, and
    /// after `close_after` requests it closes.
    fn http_server(bad: Option<u64>, close_after: Option<u64>) -> (u16, Arc<AtomicU64>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            count.fetch_add(1, Ordering::Relaxed);
            // A second connection would wait here, never served.
            std::thread::spawn(move || {
                for c in l.incoming().flatten() {
                    count.fetch_add(1, Ordering::Relaxed);
                    std::mem::forget(c);
                }
            });
            let mut w = c.try_clone().unwrap();
            let mut r = BufReader::new(c);
            let mut n = 0;
            loop {
                let mut line = String::new();
                // The request line, then headers up to the empty line.
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                assert_eq!(line, "GET /index.html HTTP/1.1\r\n");
                while line != "\r\n" {
                    line.clear();
                    r.read_line(&mut line).unwrap();
                }
                n += 1;
                if Some(n) == close_after {
                    return;
                }
                let body = if Some(n) == bad {
                    "<h1>502 Bad Gateway</h1>".to_string()
                } else {
                    format!("hello kupgrade {n}")
                };
                // Chunked and with a length in turn, in several writes.
                if n % 2 == 0 {
                    write!(
                        w,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .unwrap();
                    w.flush().unwrap();
                    write!(w, "{body}").unwrap();
                } else {
                    write!(
                        w,
                        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n",
                        body.len()
                    )
                    .unwrap();
                    w.flush().unwrap();
                    write!(w, "0\r\n\r\n").unwrap();
                }
            }
        });
        (port, accepted)
    }

    fn http_probe() -> Probe {
        Probe {
            mode: ProbeMode::Http,
            path: "/index.html".into(),
            expect: "hello kupgrade".into(),
            ..probe()
        }
    }

    fn run_probe_for(p: &Probe, port: u16, ms: u64) -> ProbeResult {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            s2.store(true, Ordering::Relaxed);
        });
        run(p, port, Duration::from_secs(5), stop)
    }

    #[test]
    fn http_mode_keeps_one_connection_and_checks_every_response() {
        let (port, accepted) = http_server(None, None);
        let r = run_probe_for(&http_probe(), port, 500);
        assert!(r.clean(), "{r:?}");
        assert!(r.replies >= 10, "{r:?}");
        assert!(r.sent - r.replies <= 1, "{r:?}");
        assert_eq!(accepted.load(Ordering::Relaxed), 1, "it reconnected");
    }

    #[test]
    fn http_mode_counts_a_wrong_response_and_a_closed_connection() {
        let (port, _) = http_server(Some(4), None);
        let r = run_probe_for(&http_probe(), port, 500);
        assert_eq!(r.wrong, 1, "{r:?}");
        assert!(!r.clean() && r.error.as_deref().unwrap().contains("hello kupgrade"));
        let (port, accepted) = http_server(None, Some(5));
        let r = run_probe_for(&http_probe(), port, 1000);
        assert!(r.eof && !r.clean(), "{r:?}");
        assert_eq!(r.replies, 4, "{r:?}");
        assert_eq!(accepted.load(Ordering::Relaxed), 1, "it reconnected");
    }

    #[test]
    fn dns_mode_checks_the_address_and_counts_silence() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            for i in 0.. {
                let (n, from) = sock.recv_from(&mut buf).unwrap();
                // Silent for a while, as a server paused by an upgrade; one
                // wrong address.
                let addr = if i == 8 {
                    [10, 0, 2, 1]
                } else {
                    [10, 0, 2, 99]
                };
                if !(3..6).contains(&i) {
                    let a = dns::answer_for(&buf[..n], &[addr.into()]);
                    sock.send_to(&a, from).unwrap();
                }
            }
        });
        let p = Probe {
            mode: ProbeMode::Dns,
            query: "kupgrade.test".into(),
            expect: "10.0.2.99".into(),
            ..probe()
        };
        let r = run_probe_for(&p, port, 2500);
        assert_eq!(r.failures, 3, "{r:?}");
        assert_eq!(r.wrong, 1, "{r:?}");
        assert!(r.replies >= 5 && r.recovered, "{r:?}");
        // The wrong answer makes it unclean, and says what came.
        assert!(!r.clean());
        let p = Probe {
            expect: String::new(),
            ..p
        };
        let r = run_probe_for(&p, port, 300);
        assert!(r.replies > 0 && r.wrong == 0 && r.clean(), "{r:?}");
    }

    /// A broker of one subscriber: CONNACK, SUBACK, and every PUBLISH sent
    /// back, but message `drop_seq` (by its count) never.
    fn mqtt_broker(drop_seq: Option<u64>) -> u16 {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let (mut buf, mut chunk, mut published) = (Vec::new(), [0u8; 1024], 0u64);
            loop {
                while let Ok(Some((kind, body, used))) = mqtt::parse(&buf) {
                    let whole = buf.drain(..used).collect::<Vec<u8>>();
                    let answer = match kind {
                        1 => vec![0x20, 2, 0, 0],
                        8 => vec![0x90, 3, body[0], body[1], 0],
                        mqtt::PUBLISH => {
                            published += 1;
                            if Some(published) == drop_seq {
                                continue;
                            }
                            whole
                        }
                        _ => continue,
                    };
                    if c.write_all(&answer).is_err() {
                        return;
                    }
                }
                match c.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        });
        port
    }

    fn mqtt_probe() -> Probe {
        Probe {
            mode: ProbeMode::Mqtt,
            interval_ms: 20,
            ..probe()
        }
    }

    #[test]
    fn mqtt_mode_hears_every_message_back_through_the_broker() {
        let r = run_probe_for(&mqtt_probe(), mqtt_broker(None), 500);
        assert!(r.clean(), "{r:?}");
        assert!(r.replies >= 10, "{r:?}");
        // The fifth message after the handshake's is lost on the way.
        let r = run_probe_for(&mqtt_probe(), mqtt_broker(Some(6)), 500);
        assert_eq!(r.lost, 1, "{r:?}");
        assert!(!r.clean());
    }

    #[test]
    fn nobody_listening_never_connects() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let stop = Arc::new(AtomicBool::new(false));
        let r = run(&probe(), port, Duration::from_millis(500), stop);
        assert!(!r.connected && r.error.is_some());
    }
}
