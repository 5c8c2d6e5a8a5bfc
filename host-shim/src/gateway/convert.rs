//! Conversion between hyper's requests and responses and the ABI's header lists: the request's
//! headers as Envoy's codec hands them to the plugin, the upstream request built from the list the
//! plugin left, and responses built from header lists.

use http::{HeaderName, HeaderValue, Request, Response, StatusCode};

use crate::abi::HeaderList;
use crate::body::Body;
use crate::envoy_config::SocketAddress;
use crate::field_order::{in_wire_order, FieldOrder, ResponseOrders};

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "proxy-authenticate",
];

/// The request's headers as Envoy's codec hands them on: `:authority`, `:path`, `:method`,
/// `:scheme`, then the regular headers in order (lower-case; `host` becomes `:authority`;
/// repeated `x-forwarded-for` headers joined by `,` into the first, as Envoy's header map
/// does). The connection manager's changes come after ([`crate::conn_manager`]).
pub(super) fn request_header_list<B>(req: &Request<B>) -> HeaderList {
    // A repeated Host is joined by `,` into one `:authority`, as Envoy's header map appends
    // to an inline header (so a second Host never goes unseen behind the first).
    let hosts: Vec<&[u8]> = req
        .headers()
        .get_all(http::header::HOST)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let authority = (!hosts.is_empty())
        .then(|| hosts.join(&b","[..]))
        .or_else(|| {
            req.uri()
                .authority()
                .map(|a| a.as_str().as_bytes().to_vec())
        })
        .unwrap_or_default();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut h: HeaderList = vec![
        (":authority".into(), authority),
        (":path".into(), path.as_bytes().to_vec()),
        (":method".into(), req.method().as_str().as_bytes().to_vec()),
        (":scheme".into(), b"http".to_vec()),
    ];
    let mut xff_at: Option<usize> = None;
    let order = req.extensions().get::<FieldOrder>().map(|o| o.0.as_slice());
    for (k, v) in in_wire_order(req.headers(), order.unwrap_or_default()) {
        let name = k.as_str();
        // `expect: 100-continue` is answered here (hyper sends the 100 when the body is first
        // read), not passed on, as Envoy does.
        if name == "host"
            || HOP_BY_HOP.contains(&name)
            || (name == "expect" && v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        {
            continue;
        }
        if name == "x-forwarded-for" {
            if let Some(i) = xff_at {
                let joined = &mut h[i].1;
                joined.push(b',');
                joined.extend_from_slice(v.as_bytes());
                continue;
            }
            xff_at = Some(h.len());
        }
        h.push((name.to_string(), v.as_bytes().to_vec()));
    }
    h
}

/// Whether an upstream exchange failed because the client's request body could not be
/// decoded (hyper's chunked decoder reports InvalidData / InvalidInput).
pub(super) fn malformed_request_body(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            ) {
                return true;
            }
        }
        source = err.source();
    }
    false
}

