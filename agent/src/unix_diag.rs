//! Peers of unix sockets, from the kernel's sock_diag netlink interface
//! (`UNIX_DIAG_PEER`): `/proc/net/unix` does not say who is connected to
//! whom, and CRIU refuses a socket whose peer is outside the dump.

use std::collections::HashMap;

use nix::sys::socket::{
    recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open a sock_diag netlink socket")]
    Socket(#[source] nix::Error),
    #[error("cannot send the unix_diag request")]
    Send(#[source] nix::Error),
    #[error("cannot read the unix_diag reply")]
    Receive(#[source] nix::Error),
    /// ENOENT when the `unix_diag` module is not loaded.
    #[error(
        "the kernel answered the unix_diag request with an error (is the unix_diag module loaded?)"
    )]
    Kernel(#[source] std::io::Error),
    #[error("malformed netlink message in the unix_diag reply")]
    Malformed,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UNIX_DIAG_PEER: u16 = 2;
const NLMSG_HDR: usize = 16;
const UNIX_DIAG_MSG: usize = 16;

/// The request: `nlmsghdr` + `struct unix_diag_req`, all sockets, with peers.
fn request() -> Vec<u8> {
    let mut b = Vec::with_capacity(40);
    b.extend_from_slice(&40u32.to_ne_bytes()); // nlmsg_len
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b.extend_from_slice(&1u32.to_ne_bytes()); // seq
    b.extend_from_slice(&0u32.to_ne_bytes()); // pid
    b.push(1); // sdiag_family: AF_UNIX
    b.push(0); // sdiag_protocol
    b.extend_from_slice(&0u16.to_ne_bytes());
    b.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    b.extend_from_slice(&0u32.to_ne_bytes()); // any inode
    b.extend_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes());
    b.extend_from_slice(&[0xff; 8]); // no cookie
    b
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

/// Parses one datagram of replies into `peers`; false once the dump is done.
fn parse(mut buf: &[u8], peers: &mut HashMap<u64, u64>) -> Result<bool, Error> {
    while buf.len() >= NLMSG_HDR {
        let len = u32_at(buf, 0).unwrap_or(0) as usize;
        let kind = u16_at(buf, 4).unwrap_or(0);
        if len < NLMSG_HDR || len > buf.len() {
            return Err(Error::Malformed);
        }
        match kind {
            NLMSG_DONE => return Ok(false),
            NLMSG_ERROR => {
                let errno = u32_at(buf, NLMSG_HDR).map(|e| -(e as i32)).unwrap_or(0);
                return Err(Error::Kernel(std::io::Error::from_raw_os_error(errno)));
            }
            _ => {
                let msg = &buf[NLMSG_HDR..len];
                if let Some(ino) = u32_at(msg, 4) {
                    let mut attrs = msg.get(UNIX_DIAG_MSG..).unwrap_or(&[]);
                    while attrs.len() >= 4 {
                        let alen = u16_at(attrs, 0).unwrap_or(0) as usize;
                        if alen < 4 || alen > attrs.len() {
                            break;
                        }
                        if u16_at(attrs, 2) == Some(UNIX_DIAG_PEER) {
                            if let Some(peer) = u32_at(attrs, 4).filter(|p| *p != 0) {
                                peers.insert(ino as u64, peer as u64);
                            }
                        }
                        let step = (alen.div_ceil(4) * 4).min(attrs.len());
                        attrs = &attrs[step..];
                    }
                }
            }
        }
        let next = len.div_ceil(4) * 4;
        buf = buf.get(next..).unwrap_or(&[]);
    }
    Ok(true)
}

/// Every connected unix socket of the system: inode -> its peer's inode.
/// Needs the `unix_diag` module.
pub fn peers() -> Result<HashMap<u64, u64>, Error> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(Error::Socket)?;
    use std::os::fd::AsRawFd;
    sendto(
        fd.as_raw_fd(),
        &request(),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(Error::Send)?;
    let mut peers = HashMap::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(Error::Receive)?;
        if n == 0 || !parse(&buf[..n], &mut peers)? {
            return Ok(peers);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_socketpair_is_seen_as_two_peers() {
        let (a, b) = UnixStream::pair().unwrap();
        let ino = |s: &UnixStream| {
            use std::os::fd::AsRawFd;
            std::fs::metadata(format!("/proc/self/fd/{}", s.as_raw_fd()))
                .unwrap()
                .ino()
        };
        let peers = match peers() {
            Ok(p) => p,
            // Without the unix_diag module there is nothing to test here.
            Err(e) => {
                eprintln!("sock_diag for AF_UNIX unavailable ({e}): skipped");
                return;
            }
        };
        assert_eq!(peers.get(&ino(&a)), Some(&ino(&b)));
        assert_eq!(peers.get(&ino(&b)), Some(&ino(&a)));
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let mut p = HashMap::new();
        assert!(matches!(parse(&[0xff; 20], &mut p), Err(Error::Malformed)));
        let mut done = vec![0u8; 16];
        done[0] = 16;
        done[4] = NLMSG_DONE as u8;
        assert!(!parse(&done, &mut p).unwrap());
        // An error reply carries the kernel's errno, negated.
        let mut error = vec![0u8; 20];
        error[0] = 20;
        error[4] = NLMSG_ERROR as u8;
        error[16..20].copy_from_slice(&(-2i32).to_ne_bytes());
        match parse(&error, &mut p) {
            Err(Error::Kernel(e)) => assert_eq!(e.raw_os_error(), Some(2)),
            other => panic!("{other:?}"),
        }
    }
}
