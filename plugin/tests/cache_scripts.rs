//! The cache's Lua scripts against a real redis-server, called exactly as the filter calls them
//! (same sources, same keys and arguments, same reply parsing): store and lookup, freshness by
//! Redis' clock, the fill lock and its `pass` mark, unreadable entries, index purges that
//! remove exactly the listed entries, and pattern purges by SCAN.

use krowoc_plugin::cache::entry::{decode, encode, MAGIC};
use krowoc_plugin::cache::key::{glob_to_lua_pattern, CacheKey, RouteKeys};
use krowoc_plugin::cache::policy::Freshness;
use krowoc_plugin::cache::{
    parse_lookup, store_call, EntryState, LockState, Lookup, CACHE_LOOKUP_LUA, CACHE_PURGE_LUA,
    CACHE_SCAN_PURGE_LUA, CACHE_STORE_LUA, CACHE_UNLOCK_LUA,
};
use krowoc_plugin::redis::resp::{decode_replies, Command, Reply};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use testkit::RedisServer;

/// Sends one command (arguments may be binary) and decodes its one reply.
fn exec(redis: &RedisServer, cmd: &Command) -> Reply {
    let mut stream = TcpStream::connect(redis.addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream.write_all(&cmd.encode()).expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        if let Ok(mut replies) = decode_replies(&buf, 1) {
            return replies.remove(0);
        }
        let n = stream.read(&mut chunk).expect("read");
        assert!(n > 0, "redis closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn eval(redis: &RedisServer, source: &str, keys: &[String], args: &[&[u8]]) -> Reply {
    let cmd = Command::new("EVAL")
        .arg(source)
        .arg(keys.len().to_string())
        .args(keys)
        .args(args);
    exec(redis, &cmd)
}

struct Entry<'a> {
    keys: &'a RouteKeys,
    hash: &'a str,
    url: &'a str,
    path: &'a str,
    tags: &'a [&'a str],
}

impl Entry<'_> {
    fn store(
        &self,
        redis: &RedisServer,
        blob: &[u8],
        times: (u64, u64, u64, u64),
        token: &str,
    ) -> i64 {
        self.store_after(redis, blob, times, token, 0)
    }

    /// Stores a response whose lookup happened at `looked_up_at` (Redis ms; 0 unknown).
    fn store_after(
        &self,
        redis: &RedisServer,
        blob: &[u8],
        (fresh, swr, sie, age): (u64, u64, u64, u64),
        token: &str,
        looked_up_at: u64,
    ) -> i64 {
        let key = CacheKey {
            hash: self.hash.into(),
            url: self.url.into(),
            path: self.path.into(),
        };
        let tags: Vec<String> = self.tags.iter().map(|t| t.to_string()).collect();
        let freshness = Freshness {
            fresh_ms: fresh,
            stale_while_revalidate_ms: swr,
            stale_if_error_ms: sie,
            initial_age_ms: age,
        };
        // The keys and arguments the filter sends, with the entry first.
        let (keys, rest) = store_call(self.keys, &key, &tags, &freshness, token, looked_up_at);
        let mut args: Vec<&[u8]> = vec![blob];
        args.extend(rest.iter().map(|a| a.as_bytes()));
        match eval(redis, CACHE_STORE_LUA, &keys, &args) {
            Reply::Int(keep) => keep,
            other => panic!("store answered {other:?}"),
        }
    }

    fn lookup(&self, redis: &RedisServer, lock_ms: u64, token: &str) -> Lookup {
        let keys = [self.keys.entry(self.hash), self.keys.lock(self.hash)];
        let lock = lock_ms.to_string();
        let reply = eval(
            redis,
            CACHE_LOOKUP_LUA,
            &keys,
            &[MAGIC, lock.as_bytes(), token.as_bytes()],
        );
        parse_lookup(&reply).unwrap_or_else(|e| panic!("lookup: {e}"))
    }
}

fn unlock(redis: &RedisServer, lock_key: &str, token: &str, pass_ms: u64) -> Reply {
    let pass = pass_ms.to_string();
    eval(
        redis,
        CACHE_UNLOCK_LUA,
        &[lock_key.to_string()],
        &[token.as_bytes(), pass.as_bytes()],
    )
}

fn response(body: &str) -> Vec<u8> {
    encode(
        200,
        &[("content-type".to_string(), "text/plain".to_string())],
        body.as_bytes(),
    )
}

