//! One request's event: its facts noted as the request goes (an [`OpenEvent`] in the request's
//! record), the event built in `on_log` and written as JSON, sampling by request id, and the
//! ids and timestamps events carry.

use super::*;

/// `event_type` of the filter's events.
pub const EVENT_TYPE: &str = "http_request";

/// Client-supplied values are cut to these lengths, so an event's size is bounded.
pub const MAX_PATH_BYTES: usize = 2048;

pub const MAX_FIELD_BYTES: usize = 512;

pub const MAX_ID_BYTES: usize = 128;

/// One event as published (field order is the JSON's).
#[derive(Debug, Serialize)]
pub struct RequestEvent<'a> {
    pub event_type: &'static str,
    /// A UUID the filter generates: consumers deduplicate by it, so a client never chooses it.
    pub id: &'a str,
    /// The request's `x-request-id` (trimmed, bounded); None when it had none.
    pub request_id: Option<&'a str>,
    /// When the request's headers arrived, RFC 3339 UTC with milliseconds.
    pub timestamp: String,
    pub timestamp_unix_ms: u64,
    pub method: &'a str,
    /// The path without the query string.
    pub path: &'a str,
    pub route: Option<&'a str>,
    /// None when no response was sent (the client went away).
    pub status: Option<u16>,
    pub duration_ms: f64,
    pub client: Option<&'a str>,
    /// The cache's decision (`HIT`, `MISS`, `BYPASS`, …); None where no cache policy applied.
    pub cache: Option<&'a str>,
    /// The rate limiter's decision; None where no rate limit applied.
    pub rate_limit: Option<&'static str>,
    /// Share of requests sampled (1 = every request), to scale counts by.
    pub sample_ratio: f64,
    /// Extra fields from headers (null when the header was absent).
    #[serde(flatten)]
    pub fields: BTreeMap<&'a str, Option<&'a str>>,
}

/// The rate limiter's decision as events name it.
pub fn rate_limit_label(tally: Tally) -> &'static str {
    match tally {
        Tally::Allowed => "allowed",
        Tally::Denied => "denied",
        Tally::ShadowDenied => "shadow_denied",
        Tally::FallbackAllowed => "fallback_allowed",
        Tally::FallbackDenied => "fallback_denied",
        Tally::Skipped => "skipped",
    }
}

/// What the host tells about the response in `on_log`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseFacts {
    pub status: Option<u16>,
    /// Response headers; read only when an extra field needs them.
    pub headers: Vec<(String, String)>,
}

/// A request's event from its start to `on_log`, kept in the request's record.
#[derive(Clone, Debug)]
pub struct OpenEvent {
    pub(super) route: Option<usize>,
    pub(super) id: String,
    pub(super) request_id: Option<String>,
    pub(super) start_ns: u64,
    pub(super) method: String,
    pub(super) path: String,
    pub(super) client: Option<String>,
    /// One per policy field: the request header's value (response fields are read at the end).
    pub(super) request_fields: Vec<Option<String>>,
    pub(super) rate_limit: Option<&'static str>,
    pub(super) cache: Option<&'static str>,
}

impl OpenEvent {
    /// The rate limiter decided.
    pub fn note_rate_limit(&mut self, tally: Tally) {
        self.rate_limit = Some(rate_limit_label(tally));
    }

    /// The cache decided (`HIT`, `MISS`, `BYPASS`, `STALE`, …).
    pub fn note_cache(&mut self, status: &'static str) {
        self.cache = Some(status);
    }
}

/// The JSON text of a request's event.
pub(super) fn build_event(
    open: &OpenEvent,
    policy: &EventPolicy,
    route: Option<&str>,
    response: &ResponseFacts,
    now_ns: u64,
) -> String {
    let unix_ms = open.start_ns / 1_000_000;
    let elapsed_us = now_ns.saturating_sub(open.start_ns) / 1_000;
    let mut fields = BTreeMap::new();
    for (field, from_request) in policy.fields.iter().zip(&open.request_fields) {
        let value = match &field.source {
            FieldSource::RequestHeader(_) => from_request.as_deref(),
            FieldSource::ResponseHeader(h) => {
                first(&response.headers, h).map(|v| truncate(v, MAX_FIELD_BYTES))
            }
        };
        fields.insert(field.name.as_str(), value);
    }
    let event = RequestEvent {
        event_type: EVENT_TYPE,
        id: &open.id,
        request_id: open.request_id.as_deref(),
        timestamp: rfc3339_ms(unix_ms),
        timestamp_unix_ms: unix_ms,
        method: &open.method,
        path: &open.path,
        route,
        status: response.status,
        duration_ms: elapsed_us as f64 / 1_000.0,
        client: open.client.as_deref(),
        cache: open.cache,
        rate_limit: open.rate_limit,
        sample_ratio: policy.sample_ratio,
        fields,
    };
    write_event(&event, elapsed_us)
}