/// Whether an upstream error was a timeout (hyper-util's connect timeout).
pub(super) fn timed_out(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = source {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// Whether the connection closes after this request: `connection: close`, or HTTP/1.0
/// without keep-alive.
pub(super) fn closes_after<B>(req: &Request<B>) -> bool {
    let connection = req
        .headers()
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect::<Vec<_>>();
    if connection.iter().any(|t| t == "close") {
        return true;
    }
    req.version() == http::Version::HTTP_10 && !connection.iter().any(|t| t == "keep-alive")
}

pub(super) fn header_str<'a>(h: &'a HeaderList, name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// An upstream response's fields (hop-by-hop ones dropped) in the order the upstream sent
/// them, when its connection noted that order.
pub(super) fn response_header_list(parts: &http::response::Parts) -> HeaderList {
    let order = parts
        .extensions
        .get::<ResponseOrders>()
        .and_then(ResponseOrders::take)
        .unwrap_or_default();
    in_wire_order(&parts.headers, &order.0)
        .into_iter()
        .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

pub(super) fn header_list_of(map: &http::HeaderMap) -> HeaderList {
    map.iter()
        .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

pub(super) fn header_map_of(list: &HeaderList) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (k, v) in list {
        if k.starts_with(':') {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// Builds the upstream request from the (plugin-modified) header list.
pub(super) fn build_request(
    addr: &SocketAddress,
    headers: &HeaderList,
    body: Body,
) -> Result<Request<Body>, String> {
    let method = header_str(headers, ":method").unwrap_or("GET");
    let path = header_str(headers, ":path").unwrap_or("/");
    let authority = header_str(headers, ":authority").unwrap_or_default();
    let uri = format!("http://{addr}{path}");
    let mut builder = Request::builder()
        .method(
            http::Method::from_bytes(method.as_bytes())
                .map_err(|_| format!("invalid :method {method:?}"))?,
        )
        .uri(uri.as_str());
    let map = builder
        .headers_mut()
        .ok_or_else(|| format!("invalid :path {path:?}"))?;
    // `host` first, where Envoy's codec writes `:authority`.
    if !authority.is_empty() {
        if let Ok(v) = HeaderValue::from_str(authority) {
            map.insert(http::header::HOST, v);
        }
    }
    // Every value of a repeated name goes on (a HeaderMap's by-value iterator names only the
    // first of each run).
    for (k, v) in header_map_of(headers).iter() {
        if !HOP_BY_HOP.contains(&k.as_str()) && k != http::header::HOST {
            map.append(k.clone(), v.clone());
        }
    }
    builder.body(body).map_err(|e| e.to_string())
}

pub(super) fn response_builder(headers: &HeaderList) -> http::response::Builder {
    let status = header_str(headers, ":status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let mut builder = Response::builder().status(status);
    if let Some(map) = builder.headers_mut() {
        // Filtered while building: HeaderMap::remove swap-removes, which reorders the rest.
        let kept: HeaderList = headers
            .iter()
            .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
            .cloned()
            .collect();
        *map = header_map_of(&kept);
    }
    builder
}

/// Moves every `name` field to the end, the others keeping their order (HeaderMap::remove
/// would swap the last field into the gap).
pub(super) fn move_to_end(map: &mut http::HeaderMap, name: &HeaderName) {
    if !map.contains_key(name) {
        return;
    }
    let old = std::mem::take(map);
    let mut moved = Vec::new();
    for (k, v) in old.iter() {
        if k == name {
            moved.push(v.clone());
        } else {
            map.append(k.clone(), v.clone());
        }
    }
    for v in moved {
        map.append(name.clone(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;

    fn list(pairs: &[(&str, &str)]) -> HeaderList {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn request_headers_reach_the_plugin_as_envoys_codec_hands_them_on() {
        let req = Request::post("/search?q=1")
            .header("host", "shop.example")
            .header("x-forwarded-for", "10.0.0.1")
            .header("connection", "keep-alive")
            .header("expect", "100-continue")
            .header("x-trace", "a")
            .header("x-forwarded-for", "10.0.0.2")
            .body(())
            .unwrap();
        assert_eq!(
            request_header_list(&req),
            list(&[
                (":authority", "shop.example"),
                (":path", "/search?q=1"),
                (":method", "POST"),
                (":scheme", "http"),
                ("x-forwarded-for", "10.0.0.1,10.0.0.2"),
                ("x-trace", "a"),
            ])
        );
    }

    #[test]
    fn connection_close_and_http10_without_keep_alive_close_after_the_request() {
        let req = |version, connection: Option<&str>| {
            let mut b = Request::get("/").version(version);
            if let Some(c) = connection {
                b = b.header("connection", c);
            }
            b.body(()).unwrap()
        };
        assert!(!closes_after(&req(http::Version::HTTP_11, None)));
        assert!(closes_after(&req(
            http::Version::HTTP_11,
            Some("keep-alive, Close")
        )));
        assert!(closes_after(&req(http::Version::HTTP_10, None)));
        assert!(!closes_after(&req(
            http::Version::HTTP_10,
            Some("Keep-Alive")
        )));
    }

    #[test]
    fn upstream_requests_go_to_the_cluster_with_host_first_and_no_hop_by_hop_fields() {
        let cluster = SocketAddress {
            host: "::1".into(),
            port: 8080,
        };
        let headers = list(&[
            (":method", "PUT"),
            (":path", "/items/1?v=2"),
            (":authority", "api.example"),
            ("x-tag", "one"),
            ("connection", "close"),
            ("x-tag", "two"),
            ("host", "ignored.example"),
        ]);
        let req = build_request(&cluster, &headers, body::empty()).unwrap();
        assert_eq!(req.method(), http::Method::PUT);
        assert_eq!(req.uri().to_string(), "http://[::1]:8080/items/1?v=2");
        let fields: Vec<(&str, &str)> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            fields,
            [("host", "api.example"), ("x-tag", "one"), ("x-tag", "two")]
        );
    }

    #[test]
    fn an_upstream_request_with_an_invalid_method_is_refused() {
        let cluster = SocketAddress {
            host: "127.0.0.1".into(),
            port: 80,
        };
        let headers = list(&[(":method", "GE T"), (":path", "/")]);
        let err = build_request(&cluster, &headers, body::empty()).unwrap_err();
        assert!(err.contains(":method"), "{err}");
    }

    #[test]
    fn responses_keep_their_field_order_and_drop_hop_by_hop_fields() {
        let headers = list(&[
            (":status", "201"),
            ("x-b", "1"),
            ("transfer-encoding", "chunked"),
            ("x-a", "2"),
            ("x-b", "3"),
        ]);
        let resp = response_builder(&headers).body(()).unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(
            header_list_of(resp.headers()),
            list(&[("x-b", "1"), ("x-b", "3"), ("x-a", "2")])
        );
    }

    #[test]
    fn a_missing_or_invalid_status_is_a_502() {
        for status in [None, Some("abc"), Some("1000")] {
            let mut headers = list(&[("x-a", "1")]);
            if let Some(s) = status {
                headers.push((":status".into(), s.as_bytes().to_vec()));
            }
            let resp = response_builder(&headers).body(()).unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "{status:?}");
        }
    }

    #[test]
    fn moving_a_field_to_the_end_keeps_the_others_in_order() {
        let mut map = header_map_of(&list(&[
            ("connection", "close"),
            ("x-a", "1"),
            ("x-b", "2"),
            ("x-c", "3"),
        ]));
        move_to_end(&mut map, &http::header::CONNECTION);
        let names: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-a", "x-b", "x-c", "connection"]);
    }

    #[test]
    fn header_maps_leave_out_pseudo_headers_and_invalid_names() {
        let map = header_map_of(&list(&[
            (":status", "200"),
            ("bad name", "x"),
            ("x-ok", "y"),
        ]));
        assert_eq!(header_list_of(&map), list(&[("x-ok", "y")]));
    }
}
