//! `proxy_get_property`, `proxy_set_property`: the attributes Envoy exposes that plugins commonly
//! read (`source.address`, `request.path`, `request.headers`, `plugin_name`, …). Paths arrive as
//! segments joined by NUL. Integers are 8-byte little-endian, maps use the header-map layout, as
//! Envoy serialises them.

use std::time::UNIX_EPOCH;

use wasmtime::Linker;

use super::{read_bytes, return_bytes, status, HostCaller};
use crate::abi::{encode_header_map, Status};
use crate::state::{HostState, StreamState};

fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_slice())
}

fn int(v: i64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// Envoy's header byte size: the names and values, nothing else.
fn headers_size(headers: &[(String, Vec<u8>)]) -> i64 {
    headers
        .iter()
        .map(|(k, v)| (k.len() + v.len()) as i64)
        .sum()
}

fn content_length(headers: &[(String, Vec<u8>)]) -> Option<i64> {
    std::str::from_utf8(header(headers, "content-length")?)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The value of a property, or `None` when host-shim does not know it (or Envoy has none).
///
/// Envoy 1.40, measured with the abi-test-guest's `phases` scenario: numbers are 8-byte
/// little-endian integers, booleans one byte. `request.size` is the request's content-length
/// (else the body bytes received); the `*.total_size` values add the byte size of the headers
/// only while those are reachable (so a body callback sees the body alone); `response.size` is 0
/// until the log phase; `response.code_details` is `via_upstream` (or the details of the plugin's
/// local reply) once there is a response; `response.flags` is 0 and `connection.mtls` false
/// (host-shim has no response flags and no TLS); `upstream.address`/`upstream.port` appear after
/// the request headers phase; `xds.route_name` is the route's `name` ("" when it has none);
/// Envoy has no `cluster_name` or `route_name`.
pub fn lookup(state: &mut HostState, path: &str) -> Option<Vec<u8>> {
    let root = path.split('.').next().unwrap_or_default();
    if !ROOTS.contains(&root) {
        return None;
    }
    match path {
        "plugin_name" => return Some(state.identity.plugin_name.clone().into_bytes()),
        "plugin_root_id" => return Some(state.identity.root_id.clone().into_bytes()),
        "plugin_vm_id" => return Some(state.identity.vm_id.clone().into_bytes()),
        _ => {}
    }
    let stream = state.current_stream()?;
    // One field of a header map: its values joined with `,`, as Envoy's attribute gives it.
    for (prefix, map) in [
        ("request.headers.", Some(&stream.request_headers)),
        ("response.headers.", stream.response_headers.as_ref()),
    ] {
        if let Some(name) = path.strip_prefix(prefix) {
            let name = name.to_ascii_lowercase();
            let (_, value) = joined(map?).into_iter().find(|(k, _)| *k == name)?;
            return Some(value);
        }
    }
    let req = &stream.request_headers;
    let info = &stream.info;
    let path_header = header(req, ":path").unwrap_or(b"/");
    Some(match path {
        "source.address" => info.source.to_string().into_bytes(),
        "source.port" => int(info.source.port() as i64),
        "destination.address" => info.destination.to_string().into_bytes(),
        "destination.port" => int(info.destination.port() as i64),
        "connection.id" => int(info.connection_id as i64),
        "request.path" => path_header.to_vec(),
        "request.url_path" => path_header
            .split(|b| *b == b'?')
            .next()
            .unwrap_or_default()
            .to_vec(),
        "request.query" => match path_header.iter().position(|b| *b == b'?') {
            Some(i) => path_header[i + 1..].to_vec(),
            None => Vec::new(),
        },
        "request.host" => header(req, ":authority")?.to_vec(),
        "request.method" => header(req, ":method")?.to_vec(),
        "request.scheme" => header(req, ":scheme").unwrap_or(b"http").to_vec(),
        "request.protocol" => b"HTTP/1.1".to_vec(),
        "request.id" => header(req, "x-request-id")?.to_vec(),
        "request.useragent" => header(req, "user-agent")?.to_vec(),
        "request.referer" => header(req, "referer")?.to_vec(),
        "request.headers" => encode_header_map(&joined(req)),
        "request.time" => int(info
            .start_time
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i64),
        "response.code" => {
            let status = header(stream.response_headers.as_ref()?, ":status")?;
            int(std::str::from_utf8(status).ok()?.parse().ok()?)
        }
        "response.headers" => encode_header_map(&joined(stream.response_headers.as_ref()?)),
        "request.size" => int(content_length(req).unwrap_or(stream.request_body_received as i64)),
        "request.total_size" => {
            let headers = if stream.readable.request_headers {
                headers_size(req)
            } else {
                0
            };
            int(stream.request_body_received as i64 + headers)
        }
        "response.size" => int(response_size(stream)),
        "response.total_size" => {
            let headers = match &stream.response_headers {
                Some(h) if stream.readable.response_headers => headers_size(h),
                _ => 0,
            };
            int(response_size(stream) + headers)
        }
        "response.code_details" => {
            stream.response_headers.as_ref()?;
            match &stream.local_details {
                Some(details) => details.clone().into_bytes(),
                None => b"via_upstream".to_vec(),
            }
        }
        "response.flags" => int(0),
        "connection.mtls" => vec![0],
        "upstream.address" => upstream(state)?.to_string().into_bytes(),
        "upstream.port" => int(upstream(state)?.port as i64),
        "xds.route_name" => info.route_name.clone().into_bytes(),
        "xds.cluster_name" => info.cluster_name.clone().into_bytes(),
        _ => return None,
    })
}

/// The first path segments Envoy resolves itself (its attributes); any other names a value a
/// plugin set (filter state).
const ROOTS: &[&str] = &[
    "request",
    "response",
    "connection",
    "upstream",
    "source",
    "destination",
    "metadata",
    "filter_state",
    "node",
    "xds",
    "plugin_name",
    "plugin_root_id",
    "plugin_vm_id",
    "cluster_name",
    "cluster_metadata",
    "route_name",
    "route_metadata",
    "listener_direction",
    "listener_metadata",
    "upstream_host_metadata",
];

/// A header map as Envoy's attribute serialises it: one entry per name, in the order names
/// first appear, repeated values joined with `,`.
fn joined(headers: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::with_capacity(headers.len());
    for (k, v) in headers {
        match out.iter_mut().find(|(name, _)| name == k) {
            Some((_, value)) => {
                value.push(b',');
                value.extend_from_slice(v);
            }
            None => out.push((k.clone(), v.clone())),
        }
    }
    out
}

/// A value the plugin set with `proxy_set_property`, as Envoy finds it: filter state is keyed by
/// the whole path the plugin set, and a read looks up only its first segment, so a value set
/// under a path of several segments cannot be read back, and no read reaches past a value.
fn plugin_value(state: &mut HostState, raw_path: &str) -> Option<Vec<u8>> {
    let mut segments = raw_path.split('\0');
    let first = segments.next()?;
    if segments.next().is_some() {
        return None;
    }
    state.current_stream()?.properties.get(first).cloned()
}

/// The response body bytes sent downstream, which Envoy reports once the response went out: 0
/// before the log phase (where both header maps are reachable again), then the body bytes the
/// plugin let through.
fn response_size(stream: &StreamState) -> i64 {
    let log_phase = stream.readable.request_headers && stream.readable.response_headers;
    if log_phase {
        stream.response_body_sent as i64
    } else {
        0
    }
}

/// The upstream host of the stream's cluster, once Envoy would have picked it.
fn upstream(state: &mut HostState) -> Option<crate::envoy_config::SocketAddress> {
    let stream = state.current_stream()?;
    if !stream.past_request_headers || stream.local_details.is_some() {
        return None;
    }
    let cluster = stream.info.cluster_name.clone();
    state.clusters.get(&cluster).cloned()
}

pub fn add_to_linker(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    linker.func_wrap_async(
        "env",
        "proxy_get_property",
        |mut caller: HostCaller<'_>,
         (path_ptr, path_len, ret_ptr, ret_size): (i32, i32, i32, i32)| {
            Box::new(async move {
                let raw = match read_bytes(&mut caller, path_ptr, path_len) {
                    Ok(p) => raw_path(&p),
                    Err(s) => return Ok(s.code()),
                };
                let path = raw.replace('\0', ".");
                let found = lookup(caller.data_mut(), &path)
                    .or_else(|| plugin_value(caller.data_mut(), &raw));
                let Some(value) = found else {
                    return Ok(Status::NotFound.code());
                };
                Ok(status(
                    return_bytes(&mut caller, &value, ret_ptr, ret_size).await?,
                ))
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut caller: HostCaller<'_>,
         path_ptr: i32,
         path_len: i32,
         val_ptr: i32,
         val_len: i32|
         -> i32 {
            let path = match read_bytes(&mut caller, path_ptr, path_len) {
                Ok(p) => raw_path(&p),
                Err(s) => return s.code(),
            };
            let value = match read_bytes(&mut caller, val_ptr, val_len) {
                Ok(v) => v,
                Err(s) => return s.code(),
            };
            match caller.data_mut().current_stream() {
                Some(s) => {
                    s.properties.insert(path, value);
                    Status::Ok.code()
                }
                None => Status::NotFound.code(),
            }
        },
    )?;
    Ok(())
}

/// A property path as the plugin sent it, segments separated by NUL (a trailing NUL is ignored).
fn raw_path(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .trim_end_matches('\0')
        .to_string()
}
