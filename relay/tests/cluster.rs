//! The relay on a real Redis Cluster (testkit::cluster: 3 masters, each with a replica, on
//! loopback): routing by slot, bodies split across masters, scripts on every master, a slot
//! moved under traffic, and a master failing over under traffic.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{config, Relay};
use testkit::cluster::RedisCluster;

use krowoc_relay::cluster::key_slot;

fn relay_for(cluster: &RedisCluster, extra: &[&str]) -> Relay {
    let seeds = cluster.seeds();
    let mut args = vec!["--redis-cluster", seeds.as_str()];
    args.extend_from_slice(extra);
    Relay::start(config(&args).expect("config"))
}

/// The integer replies of a RESP body of `:N` replies, or a panic naming the body.
fn ints(body: &str) -> Vec<i64> {
    body.split("\r\n")
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.strip_prefix(':')
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("not an integer reply: {l:?} in {body:?}"))
        })
        .collect()
}

fn metric(relay: &Relay, line_start: &str) -> u64 {
    let text = relay.get("/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
}

#[test]
fn commands_reach_the_master_of_their_slot_and_replies_keep_the_body_order() {
    let cluster = RedisCluster::start(3, 1);
    let relay = relay_for(&cluster, &[]);
    let ready = relay.get("/ready");
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert!(
        ready
            .text()
            .contains("16384/16384 slots covered by 3 masters"),
        "{}",
        ready.text()
    );

    // The relay hashes keys as Redis does.
    for i in 0..200 {
        let key = format!("key:{i}:{}", i * 7919);
        assert_eq!(key_slot(key.as_bytes()), cluster.slot(&key), "{key}");
    }

    // 300 keys over every master, written 30 to a body, then read back in one body.
    let keys: Vec<String> = (0..300).map(|i| format!("k:{i}")).collect();
    for chunk in keys.chunks(30) {
        let values: Vec<String> = chunk.iter().map(|k| format!("v-{k}")).collect();
        let cmds: Vec<Vec<&str>> = chunk
            .iter()
            .zip(&values)
            .map(|(k, v)| vec!["SET", k.as_str(), v.as_str()])
            .collect();
        let refs: Vec<&[&str]> = cmds.iter().map(|c| c.as_slice()).collect();
        let reply = relay.post(&refs);
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), "+OK\r\n".repeat(chunk.len()));
    }
    let masters = cluster.masters();
    let on_each: Vec<i64> = masters.iter().map(|&m| cluster.keys_on(m)).collect();
    assert_eq!(on_each.iter().sum::<i64>(), 300, "{on_each:?}");
    assert!(on_each.iter().all(|&n| n > 50), "spread: {on_each:?}");
    for k in keys.iter().step_by(37) {
        assert_eq!(
            cluster.node(cluster.owner_of(k)).cli(&["GET", k]),
            format!("v-{k}")
        );
    }

    let gets: Vec<Vec<&str>> = keys
        .iter()
        .take(64)
        .map(|k| vec!["GET", k.as_str()])
        .collect();
    let mut body: Vec<&[&str]> = gets.iter().map(|c| c.as_slice()).collect();
    body.insert(10, &["PING"]);
    body.truncate(64);
    let reply = relay.post(&body);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let mut expected = String::new();
    for cmd in &body {
        match cmd[0] {
            "PING" => expected.push_str("+PONG\r\n"),
            _ => {
                let v = format!("v-{}", cmd[1]);
                expected.push_str(&format!("${}\r\n{v}\r\n", v.len()));
            }
        }
    }
    assert_eq!(reply.text(), expected);

    // Multi-key commands within one hash tag; a PUBLISH goes to any node.
    let reply = relay.post(&[
        &["SET", "{user:7}:a", "1"],
        &["SET", "{user:7}:b", "2"],
        &["MGET", "{user:7}:a", "{user:7}:b"],
        &["DEL", "{user:7}:a", "{user:7}:b"],
        &["PUBLISH", "news", "hello"],
    ]);
    assert_eq!(
        reply.text(),
        "+OK\r\n+OK\r\n*2\r\n$1\r\n1\r\n$1\r\n2\r\n:2\r\n:0\r\n"
    );

    let metrics = relay.get("/metrics").text();
    assert!(
        metrics.contains("krowoc_relay_cluster_masters 3\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("krowoc_relay_cluster_slots_covered 16384\n"),
        "{metrics}"
    );
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.starts_with("krowoc_relay_cluster_node_up{") && l.ends_with(" 1"))
            .count(),
        3,
        "{metrics}"
    );
}

#[test]
fn commands_whose_keys_span_slots_are_refused_before_anything_is_sent() {
    let cluster = RedisCluster::start(3, 0);
    let relay = relay_for(&cluster, &[]);
    let reply = relay.post(&[&["SET", "before", "1"], &["MGET", "foo", "bar"]]);
    assert_eq!(reply.status, 400, "{}", reply.text());
    let why = reply.text();
    assert!(
        why.contains("command 2: MGET's keys are in hash slots 12182 and 5061"),
        "{why}"
    );
    assert!(why.contains("hash tag"), "{why}");
    assert_eq!(
        cluster
            .node(cluster.owner_of("before"))
            .cli(&["EXISTS", "before"]),
        "0"
    );

    let reply = relay.post(&[&["SCAN", "0"]]);
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("one node"), "{}", reply.text());
    assert_eq!(
        metric(
            &relay,
            "krowoc_relay_errors_total{kind=\"cluster_unroutable\"}"
        ),
        2
    );
}

