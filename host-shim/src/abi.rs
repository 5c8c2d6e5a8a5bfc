//! The numbers of proxy-wasm ABI 0.2.1 (and the Higress Redis extension), and the header-map byte
//! layout shared by every call that passes headers.

/// Status codes every host call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
    BrokenConnection = 11,
    Unimplemented = 12,
}

impl Status {
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// What a filter callback returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

impl Action {
    pub fn from_i32(v: i32) -> Action {
        // Envoy treats every non-zero value as a form of "stop iteration".
        if v == 0 {
            Action::Continue
        } else {
            Action::Pause
        }
    }
}

pub mod buffer {
    pub const HTTP_REQUEST_BODY: i32 = 0;
    pub const HTTP_RESPONSE_BODY: i32 = 1;
    pub const DOWNSTREAM_DATA: i32 = 2;
    pub const UPSTREAM_DATA: i32 = 3;
    pub const HTTP_CALL_RESPONSE_BODY: i32 = 4;
    pub const GRPC_RECEIVE_BUFFER: i32 = 5;
    pub const VM_CONFIGURATION: i32 = 6;
    pub const PLUGIN_CONFIGURATION: i32 = 7;
    pub const CALL_DATA: i32 = 8;
    /// Higress: the reply of a `proxy_redis_call`.
    pub const REDIS_CALL_RESPONSE: i32 = 9;
}

pub mod map {
    pub const REQUEST_HEADERS: i32 = 0;
    pub const REQUEST_TRAILERS: i32 = 1;
    pub const RESPONSE_HEADERS: i32 = 2;
    pub const RESPONSE_TRAILERS: i32 = 3;
    pub const GRPC_INITIAL: i32 = 4;
    pub const GRPC_TRAILING: i32 = 5;
    pub const HTTP_CALL_RESPONSE_HEADERS: i32 = 6;
    pub const HTTP_CALL_RESPONSE_TRAILERS: i32 = 7;
}

pub mod stream {
    pub const HTTP_REQUEST: i32 = 0;
    pub const HTTP_RESPONSE: i32 = 1;
}

pub mod metric {
    pub const COUNTER: i32 = 0;
    pub const GAUGE: i32 = 1;
    pub const HISTOGRAM: i32 = 2;
}

/// Log levels, Trace 0 … Critical 5.
pub fn log_level_name(level: i32) -> &'static str {
    match level {
        0 => "trace",
        1 => "debug",
        2 => "info",
        3 => "warn",
        4 => "error",
        _ => "critical",
    }
}

/// Tokens of Higress Redis calls have their low two bits set to 3; HTTP call tokens keep them 0.
pub const REDIS_TOKEN_TAG: u32 = 3;

/// An ordered header map as the ABI sees it: lower-case names (pseudo-headers included), raw
/// values. Order is kept; duplicates are allowed, as in Envoy.
pub type HeaderList = Vec<(String, Vec<u8>)>;

/// Serialises a header map: u32 count, then (key_len, value_len) pairs, then each key and value
/// followed by a NUL. An empty map is zero bytes.
pub fn encode_header_map(headers: &[(String, Vec<u8>)]) -> Vec<u8> {
    if headers.is_empty() {
        return Vec::new();
    }
    let size = 4 + headers
        .iter()
        .map(|(k, v)| 8 + k.len() + 1 + v.len() + 1)
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (k, v) in headers {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Parses the header-map layout written by a guest; `None` when the bytes do not add up.
pub fn decode_header_map(bytes: &[u8]) -> Option<HeaderList> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?) as usize;
    let mut sizes = Vec::with_capacity(count.min(1024));
    let mut pos = 4usize;
    for _ in 0..count {
        let k = u32::from_le_bytes(bytes.get(pos..pos + 4)?.try_into().ok()?) as usize;
        let v = u32::from_le_bytes(bytes.get(pos + 4..pos + 8)?.try_into().ok()?) as usize;
        sizes.push((k, v));
        pos += 8;
    }
    let mut out = Vec::with_capacity(count.min(1024));
    for (k, v) in sizes {
        let key = bytes.get(pos..pos.checked_add(k)?)?;
        pos += k + 1;
        let value = bytes.get(pos..pos.checked_add(v)?)?;
        pos += v + 1;
        out.push((
            String::from_utf8_lossy(key).to_ascii_lowercase(),
            value.to_vec(),
        ));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_map_layout_matches_the_abi() {
        let h = vec![
            (":status".to_string(), b"200".to_vec()),
            ("a".into(), vec![]),
        ];
        let bytes = encode_header_map(&h);
        let mut expected = vec![2, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        expected.extend_from_slice(b":status\x00200\x00a\x00\x00");
        assert_eq!(bytes, expected);
        assert_eq!(decode_header_map(&bytes), Some(h));
        assert_eq!(encode_header_map(&[]), Vec::<u8>::new());
    }

    #[test]
    fn truncated_header_map_is_refused_not_trusted() {
        let bytes = encode_header_map(&[("key".into(), b"value".to_vec())]);
        assert_eq!(decode_header_map(&bytes[..bytes.len() - 3]), None);
        assert_eq!(decode_header_map(&[9, 0, 0, 0]), None);
    }
}
