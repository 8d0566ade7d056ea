//! The few MQTT 3.1.1 packets the `mqtt` probe needs: it connects,
//! subscribes to one topic and publishes to it at QoS 0, so that every
//! message comes back through the broker.

/// Packet types, the high nibble of the first byte.
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const SUBACK: u8 = 9;

/// Appends MQTT's variable-length "remaining length".
fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_len(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// CONNECT with a clean session and no keep-alive: the broker never drops
/// the client for silence, which the pause is.
pub fn connect(client_id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0x02, 0, 0]);
    put_str(&mut body, client_id);
    packet(0x10, &body)
}

/// SUBSCRIBE to `topic` at QoS 0 (packet id 1).
pub fn subscribe(topic: &str) -> Vec<u8> {
    let mut body = vec![0, 1];
    put_str(&mut body, topic);
    body.push(0);
    packet(0x82, &body)
}

/// PUBLISH at QoS 0.
pub fn publish(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, topic);
    body.extend_from_slice(payload);
    packet(0x30, &body)
}

/// One whole packet at the start of `buf`: (type, its body, bytes used);
/// `None` while more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<(u8, Vec<u8>, usize)>, String> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let (mut len, mut shift, mut i) = (0usize, 0u32, 1usize);
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err("a remaining length of more than 4 bytes".into());
        }
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    Ok(Some((first >> 4, buf[i..i + len].to_vec(), i + len)))
}

/// A PUBLISH body's topic and payload (QoS 0: no packet id).
pub fn published(body: &[u8]) -> Result<(String, Vec<u8>), String> {
    let n = body
        .get(..2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        .ok_or("a PUBLISH without a topic")?;
    let topic = body.get(2..2 + n).ok_or("a PUBLISH cut in its topic")?;
    Ok((
        String::from_utf8_lossy(topic).into_owned(),
        body[2 + n..].to_vec(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_encoded_as_the_standard_says() {
        assert_eq!(
            connect("k"),
            [0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 0, 0, 1, b'k']
        );
        assert_eq!(subscribe("t"), [0x82, 6, 0, 1, 0, 1, b't', 0]);
        assert_eq!(publish("t", b"x"), [0x30, 4, 0, 1, b't', b'x']);
        // 200 bytes of body: a two-byte remaining length.
        let long = publish("t", &[7; 197]);
        assert_eq!(long[..3], [0x30, 0xc8, 0x01]);
        let (kind, body, used) = parse(&long).unwrap().unwrap();
        assert_eq!((kind, body.len(), used), (PUBLISH, 200, 203));
        assert_eq!(published(&body).unwrap(), ("t".into(), vec![7; 197]));
    }

    #[test]
    fn a_packet_is_parsed_only_once_it_is_whole() {
        let p = publish("topic", b"probe 1");
        for cut in 0..p.len() {
            assert_eq!(parse(&p[..cut]).unwrap(), None, "{cut}");
        }
        let mut two = p.clone();
        two.extend_from_slice(&[0x20, 2, 0, 0]);
        let (kind, _, used) = parse(&two).unwrap().unwrap();
        assert_eq!((kind, used), (PUBLISH, p.len()));
        assert_eq!(parse(&two[used..]).unwrap(), Some((CONNACK, vec![0, 0], 4)));
        assert!(parse(&[0x30, 0xff, 0xff, 0xff, 0xff, 1]).is_err());
    }
}
