//! The `events` configuration: what the filter publishes about each request, and where.
//!
//! A top-level `events` object is the default policy of every request (routes, and requests
//! that match no route, which are reported with `"route": null`) and holds the VM's queue
//! settings. A route's own `events` object overrides the default field by field; `fields` is
//! replaced as a whole. A target object (`publish`, `stream`) turns its target on unless it says
//! `"enabled": false`; what it leaves out comes from the top-level object, then the defaults.
//!
//! | field | default | meaning |
//! |---|---|---|
//! | `enabled` | `true` where an `events` object is given | publish events for these requests |
//! | `sample_ratio` | `1.0` | share of requests with an event, decided on `x-request-id` (else the event's `id`) |
//! | `fields` | `[]` | extra fields: `{"name": "ua", "request_header": "user-agent"}` or `"response_header"` |
//! | `publish.channel` | `krowoc:requests` | `PUBLISH` each event on this channel (on by default) |
//! | `stream.key` | `events` | `XADD <key_prefix><key> MAXLEN ~ <maxlen> * event <json>` (off by default) |
//! | `stream.maxlen` | `100000` | approximate cap of the stream |
//! | `batch_size` | `32` | events per flush (one Redis call); top level only |
//! | `flush_interval` | `100ms` | longest wait of a queued event before a partial batch is sent; top level only |
//! | `queue_limit` | `10000` | events kept per VM while Redis is slow or down; the oldest go first; top level only |
//! | `max_in_flight` | `4` | flushes awaiting an answer at once, per VM; top level only |

use super::duration::ConfigDuration;
use super::problems::{PathSeg, Problems};
use super::redis::{RedisConfig, Transport};
use serde::Deserialize;
use std::collections::HashSet;

/// Default channel of request events (the upstream's subscriber listens to it).
pub const DEFAULT_CHANNEL: &str = "krowoc:requests";
/// Default stream key, after the configured key prefix.
pub const DEFAULT_STREAM_KEY: &str = "events";
pub const DEFAULT_STREAM_MAXLEN: u64 = 100_000;
pub const DEFAULT_BATCH_SIZE: usize = 32;
pub const DEFAULT_FLUSH_INTERVAL_MS: u64 = 100;
pub const DEFAULT_QUEUE_LIMIT: usize = 10_000;
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4;

/// The relay's default `--max-commands`: a relay body (one flush) holds at most this many.
pub const RELAY_MAX_COMMANDS: usize = 64;
const MAX_BATCH_SIZE: usize = 1_000;
const MAX_QUEUE_LIMIT: usize = 1_000_000;
const MAX_IN_FLIGHT: usize = 64;
const MAX_FIELDS: usize = 16;
const MAX_NAME_BYTES: usize = 256;
const MAX_STREAM_MAXLEN: u64 = 1_000_000_000;

/// Names of the built-in event fields; extra fields may not take them.
pub const RESERVED_FIELDS: &[&str] = &[
    "event_type",
    "id",
    "timestamp",
    "timestamp_unix_ms",
    "method",
    "path",
    "route",
    "status",
    "duration_ms",
    "client",
    "cache",
    "rate_limit",
    "sample_ratio",
];

/// The top-level `events` object as written (a field left out is `None`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSpec {
    pub enabled: Option<bool>,
    pub sample_ratio: Option<f64>,
    pub fields: Option<Vec<FieldSpec>>,
    pub publish: Option<PublishSpec>,
    pub stream: Option<StreamSpec>,
    pub batch_size: Option<usize>,
    pub flush_interval: Option<ConfigDuration>,
    pub queue_limit: Option<usize>,
    pub max_in_flight: Option<usize>,
}

/// A route's `events` object as written (the queue settings are per VM, so top level only).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteEventsSpec {
    pub enabled: Option<bool>,
    pub sample_ratio: Option<f64>,
    pub fields: Option<Vec<FieldSpec>>,
    pub publish: Option<PublishSpec>,
    pub stream: Option<StreamSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishSpec {
    pub enabled: Option<bool>,
    pub channel: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    pub enabled: Option<bool>,
    /// Key after the configured `redis.key_prefix`.
    pub key: Option<String>,
    pub maxlen: Option<u64>,
}

/// One extra field: its name in the event and the header it is read from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    pub name: String,
    #[serde(default)]
    pub request_header: Option<String>,
    #[serde(default)]
    pub response_header: Option<String>,
}