#[test]
fn a_stored_response_is_found_fresh_with_its_age_and_indexes() {
    let redis = RedisServer::start();
    let keys = RouteKeys::new("t:", "r");
    let e = Entry {
        keys: &keys,
        hash: "h1",
        url: "/a?x=1",
        path: "/a",
        tags: &["user:1", "list"],
    };
    let miss = e.lookup(&redis, 0, "tok");
    assert_eq!(
        (miss.state, miss.lock),
        (EntryState::Miss, LockState::NotTried)
    );
    let keep = e.store(&redis, &response("hello"), (60_000, 0, 300_000, 2_000), "");
    assert_eq!(
        keep, 358_000,
        "fresh + the longer stale window - the age it arrived with"
    );
    let pttl = redis.int(&["PTTL", &keys.entry("h1")]);
    assert!((357_000..=358_000).contains(&pttl), "{pttl}");
    let hit = e.lookup(&redis, 10_000, "tok");
    assert_eq!(hit.state, EntryState::Hit);
    assert_eq!(hit.lock, LockState::NotTried, "a fresh hit takes no lock");
    assert!((2_000..3_000).contains(&hit.age_ms), "age {}", hit.age_ms);
    assert_eq!((hit.fresh_ms, hit.swr_ms, hit.sie_ms), (60_000, 0, 300_000));
    let stored = decode(hit.blob.expect("blob")).expect("decodes");
    assert_eq!(stored.body, b"hello");
    for index in [
        keys.route_index(),
        keys.path_index("/a"),
        keys.url_index("/a?x=1"),
        keys.tag_index("user:1"),
        keys.tag_index("list"),
    ] {
        assert_eq!(redis.cli(&["SMEMBERS", &index]), "h1", "{index}");
        let ttl = redis.int(&["PTTL", &index]);
        assert!((357_000..=358_000).contains(&ttl), "{index} ttl {ttl}");
    }
    assert_eq!(redis.cli(&["HGET", &keys.entry("h1"), "u"]), "/a?x=1");
}

#[test]
fn index_sets_live_as_long_as_their_longest_entry() {
    let redis = RedisServer::start();
    let keys = RouteKeys::new("t:", "r");
    let long = Entry {
        keys: &keys,
        hash: "long",
        url: "/a",
        path: "/a",
        tags: &["t"],
    };
    let short = Entry {
        hash: "short",
        ..long
    };
    long.store(&redis, &response("l"), (600_000, 0, 0, 0), "");
    short.store(&redis, &response("s"), (10_000, 0, 0, 0), "");
    let ttl = redis.int(&["PTTL", &keys.tag_index("t")]);
    assert!(
        ttl > 500_000,
        "a shorter entry never shortens the index: {ttl}"
    );
}

#[test]
fn the_first_miss_takes_the_lock_and_its_store_releases_it() {
    let redis = RedisServer::start();
    let keys = RouteKeys::new("t:", "r");
    let e = Entry {
        keys: &keys,
        hash: "h",
        url: "/a",
        path: "/a",
        tags: &[],
    };
    let first = e.lookup(&redis, 10_000, "filler");
    assert_eq!(
        (first.state, first.lock),
        (EntryState::Miss, LockState::Taken)
    );
    let second = e.lookup(&redis, 10_000, "waiter");
    assert_eq!(second.lock, LockState::Held);
    assert_eq!(redis.cli(&["GET", &keys.lock("h")]), "filler");
    e.store(&redis, &response("filled"), (60_000, 0, 0, 0), "filler");
    assert_eq!(
        redis.int(&["EXISTS", &keys.lock("h")]),
        0,
        "store released it"
    );
    let poll = e.lookup(&redis, 10_000, "waiter");
    assert_eq!(poll.state, EntryState::Hit);
    // A store by a request that does not hold the lock leaves someone else's lock alone.
    let other = Entry { hash: "h2", ..e };
    assert_eq!(other.lookup(&redis, 10_000, "a").lock, LockState::Taken);
    other.store(&redis, &response("x"), (60_000, 0, 0, 0), "b");
    assert_eq!(redis.cli(&["GET", &keys.lock("h2")]), "a");
}

