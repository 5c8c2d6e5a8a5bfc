//! A downstream HTTP/1.1 connection as hyper reads it, with Envoy's connection timers (hyper's
//! own header timeout also counts idle keep-alive time and answers nothing):
//!
//! * `request_headers_timeout`: from the first byte of a request until its headers are
//!   complete. Envoy 1.40 then answers `408` with body `request header timeout` (text/plain,
//!   `connection: close`) and closes.
//! * `common_http_protocol_options.idle_timeout`: no request in flight for that long. Envoy
//!   closes a connection that never sent a byte at once, without a response; one that has
//!   served requests is drained first (`drain_timeout`, 5 s) and closed after its 1 s delayed
//!   close.
//!
//! The request side tells the connection where it is with [`ConnectionState::head_complete`]
//! and the guard that returns ([`RequestInFlight`]), dropped when the response is done.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::field_order::field_names;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// The most of a request head scanned for its framing headers (Envoy's 60 KiB header limit,
/// with room for the request line).
const MAX_SCANNED_HEAD: usize = 64 * 1024;

/// What Envoy 1.40's HTTP/1 codec answers itself to a request head, before any filter, where
/// hyper would answer otherwise or not at all; each closes the connection:
/// * a version other than HTTP/1.1 (HTTP/1.0, a line without one, HTTP/2.0 or HTTP/1.7 on an
///   HTTP/1 connection): 426 (Envoy's default refuses HTTP/1.0; the status line still says
///   HTTP/1.1);
/// * a target with a `#fragment`, or one that is neither a path, an absolute URL nor `*`
///   (outside CONNECT): an empty 400;
/// * a `Host` with a byte outside an authority's characters: an empty 400;
/// * a `transfer-encoding` other than `chunked`: an empty 501 (hyper reads `chunked, identity`
///   and `xchunked` as 400).
fn codec_refusal(head: &[u8], server: Option<&str>) -> Option<String> {
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let server = server
        .map(|s| format!("server: {s}\r\n"))
        .unwrap_or_default();
    let empty = |status: &str| {
        Some(format!(
            "HTTP/1.1 {status}\r\ndate: {date}\r\n{server}connection: close\r\n\
             content-length: 0\r\n\r\n"
        ))
    };
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next()?;
    let mut parts = request_line.split(|b| *b == b' ');
    let (method, target) = (parts.next()?, parts.next()?);
    let version = parts.next();
    let other_version = match version {
        None => true,
        Some(v) => {
            v != b"HTTP/1.1"
                && matches!(v, [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
                    if major.is_ascii_digit() && minor.is_ascii_digit())
        }
    };
    if other_version {
        return Some(format!(
            "HTTP/1.1 426 Upgrade Required\r\ncontent-length: 16\r\ncontent-type: text/plain\r\n\
             date: {date}\r\n{server}connection: close\r\n\r\nUpgrade Required"
        ));
    }
    let origin_or_absolute =
        target.starts_with(b"/") || target == b"*" || target.windows(3).any(|w| w == b"://");
    if target.contains(&b'#') || (method != b"CONNECT" && !origin_or_absolute) {
        return empty("400 Bad Request");
    }
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"host") && !value.iter().all(|b| authority_byte(*b)) {
            return empty("400 Bad Request");
        }
        if name.eq_ignore_ascii_case(b"transfer-encoding")
            && !value.eq_ignore_ascii_case(b"chunked")
        {
            return empty("501 Not Implemented");
        }
    }
    None
}

/// A byte an authority may hold: unreserved, sub-delims, `:`, `@`, `[`, `]` and `%`.
fn authority_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@[]%".contains(&b)
}

/// Envoy's answer to a head over its limit, written here when the request line alone is
/// longer than the scan (hyper would answer 414 to its target).
fn head_too_large_reply(server: Option<&str>) -> String {
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let server = server
        .map(|s| format!("server: {s}\r\n"))
        .unwrap_or_default();
    format!(
        "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 31\r\n\
         content-type: text/plain\r\ndate: {date}\r\n{server}connection: close\r\n\r\n\
         Request Header Fields Too Large"
    )
}

/// Envoy's HTTP connection manager `drain_timeout` default, plus its 1 s delayed close: how
/// long an idle connection that served requests stays open after its idle timeout.
const DRAIN_AND_CLOSE: Duration = Duration::from_secs(6);

const HEADER_TIMEOUT_REPLY: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 22\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nrequest header timeout";

/// Where the connection's current request is, shared by the IO and the request handler.
#[derive(Default)]
pub struct ConnectionState {
    /// Requests whose headers are complete and whose response has not finished.
    in_flight: AtomicUsize,
    /// Bytes of a new request head have arrived and its headers are not complete yet.
    head_started: AtomicBool,
    served: AtomicBool,
    /// When the connection last became idle (no request in flight, no head in progress).
    idle_since: Mutex<Option<Instant>>,
    /// The reader waiting while a request was in flight: woken when the connection goes idle,
    /// so that the idle timer starts.
    reader: Mutex<Option<Waker>>,
    /// The current request's head carried both `content-length` and `transfer-encoding`, which
    /// hyper resolves by dropping `content-length` (where Envoy refuses the request).
    conflicting_framing: AtomicBool,
    /// The current request's field names in the order they came (lower-case): http's HeaderMap
    /// groups the values of one name, Envoy keeps them as received.
    field_order: Mutex<Option<Vec<String>>>,
}

impl ConnectionState {
    fn new() -> ConnectionState {
        let s = ConnectionState::default();
        *s.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        s
    }

