//! Just enough DNS (RFC 1035) for a probe: an A query for one name, and the
//! addresses of the answer.

use std::net::Ipv4Addr;

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
/// Header flags of a query: recursion desired.
const FLAG_RD: u16 = 0x0100;
const FLAG_QR: u16 = 0x8000;
const FLAG_TC: u16 = 0x0200;

/// The query message for the A records of `name`.
pub fn query(id: u16, name: &str) -> Result<Vec<u8>, String> {
    let mut m = Vec::with_capacity(32 + name.len());
    for word in [id, FLAG_RD, 1, 0, 0, 0] {
        m.extend_from_slice(&word.to_be_bytes());
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{name:?} is not a DNS name"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{name:?} is not a DNS name (label {label:?})"));
        }
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&TYPE_A.to_be_bytes());
    m.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(m)
}

fn u16_at(m: &[u8], at: usize) -> Result<u16, String> {
    m.get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| "the answer is cut short".to_string())
}

/// The offset just past the (possibly compressed) name at `at`.
fn skip_name(m: &[u8], mut at: usize) -> Result<usize, String> {
    loop {
        let len = *m.get(at).ok_or("the answer is cut short")?;
        match len {
            0 => return Ok(at + 1),
            // A pointer ends the name.
            l if l & 0xc0 == 0xc0 => return Ok(at + 2),
            l if l & 0xc0 == 0 => at += 1 + l as usize,
            l => return Err(format!("a name label of unknown kind {l:#x}")),
        }
    }
}

/// The A addresses of the answer to query `id`, or why it is no answer.
pub fn parse_answer(id: u16, m: &[u8]) -> Result<Vec<Ipv4Addr>, String> {
    if m.len() < 12 {
        return Err(format!("{} bytes is no DNS message", m.len()));
    }
    let got_id = u16_at(m, 0)?;
    if got_id != id {
        return Err(format!("answer to query {got_id}, not {id}"));
    }
    let flags = u16_at(m, 2)?;
    if flags & FLAG_QR == 0 {
        return Err("a query, not an answer".into());
    }
    if flags & FLAG_TC != 0 {
        return Err("the answer is truncated".into());
    }
    let rcode = flags & 0xf;
    if rcode != 0 {
        let name = match rcode {
            1 => "FORMERR",
            2 => "SERVFAIL",
            3 => "NXDOMAIN",
            4 => "NOTIMP",
            5 => "REFUSED",
            _ => "an error",
        };
        return Err(format!("the server answered {name} (rcode {rcode})"));
    }
    let (questions, answers) = (u16_at(m, 4)?, u16_at(m, 6)?);
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(m, at)? + 4;
    }
    let mut addrs = Vec::new();
    for _ in 0..answers {
        at = skip_name(m, at)?;
        let (rtype, class) = (u16_at(m, at)?, u16_at(m, at + 2)?);
        let len = u16_at(m, at + 8)? as usize;
        let data = m
            .get(at + 10..at + 10 + len)
            .ok_or("the answer is cut short")?;
        if rtype == TYPE_A && class == CLASS_IN && len == 4 {
            addrs.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + len;
    }
    Ok(addrs)
}

/// A server's answer to `query` with the given A addresses (for tests).
#[cfg(test)]
pub fn answer_for(query: &[u8], addrs: &[Ipv4Addr]) -> Vec<u8> {
    let mut m = query.to_vec();
    m[2..4].copy_from_slice(&(FLAG_QR | FLAG_RD | 0x0080).to_be_bytes());
    m[6..8].copy_from_slice(&(addrs.len() as u16).to_be_bytes());
    for a in addrs {
        // A pointer to the question's name, at offset 12.
        m.extend_from_slice(&[0xc0, 12]);
        m.extend_from_slice(&TYPE_A.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m.extend_from_slice(&60u32.to_be_bytes());
        m.extend_from_slice(&4u16.to_be_bytes());
        m.extend_from_slice(&a.octets());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_laid_out_as_rfc_1035_says() {
        let q = query(0x1234, "ab.c.").unwrap();
        assert_eq!(
            q,
            [
                0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 2, b'a', b'b', 1, b'c', 0, 0, 1, 0,
                1
            ]
        );
        assert!(query(1, "").is_err());
        assert!(query(1, "a..b").is_err());
        assert!(query(1, &"x".repeat(64)).is_err());
    }

    #[test]
    fn answers_give_their_addresses_and_errors_their_reason() {
        let q = query(7, "kupgrade.test").unwrap();
        let two = [Ipv4Addr::new(10, 0, 2, 99), Ipv4Addr::new(10, 0, 2, 98)];
        assert_eq!(parse_answer(7, &answer_for(&q, &two)).unwrap(), two);
        assert!(parse_answer(8, &answer_for(&q, &two))
            .unwrap_err()
            .contains("not 8"));
        assert!(parse_answer(7, &q).unwrap_err().contains("a query"));
        let mut nx = answer_for(&q, &[]);
        nx[3] |= 3;
        assert!(parse_answer(7, &nx).unwrap_err().contains("NXDOMAIN"));
        let whole = answer_for(&q, &two);
        assert!(parse_answer(7, &whole[..whole.len() - 1])
            .unwrap_err()
            .contains("cut short"));
    }
}
