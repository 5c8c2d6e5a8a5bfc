//! The relay to Redis over TLS (`rediss://`), with a password file and an ACL user, against real
//! redis-server processes with test certificates (testkit::tls).

mod support;

use std::path::Path;
use std::time::Duration;

use support::{config, Relay};
use testkit::tls::TestCa;
use testkit::{encode_command, RedisServer};

use krowoc_relay::pool::{RedisEndpoint, RedisPool};
use krowoc_relay::tls::RedisTls;

fn text(resp: &testkit::http::Response) -> String {
    resp.text()
}

fn tls_redis(auth_clients: bool) -> (TestCa, RedisServer) {
    let ca = TestCa::new("krowoc test CA");
    let server = ca.issue_server(&["localhost", "127.0.0.1"]);
    let redis = RedisServer::start_tls(&ca, &server, auth_clients);
    (ca, redis)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

#[test]
fn the_relay_talks_tls_with_the_test_ca_and_reconnects_after_a_restart() {
    let (ca, mut redis) = tls_redis(false);
    let url = redis.tls_url();
    let relay =
        Relay::start(config(&["--redis", &url, "--tls-ca", path(&ca.ca_file())]).expect("config"));
    let ready = relay.get("/ready");
    assert_eq!(ready.status, 200, "{}", text(&ready));
    // Two pooled connections, each with its own handshake.
    for i in 0..4 {
        let reply = relay.post(&[&["SET", "tls-key", &i.to_string()], &["GET", "tls-key"]]);
        assert_eq!(reply.status, 200, "{}", text(&reply));
        assert_eq!(text(&reply), format!("+OK\r\n$1\r\n{i}\r\n"));
    }
    assert_eq!(redis.cli(&["GET", "tls-key"]), "3");

    redis.stop();
    let down = relay.post(&[&["PING"]]);
    assert_eq!(down.status, 502, "{}", text(&down));
    redis.restart();
    let again = relay.post(&[&["PING"]]);
    assert_eq!(again.status, 200, "{}", text(&again));
    assert_eq!(text(&again), "+PONG\r\n");
}

#[test]
fn a_server_signed_by_another_ca_is_refused_naming_the_ca() {
    let (_ca, redis) = tls_redis(false);
    let other = TestCa::new("some other CA");
    let relay = Relay::start(
        config(&[
            "--redis",
            &redis.tls_url(),
            "--tls-ca",
            path(&other.ca_file()),
        ])
        .expect("config"),
    );
    let ready = relay.get("/ready");
    assert_eq!(ready.status, 503);
    let why = text(&ready);
    assert!(
        why.contains("tls: the server's certificate is not signed by the CA bundle"),
        "{why}"
    );
    assert!(why.contains(path(&other.ca_file())), "{why}");
    let reply = relay.post(&[&["PING"]]);
    assert_eq!(reply.status, 502);
    assert!(text(&reply).contains("not signed by"), "{}", text(&reply));
    let metrics = text(&relay.get("/metrics"));
    assert!(
        metrics
            .lines()
            .any(|l| l == "krowoc_relay_errors_total{kind=\"redis_tls\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_plain_tcp_server_on_a_rediss_url_is_refused_saying_so() {
    let (ca, redis) = tls_redis(false);
    // The plain port of the same server: it does not answer TLS.
    let url = format!("rediss://localhost:{}", redis.port);
    let relay =
        Relay::start(config(&["--redis", &url, "--tls-ca", path(&ca.ca_file())]).expect("config"));
    let ready = relay.get("/ready");
    assert_eq!(ready.status, 503);
    let why = text(&ready);
    assert!(why.contains("plain-TCP Redis on a rediss:// URL"), "{why}");
}

#[test]
fn a_certificate_for_another_host_is_refused_naming_the_host() {
    let ca = TestCa::new("krowoc test CA");
    let server = ca.issue_server(&["redis.internal"]);
    let redis = RedisServer::start_tls(&ca, &server, false);
    let relay = Relay::start(
        config(&["--redis", &redis.tls_url(), "--tls-ca", path(&ca.ca_file())]).expect("config"),
    );
    let why = text(&relay.get("/ready"));
    assert!(
        why.contains("certificate is not valid for the host \"localhost\""),
        "{why}"
    );
}

#[test]
fn mutual_tls_works_with_a_client_certificate_and_is_refused_without() {
    let (ca, redis) = tls_redis(true);
    let client = ca.issue_client("krowoc-relay");
    let with_cert = Relay::start(
        config(&[
            "--redis",
            &redis.tls_url(),
            "--tls-ca",
            path(&ca.ca_file()),
            "--tls-cert",
            path(&client.cert),
            "--tls-key",
            path(&client.key),
        ])
        .expect("config"),
    );
    let reply = with_cert.post(&[&["SET", "mtls", "yes"]]);
    assert_eq!(reply.status, 200, "{}", text(&reply));
    assert_eq!(redis.cli(&["GET", "mtls"]), "yes");

    let without = Relay::start(
        config(&["--redis", &redis.tls_url(), "--tls-ca", path(&ca.ca_file())]).expect("config"),
    );
    let ready = without.get("/ready");
    assert_eq!(ready.status, 503);
    let why = text(&ready);
    assert!(why.contains("wants a client certificate"), "{why}");
    let reply = without.post(&[&["PING"]]);
    assert_eq!(reply.status, 502, "{}", text(&reply));

    // A certificate from a CA the server does not trust is refused too.
    let stranger_ca = TestCa::new("stranger CA");
    let stranger = stranger_ca.issue_client("krowoc-relay");
    let untrusted = Relay::start(
        config(&[
            "--redis",
            &redis.tls_url(),
            "--tls-ca",
            path(&ca.ca_file()),
            "--tls-cert",
            path(&stranger.cert),
            "--tls-key",
            path(&stranger.key),
        ])
        .expect("config"),
    );
    let ready = untrusted.get("/ready");
    assert_eq!(ready.status, 503, "{}", text(&ready));
    assert!(
        text(&ready).contains("tls: the server refused"),
        "{}",
        text(&ready)
    );
}

#[test]
fn the_pool_alone_does_tls_for_each_connection() {
    let (ca, redis) = tls_redis(false);
    let tls = RedisTls::new(Some(&ca.ca_file()), None).expect("tls config");
    let endpoint = RedisEndpoint::from_url(&redis.tls_url()).expect("url");
    assert!(endpoint.tls);
    let pool = RedisPool::with_tls(endpoint, 3, tls);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let calls = (0..12).map(|i| {
            let pool = pool.clone();
            async move {
                let body = bytes::Bytes::from(encode_command(&["INCRBY", "n", &i.to_string()]));
                pool.call(body, Duration::from_secs(2)).await
            }
        });
        for reply in futures_util::future::join_all(calls).await {
            assert!(reply.expect("reply").starts_with(b":"));
        }
    });
    assert_eq!(redis.int(&["GET", "n"]), (0..12).sum::<i64>());
    let clients = redis.cli(&["CLIENT", "LIST"]);
    assert!(clients.lines().count() >= 3, "{clients}");
}

#[test]
fn a_rediss_url_without_a_ca_trusts_the_system_roots_only() {
    let (_ca, redis) = tls_redis(false);
    // The test CA is in no system store: the handshake is refused.
    let relay = Relay::start(config(&["--redis", &redis.tls_url()]).expect("config"));
    let why = text(&relay.get("/ready"));
    // A machine without a CA store says that instead.
    assert!(
        why.contains("not signed by the system's trusted roots")
            || why.contains("the system's trusted roots: none found"),
        "{why}"
    );
}

#[test]
fn tls_flags_are_checked_at_startup_without_showing_secrets() {
    let ca = TestCa::new("krowoc test CA");
    let client = ca.issue_client("krowoc-relay");
    let refuse = |args: &[&str], expected: &str| {
        let err = format!("{:#}", config(args).expect_err("must fail"));
        assert!(err.contains(expected), "{args:?}: {err}");
        err
    };
    let ca_file = ca.ca_file();
    refuse(
        &["--redis", "redis://h:1", "--tls-ca", path(&ca_file)],
        "write the --redis URL as rediss://",
    );
    refuse(
        &["--redis", "rediss://h:1", "--tls-ca", "/nonexistent/ca.pem"],
        "CA bundle /nonexistent/ca.pem: cannot read it",
    );
    // A key where a CA should be: named, its content not shown.
    let key_text = std::fs::read_to_string(&client.key).expect("key");
    let err = refuse(
        &["--redis", "rediss://h:1", "--tls-ca", path(&client.key)],
        "no certificate in it",
    );
    let secret_line = key_text.lines().nth(1).expect("key body");
    assert!(!err.contains(secret_line), "{err}");
    refuse(
        &["--redis", "rediss://h:1", "--tls-cert", path(&client.cert)],
        "--tls-key",
    );
    refuse(
        &[
            "--redis",
            "rediss://h:1",
            "--tls-cert",
            path(&client.cert),
            "--tls-key",
            path(&ca_file),
        ],
        "client key",
    );
}

#[test]
fn the_password_comes_from_a_file_and_never_also_from_the_url() {
    let redis = RedisServer::start();
    redis.cli(&["ACL", "SETUSER", "edge", "on", ">s3cret-pw", "~*", "+@all"]);
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("redis-password");
    std::fs::write(&file, "s3cret-pw\n").expect("write");
    let file = path(&file).to_string();

    let url = format!("redis://edge@127.0.0.1:{}", redis.port);
    let config_ok = config(&["--redis", &url, "--redis-password-file", &file]).expect("config");
    assert_eq!(config_ok.redis.username.as_deref(), Some("edge"));
    assert!(
        !format!("{config_ok:?}").contains("s3cret"),
        "{config_ok:?}"
    );
    let relay = Relay::start(config_ok);
    let reply = relay.post(&[&["SET", "from-file", "1"]]);
    assert_eq!(reply.status, 200, "{}", text(&reply));
    assert_eq!(redis.cli(&["GET", "from-file"]), "1");

    let with_password = format!("redis://edge:other@127.0.0.1:{}", redis.port);
    let err = format!(
        "{:#}",
        config(&["--redis", &with_password, "--redis-password-file", &file]).expect_err("both")
    );
    assert!(err.contains("a password file gives one too"), "{err}");
    assert!(!err.contains("other") && !err.contains("s3cret"), "{err}");

    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").expect("write");
    let err = format!(
        "{:#}",
        config(&["--redis", &url, "--redis-password-file", path(&empty)]).expect_err("empty")
    );
    assert!(err.contains("the file is empty"), "{err}");

    // A wrong password from the file: refused by Redis, and not shown.
    std::fs::write(dir.path().join("wrong"), "not-the-pw").expect("write");
    let wrong = path(&dir.path().join("wrong")).to_string();
    let relay =
        Relay::start(config(&["--redis", &url, "--redis-password-file", &wrong]).expect("config"));
    let ready = relay.get("/ready");
    assert_eq!(ready.status, 503);
    assert!(text(&ready).contains("AUTH refused"), "{}", text(&ready));
    assert!(!text(&ready).contains("not-the-pw"), "{}", text(&ready));
}