#[test]
fn released_locks_can_mark_a_key_uncacheable() {
    let redis = RedisServer::start();
    let keys = RouteKeys::new("t:", "r");
    let e = Entry {
        keys: &keys,
        hash: "h",
        url: "/a",
        path: "/a",
        tags: &[],
    };
    assert_eq!(e.lookup(&redis, 10_000, "me").lock, LockState::Taken);
    assert_eq!(unlock(&redis, &keys.lock("h"), "not-me", 0), Reply::Int(0));
    assert_eq!(unlock(&redis, &keys.lock("h"), "me", 5_000), Reply::Int(1));
    let next = e.lookup(&redis, 10_000, "next");
    assert_eq!(
        next.lock,
        LockState::Pass,
        "go upstream at once, do not wait"
    );
    assert_eq!(redis.cli(&["GET", &keys.lock("h")]), "pass");
    assert!(redis.int(&["PTTL", &keys.lock("h")]) <= 5_000);
    // A plain release lets the next miss take the lock.
    let other = Entry { hash: "h2", ..e };
    assert_eq!(other.lookup(&redis, 10_000, "me").lock, LockState::Taken);
    assert_eq!(unlock(&redis, &keys.lock("h2"), "me", 0), Reply::Int(1));
    assert_eq!(other.lookup(&redis, 10_000, "you").lock, LockState::Taken);
}

#[test]
fn stale_entries_are_served_within_their_windows_by_redis_time() {
    let redis = RedisServer::start();
    let keys = RouteKeys::new("t:", "r");
    let e = Entry {
        keys: &keys,
        hash: "h",
        url: "/a",
        path: "/a",
        tags: &[],
    };
    // Arrived 2 s old with 1 s of freshness: stale, within 60 s of stale-while-revalidate.
    e.store(&redis, &response("old"), (1_000, 60_000, 0, 2_000), "");
    let stale = e.lookup(&redis, 10_000, "refresher");
    assert_eq!(stale.state, EntryState::Stale);
    assert_eq!(stale.lock, LockState::Taken, "one request refreshes it");
    assert!(stale.blob.is_some());
    assert_eq!(e.lookup(&redis, 10_000, "other").lock, LockState::Held);
    // Past stale-while-revalidate but within stale-if-error: "expired", still returned.
    let f = Entry { hash: "h2", ..e };
    f.store(&redis, &response("older"), (1_000, 500, 60_000, 2_000), "");
    let expired = f.lookup(&redis, 10_000, "x");
    assert_eq!(expired.state, EntryState::Expired);
    assert_eq!(expired.lock, LockState::Taken);
    assert_eq!(
        decode(expired.blob.expect("kept")).expect("decodes").body,
        b"older"
    );
    // Already past every window when it arrived: nothing is stored.
    let g = Entry { hash: "h3", ..e };
    assert_eq!(g.store(&redis, &response("x"), (1_000, 0, 0, 2_000), ""), 0);
    assert_eq!(redis.int(&["EXISTS", &keys.entry("h3")]), 0);
}

#[test]
fn unreadable_entries_are_deleted_and_read_as_misses() {
    let redis = RedisServer::start();
    let keys = RouteKeys::new("t:", "r");
    let e = Entry {
        keys: &keys,
        hash: "h",
        url: "/a",
        path: "/a",
        tags: &[],
    };
    // A string where a hash belongs.
    redis.cli(&["SET", &keys.entry("h"), "garbage"]);
    let l = e.lookup(&redis, 0, "t");
    assert_eq!((l.state, l.corrupt), (EntryState::Miss, true));
    assert_eq!(redis.int(&["EXISTS", &keys.entry("h")]), 0);
    // Another version tag.
    e.store(&redis, &response("x"), (60_000, 0, 0, 0), "");
    redis.cli(&["HSET", &keys.entry("h"), "v", "KRC9 whatever"]);
    let l = e.lookup(&redis, 10_000, "t");
    assert_eq!(
        (l.state, l.corrupt, l.lock),
        (EntryState::Miss, true, LockState::Taken)
    );
    assert_eq!(redis.int(&["EXISTS", &keys.entry("h")]), 0);
    // A missing field.
    e.store(&redis, &response("x"), (60_000, 0, 0, 0), "");
    redis.cli(&["HDEL", &keys.entry("h"), "f"]);
    assert!(e.lookup(&redis, 0, "t").corrupt);
    // The right tag but a damaged body of fields: the script passes it on, the decoder refuses.
    e.store(&redis, &response("x"), (60_000, 0, 0, 0), "");
    redis.cli(&["HSET", &keys.entry("h"), "v", "KRC1\u{1}"]);
    let l = e.lookup(&redis, 0, "t");
    assert_eq!(l.state, EntryState::Hit);
    assert!(decode(l.blob.expect("blob")).is_err());
}

