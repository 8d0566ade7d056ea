//! Just enough HTTP/1.1 for a keep-alive probe: a `GET`, and a response read
//! off the connection as it arrives (status, headers, a body framed by
//! `Content-Length` or chunked).

/// One response, as the probe judges it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// The server will close the connection after it (`Connection: close`,
    /// or HTTP/1.0 without keep-alive).
    pub close: bool,
}

/// The request the probe repeats on its one connection.
pub fn request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: kupgrade-vm\r\n\r\n")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The first response in `buf` and the bytes it took: `Ok(None)` while it
/// is incomplete, an error when it can never be read as a keep-alive one.
pub fn parse_response(buf: &[u8]) -> Result<Option<(Response, usize)>, String> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| "the response head is not text".to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut words = status_line.split(' ');
    let version = words.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 response: {status_line:?}"));
    }
    let status: u16 = words
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status code in {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    // HTTP/1.1 keeps the connection by default, HTTP/1.0 closes it.
    let mut close = version == "HTTP/1.0";
    for l in lines {
        let Some((name, value)) = l.split_once(':') else {
            return Err(format!("a header line without a colon: {l:?}"));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                length = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| format!("Content-Length {value:?}"))?,
                )
            }
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            "connection" => {
                let v = value.to_ascii_lowercase();
                close = v.contains("close") || (close && !v.contains("keep-alive"));
            }
            _ => {}
        }
    }
    let body_start = head_end + 4;
    let no_body = status / 100 == 1 || status == 204 || status == 304;
    let (body, used) = if no_body {
        (Vec::new(), body_start)
    } else if chunked {
        match parse_chunked(&buf[body_start..])? {
            Some((body, n)) => (body, body_start + n),
            None => return Ok(None),
        }
    } else if let Some(n) = length {
        if buf.len() < body_start + n {
            return Ok(None);
        }
        (buf[body_start..body_start + n].to_vec(), body_start + n)
    } else {
        return Err(format!(
            "status {status} with neither Content-Length nor chunked: the server \
             cannot keep the connection alive"
        ));
    };
    Ok(Some((
        Response {
            status,
            body,
            close,
        },
        used,
    )))
}

/// A chunked body and the bytes it took, trailers included.
fn parse_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(eol) = find(&buf[at..], b"\r\n") else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&buf[at..at + eol])
            .map_err(|_| "a chunk size is not text".to_string())?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("chunk size {size_text:?}"))?;
        at += eol + 2;
        if size == 0 {
            // Trailers, if any, end with an empty line.
            return Ok(find(&buf[at..], b"\r\n").and_then(|first| {
                if first == 0 {
                    Some((body, at + 2))
                } else {
                    find(&buf[at..], b"\r\n\r\n").map(|end| (body, at + end + 4))
                }
            }));
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_with_a_length_is_read_when_whole() {
        let text = b"HTTP/1.1 200 OK\r\nServer: nginx\r\ncontent-length: 5\r\n\r\nhelloHTTP/1.1";
        for cut in [10, 40, text.len() - 14] {
            assert_eq!(parse_response(&text[..cut]).unwrap(), None, "cut at {cut}");
        }
        let (r, used) = parse_response(text).unwrap().unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), r.close),
            (200, &b"hello"[..], false)
        );
        assert_eq!(&text[used..], b"HTTP/1.1");
    }

    #[test]
    fn a_chunked_response_is_read_whole() {
        let text = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nkupg\r\n5;x=y\r\nrade!\r\n0\r\n\r\n";
        assert_eq!(parse_response(&text[..text.len() - 1]).unwrap(), None);
        let (r, used) = parse_response(text).unwrap().unwrap();
        assert_eq!(r.body, b"kupgrade!");
        assert_eq!(used, text.len());
        let trailers = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(parse_response(trailers).unwrap().unwrap().1, trailers.len());
    }

    #[test]
    fn responses_that_end_the_connection_say_so() {
        let close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert!(parse_response(close).unwrap().unwrap().0.close);
        let old = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert!(parse_response(old).unwrap().unwrap().0.close);
        let kept = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n";
        assert!(!parse_response(kept).unwrap().unwrap().0.close);
        let unframed = b"HTTP/1.1 200 OK\r\n\r\nbody";
        assert!(parse_response(unframed).unwrap_err().contains("keep"));
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        let no_content = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(parse_response(no_content).unwrap().unwrap().0.status, 204);
    }
}