#[test]
fn scripts_are_loaded_on_every_master_and_run_where_their_keys_live() {
    let cluster = RedisCluster::start(3, 0);
    let relay = relay_for(&cluster, &[]);
    // A script of the filter's (the relay allows only those).
    let script = krowoc_relay::scripts::PLUGIN_SCRIPTS[0].1;
    let sha = krowoc_relay::scripts::sha1_hex(script.as_bytes());
    let reply = relay.post(&[&["SCRIPT", "LOAD", script]]);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), format!("$40\r\n{sha}\r\n"));
    for m in cluster.masters() {
        assert_eq!(
            cluster.node(m).cli(&["SCRIPT", "EXISTS", &sha]),
            "1",
            "master {m}"
        );
    }
    let reply = relay.post(&[&["SCRIPT", "EXISTS", &sha, &"0".repeat(40)]]);
    assert_eq!(reply.text(), "*2\r\n:1\r\n:0\r\n");
    // Flushed on one master only: no longer everywhere.
    let one = cluster.masters()[1];
    assert_eq!(cluster.node(one).cli(&["SCRIPT", "FLUSH"]), "OK");
    let reply = relay.post(&[&["SCRIPT", "EXISTS", &sha]]);
    assert_eq!(reply.text(), "*1\r\n:0\r\n");
}

#[test]
fn a_slot_moved_under_traffic_gives_no_wrong_answer() {
    let cluster = RedisCluster::start(3, 0);
    let relay = Arc::new(relay_for(&cluster, &[]));
    // Keys that all live in one slot, counted up by the relay while the slot moves.
    let keys: Vec<String> = (0..8).map(|i| format!("{{moving}}:{i}")).collect();
    let slot = cluster.slot(&keys[0]);
    let from = cluster.owner_of(&keys[0]);
    let to = *cluster.masters().iter().find(|&&m| m != from).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (relay, stop, sent, keys) = (relay.clone(), stop.clone(), sent.clone(), keys.clone());
        std::thread::spawn(move || {
            let mut wrong = Vec::new();
            let mut expected = vec![0i64; keys.len()];
            while !stop.load(Ordering::Relaxed) {
                let cmds: Vec<[&str; 2]> = keys.iter().map(|k| ["INCR", k.as_str()]).collect();
                let refs: Vec<&[&str]> = cmds.iter().map(|c| c.as_slice()).collect();
                let reply = relay.post(&refs);
                if reply.status != 200 {
                    wrong.push(format!("{} {}", reply.status, reply.text()));
                    continue;
                }
                let got = ints(&reply.text());
                for (e, g) in expected.iter_mut().zip(&got) {
                    *e += 1;
                    if g != e {
                        wrong.push(format!("expected {e}, got {g}"));
                    }
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            (wrong, expected)
        })
    };
    let wait_for = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while sent.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "traffic stalled");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for(20);
    cluster.move_slot(slot, from, to, || {
        // Half-moved: the keys are on `to`, `from` still owns the slot and answers ASK.
        let now = sent.load(Ordering::Relaxed);
        wait_for(now + 20);
    });
    let now = sent.load(Ordering::Relaxed);
    wait_for(now + 20);
    stop.store(true, Ordering::Relaxed);
    let (wrong, expected) = traffic.join().expect("traffic thread");
    assert!(
        wrong.is_empty(),
        "{} wrong answers: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    for (k, e) in keys.iter().zip(&expected) {
        assert_eq!(cluster.node(to).int(&["GET", k]), *e, "{k}");
    }
    assert_eq!(cluster.owner_of(&keys[0]), to);
    assert!(metric(&relay, "krowoc_relay_cluster_redirects_total{kind=\"ask\"}") > 0);
    assert!(
        metric(
            &relay,
            "krowoc_relay_cluster_redirects_total{kind=\"moved\"}"
        ) > 0
    );
}

