//! A small blocking HTTP/1.1 client for tests: one request per connection (`connection: close`),
//! content-length, chunked and read-to-close bodies. Enough to see exactly what a server sent.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Lower-case names, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The first value of `name` (compared case-insensitively) among lower-cased header names.
pub(crate) fn first_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let name = name.to_ascii_lowercase();
    headers
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.as_str())
}

impl Response {
    /// The first value of a header (name compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        first_header(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
}

/// `GET path` with no extra headers.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, &[], b"")
}

/// Sends one request and reads the whole response; panics on I/O errors (a test failure).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    try_request(addr, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path} to {addr}: {e}"))
}

pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    exchange(stream, addr, method, path, headers, body)
}

/// Like [`request`], from a connection whose local address is `from` (any loopback address
/// works on Linux: `127.0.0.2` is another client to the server).
pub fn request_from(
    from: IpAddr,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    connect_from(from, addr, Duration::from_secs(2))
        .and_then(|stream| exchange(stream, addr, method, path, headers, body))
        .unwrap_or_else(|e| panic!("{method} {path} to {addr} from {from}: {e}"))
}

/// A connection to `to` from the local address `from` (another loopback client to the server).
pub fn connect_from(from: IpAddr, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&to.into(), timeout)?;
    Ok(socket.into())
}

fn exchange(
    mut stream: TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("host: {addr}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    head.push_str("connection: close\r\n\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    // Read until the response is complete by its framing, not until the server closes:
    // Envoy holds a connection it closes after a local reply for `delayed_close_timeout`
    // (1 s), waiting for the client to close first.
    let head_only = method == "HEAD";
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while !is_complete(&raw, head_only) {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
    }
    parse_response(&raw, head_only).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unparseable response: {:?}", String::from_utf8_lossy(&raw)),
        )
    })
}

/// Whether `raw` holds a whole response by its framing (content-length, chunked, or a status
/// without a body); a response framed by the connection's end is never complete before it.
fn is_complete(raw: &[u8], head_only: bool) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let Ok(head) = std::str::from_utf8(&raw[..end]) else {
        return false;
    };
    let mut lines = head.split("\r\n");
    let status: Option<u16> = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok());
    let Some(status) = status else { return false };
    if (100..200).contains(&status) {
        // An interim response: the final one follows.
        return false;
    }
    if head_only || status == 204 || status == 304 {
        return true;
    }
    let mut length = None;
    let mut chunked = false;
    for (k, v) in lines.filter_map(|l| l.split_once(':')) {
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked") {
            chunked = true;
        } else if k.eq_ignore_ascii_case("content-length") {
            length = v.parse::<usize>().ok();
        }
    }
    let rest = &raw[end + 4..];
    if chunked {
        return decode_chunked(rest).is_some();
    }
    length.is_some_and(|len| rest.len() >= len)
}

/// Parses one raw HTTP/1.1 response.
pub fn parse_response(raw: &[u8], head_only: bool) -> Option<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let find = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    let body = if head_only || status == 204 || status == 304 {
        Vec::new()
    } else if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        decode_chunked(rest)?
    } else if let Some(len) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
        rest.get(..len)?.to_vec()
    } else {
        rest.to_vec()
    };
    Some(Response {
        status,
        headers,
        body,
    })
}

fn decode_chunked(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

#[cfg(test)]
mod framing_tests {
    use super::is_complete;

    #[test]
    fn a_response_is_complete_by_its_framing() {
        assert!(!is_complete(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n",
            false
        ));
        assert!(!is_complete(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nabc",
            false
        ));
        assert!(is_complete(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nabcde",
            false
        ));
        assert!(is_complete(b"HTTP/1.1 204 No Content\r\n\r\n", false));
        assert!(is_complete(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            true
        ));
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n";
        assert!(!is_complete(chunked, false));
        let mut done = chunked.to_vec();
        done.extend_from_slice(b"0\r\n\r\n");
        assert!(is_complete(&done, false));
        // Framed by the connection's end: complete only at EOF.
        assert!(!is_complete(b"HTTP/1.1 200 OK\r\n\r\nbody", false));
        assert!(!is_complete(b"HTTP/1.1 100 Continue\r\n\r\n", false));
    }
}
