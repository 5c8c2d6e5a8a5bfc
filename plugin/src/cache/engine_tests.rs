//! The engine driven as the filter drives it, without a host: a recording wire for Redis, a
//! recording upstream for refreshes, the requests' records in a map.

use super::*;
use crate::config::parse_config;
use crate::http::fields;
use crate::redis::client::recording::RecordingWire;

/// One refresh sent: its token, cluster and fields.
type Refresh = (u32, String, Vec<(String, String)>);

/// Refreshes the engine would send, recorded; tokens from 1000 up.
#[derive(Default)]
struct RecordingUpstream {
    calls: Vec<Refresh>,
    refuse: bool,
}

impl Upstream for RecordingUpstream {
    fn call(
        &mut self,
        cluster: &str,
        headers: &[(String, String)],
        _timeout: Duration,
    ) -> Result<u32, String> {
        if self.refuse {
            return Err("BadArgument".into());
        }
        let token = 1000 + self.calls.len() as u32;
        self.calls
            .push((token, cluster.to_string(), headers.to_vec()));
        Ok(token)
    }
}

/// The requests' records, reduced to the cache's parts.
#[derive(Default)]
struct Records(HashMap<u32, (Option<CacheRequest>, Option<PurgeRequest>)>);

impl CacheRequests for Records {
    fn cache_mut(&mut self, ctx: u32) -> Option<&mut CacheRequest> {
        self.0.get_mut(&ctx).and_then(|(c, _)| c.as_mut())
    }

    fn purge_mut(&mut self, ctx: u32) -> Option<&mut Option<PurgeRequest>> {
        self.0.get_mut(&ctx).map(|(_, p)| p)
    }
}

const REDIS_NOW: u64 = 1_700_000_000_000;

struct Cache {
    engine: CacheEngine,
    client: RedisClient,
    wire: RecordingWire,
    upstream: RecordingUpstream,
    records: Records,
    now_ms: u64,
}

/// RESP, as Redis writes a reply.
fn resp(r: &Reply) -> Vec<u8> {
    let mut out = Vec::new();
    write_resp(&mut out, r);
    out
}