/// Where an extra field's value comes from (header names lower-cased).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldSource {
    RequestHeader(String),
    ResponseHeader(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventField {
    pub name: String,
    pub source: FieldSource,
}

/// `XADD key MAXLEN ~ maxlen * event <json>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamTarget {
    /// The full key, prefix included.
    pub key: String,
    pub maxlen: u64,
}

/// The resolved policy of one route (or of requests matching no route).
#[derive(Clone, Debug, PartialEq)]
pub struct EventPolicy {
    pub sample_ratio: f64,
    pub fields: Vec<EventField>,
    pub channel: Option<String>,
    pub stream: Option<StreamTarget>,
}

impl EventPolicy {
    /// Redis commands one event of this policy takes when pipelined (PUBLISH and/or XADD).
    pub fn commands_per_event(&self) -> usize {
        usize::from(self.channel.is_some()) + usize::from(self.stream.is_some())
    }

    pub fn wants_response_headers(&self) -> bool {
        self.fields
            .iter()
            .any(|f| matches!(f.source, FieldSource::ResponseHeader(_)))
    }
}

/// Everything about events one filter instance needs, resolved and validated.
#[derive(Clone, Debug, PartialEq)]
pub struct EventsConfig {
    pub batch_size: usize,
    pub flush_interval_ms: u64,
    pub queue_limit: usize,
    pub max_in_flight: usize,
    /// Policy of requests that match no route (None: no events for them).
    pub unrouted: Option<EventPolicy>,
    /// Per route, in configuration order (None: no events for the route).
    pub routes: Vec<Option<EventPolicy>>,
}

impl Default for EventsConfig {
    /// No events anywhere.
    fn default() -> Self {
        EventsConfig {
            batch_size: DEFAULT_BATCH_SIZE,
            flush_interval_ms: DEFAULT_FLUSH_INTERVAL_MS,
            queue_limit: DEFAULT_QUEUE_LIMIT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            unrouted: None,
            routes: Vec::new(),
        }
    }
}

impl EventsConfig {
    /// Whether any request can produce an event.
    pub fn enabled(&self) -> bool {
        self.unrouted.is_some() || self.routes.iter().any(Option::is_some)
    }

    /// The policy of a request on route `route` (None: it matched no route).
    pub fn policy(&self, route: Option<usize>) -> Option<&EventPolicy> {
        match route {
            Some(i) => self.routes.get(i).and_then(Option::as_ref),
            None => self.unrouted.as_ref(),
        }
    }

    fn policies(&self) -> impl Iterator<Item = &EventPolicy> {
        self.unrouted.iter().chain(self.routes.iter().flatten())
    }
}

/// The policy fields shared by the top-level and route-level objects.
struct PolicySpec<'a> {
    enabled: Option<bool>,
    sample_ratio: Option<f64>,
    fields: Option<&'a [FieldSpec]>,
    publish: Option<&'a PublishSpec>,
    stream: Option<&'a StreamSpec>,
}

impl<'a> From<&'a EventsSpec> for PolicySpec<'a> {
    fn from(s: &'a EventsSpec) -> Self {
        PolicySpec {
            enabled: s.enabled,
            sample_ratio: s.sample_ratio,
            fields: s.fields.as_deref(),
            publish: s.publish.as_ref(),
            stream: s.stream.as_ref(),
        }
    }
}

impl<'a> From<&'a RouteEventsSpec> for PolicySpec<'a> {
    fn from(s: &'a RouteEventsSpec) -> Self {
        PolicySpec {
            enabled: s.enabled,
            sample_ratio: s.sample_ratio,
            fields: s.fields.as_deref(),
            publish: s.publish.as_ref(),
            stream: s.stream.as_ref(),
        }
    }
}

