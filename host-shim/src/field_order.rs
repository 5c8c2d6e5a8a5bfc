//! The order of header fields as they came on the wire, which http's `HeaderMap` (what hyper
//! parses into) loses: it keeps the values of one name in order, but together. Envoy keeps a
//! request's and a response's fields interleaved as received, so host-shim notes the field names
//! of each head as it reads the bytes (downstream: crate::downstream; upstream: [`OrderedIo`]
//! below) and lays the parsed values back in that order ([`in_wire_order`]).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A head's field names in the order they came (lower-case), carried in a request's or
/// response's extensions.
#[derive(Debug, Clone, Default)]
pub struct FieldOrder(pub Vec<String>);

/// The field names of a head (its start line first, without the final blank line), lower-case,
/// in order.
pub fn field_names(head: &[u8]) -> Vec<String> {
    head.split(|b| *b == b'\n')
        .skip(1)
        .filter_map(|line| {
            let (name, _) = line.split_at(line.iter().position(|b| *b == b':')?);
            Some(String::from_utf8_lossy(name.trim_ascii()).to_ascii_lowercase())
        })
        .collect()
}

/// The fields of `map` in wire order: `order` names them as they came, each name taking its
/// next value; fields `order` does not name follow in the map's order.
pub fn in_wire_order<'a>(
    map: &'a HeaderMap,
    order: &[String],
) -> Vec<(&'a HeaderName, &'a HeaderValue)> {
    let mut out = Vec::with_capacity(map.len());
    let mut taken: HashMap<&str, usize> = HashMap::new();
    for name in order {
        let Some(key) = map.keys().find(|k| k.as_str() == name) else {
            continue;
        };
        let n = taken.entry(key.as_str()).or_insert(0);
        if let Some(v) = map.get_all(key).iter().nth(*n) {
            out.push((key, v));
            *n += 1;
        }
    }
    for key in map.keys() {
        let n = taken.get(key.as_str()).copied().unwrap_or(0);
        out.extend(map.get_all(key).iter().skip(n).map(|v| (key, v)));
    }
    out
}

/// The response heads one upstream connection has read, oldest first (HTTP/1: one response at
/// a time, in request order). Each response takes the front one.
#[derive(Debug, Clone, Default)]
pub struct ResponseOrders(Arc<Mutex<VecDeque<Vec<String>>>>);

impl ResponseOrders {
    /// The field order of the response just parsed on this connection.
    pub fn take(&self) -> Option<FieldOrder> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
            .map(FieldOrder)
    }
}

/// The most of a head that is scanned (hyper refuses larger ones anyway).
const MAX_SCANNED_HEAD: usize = 64 * 1024;

/// An upstream connection that notes each final response head's field names as it is read.
pub struct OrderedIo {
    inner: TokioIo<TcpStream>,
    orders: ResponseOrders,
    /// The bytes of the response head read so far.
    head: Option<Vec<u8>>,
    /// A request went out and its final response head has not been read yet (interim 1xx
    /// heads are passed over).
    scanning: bool,
}

/// Whether `bytes` begin with an HTTP/1 request line (`METHOD target HTTP/1.x`): hyper
/// writes a request's head in one piece, so this marks a new request on the connection (a
/// request body written while the response streams does not).
fn starts_request(bytes: &[u8]) -> bool {
    let line = bytes.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let method = parts.next().unwrap_or_default();
    let _target = parts.next();
    !method.is_empty()
        && method.iter().all(u8::is_ascii_uppercase)
        && parts.next().is_some_and(|v| v.starts_with(b"HTTP/1."))
}

impl OrderedIo {
    fn note(&mut self, bytes: &[u8]) {
        if !self.scanning {
            return;
        }
        let head = self.head.get_or_insert_with(Vec::new);
        head.extend_from_slice(bytes);
        while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let interim = head.get(9..10) == Some(b"1");
            if !interim {
                self.orders
                    .0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_back(field_names(&head[..end]));
                // The body follows; the next head comes after the next request.
                self.head = None;
                self.scanning = false;
                return;
            }
            head.drain(..end + 4);
        }
        if head.len() > MAX_SCANNED_HEAD {
            self.head = None;
            self.scanning = false;
        }
    }
}

impl hyper::rt::Read for OrderedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        // Read into a buffer of our own to see the bytes, then hand them on.
        let mut scratch = vec![0u8; buf.remaining().min(16 * 1024)];
        let mut tmp = hyper::rt::ReadBuf::new(&mut scratch);
        match Pin::new(&mut self.inner).poll_read(cx, tmp.unfilled()) {
            Poll::Ready(Ok(())) => {
                let n = tmp.filled().len();
                self.note(&scratch[..n]);
                buf.put_slice(&scratch[..n]);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl hyper::rt::Write for OrderedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if starts_request(buf) {
            self.head = None;
            self.scanning = true;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connection for OrderedIo {
    fn connected(&self) -> Connected {
        self.inner.connected().extra(self.orders.clone())
    }
}

/// hyper-util's HTTP connector whose connections are [`OrderedIo`].
#[derive(Clone)]
pub struct OrderedConnector(pub HttpConnector);

impl tower::Service<Uri> for OrderedConnector {
    type Response = OrderedIo;
    type Error = <HttpConnector as tower::Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<OrderedIo, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let inner = connecting.await?;
            Ok(OrderedIo {
                inner,
                orders: ResponseOrders::default(),
                head: None,
                scanning: false,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_line_starts_a_request_and_body_bytes_do_not() {
        assert!(starts_request(b"GET /a?b HTTP/1.1\r\nhost: x\r\n\r\n"));
        assert!(starts_request(b"POST / HTTP/1.0\r\n"));
        assert!(!starts_request(b"hello world HTTP/1.1"));
        assert!(!starts_request(b"5\r\nhello\r\n"));
        assert!(!starts_request(b""));
    }

    #[test]
    fn repeated_fields_are_laid_back_in_wire_order() {
        let head = b"HTTP/1.1 200 OK\r\nX-Dup: a\r\nx-other: 1\r\nx-dup: b";
        let order = field_names(head);
        assert_eq!(order, ["x-dup", "x-other", "x-dup"]);
        let mut map = HeaderMap::new();
        map.append("x-dup", HeaderValue::from_static("a"));
        map.append("x-dup", HeaderValue::from_static("b"));
        map.append("x-other", HeaderValue::from_static("1"));
        map.append("x-late", HeaderValue::from_static("z"));
        let fields: Vec<(&str, &str)> = in_wire_order(&map, &order)
            .into_iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap_or_default()))
            .collect();
        assert_eq!(
            fields,
            [
                ("x-dup", "a"),
                ("x-other", "1"),
                ("x-dup", "b"),
                ("x-late", "z")
            ]
        );
    }
}