fn write_resp(out: &mut Vec<u8>, r: &Reply) {
    match r {
        Reply::Status(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
        Reply::Error(s) => out.extend_from_slice(format!("-{s}\r\n").as_bytes()),
        Reply::Int(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
        Reply::Nil => out.extend_from_slice(b"$-1\r\n"),
        Reply::Bulk(b) => {
            out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        Reply::Array(items) => {
            out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
            for i in items {
                write_resp(out, i);
            }
        }
    }
}

/// What `cache_lookup.lua` answers: state, age, entry, lock, fresh/swr/sie windows.
#[allow(clippy::too_many_arguments)]
fn lookup_reply(
    state: &str,
    age_ms: i64,
    entry: Option<&[u8]>,
    lock: i64,
    fresh_ms: i64,
    swr_ms: i64,
    sie_ms: i64,
) -> Vec<u8> {
    resp(&Reply::Array(vec![
        Reply::Bulk(state.as_bytes().to_vec()),
        Reply::Int(age_ms),
        entry.map_or(Reply::Nil, |e| Reply::Bulk(e.to_vec())),
        Reply::Int(lock),
        Reply::Int(fresh_ms),
        Reply::Int(swr_ms),
        Reply::Int(sie_ms),
        Reply::Int(0),
        Reply::Int(REDIS_NOW as i64),
    ]))
}

fn entry(body: &str) -> Vec<u8> {
    entry::encode(
        200,
        &fields(&[("content-type", "text/plain")]),
        body.as_bytes(),
    )
}

fn header_of<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    first(fields, name)
}

/// The fields a response passes with (it must pass).
fn passes(step: CacheResponse) -> Vec<(String, String)> {
    match step {
        CacheResponse::Pass(f) => f,
        other => panic!("the response should pass: {other:?}"),
    }
}

/// A miss: its lock taken by this request (1) or held by another (0).
fn miss(lock: i64) -> Vec<u8> {
    lookup_reply("miss", 0, None, lock, 0, 0, 0)
}

const ROUTE: &str = r#"{"name": "r", "match": {"prefix": "/r"},
    "cache": {"ttl": "60s", "honor_cache_control": false,
              "stale_while_revalidate": "30s", "stale_if_error": "60s"}}"#;

impl Cache {
    fn new(routes: &str) -> Cache {
        Cache::with(&format!(r#"{{"routes": [{routes}]}}"#))
    }

    fn with(json: &str) -> Cache {
        let config = Rc::new(parse_config(json.as_bytes()).expect("config"));
        Cache {
            engine: CacheEngine::new(&config, 0xabc),
            client: RedisClient::new(&config.redis),
            wire: RecordingWire::default(),
            upstream: RecordingUpstream::default(),
            records: Records::default(),
            now_ms: 5_000_000,
        }
    }

    fn request(method: &str, path: &str) -> RequestInfo {
        RequestInfo {
            path: path.to_string(),
            method: method.to_string(),
            headers: fields(&[(":authority", "example.test"), (":scheme", "http")]),
            source_address: None,
        }
    }

    /// Request `ctx` on the route: its lookup; true when it was sent.
    fn look_up(&mut self, ctx: u32, method: &str, path: &str) -> bool {
        self.look_up_with(ctx, method, path, &[])
    }

    /// [`Cache::look_up`] for a request with these fields too.
    fn look_up_with(&mut self, ctx: u32, method: &str, path: &str, extra: &[(&str, &str)]) -> bool {
        let mut req = Cache::request(method, path);
        req.headers.extend(fields(extra));
        let cache = self
            .engine
            .lookup(
                &mut self.client,
                &mut self.wire,
                self.now_ms,
                ctx,
                0,
                &req,
                || Some("upstream".into()),
            )
            .expect("a cached route");
        let sent = cache.awaits_lookup();
        self.records.0.insert(ctx, (Some(cache), None));
        sent
    }

    /// Redis answers call `token`; the answer goes where the filter sends it.
    fn answer(&mut self, token: u32, reply: &[u8]) -> Option<HostAction> {
        let raw = RawReply::Relay {
            status: Some(200),
            body: reply.to_vec(),
        };
        let c = self
            .client
            .on_reply(&mut self.wire, self.now_ms, token, raw)?;
        match c.owner {
            Owner::CacheLookup(ctx) => {
                let r = self.records.cache_mut(ctx)?;
                assert!(CacheEngine::on_lookup(r, c.result));
                None
            }
            Owner::Job(job) => self.engine.on_job_answer(
                &mut self.client,
                &mut self.wire,
                self.now_ms,
                job,
                c.result,
                &mut self.records,
            ),
            other => panic!("not a cache call: {other:?}"),
        }
    }

    /// Request `ctx`'s lookup is sent and answered with `reply`; then it proceeds.
    fn found(&mut self, ctx: u32, path: &str, reply: &[u8]) -> Proceed {
        assert!(self.look_up(ctx, "GET", path), "lookup sent");
        let token = self.wire.last_token();
        assert_eq!(self.answer(token, reply), None);
        self.proceed(ctx)
    }

    fn proceed(&mut self, ctx: u32) -> Proceed {
        let r = self.records.cache_mut(ctx).expect("request");
        self.engine
            .proceed(&mut self.client, &mut self.wire, self.now_ms, ctx, r)
    }

    fn respond(
        &mut self,
        ctx: u32,
        status: u16,
        headers: &[(&str, &str)],
        passed: &[(&str, &str)],
        end_of_stream: bool,
    ) -> CacheResponse {
        let mut all = fields(&[(":status", &status.to_string())]);
        all.extend(fields(headers));
        let (cache, _) = self.records.0.get_mut(&ctx).expect("request");
        self.engine.response_headers(
            &mut self.client,
            &mut self.wire,
            self.now_ms,
            ctx,
            0,
            cache.as_mut(),
            &fields(passed),
            end_of_stream,
            || all,
        )
    }

    fn body(&mut self, ctx: u32, chunk: &[u8], end_of_stream: bool) {
        let r = self.records.cache_mut(ctx).expect("request");
        assert!(CacheEngine::collects(r), "collecting");
        self.engine.response_body(
            &mut self.client,
            &mut self.wire,
            self.now_ms,
            r,
            chunk,
            end_of_stream,
        );
    }

    fn end(&mut self, ctx: u32) {
        let (cache, _) = self.records.0.remove(&ctx).expect("request");
        if let Some(cache) = cache {
            self.engine
                .end(&mut self.client, &mut self.wire, self.now_ms, ctx, cache);
        }
    }

    fn tick(&mut self) -> Vec<HostAction> {
        self.engine.tick(
            &mut self.client,
            &mut self.wire,
            &mut self.upstream,
            self.now_ms,
            &mut self.records,
        )
    }

    fn token_of(&mut self, ctx: u32) -> String {
        self.records.cache_mut(ctx).expect("request").token.clone()
    }

    fn sha(&self, name: &str) -> String {
        let s = &self.engine.scripts;
        [&s.lookup, &s.store, &s.unlock, &s.purge, &s.scan]
            .into_iter()
            .find(|x| x.name == name)
            .map(|x| x.sha1.clone())
            .expect("a cache script")
    }
}

#[test]
fn a_filling_miss_goes_upstream_and_its_response_is_stored_with_its_lock_on_the_tick() {
    let mut c = Cache::new(ROUTE);
    assert!(c.look_up(1, "GET", "/r?b=2&a=1"));
    let lookup = c.wire.last_command();
    assert_eq!(lookup[..2], ["EVALSHA".to_string(), c.sha("cache_lookup")]);
    let token = c.token_of(1);
    assert_eq!(
        lookup[5..],
        ["KRC1".to_string(), "10000".into(), token.clone()]
    );
    let t = c.wire.last_token();
    c.answer(t, &miss(1));
    assert_eq!(c.proceed(1), Proceed::Forward);

    let f = passes(c.respond(1, 200, &[("content-length", "5")], &[], false));
    assert_eq!(header_of(&f, "x-cache"), Some("MISS"));
    assert_eq!(
        header_of(&f, "cache-status"),
        Some("krowoc; fwd=uri-miss; fwd-status=200; stored")
    );
    c.body(1, b"hel", false);
    c.body(1, b"lo", true);
    let sent = c.wire.sent.len();
    assert!(c.tick().is_empty());
    assert_eq!(
        c.wire.sent.len(),
        sent + 1,
        "the store goes out on the tick"
    );
    let store = c.wire.last_command();
    assert_eq!(
        store[..3],
        ["EVALSHA".to_string(), c.sha("cache_store"), "6".into()]
    );
    let keys = RouteKeys::new("krowoc:", "r");
    let blob = &store[9][..];
    assert_eq!(store[3], keys.entry(&store[15]));
    assert_eq!(blob.as_bytes()[..4], *b"KRC1", "ARGV[1] is the entry");
    assert_eq!(
        store[10..],
        [
            "60000".to_string(),
            "30000".into(),
            "60000".into(),
            "0".into(),
            "/r".into(),
            store[15].clone(),
            token,
            REDIS_NOW.to_string(),
        ],
        "freshness, URL, hash, the lock's token, the lookup's Redis time"
    );
    let t = c.wire.last_token();
    assert_eq!(c.answer(t, b":1\r\n"), None);
    assert!(c.engine.jobs.is_empty());
}

#[test]
fn over_redis_call_stores_go_out_at_once() {
    let mut c = Cache::with(&format!(
        r#"{{"redis": {{"transport": "redis_call", "cluster": "redis"}}, "routes": [{ROUTE}]}}"#
    ));
    c.found(1, "/r", &miss(1));
    c.respond(1, 200, &[], &[], true);
    assert_eq!(c.wire.last_command()[1], c.sha("cache_store"));
}

#[test]
fn a_concurrent_miss_waits_for_the_fill_and_is_served_from_it() {
    let mut c = Cache::new(ROUTE);
    assert_eq!(c.found(1, "/r", &miss(1)), Proceed::Forward);
    assert_eq!(
        c.found(2, "/r", &miss(0)),
        Proceed::Wait,
        "the lock is another request's"
    );
    assert!(c.tick().is_empty());
    let poll = c.wire.last_command();
    assert_eq!(poll[1], c.sha("cache_lookup"));
    assert_eq!(
        poll[7],
        c.token_of(2),
        "the waiter polls with its own token"
    );
    let t = c.wire.last_token();
    assert_eq!(
        c.answer(
            t,
            &lookup_reply("hit", 2_000, Some(&entry("filled")), -1, 60_000, 0, 0)
        ),
        None,
        "acted on at the next tick"
    );
    c.now_ms += 40;
    let actions = c.tick();
    let [HostAction::Respond(2, served)] = actions.as_slice() else {
        panic!("the waiter is served: {actions:?}");
    };
    assert_eq!(
        (served.status, served.body.as_slice()),
        (200, &b"filled"[..])
    );
    assert_eq!(header_of(&served.headers, "x-cache"), Some("HIT"));
    assert_eq!(
        header_of(&served.headers, "cache-status"),
        Some("krowoc; hit; ttl=57; collapsed"),
        "the entry's age counts the time since the poll read it"
    );
    assert_eq!(header_of(&served.headers, "age"), Some("2"));
    assert_eq!(
        c.records.cache_mut(2).and_then(|r| r.outcome()),
        Some("HIT")
    );
    let sent = c.wire.sent.len();
    assert!(c.tick().is_empty());
    assert_eq!(c.wire.sent.len(), sent, "nobody waits: no more polls");
}

#[test]
fn a_waiter_goes_upstream_once_its_wait_is_over() {
    let mut c = Cache::new(ROUTE);
    c.found(1, "/r", &miss(1));
    c.found(2, "/r", &miss(0));
    c.now_ms += 4_999;
    assert!(c.tick().is_empty(), "still within coalesce.wait");
    c.now_ms += 1;
    assert_eq!(c.tick(), vec![HostAction::Resume(2)]);
    let f = passes(c.respond(2, 200, &[], &[], false));
    assert_eq!(header_of(&f, "x-cache"), Some("MISS"));
}

#[test]
fn when_the_filler_gives_up_the_polling_waiter_fills_with_its_own_lock() {
    let mut c = Cache::new(ROUTE);
    c.found(1, "/r", &miss(1));
    c.found(2, "/r", &miss(0));
    c.found(3, "/r", &miss(0));
    c.tick();
    let t = c.wire.last_token();
    c.answer(t, &miss(1));
    assert_eq!(
        c.tick(),
        vec![HostAction::Resume(2)],
        "the poll took the lock for the first waiter: it goes upstream, the other waits"
    );
    assert_eq!(
        c.wire.last_command()[7],
        c.token_of(3),
        "the next poll is 3's"
    );
    c.respond(2, 200, &[], &[], true);
    c.tick();
    let store = c.wire.last_command();
    assert_eq!(store[1], c.sha("cache_store"));
    assert_eq!(
        store[store.len() - 2],
        c.token_of(2),
        "its store releases its lock"
    );
}

#[test]
fn a_stale_entry_is_served_and_refreshed_in_the_background_by_its_lock_holder() {
    let mut c = Cache::new(ROUTE);
    let served = c.found(
        1,
        "/r?a=1",
        &lookup_reply("stale", 70_000, Some(&entry("old")), 1, 60_000, 30_000, 0),
    );
    let Proceed::Serve(resp) = served else {
        panic!("served stale: {served:?}");
    };
    assert_eq!(resp.body, b"old");
    assert_eq!(header_of(&resp.headers, "x-cache"), Some("STALE"));
    assert_eq!(
        header_of(&resp.headers, "cache-status"),
        Some("krowoc; hit; ttl=-10; detail=stale-while-revalidate")
    );
    assert!(
        c.upstream.calls.is_empty(),
        "the refresh waits for the tick"
    );
    c.tick();
    let [(call, cluster, headers)] = c.upstream.calls.as_slice() else {
        panic!("one refresh: {:?}", c.upstream.calls);
    };
    assert_eq!(cluster, "upstream");
    assert_eq!(
        headers[..4],
        fields(&[
            (":method", "GET"),
            (":path", "/r?a=1"),
            (":authority", "example.test"),
            (":scheme", "http"),
        ])
    );
    let call = *call;
    let token = c.token_of(1);
    c.end(1);
    let sent = c.wire.sent.len();
    let fresh = RawReply::Relay {
        status: Some(200),
        body: b"new".to_vec(),
    };
    assert!(c
        .engine
        .on_refresh_answer(&mut c.client, &mut c.wire, c.now_ms, call, &fresh, || {
            fields(&[(":status", "200"), ("cache-tag", "t1")])
        },));
    c.tick();
    assert_eq!(c.wire.sent.len(), sent + 1);
    let store = c.wire.last_command();
    assert_eq!(
        store[..3],
        ["EVALSHA".to_string(), c.sha("cache_store"), "7".into()]
    );
    assert_eq!(store[9], RouteKeys::new("krowoc:", "r").tag_index("t1"));
    assert_eq!(
        store[10].as_bytes()[..4],
        *b"KRC1",
        "after the 7 keys, the entry"
    );
    assert_eq!(
        store[store.len() - 2..],
        [token, REDIS_NOW.to_string()],
        "stored under the served request's lock, as of its lookup"
    );
    assert!(!c.engine.on_refresh_answer(
        &mut c.client,
        &mut c.wire,
        c.now_ms,
        call,
        &fresh,
        Vec::new
    ));
}

#[test]
fn a_refresh_that_fails_gives_its_lock_back() {
    let mut c = Cache::new(ROUTE);
    c.found(
        1,
        "/r",
        &lookup_reply("stale", 70_000, Some(&entry("old")), 1, 60_000, 30_000, 0),
    );
    c.tick();
    let call = c.upstream.calls[0].0;
    let token = c.token_of(1);
    let error = RawReply::Relay {
        status: Some(503),
        body: Vec::new(),
    };
    let headers = || fields(&[(":status", "503")]);
    assert!(c.engine.on_refresh_answer(
        &mut c.client,
        &mut c.wire,
        c.now_ms,
        call,
        &error,
        headers
    ));
    c.tick();
    let unlock = c.wire.last_command();
    assert_eq!(unlock[1], c.sha("cache_unlock"));
    assert_eq!(
        unlock[4..],
        [token.clone(), "0".into()],
        "a 5xx may pass: no pass mark"
    );

    // A refresh the host refuses gives the lock back too.
    let mut c = Cache::new(ROUTE);
    c.upstream.refuse = true;
    c.found(
        1,
        "/r",
        &lookup_reply("stale", 70_000, Some(&entry("old")), 1, 60_000, 30_000, 0),
    );
    let token = c.token_of(1);
    c.tick();
    c.tick();
    let unlock = c.wire.last_command();
    assert_eq!(unlock[1], c.sha("cache_unlock"));
    assert_eq!(unlock[4], token);
}

#[test]
fn an_upstream_error_is_answered_with_a_stale_copy_within_stale_if_error() {
    let mut c = Cache::new(ROUTE);
    let expired = lookup_reply(
        "expired",
        100_000,
        Some(&entry("old")),
        1,
        60_000,
        0,
        60_000,
    );
    assert_eq!(c.found(1, "/r", &expired), Proceed::Forward);
    let token = c.token_of(1);
    let step = c.respond(1, 503, &[], &[("ratelimit", "\"r\";r=4;t=60")], false);
    let CacheResponse::Replace(resp) = step else {
        panic!("replaced: {step:?}");
    };
    assert_eq!((resp.status, resp.body.as_slice()), (200, &b"old"[..]));
    assert_eq!(header_of(&resp.headers, "x-cache"), Some("STALE"));
    assert_eq!(
        header_of(&resp.headers, "cache-status"),
        Some("krowoc; fwd=stale; fwd-status=503; ttl=-40; detail=stale-if-error")
    );
    assert_eq!(
        header_of(&resp.headers, "ratelimit"),
        Some("\"r\";r=4;t=60"),
        "the fields the request was let through with go too"
    );
    assert_eq!(
        c.records.cache_mut(1).and_then(|r| r.outcome()),
        Some("STALE")
    );
    c.tick();
    let unlock = c.wire.last_command();
    assert_eq!(unlock[1], c.sha("cache_unlock"));
    assert_eq!(unlock[4..], [token, "0".into()]);

    // Past the window the error passes, marked as the expired miss it is.
    let mut c = Cache::new(ROUTE);
    let too_old = lookup_reply(
        "expired",
        130_000,
        Some(&entry("old")),
        1,
        60_000,
        0,
        60_000,
    );
    c.found(1, "/r", &too_old);
    let f = passes(c.respond(1, 503, &[], &[], false));
    assert_eq!(header_of(&f, "x-cache"), Some("EXPIRED"));
}

#[test]
fn a_store_carries_its_lookups_redis_time_so_a_purge_since_then_refuses_it() {
    let mut c = Cache::new(ROUTE);
    c.found(1, "/r", &miss(1));
    c.respond(1, 200, &[], &[], true);
    c.tick();
    let store = c.wire.last_command();
    assert_eq!(store.last(), Some(&REDIS_NOW.to_string()));
    assert!(store.contains(&RouteKeys::new("krowoc:", "r").purge_mark()));
    // cache_store.lua answers -1 when the route was purged after the lookup: not stored,
    // nothing else to do.
    let t = c.wire.last_token();
    assert_eq!(c.answer(t, b":-1\r\n"), None);
    assert!(c.engine.jobs.is_empty());
}

#[test]
fn a_response_that_invalidates_is_held_until_its_purges_are_done() {
    let mut c = Cache::new(
        r#"{"name": "r", "match": {"prefix": "/r"}, "cache": {"ttl": "60s"},
            "invalidation": {}}"#,
    );
    c.found(1, "/r", &miss(1));
    let sent = c.wire.sent.len();
    let step = c.respond(1, 200, &[("x-krowoc-invalidate", "tag=user:1")], &[], false);
    let CacheResponse::Hold(f, purge) = step else {
        panic!("held: {step:?}");
    };
    assert_eq!(header_of(&f, "x-cache"), Some("MISS"));
    assert_eq!(c.wire.sent.len(), sent + 1, "the purge goes out at once");
    let cmd = c.wire.last_command();
    assert_eq!(cmd[1], c.sha("cache_purge"));
    assert_eq!(cmd[3], RouteKeys::new("krowoc:", "r").tag_index("user:1"));
    c.records.0.get_mut(&1).expect("request").1 = Some(purge);
    let t = c.wire.last_token();
    assert_eq!(c.answer(t, b":2\r\n"), Some(HostAction::ResumeResponse(1)));
    assert!(c.records.purge_mut(1).is_some_and(|p| p.is_none()));
}

#[test]
fn a_successful_post_purges_its_url_before_its_response_goes_on() {
    let mut c = Cache::new(ROUTE);
    assert!(!c.look_up(1, "POST", "/r?a=1"), "a POST bypasses the cache");
    let step = c.respond(1, 201, &[], &[], false);
    let CacheResponse::Hold(f, _) = step else {
        panic!("held: {step:?}");
    };
    assert_eq!(header_of(&f, "x-cache"), Some("BYPASS"));
    let cmd = c.wire.last_command();
    assert_eq!(cmd[1], c.sha("cache_purge"));
    assert_eq!(cmd[3], RouteKeys::new("krowoc:", "r").url_index("/r"));
    // A failed POST purges nothing.
    let mut c = Cache::new(ROUTE);
    c.look_up(1, "POST", "/r");
    assert!(matches!(
        c.respond(1, 500, &[], &[], false),
        CacheResponse::Pass(_)
    ));
    assert!(c.wire.sent.is_empty());
}

#[test]
fn an_uncacheable_response_releases_the_lock_and_sends_misses_upstream_for_a_while() {
    let mut c = Cache::new(r#"{"name": "r", "match": {"prefix": "/r"}, "cache": {"ttl": "60s"}}"#);
    c.found(1, "/r", &miss(1));
    let token = c.token_of(1);
    let f = passes(c.respond(1, 200, &[("cache-control", "private")], &[], false));
    assert_eq!(
        header_of(&f, "cache-status"),
        Some("krowoc; fwd=uri-miss; fwd-status=200; detail=private")
    );
    c.tick();
    let unlock = c.wire.last_command();
    assert_eq!(unlock[1], c.sha("cache_unlock"));
    assert_eq!(
        unlock[4..],
        [token, "10000".into()],
        "marked uncacheable for coalesce.lock"
    );
}

#[test]
fn a_body_over_the_limit_is_not_stored_and_an_unfinished_one_gives_the_lock_back() {
    let mut c = Cache::new(
        r#"{"name": "r", "match": {"prefix": "/r"},
            "cache": {"ttl": "60s", "max_body_bytes": 4}}"#,
    );
    c.found(1, "/r", &miss(1));
    c.respond(1, 200, &[], &[], false);
    c.body(1, b"too long", false);
    c.tick();
    assert_eq!(c.wire.last_command()[1], c.sha("cache_unlock"));

    c.found(2, "/r", &miss(1));
    c.respond(2, 200, &[("content-length", "3")], &[], false);
    c.body(2, b"ab", false);
    let token = c.token_of(2);
    c.end(2);
    c.tick();
    let unlock = c.wire.last_command();
    assert_eq!(
        unlock[1],
        c.sha("cache_unlock"),
        "a short body is not stored"
    );
    assert_eq!(unlock[4..], [token, "0".into()]);
}

#[test]
fn an_unreadable_entry_is_a_miss_deleted_when_the_request_ends_unstored() {
    let mut c = Cache::new(ROUTE);
    let garbage = lookup_reply("hit", 0, Some(b"KRC9 nonsense"), -1, 60_000, 0, 0);
    assert_eq!(c.found(1, "/r", &garbage), Proceed::Forward);
    c.respond(1, 500, &[], &[], false);
    let key = c.records.cache_mut(1).expect("request").entry_key();
    c.end(1);
    c.tick();
    assert_eq!(c.wire.last_command(), ["DEL".to_string(), key]);
}

#[test]
fn the_purge_endpoint_answers_once_its_purges_are_done() {
    let mut c = Cache::with(&format!(
        r#"{{"routes": [{ROUTE}],
            "cache": {{"purge": {{"path": "/_purge", "token": "0123456789abcdef"}}}}}}"#
    ));
    let mut req = Cache::request("POST", "/_purge");
    req.headers.extend(fields(&[
        ("x-krowoc-purge-token", "0123456789abcdef"),
        ("x-krowoc-invalidate", "tag=a, route=r"),
    ]));
    let start = c
        .engine
        .purge_endpoint(&mut c.client, &mut c.wire, c.now_ms, 9, &req);
    let Some(PurgeStart::Wait(purge)) = start else {
        panic!("waits: {start:?}");
    };
    assert_eq!(c.wire.sent.len(), 2, "one index purge per directive");
    c.records.0.insert(9, (None, Some(purge)));
    let (first, second) = (c.wire.sent[0].0, c.wire.sent[1].0);
    assert_eq!(c.answer(first, b":2\r\n"), None);
    let Some(HostAction::Respond(9, resp)) = c.answer(second, b":3\r\n") else {
        panic!("answered");
    };
    assert_eq!(resp.status, 200);
    let body: serde_json::Value = serde_json::from_slice(&resp.body).expect("JSON");
    assert_eq!(body["purged"], 5);
    assert_eq!(body["directives"], serde_json::json!(["tag=a", "route=r"]));

    req.headers[2].1 = "wrong-token-0123".into();
    let refused = c
        .engine
        .purge_endpoint(&mut c.client, &mut c.wire, c.now_ms, 10, &req);
    assert!(matches!(
        refused,
        Some(PurgeStart::Answer(LocalResponse { status: 403, .. }))
    ));
    let other = Cache::request("GET", "/r");
    assert!(c
        .engine
        .purge_endpoint(&mut c.client, &mut c.wire, c.now_ms, 11, &other)
        .is_none());
}

