//! The network's configuration through rtnetlink, as `ip` would send it,
//! without spawning `ip` for every link, address and route: under TCG each
//! spawn costs about a tenth of a second of the blackout.
//!
//! Messages are built by pure functions (tested byte for byte) and sent one
//! at a time, each acknowledged before the next.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use contract::devstate::{Address, Family, Route};
use nix::errno::Errno;
use nix::sys::socket::{
    bind, recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr,
    SockFlag, SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;

const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFF_UP: u32 = 0x1;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_PREFSRC: u16 = 7;

const RT_TABLE_MAIN: u8 = 254;
const RTN_UNICAST: u8 = 1;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
/// What `ip route` gives a route it adds without `proto`.
const RTPROT_BOOT: u8 = 3;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// A netlink request with no answer in this long will not get one.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open a netlink socket")]
    Socket(#[source] Errno),
    #[error("netlink: {what}")]
    Refused {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("netlink: {what}: the kernel did not answer")]
    NoAnswer {
        what: String,
        #[source]
        source: Errno,
    },
    #[error("no network interface {0}")]
    NoSuchLink(String),
}

/// A route as the kernel takes it. Built by [`route_spec`], which refuses
/// what it cannot say exactly as `ip` would (a protocol name it does not
/// know, say); such a route is left to `ip`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub family: u8,
    pub dst: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub metric: Option<u32>,
    pub prefsrc: Option<IpAddr>,
    pub scope: u8,
    pub protocol: u8,
}

/// A netlink socket bound to the kernel, with the sequence numbers of its
/// requests.
pub(crate) struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub(crate) fn open(protocol: SockProtocol) -> Result<Self, Error> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            protocol,
        )
        .map_err(Error::Socket)?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(Error::Socket)?;
        let timeout = TimeVal::new(REPLY_TIMEOUT.as_secs() as _, 0);
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout).map_err(Error::Socket)?;
        Ok(Socket { fd, seq: 0 })
    }

    pub(crate) fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    pub(crate) fn send(&self, msg: &[u8], what: &str) -> Result<(), Error> {
        let kernel = NetlinkAddr::new(0, 0);
        sendto(self.fd.as_raw_fd(), msg, &kernel, MsgFlags::empty())
            .map(drop)
            .map_err(|source| Error::NoAnswer {
                what: what.into(),
                source,
            })
    }

    /// One datagram of answers into `buf`: its length.
    pub(crate) fn recv(&self, buf: &mut [u8], what: &str) -> Result<usize, Error> {
        recv(self.fd.as_raw_fd(), buf, MsgFlags::empty()).map_err(|source| Error::NoAnswer {
            what: what.into(),
            source,
        })
    }

    /// Sends `msg` and waits for the kernel's ack of `seq`.
    pub(crate) fn request(&mut self, msg: &[u8], seq: u32, what: &str) -> Result<(), Error> {
        self.send(msg, what)?;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = self.recv(&mut buf, what)?;
            match ack_of(&buf[..n], seq) {
                Some(0) => return Ok(()),
                Some(errno) => return Err(refused(what, errno)),
                // Another message's answer, or not an ack: read on.
                None => continue,
            }
        }
    }
}

pub(crate) fn refused(what: &str, errno: i32) -> Error {
    Error::Refused {
        what: what.into(),
        source: io::Error::from_raw_os_error(errno),
    }
}

/// An open rtnetlink socket.
pub struct Rtnl {
    sock: Socket,
}

impl Rtnl {
    pub fn open() -> Result<Self, Error> {
        Ok(Rtnl {
            sock: Socket::open(SockProtocol::NetlinkRoute)?,
        })
    }

    /// Renames, sets the MTU and brings up or down a link, each if given.
    pub fn set_link(
        &mut self,
        index: u32,
        name: Option<&str>,
        mtu: Option<u32>,
        up: Option<bool>,
        what: &str,
    ) -> Result<(), Error> {
        let seq = self.sock.next_seq();
        self.sock
            .request(&link_message(seq, index, name, mtu, up), seq, what)
    }

