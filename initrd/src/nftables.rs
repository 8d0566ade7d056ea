//! nf_tables' tables through nfnetlink: listed and deleted as `nft` would,
//! without spawning it once the workloads are restored (under TCG a spawn
//! of `nft` costs about a tenth of a second of the blackout).
//!
//! CRIU's lock tables still go in through `nft -f`: what the new kernel
//! installs is the text `nft list table` printed at the dump.

use nix::sys::socket::SockProtocol;

use crate::netlink::{self, Error, Message, Socket, NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFTA_TABLE_NAME: u16 = 1;
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;
/// A dump's answers come in datagrams of up to a page or so; this holds
/// any the kernel sends.
const DATAGRAM: usize = 64 << 10;

/// An open nfnetlink socket.
pub struct Nft {
    sock: Socket,
}

impl Nft {
    pub fn open() -> Result<Self, Error> {
        Ok(Nft {
            sock: Socket::open(SockProtocol::NetlinkNetFilter)?,
        })
    }

    /// The names of the tables of family `inet`.
    pub fn inet_tables(&mut self) -> Result<Vec<String>, Error> {
        let what = "list the inet tables";
        let seq = self.sock.next_seq();
        self.sock.send(&get_tables_message(seq), what)?;
        let mut buf = vec![0u8; DATAGRAM];
        let mut names = Vec::new();
        loop {
            let n = self.sock.recv(&mut buf, what)?;
            match tables_in(&buf[..n], seq) {
                Answer::More(found) => names.extend(found),
                Answer::Done(found) => {
                    names.extend(found);
                    return Ok(names);
                }
                Answer::Refused(errno) => return Err(netlink::refused(what, errno)),
            }
        }
    }

    /// Deletes tables of family `inet` in one transaction: all of them, or
    /// none if any is refused (one that is not there, say).
    pub fn delete_inet_tables(&mut self, names: &[String]) -> Result<(), Error> {
        if names.is_empty() {
            return Ok(());
        }
        let what = format!("delete table(s) inet {}", names.join(", "));
        let first = self.sock.next_seq();
        let seqs: Vec<u32> = (0..names.len()).map(|_| self.sock.next_seq()).collect();
        let end = self.sock.next_seq();
        self.sock
            .send(&delete_tables_batch(first, names, end), &what)?;
        // Each delete is acked once the batch is committed, or refused.
        let mut waiting = seqs;
        let mut buf = vec![0u8; DATAGRAM];
        while !waiting.is_empty() {
            let n = self.sock.recv(&mut buf, &what)?;
            for (kind, seq, body) in netlink::messages(&buf[..n]) {
                if kind != NLMSG_ERROR || !waiting.contains(&seq) {
                    continue;
                }
                match netlink::errno_of(body) {
                    Some(0) => waiting.retain(|&s| s != seq),
                    Some(errno) => return Err(netlink::refused(&what, errno)),
                    None => continue,
                }
            }
        }
        Ok(())
    }
}

/// An nfnetlink message: the netlink header, then `struct nfgenmsg`
/// (family, version 0, the resource id, big-endian).
fn nfnl(msg: Message, family: u8, res_id: u16) -> Message {
    let mut msg = msg;
    msg.bytes(&[family, 0]).bytes(&res_id.to_be_bytes());
    msg
}

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

fn get_tables_message(seq: u32) -> Vec<u8> {
    let m = Message::unacked(nft_type(NFT_MSG_GETTABLE), NLM_F_DUMP, seq);
    nfnl(m, NFPROTO_INET, 0).finish()
}

/// A batch (what `nft -f` sends): its begin at `first`, one delete per
/// table at the sequence numbers after it, its end at `end`.
fn delete_tables_batch(first: u32, names: &[String], end: u32) -> Vec<u8> {
    let begin = Message::unacked(NFNL_MSG_BATCH_BEGIN, 0, first);
    let mut out = nfnl(begin, NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES).finish();
    for (i, name) in names.iter().enumerate() {
        let mut z = name.as_bytes().to_vec();
        z.push(0);
        let del = Message::new(nft_type(NFT_MSG_DELTABLE), 0, first + 1 + i as u32);
        out.extend(
            nfnl(del, NFPROTO_INET, 0)
                .attr(NFTA_TABLE_NAME, &z)
                .finish(),
        );
    }
    let close = Message::unacked(NFNL_MSG_BATCH_END, 0, end);
    out.extend(nfnl(close, NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES).finish());
    out
}

#[derive(Debug, PartialEq, Eq)]
enum Answer {
    More(Vec<String>),
    Done(Vec<String>),
    Refused(i32),
}

/// The tables a datagram of the dump `seq` names, and whether the dump
/// ends in it.
fn tables_in(buf: &[u8], seq: u32) -> Answer {
    let mut names = Vec::new();
    for (kind, s, body) in netlink::messages(buf) {
        if s != seq {
            continue;
        }
        match kind {
            NLMSG_DONE => {
                return match netlink::errno_of(body) {
                    Some(errno) if errno != 0 => Answer::Refused(errno),
                    _ => Answer::Done(names),
                }
            }
            NLMSG_ERROR => match netlink::errno_of(body) {
                Some(0) | None => {}
                Some(errno) => return Answer::Refused(errno),
            },
            k if k == nft_type(NFT_MSG_NEWTABLE) => {
                // After the nfgenmsg, the table's attributes.
                if let Some(name) = body.get(4..).and_then(table_name) {
                    names.push(name);
                }
            }
            _ => {}
        }
    }
    Answer::More(names)
}

/// `NFTA_TABLE_NAME` among a table's attributes.
fn table_name(mut attrs: &[u8]) -> Option<String> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes(attrs[0..2].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(attrs[2..4].try_into().ok()?) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == NFTA_TABLE_NAME {
            let v = &attrs[4..len];
            let v = v.split(|&b| b == 0).next().unwrap_or(v);
            return String::from_utf8(v.to_vec()).ok();
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes(b[at..at + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn the_dump_asks_for_the_inet_tables() {
        let m = get_tables_message(7);
        assert_eq!(m.len(), 20);
        assert_eq!(u32_at(&m, 0), 20);
        assert_eq!(u16_at(&m, 4), 0x0a01, "NFT_MSG_GETTABLE of nf_tables");
        assert_eq!(u16_at(&m, 6), 0x301, "a request, a dump, no ack");
        assert_eq!(u32_at(&m, 8), 7);
        assert_eq!(&m[16..20], &[NFPROTO_INET, 0, 0, 0]);
    }

    #[test]
    fn a_delete_is_a_batch_of_one_acked_message_per_table() {
        let names = ["CRIU-7".to_string(), "CRIU-10002".to_string()];
        let b = delete_tables_batch(1, &names, 4);
        let msgs = netlink::messages(&b);
        let kinds: Vec<(u16, u32)> = msgs.iter().map(|&(k, s, _)| (k, s)).collect();
        assert_eq!(kinds, [(0x10, 1), (0x0a02, 2), (0x0a02, 3), (0x11, 4)]);
        // The batch's bounds name the nf_tables subsystem, big-endian.
        assert_eq!(msgs[0].2, &[0, 0, 0, 10]);
        assert_eq!(msgs[3].2, &[0, 0, 0, 10]);
        assert_eq!(u16_at(&b, 6), 0x1, "the begin asks no ack");
        let second = u32_at(&b, 0) as usize;
        assert_eq!(u16_at(&b, second + 6), 0x5, "a delete is acked");
        assert_eq!(&msgs[1].2[..4], &[NFPROTO_INET, 0, 0, 0]);
        assert_eq!(table_name(&msgs[1].2[4..]).as_deref(), Some("CRIU-7"));
        assert_eq!(table_name(&msgs[2].2[4..]).as_deref(), Some("CRIU-10002"));
    }

    fn answer(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let len = 16 + body.len();
        let mut b = Vec::new();
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&0x2u16.to_ne_bytes()); // NLM_F_MULTI
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(body);
        b.resize(len.next_multiple_of(4), 0);
        b
    }

    fn table(seq: u32, name: &str) -> Vec<u8> {
        let mut body = vec![NFPROTO_INET, 0, 0, 0];
        // Another attribute first (NFTA_TABLE_FLAGS), then the name.
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&2u16.to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        let z = format!("{name}\0");
        body.extend_from_slice(&((4 + z.len()) as u16).to_ne_bytes());
        body.extend_from_slice(&NFTA_TABLE_NAME.to_ne_bytes());
        body.extend_from_slice(z.as_bytes());
        body.resize(body.len().next_multiple_of(4), 0);
        answer(nft_type(NFT_MSG_NEWTABLE), seq, &body)
    }

    #[test]
    fn a_dump_names_its_tables_until_it_is_done() {
        let mut first = table(3, "filter");
        first.extend(table(3, "CRIU-10002"));
        first.extend(table(2, "another request's"));
        assert_eq!(
            tables_in(&first, 3),
            Answer::More(vec!["filter".into(), "CRIU-10002".into()])
        );
        let mut last = table(3, "CRIU-7");
        last.extend(answer(NLMSG_DONE, 3, &0i32.to_ne_bytes()));
        assert_eq!(tables_in(&last, 3), Answer::Done(vec!["CRIU-7".into()]));
        let done = answer(NLMSG_DONE, 3, &0i32.to_ne_bytes());
        assert_eq!(tables_in(&done, 3), Answer::Done(vec![]));
        let refused = answer(NLMSG_ERROR, 3, &(-1i32).to_ne_bytes());
        assert_eq!(tables_in(&refused, 3), Answer::Refused(1));
    }

    /// The kernel's own answers: in a network namespace of its own, the
    /// tables `nft` made are listed, deleted in one batch, and gone; a batch
    /// naming one that is not there deletes none.
    #[test]
    fn the_kernel_lists_and_deletes_tables_in_a_namespace_of_its_own() {
        let nft = |script: &str| {
            use std::io::Write;
            let mut c = std::process::Command::new("nft")
                .args(["-f", "-"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .ok()?;
            c.stdin.take()?.write_all(script.as_bytes()).ok()?;
            c.wait().ok().filter(|s| s.success())
        };
        let outcome = std::thread::spawn(move || {
            if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                return None; // not root
            }
            nft("add table inet CRIU-1\nadd table inet CRIU-2\nadd table ip CRIU-3\n")?;
            let mut n = Nft::open().unwrap();
            let mut before = n.inet_tables().unwrap();
            before.sort();
            let none = n.delete_inet_tables(&["CRIU-1".into(), "CRIU-9".into()]);
            let kept = n.inet_tables().unwrap();
            n.delete_inet_tables(&["CRIU-1".into(), "CRIU-2".into()])
                .unwrap();
            let after = n.inet_tables().unwrap();
            Some((before, none, kept, after))
        })
        .join()
        .unwrap();
        let Some((before, none, kept, after)) = outcome else {
            eprintln!("skipped: no network namespace or no nft here");
            return;
        };
        assert_eq!(before, ["CRIU-1", "CRIU-2"], "the ip table is not inet");
        let e = none.unwrap_err().to_string();
        assert!(e.contains("delete table(s) inet CRIU-1, CRIU-9"), "{e}");
        assert_eq!(kept.len(), 2, "the batch deleted nothing: {kept:?}");
        assert!(after.is_empty(), "{after:?}");
    }
}