/// Resolves the top-level `spec` and the routes' own `events` objects (each with its index in
/// the document) into per-route policies, reporting every problem with its path.
pub(crate) fn resolve_events<'r>(
    p: &mut Problems<'_>,
    spec: Option<&EventsSpec>,
    routes: impl IntoIterator<Item = (usize, Option<&'r RouteEventsSpec>)>,
    redis: &RedisConfig,
) -> EventsConfig {
    let top_base = [PathSeg::Key("events")];
    let top = spec.map(PolicySpec::from);
    if let Some(t) = &top {
        check_policy_spec(p, &top_base, t);
    }
    let mut config = EventsConfig::default();
    if let Some(s) = spec {
        let at = |f: &'static str| [PathSeg::Key("events"), PathSeg::Key(f)];
        if let Some(n) = s.batch_size {
            if n == 0 || n > MAX_BATCH_SIZE {
                p.at(&at("batch_size"), format!("must be 1 to {MAX_BATCH_SIZE}"));
            }
            config.batch_size = n;
        }
        if let Some(d) = s.flush_interval {
            let ms = d.as_millis();
            if ms == 0 || ms > 60_000 {
                p.at(&at("flush_interval"), "must be between 1ms and 60s");
            }
            config.flush_interval_ms = ms;
        }
        if let Some(n) = s.queue_limit {
            if n == 0 || n > MAX_QUEUE_LIMIT {
                p.at(
                    &at("queue_limit"),
                    format!("must be 1 to {MAX_QUEUE_LIMIT}"),
                );
            } else if n < config.batch_size {
                p.at(
                    &at("queue_limit"),
                    format!(
                        "must be at least batch_size ({}): a full batch must fit in the queue",
                        config.batch_size
                    ),
                );
            }
            config.queue_limit = n;
        }
        if let Some(n) = s.max_in_flight {
            if n == 0 || n > MAX_IN_FLIGHT {
                p.at(
                    &at("max_in_flight"),
                    format!("must be 1 to {MAX_IN_FLIGHT}"),
                );
            }
            config.max_in_flight = n;
        }
    }

    let prefix = redis.key_prefix.as_str();
    // Requests that match no route follow the top-level object alone.
    if top.as_ref().is_some_and(|t| t.enabled != Some(false)) {
        config.unrouted = merge(p, &top_base, top.as_ref(), None, prefix);
    }
    for (i, route_spec) in routes {
        let base = [
            PathSeg::Key("routes"),
            PathSeg::Index(i),
            PathSeg::Key("events"),
        ];
        let own = route_spec.map(PolicySpec::from);
        if let Some(o) = &own {
            check_policy_spec(p, &base, o);
        }
        let enabled = match (&own, &top) {
            (Some(o), _) => o.enabled != Some(false),
            (None, Some(t)) => t.enabled != Some(false),
            (None, None) => false,
        };
        // Where a missing target is reported: the object that turned events on.
        let report_at: &[PathSeg<'static>] = if own.is_some() { &base } else { &top_base };
        let policy = if enabled {
            merge(p, report_at, top.as_ref(), own.as_ref(), prefix)
        } else {
            None
        };
        if config.routes.len() <= i {
            config.routes.resize(i + 1, None);
        }
        config.routes[i] = policy;
    }

    if redis.transport == Transport::Relay {
        let per_event = config
            .policies()
            .map(EventPolicy::commands_per_event)
            .max()
            .unwrap_or(0);
        if per_event > 0 && config.batch_size.saturating_mul(per_event) > RELAY_MAX_COMMANDS {
            p.at(
                &[PathSeg::Key("events"), PathSeg::Key("batch_size")],
                format!(
                    "with transport `relay` a flush is one relay body, which the relay caps at {RELAY_MAX_COMMANDS} commands by default: batch_size × commands per event ({per_event}) must be at most {RELAY_MAX_COMMANDS}"
                ),
            );
        }
    }
    config
}

/// Combines a route's object over the top-level one over the defaults.
fn merge(
    p: &mut Problems<'_>,
    report_at: &[PathSeg<'static>],
    top: Option<&PolicySpec<'_>>,
    own: Option<&PolicySpec<'_>>,
    key_prefix: &str,
) -> Option<EventPolicy> {
    let sample_ratio = own
        .and_then(|s| s.sample_ratio)
        .or_else(|| top.and_then(|s| s.sample_ratio))
        .unwrap_or(1.0);
    let fields = own
        .and_then(|s| s.fields)
        .or_else(|| top.and_then(|s| s.fields))
        .unwrap_or(&[]);

    let publish_own = own.and_then(|s| s.publish);
    let publish_top = top.and_then(|s| s.publish);
    let publish_on = publish_own
        .map(|s| s.enabled != Some(false))
        .or_else(|| publish_top.map(|s| s.enabled != Some(false)))
        .unwrap_or(true);
    let channel = publish_on.then(|| {
        publish_own
            .and_then(|s| s.channel.clone())
            .or_else(|| publish_top.and_then(|s| s.channel.clone()))
            .unwrap_or_else(|| DEFAULT_CHANNEL.to_string())
    });

    let stream_own = own.and_then(|s| s.stream);
    let stream_top = top.and_then(|s| s.stream);
    let stream_on = stream_own
        .map(|s| s.enabled != Some(false))
        .or_else(|| stream_top.map(|s| s.enabled != Some(false)))
        .unwrap_or(false);
    let stream = stream_on.then(|| {
        let key = stream_own
            .and_then(|s| s.key.clone())
            .or_else(|| stream_top.and_then(|s| s.key.clone()))
            .unwrap_or_else(|| DEFAULT_STREAM_KEY.to_string());
        StreamTarget {
            key: format!("{key_prefix}{key}"),
            maxlen: stream_own
                .and_then(|s| s.maxlen)
                .or_else(|| stream_top.and_then(|s| s.maxlen))
                .unwrap_or(DEFAULT_STREAM_MAXLEN),
        }
    });

    if channel.is_none() && stream.is_none() {
        p.at(
            report_at,
            "events are on but both targets are off: enable `publish` or `stream`, or set `enabled: false`",
        );
        return None;
    }
    Some(EventPolicy {
        sample_ratio,
        fields: fields
            .iter()
            .filter_map(|f| {
                let source = match (&f.request_header, &f.response_header) {
                    (Some(h), None) => FieldSource::RequestHeader(h.to_ascii_lowercase()),
                    (None, Some(h)) => FieldSource::ResponseHeader(h.to_ascii_lowercase()),
                    _ => return None, // reported by check_policy_spec
                };
                Some(EventField {
                    name: f.name.clone(),
                    source,
                })
            })
            .collect(),
        channel,
        stream,
    })
}

/// Checks the values of one object where they are written.
fn check_policy_spec(p: &mut Problems<'_>, base: &[PathSeg<'static>], s: &PolicySpec<'_>) {
    let at = |rest: &[PathSeg<'static>]| -> Vec<PathSeg<'static>> {
        let mut v = base.to_vec();
        v.extend_from_slice(rest);
        v
    };
    if let Some(r) = s.sample_ratio {
        if !(0.0..=1.0).contains(&r) {
            p.at(
                &at(&[PathSeg::Key("sample_ratio")]),
                "must be a number from 0 to 1",
            );
        }
    }
    if let Some(channel) = s.publish.and_then(|x| x.channel.as_deref()) {
        if !is_redis_name(channel) {
            p.at(
                &at(&[PathSeg::Key("publish"), PathSeg::Key("channel")]),
                format!("must be 1 to {MAX_NAME_BYTES} bytes without spaces or control characters"),
            );
        }
    }
    if let Some(stream) = s.stream {
        if let Some(key) = stream.key.as_deref() {
            if !is_redis_name(key) {
                p.at(
                    &at(&[PathSeg::Key("stream"), PathSeg::Key("key")]),
                    format!(
                        "must be 1 to {MAX_NAME_BYTES} bytes without spaces or control characters"
                    ),
                );
            }
        }
        if let Some(n) = stream.maxlen {
            if n == 0 || n > MAX_STREAM_MAXLEN {
                p.at(
                    &at(&[PathSeg::Key("stream"), PathSeg::Key("maxlen")]),
                    format!("must be 1 to {MAX_STREAM_MAXLEN}"),
                );
            }
        }
    }
    if let Some(fields) = s.fields {
        if fields.len() > MAX_FIELDS {
            p.at(
                &at(&[PathSeg::Key("fields")]),
                format!("give at most {MAX_FIELDS} fields"),
            );
        }
        let mut names = HashSet::new();
        for (j, f) in fields.iter().enumerate() {
            let fp = |field: &'static str| {
                at(&[
                    PathSeg::Key("fields"),
                    PathSeg::Index(j),
                    PathSeg::Key(field),
                ])
            };
            if !is_field_name(&f.name) {
                p.at(
                    &fp("name"),
                    "must start with a-z and use only a-z 0-9 _ (at most 64 bytes)",
                );
            } else if RESERVED_FIELDS.contains(&f.name.as_str()) {
                p.at(
                    &fp("name"),
                    format!(
                        "is a built-in field of every event; built-ins: {}",
                        RESERVED_FIELDS.join(", ")
                    ),
                );
            } else if !names.insert(f.name.as_str()) {
                p.at(&fp("name"), "two fields have this name");
            }
            match (&f.request_header, &f.response_header) {
                (Some(h), None) | (None, Some(h)) => {
                    if !is_header_name(h) {
                        let which = if f.request_header.is_some() {
                            "request_header"
                        } else {
                            "response_header"
                        };
                        p.at(&fp(which), "must be a header name (an HTTP token)");
                    }
                }
                _ => p.at(
                    &at(&[PathSeg::Key("fields"), PathSeg::Index(j)]),
                    "give exactly one of `request_header` or `response_header`",
                ),
            }
        }
    }
}

fn is_redis_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_BYTES
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn is_field_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z'))
        && s.len() <= 64
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// An HTTP token (RFC 9110), or an HTTP/2 pseudo-header such as `:authority`.
fn is_header_name(s: &str) -> bool {
    let name = s.strip_prefix(':').unwrap_or(s);
    name.len() <= 256 && super::problems::is_token(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_config, ConfigError};

    fn events(json: &str) -> EventsConfig {
        parse_config(json.as_bytes())
            .unwrap_or_else(|e| panic!("refused: {e:#?}"))
            .events
    }

    fn errors(json: &str) -> Vec<ConfigError> {
        parse_config(json.as_bytes()).expect_err("configuration should be refused")
    }

    fn paths(errs: &[ConfigError]) -> Vec<&str> {
        errs.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn without_an_events_object_nothing_is_published() {
        let e = events(r#"{"routes": [{"name": "a", "match": {"prefix": "/"}}]}"#);
        assert!(!e.enabled());
        assert_eq!(e.policy(Some(0)), None);
        assert_eq!(e.policy(None), None);
    }

    #[test]
    fn an_empty_events_object_publishes_every_request_with_defaults() {
        let e = events(r#"{"events": {}, "routes": [{"name": "a", "match": {"prefix": "/a"}}]}"#);
        let expected = EventPolicy {
            sample_ratio: 1.0,
            fields: vec![],
            channel: Some(DEFAULT_CHANNEL.to_string()),
            stream: None,
        };
        assert_eq!(e.policy(Some(0)), Some(&expected));
        assert_eq!(
            e.policy(None),
            Some(&expected),
            "requests matching no route too"
        );
        assert_eq!(
            (
                e.batch_size,
                e.flush_interval_ms,
                e.queue_limit,
                e.max_in_flight
            ),
            (32, 100, 10_000, 4)
        );
    }

    #[test]
    fn a_route_overrides_the_default_field_by_field() {
        let e = events(
            r#"{"redis": {"key_prefix": "edge:"},
                "events": {"sample_ratio": 0.5, "publish": {"channel": "all"},
                           "stream": {"key": "log", "maxlen": 1000},
                           "fields": [{"name": "ua", "request_header": "User-Agent"}]},
                "routes": [
                  {"name": "a", "match": {"prefix": "/a"}, "events": {"sample_ratio": 1}},
                  {"name": "b", "match": {"prefix": "/b"},
                   "events": {"publish": {"enabled": false}, "stream": {"maxlen": 10}, "fields": []}},
                  {"name": "c", "match": {"prefix": "/c"}, "events": {"enabled": false}},
                  {"name": "d", "match": {"prefix": "/d"}}
                ]}"#,
        );
        let a = e.policy(Some(0)).expect("a");
        assert_eq!(a.sample_ratio, 1.0);
        assert_eq!(a.channel.as_deref(), Some("all"));
        assert_eq!(
            a.stream,
            Some(StreamTarget {
                key: "edge:log".into(),
                maxlen: 1000
            })
        );
        assert_eq!(
            a.fields,
            vec![EventField {
                name: "ua".into(),
                source: FieldSource::RequestHeader("user-agent".into())
            }]
        );
        let b = e.policy(Some(1)).expect("b");
        assert_eq!(b.channel, None);
        assert_eq!(b.stream.as_ref().map(|s| s.maxlen), Some(10));
        assert!(b.fields.is_empty());
        assert_eq!(b.sample_ratio, 0.5);
        assert_eq!(e.policy(Some(2)), None);
        assert_eq!(e.policy(Some(3)).map(|p| p.sample_ratio), Some(0.5));
    }

    #[test]
    fn a_route_can_turn_events_on_without_a_default() {
        let e = events(
            r#"{"routes": [{"name": "a", "match": {"prefix": "/a"}, "events": {"stream": {}}},
                           {"name": "b", "match": {"prefix": "/b"}}]}"#,
        );
        let a = e.policy(Some(0)).expect("a");
        assert_eq!(a.channel.as_deref(), Some(DEFAULT_CHANNEL));
        assert_eq!(
            a.stream.as_ref().map(|s| s.key.as_str()),
            Some("krowoc:events")
        );
        assert_eq!(e.policy(Some(1)), None);
        assert_eq!(e.policy(None), None);
        // A disabled default still lets a route opt in.
        let e = events(
            r#"{"events": {"enabled": false},
                "routes": [{"name": "a", "match": {"prefix": "/a"}, "events": {}}]}"#,
        );
        assert!(e.policy(Some(0)).is_some());
        assert_eq!(e.policy(None), None);
    }

    #[test]
    fn bad_values_are_named_where_they_are_written() {
        let errs = errors(
            r#"{"events": {"sample_ratio": 1.5, "batch_size": 0, "flush_interval": "0ms",
                           "queue_limit": 2000000, "max_in_flight": 0,
                           "publish": {"channel": "has space"}, "stream": {"key": "", "maxlen": 0}},
                "routes": [{"name": "a", "match": {"prefix": "/a"},
                            "events": {"sample_ratio": -0.1,
                                       "fields": [{"name": "Bad-Name", "request_header": "x"},
                                                  {"name": "status", "response_header": "x"},
                                                  {"name": "ok", "request_header": "a b"},
                                                  {"name": "both", "request_header": "a", "response_header": "b"},
                                                  {"name": "ok", "request_header": "y"}]}}]}"#,
        );
        assert_eq!(
            paths(&errs),
            vec![
                "events.sample_ratio",
                "events.publish.channel",
                "events.stream.key",
                "events.stream.maxlen",
                "events.batch_size",
                "events.flush_interval",
                "events.queue_limit",
                "events.max_in_flight",
                "routes[0].events.sample_ratio",
                "routes[0].events.fields[0].name",
                "routes[0].events.fields[1].name",
                "routes[0].events.fields[2].request_header",
                "routes[0].events.fields[3]",
                "routes[0].events.fields[4].name",
            ]
        );
        assert_eq!(errs[0].value, "1.5");
        assert_eq!(errs[1].value, "\"has space\"");
        assert!(errs[10].message.contains("built-in"), "{}", errs[10]);
    }

    #[test]
    fn queue_settings_are_refused_on_a_route() {
        let errs = errors(
            r#"{"routes": [{"name": "a", "match": {"prefix": "/a"}, "events": {"batch_size": 10}}]}"#,
        );
        assert_eq!(paths(&errs), vec!["routes[0].events.batch_size"]);
        assert!(
            errs[0].message.contains("unknown field `batch_size`"),
            "{}",
            errs[0]
        );
        let errs = errors(r#"{"events": {"chanel": "x"}}"#);
        assert_eq!(paths(&errs), vec!["events.chanel"]);
    }

    #[test]
    fn events_need_a_target() {
        let errs = errors(r#"{"events": {"publish": {"enabled": false}}}"#);
        assert_eq!(paths(&errs), vec!["events"]);
        let errs = errors(
            r#"{"routes": [{"name": "a", "match": {"prefix": "/a"},
                            "events": {"publish": {"enabled": false}, "stream": {"enabled": false}}}]}"#,
        );
        assert_eq!(paths(&errs), vec!["routes[0].events"]);
        assert!(errs[0].message.contains("both targets are off"));
    }

    #[test]
    fn a_relay_flush_fits_the_relays_command_cap() {
        // PUBLISH and XADD per event: 32 × 2 = 64 commands fit, 33 × 2 do not.
        events(r#"{"events": {"batch_size": 32, "stream": {}}}"#);
        let errs = errors(r#"{"events": {"batch_size": 33, "stream": {}}}"#);
        assert_eq!(paths(&errs), vec!["events.batch_size"]);
        assert!(errs[0].message.contains("64"), "{}", errs[0]);
        // One script call per flush with redis_call: no such cap.
        events(
            r#"{"redis": {"transport": "redis_call"}, "events": {"batch_size": 500, "stream": {}}}"#,
        );
        let errs = errors(r#"{"events": {"batch_size": 64, "queue_limit": 10}}"#);
        assert_eq!(paths(&errs), vec!["events.queue_limit"]);
    }
}
