//! Through real sockets: the router served on 127.0.0.1:0 and spoken to with hyper's client,
//! and the `krowoc-upstream` binary itself (its flags, its ready line, bad configuration).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use std::future::IntoFuture;

use axum::body::Bytes;
use axum::http::{Request, StatusCode};
use common::{fast_config, wait_for_phase};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use krowoc_upstream::subscriber::SubscriberPhase;
use krowoc_upstream::{app, AppState};
use serde_json::{json, Value};
use testkit::{ChildGuard, RedisServer};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

struct HttpReply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    json: Value,
}

async fn call(client: &HttpClient, request: Request<Full<Bytes>>) -> HttpReply {
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("an answer within 10 s")
        .expect("HTTP exchange");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    HttpReply {
        status,
        headers,
        json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .expect("request")
}

fn post(addr: SocketAddr, path: &str, body: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_serves_over_a_real_socket() {
    let redis = RedisServer::start();
    let state = AppState::start(fast_config(&redis.url())).expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(axum::serve(listener, app(state.clone())).into_future());
    wait_for_phase(&state, SubscriberPhase::Subscribed).await;
    let client = http_client();

    let r = call(&client, get(addr, "/api/cached-data?user_id=abc")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["cache-tag"], "user:abc");
    assert_eq!(r.headers["cache-control"], "public, max-age=60");

    let r = call(
        &client,
        post(addr, "/api/invalidate-cache", r#"{"user_id":"abc"}"#),
    )
    .await;
    assert_eq!(r.headers["x-krowoc-invalidate"], "tag=user:abc");

    let r = call(
        &client,
        post(
            addr,
            "/api/publish-event",
            r#"{"channel":"app:events","message":"over tcp"}"#,
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["receivers"], json!(1));

    let r = call(
        &client,
        post(addr, "/api/publish-event", r#"{"message":"x"}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json["error"]["field"], json!("channel"));

    let r = call(&client, get(addr, "/health/deep")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["status"], json!("pass"));
    server.abort();
}

/// Starts the binary and returns it with the address it printed.
fn spawn_binary(args: &[&str]) -> (ChildGuard, SocketAddr) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_krowoc-upstream"));
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = ChildGuard::spawn("krowoc-upstream", &mut cmd);
    let stdout = child.child.stdout.take().expect("stdout is piped");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the ready line");
    let addr = line
        .trim()
        .strip_prefix("upstream listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .expect("a socket address");
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_prints_its_address_and_serves_even_with_redis_down() {
    let dead_redis = format!("redis://127.0.0.1:{}", testkit::free_port());
    let (_child, addr) = spawn_binary(&[
        "--listen",
        "127.0.0.1:0",
        "--redis",
        &dead_redis,
        "--cached-data-delay",
        "0",
        "--redis-timeout",
        "300ms",
    ]);
    let client = http_client();
    let r = call(&client, get(addr, "/health")).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = call(&client, get(addr, "/health/deep")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json["status"], json!("fail"));
    let r = call(&client, get(addr, "/api/cached-data?user_id=1")).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = call(
        &client,
        post(addr, "/api/publish-event", r#"{"channel":"a","message":1}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_takes_its_options_from_flags_and_environment() {
    let redis = RedisServer::start();
    let mut cmd_env = vec![("REDIS_URL", redis.url())];
    cmd_env.push(("UPSTREAM_CHANNELS", "custom:one,custom:two".to_string()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_krowoc-upstream"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--cached-data-delay",
        "0",
        "--events-buffer",
        "7",
    ])
    .envs(cmd_env)
    .env("RUST_LOG", "warn")
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = ChildGuard::spawn("krowoc-upstream", &mut cmd);
    let stdout = child.child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("ready line");
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("upstream listening on ")
        .expect("ready line")
        .parse()
        .expect("address");

    let client = http_client();
    let r = common::eventually("the subscriber", Duration::from_secs(10), || async {
        let r = call(&client, get(addr, "/api/recent-events?limit=100")).await;
        (r.json["subscriber"]["state"] == json!("subscribed")).then_some(r)
    })
    .await;
    assert_eq!(
        r.json["subscriber"]["channels"],
        json!(["custom:one", "custom:two"])
    );
    assert_eq!(r.json["limit"], json!(7));
    assert_eq!(redis.int(&["PUBLISH", "custom:two", "hello"]), 1);
}

#[test]
fn the_binary_refuses_bad_options_naming_them() {
    let cases: &[(&[&str], &str)] = &[
        (&["--events-buffer", "0"], "--events-buffer"),
        (&["--redis", "http://nope"], "--redis"),
        (&["--channels", "a,,b"], "--channels"),
        (&["--cached-data-delay", "5 parsecs"], "--cached-data-delay"),
    ];
    for (args, option) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_krowoc-upstream"))
            .args(["--listen", "127.0.0.1:0"])
            .args(*args)
            .env_remove("REDIS_URL")
            .output()
            .expect("run the binary");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(option), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}: it must not start");
    }
}