    /// Whether the head just completed framed its body twice (`content-length` and
    /// `transfer-encoding`); asking clears it.
    pub fn take_conflicting_framing(&self) -> bool {
        self.conflicting_framing.swap(false, Ordering::Relaxed)
    }

    /// The field names of the head just completed, in wire order (taken once).
    pub fn take_field_order(&self) -> Option<Vec<String>> {
        self.field_order
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// A request's headers are complete: its head timer stops. Drop the guard when its
    /// response is done.
    pub fn head_complete(self: &Arc<Self>) -> RequestInFlight {
        self.head_started.store(false, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
        RequestInFlight {
            state: self.clone(),
        }
    }
}

/// A request in flight on a connection; dropping it (when the response body is done) lets the
/// connection go idle.
pub struct RequestInFlight {
    state: Arc<ConnectionState>,
}

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        let s = &self.state;
        s.served.store(true, Ordering::Relaxed);
        if s.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            *s.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            if let Some(w) = s.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
                w.wake();
            }
        }
    }
}

/// The TCP stream with the two timers.
pub struct DownstreamIo {
    stream: TcpStream,
    state: Arc<ConnectionState>,
    request_headers_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    head_deadline: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
    /// Set once the connection timed out: reads see EOF, writes are discarded.
    closed: bool,
    /// The bytes of the current request head read so far (scanned for its framing headers),
    /// `None` once the head is complete.
    head: Option<Vec<u8>>,
    /// The `server` header of the refusals written here (None: no `server`).
    server: Option<String>,
}

impl DownstreamIo {
    /// `server`: the `server` field of the refusals the connection writes itself.
    pub fn new(
        stream: TcpStream,
        request_headers_timeout: Option<Duration>,
        idle_timeout: Option<Duration>,
        server: Option<String>,
    ) -> (DownstreamIo, Arc<ConnectionState>) {
        let state = Arc::new(ConnectionState::new());
        let io = DownstreamIo {
            stream,
            state: state.clone(),
            request_headers_timeout,
            idle_timeout,
            head_deadline: None,
            head: None,
            server,
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            closed: false,
        };
        (io, state)
    }

    /// The earliest timer that applies now, and whether it is the head timer.
    fn deadline(&self) -> Option<(Instant, bool)> {
        if self.state.head_started.load(Ordering::Relaxed) {
            return self.head_deadline.map(|d| (d, true));
        }
        if self.state.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let since = (*self
            .state
            .idle_since
            .lock()
            .unwrap_or_else(|e| e.into_inner()))?;
        let idle = self.idle_timeout?;
        let extra = if self.state.served.load(Ordering::Relaxed) {
            DRAIN_AND_CLOSE
        } else {
            Duration::ZERO
        };
        Some((since + idle + extra, false))
    }

    fn expire(&mut self, head: bool) {
        if head {
            // Best effort: the reply is small enough for an empty socket buffer.
            let _ = self.stream.try_write(HEADER_TIMEOUT_REPLY);
        }
        self.closed = true;
    }
}

impl AsyncRead for DownstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len() > before;
                if got
                    && this.state.in_flight.load(Ordering::Relaxed) == 0
                    && !this.state.head_started.swap(true, Ordering::Relaxed)
                {
                    // The first byte of a new request: the idle timer stops, the head timer runs.
                    *this
                        .state
                        .idle_since
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = None;
                    this.head_deadline = this.request_headers_timeout.map(|t| Instant::now() + t);
                    this.head = Some(Vec::new());
                }
                if let Some(head) = &mut this.head {
                    head.extend_from_slice(&buf.filled()[before..]);
                    let line_too_long = head.len() > MAX_SCANNED_HEAD
                        && head[..MAX_SCANNED_HEAD].iter().all(|b| *b != b'\n');
                    if line_too_long {
                        let reply = head_too_large_reply(this.server.as_deref());
                        let _ = this.stream.try_write(reply.as_bytes());
                        this.closed = true;
                        this.head = None;
                        buf.set_filled(before);
                    } else if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        if let Some(reply) = codec_refusal(&head[..end], this.server.as_deref()) {
                            // Answered here, the request never reaches hyper (which would
                            // answer an HTTP/1.0 request in HTTP/1.0, and drops a fragment).
                            let _ = this.stream.try_write(reply.as_bytes());
                            this.closed = true;
                            this.head = None;
                            buf.set_filled(before);
                            return Poll::Ready(Ok(()));
                        }
                        let names = field_names(&head[..end]);
                        if names.iter().any(|n| n == "content-length")
                            && names.iter().any(|n| n == "transfer-encoding")
                        {
                            this.state
                                .conflicting_framing
                                .store(true, Ordering::Relaxed);
                        }
                        *this
                            .state
                            .field_order
                            .lock()
                            .unwrap_or_else(|e| e.into_inner()) = Some(names);
                        this.head = None;
                    } else if head.len() > MAX_SCANNED_HEAD {
                        // hyper refuses a head this large anyway (431).
                        this.head = None;
                    }
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        let Some((deadline, head)) = this.deadline() else {
            *this.state.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            return Poll::Pending;
        };
        if Instant::now() >= deadline {
            this.expire(head);
            return Poll::Ready(Ok(()));
        }
        if this.sleep.deadline() != deadline {
            this.sleep.as_mut().reset(deadline);
        }
        if this.sleep.as_mut().poll(cx).is_ready() {
            this.expire(head);
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

impl AsyncWrite for DownstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.closed {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.closed {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
