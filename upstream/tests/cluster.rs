//! The upstream on a real Redis Cluster (`REDIS_CLUSTER`): three masters with a replica each.
//! Publishing and the subscriber work across nodes, `/health/deep` reports the cluster and
//! every master, the subscriber moves when its node dies, and a master killed under traffic is
//! replaced by its replica without restarting the upstream.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{
    blocking, eventually, fast_config_for, get, post, publish, wait_for_event, wait_for_phase,
    Reply, TrafficRun, SETTLE,
};
use krowoc_upstream::subscriber::SubscriberPhase;
use krowoc_upstream::{app, AppState, RedisDeployment, UpstreamConfig};
use serde_json::{json, Value};
use testkit::cluster::RedisCluster;

fn cluster_config(cluster: &RedisCluster) -> UpstreamConfig {
    let deployment = RedisDeployment::cluster(&cluster.seeds()).expect("seeds parse");
    UpstreamConfig {
        redis_timeout: Duration::from_secs(2),
        ..fast_config_for(deployment)
    }
}

fn cluster_check(deep: &Reply) -> &Value {
    &deep.json["checks"]["redis:cluster"][0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_work_and_health_reports_every_master_of_the_cluster() {
    let cluster = RedisCluster::start(3, 1);
    // Keys spread over every master, as a cache in front of the cluster would leave them.
    let cluster = blocking(cluster, |cluster| {
        for i in 0..90 {
            let key = format!("krowoc:cache:item-{i}");
            let owner = cluster.owner_of(&key);
            assert_eq!(cluster.node(owner).cli(&["SET", &key, "v"]), "OK");
        }
    })
    .await;
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "{masters:?}");
    for &m in &masters {
        assert!(cluster.keys_on(m) > 0, "master {m} holds no key");
    }

    let state = AppState::start(cluster_config(&cluster)).expect("a cluster config");
    let app = app(state.clone());
    wait_for_phase(&state, SubscriberPhase::Subscribed).await;

    let deep = eventually("a passing /health/deep", SETTLE, || async {
        let deep = get(&app, "/health/deep").await;
        (deep.json["status"] == json!("pass")).then_some(deep)
    })
    .await;
    assert_eq!(deep.status, StatusCode::OK, "{}", deep.text);
    let check = cluster_check(&deep);
    assert_eq!(check["cluster_state"], json!("ok"), "{check}");
    assert_eq!(check["slots_assigned"], json!(16384), "{check}");
    assert_eq!(check["slots_ok"], json!(16384), "{check}");
    assert_eq!(check["nodes"], json!(6), "{check}");
    assert_eq!(check["replicas"], json!(3), "{check}");
    let reported = check["masters"].as_array().expect("masters");
    assert_eq!(reported.len(), 3, "{check}");
    for &m in &masters {
        let address = format!("127.0.0.1:{}", cluster.node(m).port);
        let entry = reported
            .iter()
            .find(|e| e["address"] == json!(address))
            .unwrap_or_else(|| panic!("master {address} is not reported: {check}"));
        assert_eq!(entry["keys"], json!(cluster.keys_on(m)), "{entry}");
        assert!(entry["slots"].as_u64() > Some(0), "{entry}");
    }
    let slots: u64 = reported.iter().filter_map(|e| e["slots"].as_u64()).sum();
    assert_eq!(slots, 16384);
    // One entry per master in the per-server checks.
    for key in ["redis:responseTime", "redis:memory", "redis:uptime"] {
        let entries = deep.json["checks"][key].as_array().expect(key);
        assert_eq!(entries.len(), 3, "{key}: {}", deep.text);
        assert!(
            entries.iter().all(|e| e["status"] == json!("pass")),
            "{key}"
        );
    }
    assert_eq!(
        deep.json["checks"]["redis:uptime"][0]["redis_mode"],
        json!("cluster")
    );

    // PUBLISH lands on some node; the subscriber, on whichever node it chose, hears it.
    for n in 0..10 {
        let r = publish(&app, json!({"n": n})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(r.json["receivers"].is_u64(), "{}", r.text);
    }
    for n in 0..10 {
        wait_for_event(&app, &json!({"n": n})).await;
    }
    // The endpoints that only mark responses for the filter work as ever.
    let cached = get(&app, "/api/cached-data?user_id=7").await;
    assert_eq!(cached.status, StatusCode::OK);
    assert_eq!(cached.header("cache-tag"), Some("user:7"));
    let invalidate = post(&app, "/api/invalidate-cache", r#"{"user_id":"7"}"#).await;
    assert_eq!(invalidate.status, StatusCode::OK);
    assert_eq!(get(&app, "/api/rate-limited").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscriber_moves_to_another_node_when_its_node_dies() {
    let cluster = RedisCluster::start(3, 1);
    let state = AppState::start(cluster_config(&cluster)).expect("a cluster config");
    let app = app(state.clone());
    wait_for_phase(&state, SubscriberPhase::Subscribed).await;
    let first = state.subscriber().snapshot().node.expect("a node");
    let port: u16 = first
        .rsplit_once(':')
        .expect("HOST:PORT")
        .1
        .parse()
        .unwrap();
    let victim = (0..cluster.len())
        .find(|&i| cluster.node(i).port == port)
        .expect("the subscriber's node is one of the cluster's");

    let cluster = blocking(cluster, move |cluster| cluster.kill(victim)).await;
    let moved = eventually("a subscription on another node", SETTLE, || async {
        let s = state.subscriber().snapshot();
        (s.phase == SubscriberPhase::Subscribed && s.node.as_deref() != Some(&first)).then_some(s)
    })
    .await;
    assert!(moved.resubscriptions >= 1, "{moved:?}");

    // What is published now (retried while the cluster replaces the dead master) arrives.
    let message = json!("after the node died");
    eventually("a successful PUBLISH", SETTLE, || async {
        (publish(&app, message.clone()).await.status == StatusCode::OK).then_some(())
    })
    .await;
    wait_for_event(&app, &message).await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_replaced_by_its_replica_without_restarting_the_upstream() {
    let cluster = RedisCluster::start(3, 1);
    let state = AppState::start(cluster_config(&cluster)).expect("a cluster config");
    let app = app(state.clone());
    wait_for_phase(&state, SubscriberPhase::Subscribed).await;
    let r = publish(&app, json!("before")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let victim = cluster.masters()[0];
    let victim_address = format!("127.0.0.1:{}", cluster.node(victim).port);

    // Traffic runs while the master dies and its replica takes over.
    let traffic = TrafficRun::start(&app);
    let cluster = blocking(cluster, move |cluster| cluster.kill(victim)).await;
    // Until the replica is promoted the others may still say `ok`: wait for three masters.
    let cluster = blocking(cluster, |cluster| {
        let deadline = std::time::Instant::now() + SETTLE;
        while cluster.masters().len() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "no replica was promoted"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster.wait_ok(SETTLE);
    })
    .await;

    // The upstream catches up by itself: the health check names three masters again, none of
    // them the dead one, and publishing works.
    let deep = eventually(
        "/health/deep passing with the new master",
        SETTLE,
        || async {
            let deep = get(&app, "/health/deep").await;
            let check = cluster_check(&deep);
            let masters = check["masters"].as_array()?;
            let fresh = masters.len() == 3
                && masters
                    .iter()
                    .all(|m| m["address"] != json!(victim_address))
                && check["cluster_state"] == json!("ok");
            (fresh && deep.status == StatusCode::OK).then_some(deep)
        },
    )
    .await;
    let promoted: Vec<String> = cluster
        .masters()
        .iter()
        .map(|&m| format!("127.0.0.1:{}", cluster.node(m).port))
        .collect();
    for entry in cluster_check(&deep)["masters"].as_array().expect("masters") {
        let address = entry["address"].as_str().expect("an address").to_string();
        assert!(promoted.contains(&address), "{address} is not a master now");
    }
    for n in 0..5 {
        let r = publish(&app, json!({"after": n})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    wait_for_event(&app, &json!({"after": 4})).await;

    let seen = traffic.stop().await;
    // The failover cost only 503s (Redis unavailable or slow), never another error.
    assert!(seen.unexpected.is_empty(), "{:?}", seen.unexpected);
    assert!(seen.published > 0, "{seen:?}");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_degrades_to_503_and_failing_health() {
    // Seeds where nothing listens.
    let seeds = format!(
        "127.0.0.1:{},127.0.0.1:{}",
        testkit::free_port(),
        testkit::free_port()
    );
    let mut config = fast_config_for(RedisDeployment::cluster(&seeds).expect("seeds"));
    config.channels.clear();
    let state = AppState::start(config).expect("starts without the cluster");
    let app = app(state);
    let r = publish(&app, json!("nobody hears this")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    let deep = get(&app, "/health/deep").await;
    assert_eq!(
        deep.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        deep.text
    );
    assert_eq!(deep.json["status"], json!("fail"));
    let ping = &deep.json["checks"]["redis:responseTime"][0];
    assert_eq!(ping["reachable"], json!(false), "{}", deep.text);
    assert_eq!(get(&app, "/health").await.status, StatusCode::OK);
}