const HONOURS_CLIENTS: &str = r#"{"name": "r", "match": {"prefix": "/r"},
    "cache": {"ttl": "60s", "honor_cache_control": false, "honor_request_cache_control": true}}"#;

#[test]
fn a_clients_no_cache_goes_upstream_past_a_fresh_entry_and_its_answer_replaces_it() {
    let fresh = || lookup_reply("hit", 1_000, Some(&entry("old")), -1, 60_000, 0, 0);
    let mut c = Cache::new(HONOURS_CLIENTS);
    assert!(
        matches!(c.found(1, "/r", &fresh()), Proceed::Serve(_)),
        "without the directive the entry is served"
    );
    for (ctx, directive) in [
        (2, ("cache-control", "no-cache")),
        (3, ("pragma", "no-cache")),
    ] {
        assert!(c.look_up_with(ctx, "GET", "/r", &[directive]));
        let t = c.wire.last_token();
        c.answer(t, &fresh());
        assert_eq!(c.proceed(ctx), Proceed::Forward, "{directive:?}");
        let f = passes(c.respond(ctx, 200, &[("content-length", "3")], &[], false));
        assert_eq!(header_of(&f, "x-cache"), Some("MISS"));
        assert_eq!(
            header_of(&f, "cache-status"),
            Some("krowoc; fwd=request; fwd-status=200; stored")
        );
        c.body(ctx, b"new", true);
        assert!(c.tick().is_empty());
        let store = c.wire.last_command();
        assert_eq!(store[1], c.sha("cache_store"), "the answer is stored");
        assert_eq!(store[16], "", "without a fill lock: a fresh hit takes none");
    }
    // `Pragma` counts only without `Cache-Control`.
    let both = [("cache-control", "max-age=60"), ("pragma", "no-cache")];
    assert!(c.look_up_with(4, "GET", "/r", &both));
    let t = c.wire.last_token();
    c.answer(t, &fresh());
    assert!(matches!(c.proceed(4), Proceed::Serve(_)));
}