#[test]
fn a_master_killed_under_traffic_fails_over_and_the_relay_follows_without_a_restart() {
    let mut cluster = RedisCluster::start(3, 1);
    let relay = Arc::new(relay_for(
        &cluster,
        &["--timeout", "500ms", "--connect-timeout", "250ms"],
    ));
    // One key per master, all written through the relay in each body.
    let masters = cluster.masters();
    let mut keys: Vec<String> = Vec::new();
    for i in 0.. {
        let k = format!("fo:{i}");
        let owner = cluster.owner_of(&k);
        if !keys.iter().any(|x| cluster.owner_of(x) == owner) {
            keys.push(k);
        }
        if keys.len() == masters.len() {
            break;
        }
    }
    let victim = cluster.owner_of(&keys[0]);
    let stop = Arc::new(AtomicBool::new(false));
    // Successes in a row: the relay is back once it has many.
    let streak = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (relay, stop, streak, keys) =
            (relay.clone(), stop.clone(), streak.clone(), keys.clone());
        std::thread::spawn(move || {
            // (time, status, body) of each failed request.
            let mut failures: Vec<(Instant, u16, String)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let cmds: Vec<[&str; 2]> = keys.iter().map(|k| ["INCR", k.as_str()]).collect();
                let refs: Vec<&[&str]> = cmds.iter().map(|c| c.as_slice()).collect();
                let reply = relay.post(&refs);
                // While the cluster has no master for a slot, every master answers its commands
                // -CLUSTERDOWN (a 200 carrying error replies): a failure too.
                let all_ints = reply
                    .text()
                    .split("\r\n")
                    .filter(|l| !l.is_empty())
                    .all(|l| l.starts_with(':'));
                if reply.status == 200 && all_ints && ints(&reply.text()).len() == keys.len() {
                    streak.fetch_add(1, Ordering::Relaxed);
                } else {
                    streak.store(0, Ordering::Relaxed);
                    failures.push((Instant::now(), reply.status, reply.text()));
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            failures
        })
    };
    let wait_for_streak = |n: u64, within: Duration| {
        let deadline = Instant::now() + within;
        while streak.load(Ordering::Relaxed) < n {
            assert!(
                Instant::now() < deadline,
                "no {n} successes in a row within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for_streak(20, Duration::from_secs(30));
    let killed_at = Instant::now();
    cluster.kill(victim);
    // The replica takes over after cluster-node-timeout; then every request succeeds again.
    std::thread::sleep(Duration::from_millis(100));
    wait_for_streak(200, Duration::from_secs(30));
    stop.store(true, Ordering::Relaxed);
    let failures = traffic.join().expect("traffic thread");
    let window = failures
        .last()
        .map(|(t, _, _)| *t - killed_at)
        .unwrap_or_default();
    let mut kinds: Vec<&str> = failures.iter().map(|(_, _, b)| b.as_str()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    println!(
        "failover: {} failed requests, the last {window:?} after the kill; errors: {:?}",
        failures.len(),
        &kinds[..kinds.len().min(4)]
    );
    assert!(
        failures.iter().all(|(t, _, _)| *t >= killed_at),
        "failures before the kill: {failures:?}"
    );
    let cluster_down = |body: &str| {
        body.split("\r\n")
            .filter(|l| !l.is_empty())
            .all(|l| l.starts_with(':') || l.starts_with("-CLUSTERDOWN"))
    };
    assert!(
        failures.iter().all(|(_, status, body)| *status == 502
            || *status == 504
            || (*status == 200 && cluster_down(body))),
        "failures are 502/504, or CLUSTERDOWN from the masters left: {kinds:?}"
    );
    // The failover window: cluster-node-timeout (1 s), the election, and the relay's refresh.
    assert!(
        window < Duration::from_secs(15),
        "failures went on for {window:?}: {kinds:?}"
    );
    let new_owner = cluster.owner_of(&keys[0]);
    assert_ne!(new_owner, victim);
    assert!(cluster.node(new_owner).int(&["GET", &keys[0]]) > 0);
    assert_eq!(metric(&relay, "krowoc_relay_cluster_masters"), 3);
    let ready = relay.get("/ready");
    assert_eq!(ready.status, 200, "{}", ready.text());
}

#[test]
fn the_relay_reaches_a_cluster_over_tls_on_the_ports_its_slot_map_names() {
    let ca = testkit::tls::TestCa::new("krowoc test CA");
    let server = ca.issue_peer(&["localhost", "127.0.0.1"]);
    let cluster = RedisCluster::start_tls(3, 0, &ca, &server);
    let seeds = format!("rediss://{}", cluster.tls_seeds());
    let ca_file = ca.ca_file();
    let relay = Relay::start(
        config(&[
            "--redis-cluster",
            &seeds,
            "--tls-ca",
            ca_file.to_str().expect("utf-8 path"),
        ])
        .expect("config"),
    );
    let ready = relay.get("/ready");
    assert_eq!(ready.status, 200, "{}", ready.text());
    // The masters are reached on their TLS ports (a TLS client's CLUSTER SLOTS names them).
    for port in cluster.tls_seeds().split(',') {
        assert!(ready.text().contains(port), "{port} in {}", ready.text());
    }
    let keys: Vec<String> = (0..60).map(|i| format!("tls:{i}")).collect();
    let cmds: Vec<[&str; 3]> = keys.iter().map(|k| ["SET", k.as_str(), "v"]).collect();
    let refs: Vec<&[&str]> = cmds.iter().map(|c| c.as_slice()).collect();
    let reply = relay.post(&refs);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "+OK\r\n".repeat(keys.len()));
    let on_each: Vec<i64> = cluster
        .masters()
        .iter()
        .map(|&m| cluster.keys_on(m))
        .collect();
    assert!(on_each.iter().all(|&n| n > 0), "{on_each:?}");
    assert_eq!(on_each.iter().sum::<i64>(), 60);
}
