//! The relay behind real sentinels (testkit::sentinel: a master, its replica and three
//! sentinels on loopback): it finds the master, follows a failover under traffic without a
//! restart, and says clearly when the sentinels know no such master.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{config, Relay};
use testkit::sentinel::RedisSentinel;

fn relay_for(redis: &RedisSentinel, name: &str) -> Relay {
    let sentinels = redis.sentinels();
    Relay::start(
        config(&[
            "--redis-sentinel",
            &sentinels,
            "--sentinel-master",
            name,
            "--timeout",
            "500ms",
            "--connect-timeout",
            "250ms",
        ])
        .expect("config"),
    )
}

fn metric(relay: &Relay, name: &str) -> u64 {
    let text = relay.get("/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[test]
fn the_relay_finds_the_master_and_follows_a_failover_under_traffic() {
    let redis = RedisSentinel::start("krowoc");
    let relay = Arc::new(relay_for(&redis, "krowoc"));
    let first = redis.master();
    let ready = relay.get("/ready");
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert!(
        ready.text().contains(&format!(
            "sentinel master krowoc at 127.0.0.1:{}",
            redis.node(first).port
        )),
        "{}",
        ready.text()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (relay, stop, ok) = (relay.clone(), stop.clone(), ok.clone());
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut sent = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let reply = relay.post(&[&["INCR", "counted"]]);
                if reply.status == 200 && reply.text().starts_with(':') {
                    ok.fetch_add(1, Ordering::Relaxed);
                    sent += 1;
                } else {
                    failures.push((Instant::now(), reply.status, reply.text()));
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            (failures, sent)
        })
    };
    let wait_for = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while ok.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "no {n} successes");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for(20);
    let second = redis.failover(Duration::from_secs(30));
    assert_ne!(first, second);
    // The relay hears of the switch from the sentinels and moves to the new master.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&relay, "krowoc_relay_sentinel_master_changes_total") == 0 {
        assert!(
            Instant::now() < deadline,
            "the relay did not follow the failover"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = redis.node(second).int(&["GET", "counted"]);
    wait_for(ok.load(Ordering::Relaxed) + 50);
    stop.store(true, Ordering::Relaxed);
    let (failures, _) = traffic.join().expect("traffic");
    println!("sentinel failover: {} failed requests", failures.len());
    assert!(
        failures
            .iter()
            .all(|(_, status, _)| *status == 502 || *status == 504),
        "{failures:?}"
    );
    // The writes after the failover went to the new master.
    let on_new = redis.node(second).int(&["GET", "counted"]);
    assert!(
        on_new >= before + 50,
        "the new master counts {on_new}, {before} before"
    );
    assert_eq!(
        metric(&relay, "krowoc_relay_sentinel_master_changes_total"),
        1
    );
    let ready = relay.get("/ready");
    assert!(
        ready
            .text()
            .contains(&format!("at 127.0.0.1:{}", redis.node(second).port)),
        "{}",
        ready.text()
    );
}

#[test]
fn an_unknown_master_name_is_not_ready_saying_so() {
    let redis = RedisSentinel::start("krowoc");
    let relay = relay_for(&redis, "elsewhere");
    let ready = relay.get("/ready");
    assert_eq!(ready.status, 503);
    assert!(
        ready.text().contains("knows no master named \"elsewhere\""),
        "{}",
        ready.text()
    );
    let reply = relay.post(&[&["PING"]]);
    assert_eq!(reply.status, 502, "{}", reply.text());
}

#[test]
fn sentinel_flags_are_checked() {
    let e = config(&["--redis-sentinel", "127.0.0.1:26379"]).expect_err("refused");
    assert!(e.to_string().contains("--sentinel-master"), "{e}");
    let e = config(&[
        "--redis-sentinel",
        "127.0.0.1:26379",
        "--sentinel-master",
        " ",
    ])
    .expect_err("refused");
    assert!(e.to_string().contains("name is empty"), "{e}");
    let e = config(&[
        "--redis-cluster",
        "127.0.0.1:7000",
        "--redis-sentinel",
        "127.0.0.1:26379",
        "--sentinel-master",
        "m",
    ])
    .expect_err("refused");
    assert!(e.to_string().contains("cannot be used with"), "{e}");
}