#[test]
fn a_clients_no_store_bypasses_the_cache_and_is_ignored_unless_honoured() {
    let mut c = Cache::new(HONOURS_CLIENTS);
    assert!(
        !c.look_up_with(1, "GET", "/r", &[("cache-control", "no-store")]),
        "no lookup is sent"
    );
    assert_eq!(c.proceed(1), Proceed::Forward);
    let f = passes(c.respond(1, 200, &[("content-length", "3")], &[], true));
    assert_eq!(header_of(&f, "x-cache"), Some("BYPASS"));
    assert_eq!(
        header_of(&f, "cache-status"),
        Some("krowoc; fwd=request; fwd-status=200; detail=no-store")
    );

    let mut c = Cache::new(ROUTE);
    let fresh = lookup_reply("hit", 1_000, Some(&entry("old")), -1, 60_000, 0, 0);
    assert!(c.look_up_with(1, "GET", "/r", &[("cache-control", "no-store, no-cache")]));
    let t = c.wire.last_token();
    c.answer(t, &fresh);
    assert!(
        matches!(c.proceed(1), Proceed::Serve(_)),
        "by default a client's directives do not empty the cache"
    );
}

#[test]
fn a_pattern_purge_scans_route_by_route_each_in_its_routes_slot() {
    let mut c = Cache::with(&format!(
        r#"{{"routes": [{ROUTE}, {{"name": "s", "match": {{"prefix": "/s"}}, "cache": {{"ttl": "60s"}}}}],
            "cache": {{"purge": {{"path": "/_purge", "token": "0123456789abcdef"}}}}}}"#
    ));
    let mut req = Cache::request("POST", "/_purge");
    req.headers.extend(fields(&[
        ("x-krowoc-purge-token", "0123456789abcdef"),
        ("x-krowoc-invalidate", "pattern=/*"),
    ]));
    let start = c
        .engine
        .purge_endpoint(&mut c.client, &mut c.wire, c.now_ms, 9, &req);
    let Some(PurgeStart::Wait(purge)) = start else {
        panic!("waits: {start:?}");
    };
    c.records.0.insert(9, (None, Some(purge)));
    c.tick();
    // (The recording wire checks that each command's keys share one cluster slot.)
    let scans: Vec<(u32, Vec<String>)> = c
        .wire
        .sent
        .iter()
        .map(|(t, payload)| {
            let mut w = RecordingWire::default();
            w.sent.push((*t, payload.clone()));
            (*t, w.last_command())
        })
        .filter(|(_, cmd)| cmd.get(1) == Some(&c.sha("cache_scan_purge")))
        .collect();
    assert_eq!(scans.len(), 2, "one scan per cached route: {scans:?}");
    for (route, (_, cmd)) in ["r", "s"].iter().zip(&scans) {
        let keys = RouteKeys::new("krowoc:", route);
        assert_eq!(cmd[2], "1", "one key: the route's purge mark");
        assert_eq!(cmd[3], keys.purge_mark());
        assert_eq!(cmd[5], keys.entries_match());
    }
}
