//! Server-Sent Events for tests: a parser of the `text/event-stream` format (fed bytes as they
//! arrive, it yields each complete event and comment), and a blocking client that keeps one
//! HTTP/1.1 response open and reads its events one by one, each read bounded by a deadline.
//!
//! ```no_run
//! # let addr: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
//! let mut stream = testkit::sse::EventStream::open(addr, "/api/events/stream", &[]).unwrap();
//! assert_eq!(stream.status, 200);
//! let first = stream.next_event(std::time::Duration::from_secs(5)).unwrap();
//! ```

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// One dispatched event, or one comment line (`: text`), as the stream sent it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field; empty when absent (an `EventSource` calls that `message`).
    pub event: String,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
    pub id: Option<String>,
    pub retry: Option<u64>,
    /// Set for a comment line, which carries nothing else.
    pub comment: Option<String>,
}

impl SseEvent {
    pub fn is_comment(&self) -> bool {
        self.comment.is_some()
    }

    /// The event's type as an `EventSource` dispatches it.
    pub fn kind(&self) -> &str {
        if self.event.is_empty() {
            "message"
        } else {
            &self.event
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {:?}", self.data))
    }
}

/// Turns `text/event-stream` bytes into events, however the bytes are split.
#[derive(Debug, Default)]
pub struct SseParser {
    pending: Vec<u8>,
    current: SseEvent,
    data: Vec<String>,
    has_fields: bool,
}

impl SseParser {
    /// Feeds bytes; returns every event and comment they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]);
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if line.is_empty() {
                if self.has_fields {
                    let mut event = std::mem::take(&mut self.current);
                    event.data = std::mem::take(&mut self.data).join("\n");
                    out.push(event);
                    self.has_fields = false;
                }
                continue;
            }
            if let Some(comment) = line.strip_prefix(':') {
                out.push(SseEvent {
                    comment: Some(comment.trim_start().to_string()),
                    ..SseEvent::default()
                });
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            self.has_fields = true;
            match field {
                "event" => self.current.event = value.to_string(),
                "data" => self.data.push(value.to_string()),
                "id" => self.current.id = Some(value.to_string()),
                "retry" => self.current.retry = value.parse().ok(),
                _ => {}
            }
        }
        out
    }
}

/// One open `text/event-stream` response over HTTP/1.1 (chunked or not).
pub struct EventStream {
    stream: TcpStream,
    pub status: u16,
    /// Lower-case names, in the order received.
    pub headers: Vec<(String, String)>,
    chunked: bool,
    /// Received bytes not yet decoded (chunk framing).
    raw: Vec<u8>,
    parser: SseParser,
    ready: std::collections::VecDeque<SseEvent>,
    ended: bool,
    /// The response ended by its framing (the last chunk), not by the connection's end.
    finished: bool,
}

impl EventStream {
    /// Sends `GET path` (with `accept: text/event-stream` and `headers`) and reads the response
    /// head, waiting at most 10 s for it.
    pub fn open(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<EventStream> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        let mut head =
            format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut raw = Vec::new();
        let end = loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            if read_some(&mut stream, &mut raw, deadline)? == 0 {
                return Err(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!(
                        "the connection ended before the response head: {:?}",
                        String::from_utf8_lossy(&raw)
                    ),
                ));
            }
        };
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                std::io::Error::new(ErrorKind::InvalidData, format!("bad status line: {head:?}"))
            })?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let rest = raw[end + 4..].to_vec();
        let mut opened = EventStream {
            stream,
            status,
            headers,
            chunked,
            raw: Vec::new(),
            parser: SseParser::default(),
            ready: Default::default(),
            ended: false,
            finished: false,
        };
        opened.take(&rest);
        Ok(opened)
    }

    /// The first value of a header (name compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::http::first_header(&self.headers, name)
    }

    /// The next event or comment, waiting at most `timeout`: `Ok(None)` when none came in time,
    /// an `UnexpectedEof` error when the response (or the connection) ended.
    pub fn next_event(&mut self, timeout: Duration) -> std::io::Result<Option<SseEvent>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(Some(event));
            }
            if self.ended {
                return Err(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the event stream ended",
                ));
            }
            let mut buf = Vec::new();
            match read_some(&mut self.stream, &mut buf, deadline) {
                Ok(0) => self.ended = true,
                Ok(_) => self.take(&buf),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads events (comments skipped) until one satisfies `wanted`, for at most `timeout`;
    /// returns it, or `None` with the stream still open.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        mut wanted: impl FnMut(&SseEvent) -> bool,
    ) -> std::io::Result<Option<SseEvent>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.next_event(left)? {
                Some(e) if !e.is_comment() && wanted(&e) => return Ok(Some(e)),
                Some(_) => continue,
                None => return Ok(None),
            }
        }
    }

    /// Whether the response, once ended, ended by its own framing (a chunked body's last
    /// chunk): a server that finished it, rather than a connection cut short.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// The connection, e.g. to close it from the client's side.
    pub fn into_inner(self) -> TcpStream {
        self.stream
    }

    fn take(&mut self, bytes: &[u8]) {
        if !self.chunked {
            self.ready.extend(self.parser.push(bytes));
            return;
        }
        self.raw.extend_from_slice(bytes);
        // Whole chunks only; a partial one waits for more bytes.
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size = std::str::from_utf8(&self.raw[..line_end])
                .ok()
                .and_then(|t| usize::from_str_radix(t.split(';').next()?.trim(), 16).ok());
            let Some(size) = size else {
                self.ended = true;
                return;
            };
            if size == 0 {
                self.ended = true;
                self.finished = true;
                return;
            }
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return;
            }
            let chunk: Vec<u8> = self.raw[start..start + size].to_vec();
            self.raw.drain(..start + size + 2);
            let events = self.parser.push(&chunk);
            self.ready.extend(events);
        }
    }
}

/// One read, with the socket's timeout set to what is left before `deadline`.
fn read_some(
    stream: &mut TcpStream,
    into: &mut Vec<u8>,
    deadline: Instant,
) -> std::io::Result<usize> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::Error::new(ErrorKind::TimedOut, "deadline passed"));
    }
    stream.set_read_timeout(Some(left))?;
    let mut buf = [0u8; 16 * 1024];
    let n = stream.read(&mut buf)?;
    into.extend_from_slice(&buf[..n]);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_comments_are_parsed_however_the_bytes_are_split() {
        let text = b": keep-alive\n\nevent: status\nretry: 1000\ndata: {\"a\":1}\n\nid: 7\ndata: x\ndata: y\n\n";
        let whole = SseParser::default().push(text);
        let mut split = SseParser::default();
        let mut pieces = Vec::new();
        for b in text.iter() {
            pieces.extend(split.push(&[*b]));
        }
        assert_eq!(whole, pieces);
        assert_eq!(whole.len(), 3, "{whole:?}");
        assert_eq!(whole[0].comment.as_deref(), Some("keep-alive"));
        assert_eq!(whole[1].kind(), "status");
        assert_eq!(whole[1].retry, Some(1000));
        assert_eq!(whole[1].json(), serde_json::json!({"a": 1}));
        assert_eq!(whole[2].kind(), "message");
        assert_eq!(whole[2].id.as_deref(), Some("7"));
        assert_eq!(whole[2].data, "x\ny");
    }
}