#[test]
fn an_index_purge_deletes_exactly_the_listed_entries() {
    let redis = RedisServer::start();
    let keys = RouteKeys::new("t:", "r");
    let base = Entry {
        keys: &keys,
        hash: "",
        url: "/a",
        path: "/a",
        tags: &[],
    };
    let one = Entry {
        hash: "u1a",
        tags: &["user:1"],
        ..base
    };
    let one_b = Entry {
        hash: "u1b",
        url: "/b",
        path: "/b",
        tags: &["user:1", "b"],
        ..base
    };
    let two = Entry {
        hash: "u2",
        tags: &["user:2"],
        ..base
    };
    for e in [&one, &one_b, &two] {
        e.store(&redis, &response(e.hash), (60_000, 0, 0, 0), "");
    }
    let purged = eval(
        &redis,
        CACHE_PURGE_LUA,
        &[keys.tag_index("user:1"), keys.purge_mark()],
        &[keys.entry_prefix().as_bytes()],
    );
    assert_eq!(purged, Reply::Int(2));
    assert_eq!(redis.int(&["EXISTS", &keys.entry("u1a")]), 0);
    assert_eq!(redis.int(&["EXISTS", &keys.entry("u1b")]), 0);
    assert_eq!(
        redis.int(&["EXISTS", &keys.entry("u2")]),
        1,
        "untagged stays"
    );
    assert_eq!(redis.int(&["EXISTS", &keys.tag_index("user:1")]), 0);
    // A path purge covers every query of the path; purging again finds nothing.
    let purged = eval(
        &redis,
        CACHE_PURGE_LUA,
        &[keys.path_index("/a"), keys.purge_mark()],
        &[keys.entry_prefix().as_bytes()],
    );
    assert_eq!(purged, Reply::Int(1), "u2 (u1a is already gone)");
    let again = eval(
        &redis,
        CACHE_PURGE_LUA,
        &[keys.path_index("/a"), keys.purge_mark()],
        &[keys.entry_prefix().as_bytes()],
    );
    assert_eq!(again, Reply::Int(0));
}

#[test]
fn a_pattern_purge_scans_in_steps_and_matches_urls() {
    let redis = RedisServer::start();
    let keys = RouteKeys::new("t:", "r");
    let other_route = RouteKeys::new("t:", "other");
    for i in 0..300 {
        let url = format!("/api/cached-data?user_id={i}");
        let hash = format!("h{i}");
        let e = Entry {
            keys: if i % 2 == 0 { &keys } else { &other_route },
            hash: &hash,
            url: &url,
            path: "/api/cached-data",
            tags: &[],
        };
        e.store(&redis, &response("x"), (60_000, 0, 0, 0), "");
    }
    redis.cli(&["SET", "unrelated:key", "v"]);
    let pattern = glob_to_lua_pattern("/api/cached-data?user_id=1*");
    let mut deleted = 0;
    let mut steps = 0;
    // Route by route, as the filter scans.
    for route in [&keys, &other_route] {
        let matcher = route.entries_match();
        let mut cursor = "0".to_string();
        loop {
            let reply = eval(
                &redis,
                CACHE_SCAN_PURGE_LUA,
                &[route.purge_mark()],
                &[
                    cursor.as_bytes(),
                    matcher.as_bytes(),
                    b"50",
                    pattern.as_bytes(),
                ],
            );
            let Reply::Array(items) = reply else {
                panic!("scan step answered {reply:?}")
            };
            cursor = match &items[0] {
                Reply::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
                other => panic!("cursor {other:?}"),
            };
            deleted += items[1].as_int().expect("count");
            steps += 1;
            if cursor == "0" {
                break;
            }
        }
    }
    assert!(steps > 1, "a large keyspace takes several steps");
    // user_id 1, 10-19, 100-199: 111 entries across both routes.
    assert_eq!(deleted, 111);
    assert_eq!(redis.int(&["EXISTS", &keys.entry("h100")]), 0);
    assert_eq!(redis.int(&["EXISTS", &other_route.entry("h1")]), 0);
    assert_eq!(redis.int(&["EXISTS", &keys.entry("h2")]), 1);
    assert_eq!(redis.int(&["EXISTS", "unrelated:key"]), 1);
}