    pub fn replace_address(&mut self, index: u32, a: &Address, what: &str) -> Result<(), Error> {
        let seq = self.sock.next_seq();
        let Some(msg) = address_message(seq, index, a) else {
            return Err(Error::Refused {
                what: what.into(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not an address"),
            });
        };
        self.sock.request(&msg, seq, what)
    }

    pub fn replace_route(&mut self, r: &RouteSpec, what: &str) -> Result<(), Error> {
        let seq = self.sock.next_seq();
        self.sock.request(&route_message(seq, r), seq, what)
    }
}

/// A link's index (`SIOCGIFINDEX`: sysfs may not be mounted yet).
pub fn link_index(name: &str) -> Result<u32, Error> {
    nix::net::if_::if_nametoindex(name).map_err(|_| Error::NoSuchLink(name.into()))
}

/// The route in kernel terms, or `None` for one only `ip` can say.
pub fn route_spec(r: &Route, oif: Option<u32>) -> Option<RouteSpec> {
    let family = family_number(r.family);
    let dst = match r.dst.as_str() {
        "default" => None,
        d => Some(prefix(d, r.family)?),
    };
    let gateway = match &r.gateway {
        Some(g) => Some(address_of(g, r.family)?),
        None => None,
    };
    let prefsrc = match &r.prefsrc {
        Some(p) => Some(address_of(p, r.family)?),
        None => None,
    };
    let scope = match r.scope.as_deref() {
        Some(s) => scope_number(s)?,
        // As `ip` does: an IPv4 route with no gateway is on the link.
        None if gateway.is_none() && r.family == Family::Inet => RT_SCOPE_LINK,
        None => RT_SCOPE_UNIVERSE,
    };
    let protocol = match r.protocol.as_deref() {
        Some(p) => protocol_number(p)?,
        None => RTPROT_BOOT,
    };
    Some(RouteSpec {
        family,
        dst,
        gateway,
        oif,
        metric: r.metric,
        prefsrc,
        scope,
        protocol,
    })
}

fn family_number(f: Family) -> u8 {
    match f {
        Family::Inet => AF_INET,
        Family::Inet6 => AF_INET6,
    }
}

fn address_of(s: &str, f: Family) -> Option<IpAddr> {
    let a: IpAddr = s.parse().ok()?;
    (a.is_ipv4() == (f == Family::Inet)).then_some(a)
}

/// `10.0.2.0/24`, or a host (`10.0.2.2`, a full-length prefix).
fn prefix(s: &str, f: Family) -> Option<(IpAddr, u8)> {
    let (a, len) = match s.split_once('/') {
        Some((a, len)) => (address_of(a, f)?, len.parse().ok()?),
        None => {
            let a = address_of(s, f)?;
            (a, if a.is_ipv4() { 32 } else { 128 })
        }
    };
    (len <= if a.is_ipv4() { 32 } else { 128 }).then_some((a, len))
}

/// The names of `/etc/iproute2/rt_scopes`.
fn scope_number(s: &str) -> Option<u8> {
    Some(match s {
        "global" | "universe" => 0,
        "site" => 200,
        "link" => 253,
        "host" => 254,
        "nowhere" => 255,
        n => n.parse().ok()?,
    })
}

/// The names of `/etc/iproute2/rt_protos` that `ip -json route` prints.
fn protocol_number(p: &str) -> Option<u8> {
    Some(match p {
        "redirect" => 1,
        "kernel" => 2,
        "boot" => 3,
        "static" => 4,
        "ra" => 9,
        "dhcp" => 16,
        "keepalived" => 18,
        "babel" => 42,
        "bgp" => 186,
        "isis" => 187,
        "ospf" => 188,
        "rip" => 189,
        n => n.parse().ok()?,
    })
}

fn octets(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

/// A message under construction: the header's length is set by `finish`.
pub(crate) struct Message(Vec<u8>);

impl Message {
    /// A request the kernel acknowledges.
    pub(crate) fn new(kind: u16, flags: u16, seq: u32) -> Self {
        Message::unacked(kind, flags | NLM_F_ACK, seq)
    }

    /// A request with no ack asked for (a dump, a batch's bounds).
    pub(crate) fn unacked(kind: u16, flags: u16, seq: u32) -> Self {
        let mut b = Vec::with_capacity(128);
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
        Message(b)
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }

    pub(crate) fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    pub(crate) fn finish(&mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        std::mem::take(&mut self.0)
    }
}

fn link_message(
    seq: u32,
    index: u32,
    name: Option<&str>,
    mtu: Option<u32>,
    up: Option<bool>,
) -> Vec<u8> {
    let (flags, change) = match up {
        Some(true) => (IFF_UP, IFF_UP),
        Some(false) => (0, IFF_UP),
        None => (0, 0),
    };
    let mut m = Message::new(RTM_NEWLINK, 0, seq);
    // struct ifinfomsg: family, pad, type, index, flags, change.
    m.bytes(&[0, 0])
        .bytes(&0u16.to_ne_bytes())
        .bytes(&index.to_ne_bytes())
        .bytes(&flags.to_ne_bytes())
        .bytes(&change.to_ne_bytes());
    if let Some(name) = name {
        let mut z = name.as_bytes().to_vec();
        z.push(0);
        m.attr(IFLA_IFNAME, &z);
    }
    if let Some(mtu) = mtu {
        m.attr(IFLA_MTU, &mtu.to_ne_bytes());
    }
    m.finish()
}

fn address_message(seq: u32, index: u32, a: &Address) -> Option<Vec<u8>> {
    let local = address_of(&a.local, a.family)?;
    let max = if local.is_ipv4() { 32 } else { 128 };
    if a.prefix_len > max {
        return None;
    }
    let broadcast = match &a.broadcast {
        Some(b) => Some(address_of(b, a.family)?),
        None => None,
    };
    let mut m = Message::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, seq);
    // struct ifaddrmsg: family, prefix length, flags, scope, index.
    m.bytes(&[family_number(a.family), a.prefix_len, 0, RT_SCOPE_UNIVERSE])
        .bytes(&index.to_ne_bytes())
        .attr(IFA_LOCAL, &octets(&local))
        .attr(IFA_ADDRESS, &octets(&local));
    if let Some(b) = broadcast {
        m.attr(IFA_BROADCAST, &octets(&b));
    }
    Some(m.finish())
}

fn route_message(seq: u32, r: &RouteSpec) -> Vec<u8> {
    let dst_len = r.dst.map_or(0, |(_, len)| len);
    let mut m = Message::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, seq);
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope,
    // type, flags.
    m.bytes(&[
        r.family,
        dst_len,
        0,
        0,
        RT_TABLE_MAIN,
        r.protocol,
        r.scope,
        RTN_UNICAST,
    ])
    .bytes(&0u32.to_ne_bytes());
    if let Some((dst, _)) = &r.dst {
        m.attr(RTA_DST, &octets(dst));
    }
    if let Some(g) = &r.gateway {
        m.attr(RTA_GATEWAY, &octets(g));
    }
    if let Some(oif) = r.oif {
        m.attr(RTA_OIF, &oif.to_ne_bytes());
    }
    if let Some(metric) = r.metric {
        m.attr(RTA_PRIORITY, &metric.to_ne_bytes());
    }
    if let Some(p) = &r.prefsrc {
        m.attr(RTA_PREFSRC, &octets(p));
    }
    m.finish()
}