/// The event's JSON text, exactly as `serde_json` writes [`RequestEvent`] (a test holds them
/// to it), written by hand: it runs once per request, and measured in process against
/// `serde_json::to_writer` into a buffer of the same size it was never slower (the same median,
/// a 10% lower minimum per request with envoy.yaml's configuration).
pub(super) fn write_event(e: &RequestEvent<'_>, elapsed_us: u64) -> String {
    let request_id_len = e.request_id.map_or(0, str::len);
    let mut out = String::with_capacity(340 + e.path.len() + e.id.len() + request_id_len);
    out.push_str("{\"event_type\":");
    push_json_str(&mut out, e.event_type);
    out.push_str(",\"id\":");
    push_json_str(&mut out, e.id);
    out.push_str(",\"request_id\":");
    push_json_opt(&mut out, e.request_id);
    out.push_str(",\"timestamp\":");
    push_json_str(&mut out, &e.timestamp);
    out.push_str(",\"timestamp_unix_ms\":");
    push_u64(&mut out, e.timestamp_unix_ms);
    out.push_str(",\"method\":");
    push_json_str(&mut out, e.method);
    out.push_str(",\"path\":");
    push_json_str(&mut out, e.path);
    out.push_str(",\"route\":");
    push_json_opt(&mut out, e.route);
    out.push_str(",\"status\":");
    match e.status {
        Some(s) => push_u64(&mut out, u64::from(s)),
        None => out.push_str("null"),
    }
    // Milliseconds with up to three decimals, as the shortest float text of `us / 1000`.
    out.push_str(",\"duration_ms\":");
    push_u64(&mut out, elapsed_us / 1_000);
    out.push('.');
    let frac = elapsed_us % 1_000;
    let frac_digits = [frac / 100, frac / 10 % 10, frac % 10];
    // Trailing zeros go, but one digit stays: 2.5, 1.0, 0.125.
    let keep = frac_digits
        .iter()
        .rposition(|d| *d != 0)
        .map_or(1, |i| i + 1);
    for d in &frac_digits[..keep] {
        out.push(char::from(b'0' + *d as u8));
    }
    out.push_str(",\"client\":");
    push_json_opt(&mut out, e.client);
    out.push_str(",\"cache\":");
    push_json_opt(&mut out, e.cache);
    out.push_str(",\"rate_limit\":");
    push_json_opt(&mut out, e.rate_limit);
    out.push_str(",\"sample_ratio\":");
    if e.sample_ratio == 1.0 {
        out.push_str("1.0");
    } else {
        out.push_str(&serde_json::to_string(&e.sample_ratio).unwrap_or_else(|_| "null".into()));
    }
    for (name, value) in &e.fields {
        out.push(',');
        push_json_str(&mut out, name);
        out.push(':');
        push_json_opt(&mut out, *value);
    }
    out.push('}');
    out
}

pub(super) fn push_u64(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

pub(super) fn push_json_opt(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(out, s),
        None => out.push_str("null"),
    }
}

/// A JSON string with serde_json's escapes: `\"`, `\\`, `\b \f \n \r \t`, other control
/// characters as `\u00XX`; everything else (UTF-8 included) as is.
pub(super) fn push_json_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    let mut plain_from = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[plain_from..i]);
        if escape.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(escape);
        }
        plain_from = i + 1;
    }
    out.push_str(&s[plain_from..]);
    out.push('"');
}

/// Sampling decided on the request id, so every gateway decides the same for one request.
pub fn sampled(id: &str, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    // FNV-1a, then a final mix so similar ids spread over the whole range.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h as f64) < ratio * (u64::MAX as f64)
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `2024-05-06T07:08:09.123Z` for milliseconds since the Unix epoch (years 0 to 9999).
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    // Written digit by digit: this runs once per request, and `format!` costs ~10x more.
    let mut out = String::with_capacity(24);
    let mut digits = |n: u64, width: u32, sep: char| {
        for i in (0..width).rev() {
            out.push(char::from(b'0' + ((n / 10u64.pow(i)) % 10) as u8));
        }
        out.push(sep);
    };
    digits(u64::try_from(y).unwrap_or(0), 4, '-');
    digits(u64::from(m), 2, '-');
    digits(u64::from(d), 2, 'T');
    digits(rem / 3600, 2, ':');
    digits((rem % 3600) / 60, 2, ':');
    digits(rem % 60, 2, '.');
    digits(unix_ms % 1000, 3, 'Z');
    out
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`).
pub(super) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Event ids: UUIDs in the version 4 layout from a splitmix64 sequence whose start is drawn
/// from WASI `random_get` per VM, so VMs and gateways sharing a channel do not collide; no extra
/// dependency. Ids need to be unique, not unguessable (clients never see or choose them).
pub(super) struct IdGenerator {
    pub(super) state: u64,
}

impl IdGenerator {
    pub(super) fn new() -> IdGenerator {
        IdGenerator {
            // Natively (unit tests) or if the host refuses: std's randomly keyed hasher.
            state: host::random_u64()
                .unwrap_or_else(|| RandomState::new().hash_one(0x6b72_6f77_6f63u64)),
        }
    }

    pub(super) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(super) fn next_uuid(&mut self) -> String {
        let hi = (self.next_u64() & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
        let lo = (self.next_u64() & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
        let bits = (u128::from(hi) << 64) | u128::from(lo);
        let mut out = String::with_capacity(36);
        for i in 0..32 {
            if matches!(i, 8 | 12 | 16 | 20) {
                out.push('-');
            }
            let nibble = ((bits >> (124 - 4 * i)) & 0xf) as u8;
            out.push(char::from(if nibble < 10 {
                b'0' + nibble
            } else {
                b'a' + nibble - 10
            }));
        }
        out
    }
}