#[test]
fn a_fill_that_looked_up_before_a_purge_is_not_stored() {
    let redis = RedisServer::start();
    let keys = RouteKeys::new("t:", "r");
    let e = Entry {
        keys: &keys,
        hash: "h",
        url: "/a",
        path: "/a",
        tags: &["user:1"],
    };
    // A fill looks up (and takes the lock), then a purge of the route runs before its store.
    let lookup = e.lookup(&redis, 10_000, "filler");
    assert_eq!(lookup.lock, LockState::Taken);
    assert!(
        lookup.now_ms > 1_600_000_000_000,
        "Redis time: {}",
        lookup.now_ms
    );
    std::thread::sleep(Duration::from_millis(5));
    let purged = eval(
        &redis,
        CACHE_PURGE_LUA,
        &[keys.tag_index("user:1"), keys.purge_mark()],
        &[keys.entry_prefix().as_bytes()],
    );
    assert_eq!(purged, Reply::Int(0));
    let mark: u64 = redis
        .cli(&["GET", &keys.purge_mark()])
        .parse()
        .expect("mark");
    assert!(mark > lookup.now_ms);
    let stored = e.store_after(
        &redis,
        &response("fetched before the purge"),
        (60_000, 0, 0, 0),
        "filler",
        lookup.now_ms,
    );
    assert_eq!(stored, -1, "refused: the response may predate the purge");
    assert_eq!(redis.int(&["EXISTS", &keys.entry("h")]), 0);
    assert_eq!(
        redis.int(&["EXISTS", &keys.lock("h")]),
        0,
        "the lock is released anyway"
    );
    // A fill that looked up after the purge is stored. (One in the purge's own millisecond is
    // refused, the safe side of the tie; step past it.)
    std::thread::sleep(Duration::from_millis(5));
    let later = e.lookup(&redis, 10_000, "next");
    let stored = e.store_after(
        &redis,
        &response("fresh"),
        (60_000, 0, 0, 0),
        "next",
        later.now_ms,
    );
    assert!(stored > 0);
    assert_eq!(e.lookup(&redis, 0, "x").state, EntryState::Hit);
}

/// Fills `redis` past a 1 MiB `maxmemory` with `noeviction`, so Redis refuses every write that
/// needs memory (`OOM command not allowed…`), as a full production Redis does.
fn out_of_memory(redis: &RedisServer) {
    let big = "x".repeat(100_000);
    for i in 0..20 {
        redis.cli(&["SET", &format!("fill:{i}"), &big]);
    }
    redis.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis.cli(&["CONFIG", "SET", "maxmemory", "1mb"]);
    let probe = redis.cli(&["SET", "probe", "x"]);
    assert!(probe.starts_with("OOM"), "{probe}");
}

#[test]
fn out_of_memory_lookups_still_serve_hits_and_send_misses_upstream_without_a_lock() {
    let redis = RedisServer::start();
    let keys = RouteKeys::new("t:", "r");
    let e = Entry {
        keys: &keys,
        hash: "fresh",
        url: "/a",
        path: "/a",
        tags: &[],
    };
    e.store(&redis, &response("fresh"), (60_000, 0, 0, 0), "");
    let stale = Entry { hash: "stale", ..e };
    stale.store(&redis, &response("old"), (1_000, 60_000, 0, 2_000), "");
    let missing = Entry {
        hash: "missing",
        ..e
    };
    out_of_memory(&redis);

    let hit = e.lookup(&redis, 10_000, "a");
    assert_eq!(
        (hit.state, hit.lock),
        (EntryState::Hit, LockState::NotTried)
    );
    assert_eq!(
        decode(hit.blob.expect("blob")).expect("decodes").body,
        b"fresh"
    );
    // The refresh lock is refused: the stale copy is served and nobody refreshes it.
    let s = stale.lookup(&redis, 10_000, "b");
    assert_eq!((s.state, s.lock), (EntryState::Stale, LockState::NotTried));
    assert!(s.blob.is_some());
    // A miss answers as with coalescing off (go upstream, do not wait), not as an error.
    let m = missing.lookup(&redis, 10_000, "c");
    assert_eq!((m.state, m.lock), (EntryState::Miss, LockState::NotTried));
    assert_eq!(
        redis.int(&["EXISTS", &keys.lock("stale"), &keys.lock("missing")]),
        0
    );

    // Room again: the lock is taken as before.
    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    let m = missing.lookup(&redis, 10_000, "c");
    assert_eq!((m.state, m.lock), (EntryState::Miss, LockState::Taken));
}