/// The messages of a datagram of answers: (type, sequence number, what
/// follows the header). Stops at one whose length does not fit.
pub(crate) fn messages(buf: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
        let seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
        if len < 16 || len > rest.len() {
            break;
        }
        out.push((kind, seq, &rest[16..len]));
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    out
}

/// The errno an `NLMSG_ERROR` (or `NLMSG_DONE`) body carries: 0 for
/// success.
pub(crate) fn errno_of(body: &[u8]) -> Option<i32> {
    Some(-i32::from_ne_bytes(body.get(..4)?.try_into().ok()?))
}

/// In a datagram of answers, the ack of request `seq`: `Some(0)` for
/// success, `Some(errno)` for a refusal, `None` if it holds none.
fn ack_of(buf: &[u8], seq: u32) -> Option<i32> {
    messages(buf)
        .into_iter()
        .find(|&(kind, s, _)| kind == NLMSG_ERROR && s == seq)
        .and_then(|(_, _, body)| errno_of(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str) -> Route {
        Route {
            family: Family::Inet,
            dst: dst.into(),
            gateway: None,
            dev: Some("eth0".into()),
            metric: None,
            scope: None,
            prefsrc: None,
            protocol: None,
        }
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes(b[at..at + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn an_address_message_is_ifaddrmsg_then_local_address_and_broadcast() {
        let a = Address {
            family: Family::Inet,
            local: "10.0.2.15".into(),
            prefix_len: 24,
            broadcast: Some("10.0.2.255".into()),
        };
        let m = address_message(7, 2, &a).unwrap();
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(m.len(), 16 + 8 + 3 * 8);
        assert_eq!(u16_at(&m, 4), RTM_NEWADDR);
        assert_eq!(
            u16_at(&m, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        assert_eq!(u32_at(&m, 8), 7);
        assert_eq!(&m[16..20], &[AF_INET, 24, 0, 0]);
        assert_eq!(u32_at(&m, 20), 2);
        assert_eq!((u16_at(&m, 24), u16_at(&m, 26)), (8, IFA_LOCAL));
        assert_eq!(&m[28..32], &[10, 0, 2, 15]);
        assert_eq!((u16_at(&m, 32), u16_at(&m, 34)), (8, IFA_ADDRESS));
        assert_eq!((u16_at(&m, 40), u16_at(&m, 42)), (8, IFA_BROADCAST));
        assert_eq!(&m[44..48], &[10, 0, 2, 255]);
    }

    #[test]
    fn an_address_that_does_not_parse_or_is_too_long_a_prefix_is_no_message() {
        let mut a = Address {
            family: Family::Inet,
            local: "10.0.2.300".into(),
            prefix_len: 24,
            broadcast: None,
        };
        assert!(address_message(1, 2, &a).is_none());
        a.local = "10.0.2.3".into();
        a.prefix_len = 33;
        assert!(address_message(1, 2, &a).is_none());
        a.family = Family::Inet6;
        a.prefix_len = 64;
        assert!(
            address_message(1, 2, &a).is_none(),
            "an IPv4 address given as IPv6"
        );
    }

    #[test]
    fn a_link_message_names_sets_mtu_and_raises_the_link() {
        let m = link_message(3, 2, Some("eth0"), Some(1400), Some(true));
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u16_at(&m, 4), RTM_NEWLINK);
        assert_eq!(u16_at(&m, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_at(&m, 20), 2, "index");
        assert_eq!((u32_at(&m, 24), u32_at(&m, 28)), (IFF_UP, IFF_UP));
        // "eth0\0" padded to 8, after its 4-byte header.
        assert_eq!((u16_at(&m, 32), u16_at(&m, 34)), (9, IFLA_IFNAME));
        assert_eq!(&m[36..41], b"eth0\0");
        assert_eq!((u16_at(&m, 44), u16_at(&m, 46)), (8, IFLA_MTU));
        assert_eq!(u32_at(&m, 48), 1400);
        assert_eq!(m.len(), 52);

        let untouched = link_message(4, 1, None, None, None);
        assert_eq!(untouched.len(), 32);
        assert_eq!((u32_at(&untouched, 24), u32_at(&untouched, 28)), (0, 0));
    }

    #[test]
    fn routes_get_the_scope_and_protocol_ip_would_give_them() {
        let on_link = route_spec(&route("10.0.2.0/24"), Some(2)).unwrap();
        assert_eq!(on_link.scope, RT_SCOPE_LINK);
        assert_eq!(on_link.protocol, RTPROT_BOOT);
        assert_eq!(on_link.dst, Some(("10.0.2.0".parse().unwrap(), 24)));

        let mut default = route("default");
        default.gateway = Some("10.0.2.2".into());
        default.protocol = Some("dhcp".into());
        default.metric = Some(100);
        let spec = route_spec(&default, Some(2)).unwrap();
        assert_eq!((spec.dst, spec.scope, spec.protocol), (None, 0, 16));

        let host = route_spec(&route("10.0.2.2"), None).unwrap();
        assert_eq!(host.dst, Some(("10.0.2.2".parse().unwrap(), 32)));

        let mut v6 = route("fd00::/64");
        v6.family = Family::Inet6;
        assert_eq!(route_spec(&v6, None).unwrap().scope, RT_SCOPE_UNIVERSE);
    }

    #[test]
    fn a_route_only_ip_can_say_is_left_to_it() {
        let mut r = route("default");
        r.protocol = Some("zebra-of-my-own".into());
        assert!(route_spec(&r, None).is_none());
        let mut r = route("10.0.2.0/24");
        r.scope = Some("galaxy".into());
        assert!(route_spec(&r, None).is_none());
        assert!(route_spec(&route("10.0.2.0/40"), None).is_none());
        let mut r = route("default");
        r.gateway = Some("fe80::1".into());
        assert!(route_spec(&r, None).is_none(), "an IPv6 gateway on IPv4");
    }

    #[test]
    fn a_route_message_carries_every_attribute_given() {
        let spec = RouteSpec {
            family: AF_INET,
            dst: Some(("10.1.0.0".parse().unwrap(), 16)),
            gateway: Some("10.0.2.2".parse().unwrap()),
            oif: Some(2),
            metric: Some(50),
            prefsrc: Some("10.0.2.15".parse().unwrap()),
            scope: 0,
            protocol: 4,
        };
        let m = route_message(9, &spec);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(
            &m[16..24],
            &[AF_INET, 16, 0, 0, RT_TABLE_MAIN, 4, 0, RTN_UNICAST]
        );
        let kinds: Vec<u16> = (28..m.len())
            .step_by(8)
            .map(|at| u16_at(&m, at + 2))
            .collect();
        assert_eq!(
            kinds,
            [RTA_DST, RTA_GATEWAY, RTA_OIF, RTA_PRIORITY, RTA_PREFSRC]
        );
    }

    fn answer(kind: u16, seq: u32, error: i32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&36u32.to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&error.to_ne_bytes());
        b.extend_from_slice(&[0; 16]);
        b
    }

    #[test]
    fn the_ack_of_a_request_is_found_by_its_sequence_number() {
        assert_eq!(ack_of(&answer(NLMSG_ERROR, 5, 0), 5), Some(0));
        assert_eq!(ack_of(&answer(NLMSG_ERROR, 5, -17), 5), Some(17));
        assert_eq!(ack_of(&answer(NLMSG_ERROR, 4, 0), 5), None, "another's");
        let mut two = answer(RTM_NEWLINK, 5, 0);
        two.extend(answer(NLMSG_ERROR, 5, -1));
        assert_eq!(ack_of(&two, 5), Some(1));
        assert_eq!(ack_of(&[0; 10], 5), None, "too short");
        let mut bad = answer(NLMSG_ERROR, 5, 0);
        bad[0] = 200;
        assert_eq!(ack_of(&bad, 5), None, "a length past the datagram");
    }

    /// The kernel takes the messages: in a network namespace of its own,
    /// loopback is raised, given an address and a route, and they are there.
    #[test]
    fn the_kernel_takes_them_in_a_namespace_of_its_own() {
        let outcome = std::thread::spawn(|| {
            if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                return None; // not root: nothing to configure
            }
            let mut rt = Rtnl::open().unwrap();
            let lo = link_index("lo").unwrap();
            assert!(link_index("no-such-link0").is_err());
            rt.set_link(lo, None, Some(1500), Some(true), "lo up")
                .unwrap();
            let a = Address {
                family: Family::Inet,
                local: "10.9.8.7".into(),
                prefix_len: 24,
                broadcast: None,
            };
            rt.replace_address(lo, &a, "address").unwrap();
            rt.replace_address(lo, &a, "again").unwrap();
            let mut r = route("10.7.0.0/16");
            r.prefsrc = Some("10.9.8.7".into());
            let spec = route_spec(&r, Some(lo)).unwrap();
            rt.replace_route(&spec, "route").unwrap();
            let mut unreachable = route("default");
            unreachable.gateway = Some("192.0.2.1".into());
            let refused = rt
                .replace_route(&route_spec(&unreachable, Some(lo)).unwrap(), "default via")
                .unwrap_err();
            let addrs = std::process::Command::new("ip")
                .args(["-4", "-o", "addr", "show", "dev", "lo"])
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            let routes = std::process::Command::new("ip")
                .args(["-4", "route", "show"])
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            Some((addrs, routes, refused.to_string()))
        })
        .join()
        .unwrap();
        let Some((addrs, routes, refused)) = outcome else {
            eprintln!("skipped: cannot make a network namespace (not root)");
            return;
        };
        if let Some(addrs) = addrs {
            assert!(addrs.contains("inet 10.9.8.7/24"), "{addrs}");
        }
        if let Some(routes) = routes {
            assert!(
                // (`ip` leaves out `proto boot`, its default.)
                routes.contains("10.7.0.0/16 dev lo scope link src 10.9.8.7"),
                "{routes}"
            );
        }
        assert!(refused.starts_with("netlink: default via"), "{refused}");
    }
}
