//! The relay against a real redis-server, through real HTTP on loopback.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use testkit::{encode_command, RedisServer};

use krowoc_relay::pool::RedisEndpoint;
use krowoc_relay::scripts::{sha1_hex, PLUGIN_SCRIPTS};
use krowoc_relay::{serve, RelayArgs, RelayConfig, TOKEN_HEADER};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

struct Relay {
    addr: SocketAddr,
    client: HttpClient,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn config_for(redis: &RedisServer) -> RelayConfig {
    RelayConfig::new(RedisEndpoint::from_url(&redis.url()).expect("redis url"))
}

async fn start(config: RelayConfig) -> Relay {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(serve(listener, config));
    let client = Client::builder(TokioExecutor::new()).build_http();
    Relay { addr, client, task }
}

struct Reply {
    status: StatusCode,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Relay {
    async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.addr, path))
            .header("content-type", "application/x-resp");
        if let Some(t) = token {
            req = req.header(TOKEN_HEADER, t);
        }
        let req = req.body(Full::new(Bytes::from(body))).expect("request");
        let resp = self.client.request(req).await.expect("http request");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Reply { status, body }
    }

    async fn post(&self, body: Vec<u8>) -> Reply {
        self.request(Method::POST, "/resp", None, body).await
    }
}

fn commands(cmds: &[&[&str]]) -> Vec<u8> {
    cmds.iter().flat_map(|c| encode_command(c)).collect()
}

#[tokio::test]
async fn ping_answers_pong() {
    let redis = RedisServer::start();
    let relay = start(config_for(&redis)).await;
    let reply = relay.post(commands(&[&["PING"]])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(&reply.body[..], b"+PONG\r\n");
}

#[tokio::test]
async fn pipelined_commands_reply_in_order() {
    let redis = RedisServer::start();
    let relay = start(config_for(&redis)).await;
    let body = commands(&[
        &["SET", "counter", "1"],
        &["INCR", "counter"],
        &["GET", "counter"],
        &["HSET", "h", "f", "v"],
        &["HGETALL", "h"],
        &["DEL", "counter", "h"],
        &["GET", "counter"],
    ]);
    let reply = relay.post(body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.text(),
        "+OK\r\n:2\r\n$1\r\n2\r\n:1\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n:2\r\n$-1\r\n"
    );
    assert_eq!(redis.int(&["DBSIZE"]), 0);
}

#[tokio::test]
async fn eval_runs_a_script_with_keys_and_args() {
    let redis = RedisServer::start();
    let mut config = config_for(&redis);
    let script =
        "redis.call('SET', KEYS[1], ARGV[1]); return {KEYS[1], redis.call('GET', KEYS[1])}";
    config.scripts.allow_source("test", script.as_bytes());
    let relay = start(config).await;
    let reply = relay
        .post(commands(&[&["EVAL", script, "1", "k", "from-lua"]]))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), "*2\r\n$1\r\nk\r\n$8\r\nfrom-lua\r\n");
    assert_eq!(redis.cli(&["GET", "k"]), "from-lua");
}

#[tokio::test]
async fn noscript_is_a_normal_reply_inside_a_200() {
    let redis = RedisServer::start();
    let mut config = config_for(&redis);
    config.scripts.allow_source("test", b"return 42");
    let relay = start(config).await;
    // A script of the plugin's that this fresh Redis has never seen.
    let sha = &sha1_hex(PLUGIN_SCRIPTS[0].1.as_bytes());
    let reply = relay
        .post(commands(&[&["EVALSHA", sha, "0"], &["PING"]]))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let text = reply.text();
    assert!(text.starts_with("-NOSCRIPT"), "{text}");
    assert!(text.ends_with("\r\n+PONG\r\n"), "{text}");
    // SCRIPT LOAD then EVALSHA works through the relay too.
    let load = relay
        .post(commands(&[&["SCRIPT", "LOAD", "return 42"]]))
        .await;
    assert_eq!(load.status, StatusCode::OK);
    let sha = load.text().lines().nth(1).unwrap_or_default().to_string();
    let reply = relay.post(commands(&[&["EVALSHA", &sha, "0"]])).await;
    assert_eq!(reply.text(), ":42\r\n");
}

/// Scripts a token holder might try: each would wipe Redis, or stall it for every client.
const HOSTILE_SCRIPTS: [&str; 3] = [
    "return redis.call('FLUSHALL')",
    "while true do end",
    "redis.call('SET', 'forged', '1') return 1",
];

#[tokio::test]
async fn unknown_scripts_are_403_naming_the_sha1_and_nothing_reaches_redis() {
    let redis = RedisServer::start();
    redis.cli(&["SET", "guard", "still-here"]);
    let mut config = config_for(&redis);
    config.token = Some("s3cret".into());
    let relay = start(config).await;
    let mut refused = 0;
    for script in HOSTILE_SCRIPTS {
        let sha = sha1_hex(script.as_bytes());
        let attempts: [&[&str]; 4] = [
            &["EVAL", script, "0"],
            &["EVALSHA", &sha, "0"],
            &["SCRIPT", "LOAD", script],
            &["EVALSHA", &sha.to_ascii_uppercase(), "0"],
        ];
        for attempt in attempts {
            // The script comes last: the SET before it must not run either.
            let body = commands(&[&["SET", "written", "1"], attempt]);
            let started = Instant::now();
            let reply = relay
                .request(Method::POST, "/resp", Some("s3cret"), body)
                .await;
            refused += 1;
            assert_eq!(
                reply.status,
                StatusCode::FORBIDDEN,
                "{attempt:?}: {}",
                reply.text()
            );
            assert!(reply.text().contains(&sha), "{attempt:?}: {}", reply.text());
            assert!(
                reply.text().contains("not one of the relay's scripts"),
                "{}",
                reply.text()
            );
            assert!(started.elapsed() < Duration::from_millis(500));
        }
        assert_eq!(redis.cli(&["SCRIPT", "EXISTS", &sha]), "0", "{script}");
    }
    // Redis answers at once (no BUSY script), nothing was written, nothing was wiped.
    assert_eq!(redis.cli(&["PING"]), "PONG");
    assert_eq!(redis.cli(&["GET", "guard"]), "still-here");
    assert_eq!(redis.int(&["EXISTS", "written", "forged"]), 0);
    assert_eq!(redis.int(&["DBSIZE"]), 1);
    let metrics = relay
        .request(Method::GET, "/metrics", None, Vec::new())
        .await
        .text();
    let line = format!("krowoc_relay_errors_total{{kind=\"script_refused\"}} {refused}");
    assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    assert!(
        metrics.contains("krowoc_relay_commands_total 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn functions_are_refused_even_when_allowed() {
    let redis = RedisServer::start();
    let mut config = config_for(&redis);
    for name in ["FUNCTION", "FCALL", "FCALL_RO"] {
        let err = config.commands.allow(name).expect_err(name);
        assert!(err.contains("always refused"), "{err}");
    }
    let relay = start(config).await;
    let library = "#!lua name=evil\nredis.register_function('wipe', function() return redis.call('FLUSHALL') end)";
    for cmd in [
        &["FUNCTION", "LOAD", library][..],
        &["FCALL", "wipe", "0"],
        &["FCALL_RO", "wipe", "0"],
    ] {
        let reply = relay.post(commands(&[cmd])).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{cmd:?}");
        assert!(reply.text().contains(cmd[0]), "{}", reply.text());
    }
    assert_eq!(redis.cli(&["FUNCTION", "LIST"]), "");
}

#[tokio::test]
async fn each_plugin_script_runs_by_eval_and_by_evalsha() {
    let redis = RedisServer::start();
    let relay = start(config_for(&redis)).await;
    for (name, source) in PLUGIN_SCRIPTS {
        let sha = sha1_hex(source.as_bytes());
        // Unknown to Redis: EVALSHA is relayed and Redis answers NOSCRIPT, as the plugin expects.
        let reply = relay.post(commands(&[&["EVALSHA", &sha, "0"]])).await;
        assert_eq!(reply.status, StatusCode::OK, "{name}: {}", reply.text());
        assert!(
            reply.text().starts_with("-NOSCRIPT"),
            "{name}: {}",
            reply.text()
        );
        // EVAL reaches Redis (which caches the script), then EVALSHA finds it. Without the
        // script's real arguments most answer a script error: a normal reply inside the 200.
        let eval = relay.post(commands(&[&["EVAL", source, "0"]])).await;
        assert_eq!(eval.status, StatusCode::OK, "{name}: {}", eval.text());
        assert_eq!(redis.cli(&["SCRIPT", "EXISTS", &sha]), "1", "{name}");
        let again = relay.post(commands(&[&["EVALSHA", &sha, "0"]])).await;
        assert_eq!(again.status, StatusCode::OK, "{name}: {}", again.text());
        assert!(
            !again.text().starts_with("-NOSCRIPT"),
            "{name}: {}",
            again.text()
        );
        redis.cli(&["SCRIPT", "FLUSH"]);
        let load = relay.post(commands(&[&["SCRIPT", "LOAD", source]])).await;
        assert_eq!(load.status, StatusCode::OK, "{name}: {}", load.text());
        assert!(load.text().contains(&sha), "{name}: {}", load.text());
    }
    // One with its real arguments: a fixed window of 10 per second admits the first request.
    let (_, rate_limit) = PLUGIN_SCRIPTS
        .iter()
        .find(|(n, _)| *n == "rate_limit.lua")
        .expect("rate_limit.lua");
    let args = ["1", "rl:{t}:a", "1", "fixed_window", "10", "1000", "1"];
    let eval = [&["EVAL", rate_limit][..], &args].concat();
    let reply = relay.post(commands(&[&eval])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(
        reply.text().starts_with("*5\r\n:1\r\n:0\r\n:9\r\n"),
        "{}",
        reply.text()
    );
}

#[test]
fn allow_script_admits_another_plugin_versions_script() {
    let redis = RedisServer::start();
    let file = redis.dir().join("next_version.lua");
    let next = "-- a later plugin's script\nreturn 'v2'\n";
    std::fs::write(&file, next).expect("write script");
    let cli = Cli::try_parse_from([
        "relay",
        "--redis",
        &redis.url(),
        "--allow-script",
        file.to_str().expect("utf-8 path"),
    ])
    .expect("flags");
    let config = RelayConfig::from_args(&cli.relay).expect("config");
    assert_eq!(config.scripts.len(), PLUGIN_SCRIPTS.len() + 1);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let relay = start(config).await;
        let reply = relay.post(commands(&[&["EVAL", next, "0"]])).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.text(), "$2\r\nv2\r\n");
        let sha = sha1_hex(next.as_bytes());
        let reply = relay.post(commands(&[&["EVALSHA", &sha, "0"]])).await;
        assert_eq!(reply.text(), "$2\r\nv2\r\n");
        // Byte for byte: the same script without its trailing newline is another script.
        let reply = relay
            .post(commands(&[&["EVAL", next.trim_end(), "0"]]))
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    });
}

#[test]
fn an_unreadable_allow_script_file_fails_startup_naming_it() {
    let dir =
        std::env::temp_dir().join(format!("krowoc-relay-allow-script-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let missing = dir.join("missing.lua");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_krowoc-relay"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--token",
            "t0ps3cret",
            "--allow-script",
        ])
        .arg(&missing)
        .output()
        .expect("run krowoc-relay");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: --allow-script {}: cannot read it",
            missing.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("No such file"), "{stderr}");
    assert!(!stderr.contains("t0ps3cret"), "{stderr}");
    // A directory is not a script either.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_krowoc-relay"))
        .args(["--listen", "127.0.0.1:0", "--allow-script"])
        .arg(&dir)
        .output()
        .expect("run krowoc-relay");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--allow-script"), "{stderr}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[tokio::test]
async fn concurrent_requests_share_two_connections_and_each_gets_its_own_replies() {
    let redis = RedisServer::start();
    let mut config = config_for(&redis);
    config.pool_size = 2;
    let relay = std::sync::Arc::new(start(config).await);
    let mut tasks = Vec::new();
    for i in 0..64 {
        let relay = relay.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("key:{i}");
            let value = format!("value-{i}-{}", "x".repeat(i * 7));
            let body = commands(&[&["SET", &key, &value], &["GET", &key], &["EXISTS", &key]]);
            let reply = relay.post(body).await;
            (i, value, reply)
        }));
    }
    for task in tasks {
        let (i, value, reply) = task.await.expect("task");
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "request {i}: {}",
            reply.text()
        );
        let expected = format!("+OK\r\n${}\r\n{value}\r\n:1\r\n", value.len());
        assert_eq!(reply.text(), expected, "request {i}");
    }
    assert_eq!(redis.int(&["DBSIZE"]), 64);
    // The relay's two connections, plus the one asking.
    let clients = redis.cli(&["CLIENT", "LIST"]);
    assert_eq!(clients.lines().count(), 3, "{clients}");
}

#[tokio::test]
async fn refused_commands_are_403_and_nothing_reaches_redis() {
    let redis = RedisServer::start();
    redis.cli(&["SET", "guard", "still-here"]);
    let relay = start(config_for(&redis)).await;
    let refused: [(&[&str], &str); 5] = [
        (&["FLUSHALL"], "FLUSHALL"),
        (&["CONFIG", "GET", "*"], "CONFIG"),
        (&["KEYS", "*"], "KEYS"),
        (&["SCRIPT", "FLUSH"], "SCRIPT FLUSH"),
        (&["LPUSH", "l", "x"], "LPUSH"),
    ];
    for (cmd, name) in refused {
        // The refused command comes last: the SET before it must not run either.
        let body = commands(&[&["SET", "written", "1"], cmd]);
        let reply = relay.post(body).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{cmd:?}: {}",
            reply.text()
        );
        assert!(reply.text().contains(name), "{cmd:?}: {}", reply.text());
    }
    assert_eq!(redis.cli(&["GET", "guard"]), "still-here");
    assert_eq!(redis.int(&["EXISTS", "written"]), 0);
    assert_eq!(redis.int(&["DBSIZE"]), 1);
}

#[tokio::test]
async fn allow_flag_lets_one_more_command_through() {
    let redis = RedisServer::start();
    let mut config = config_for(&redis);
    config.commands.allow("LPUSH").expect("allow LPUSH");
    let relay = start(config).await;
    let reply = relay.post(commands(&[&["LPUSH", "l", "x"]])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), ":1\r\n");
}

#[tokio::test]
async fn wrong_or_missing_token_is_403() {
    let redis = RedisServer::start();
    let mut config = config_for(&redis);
    config.token = Some("s3cret".into());
    let relay = start(config).await;
    let body = || commands(&[&["SET", "k", "v"]]);
    let missing = relay.request(Method::POST, "/resp", None, body()).await;
    assert_eq!(missing.status, StatusCode::FORBIDDEN);
    assert!(
        missing.text().contains("missing x-krowoc-relay-token"),
        "{}",
        missing.text()
    );
    for wrong in ["s3cre", "s3cret!", "S3CRET", ""] {
        let reply = relay
            .request(Method::POST, "/resp", Some(wrong), body())
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "token {wrong:?}");
        assert!(
            reply.text().contains("wrong x-krowoc-relay-token"),
            "{}",
            reply.text()
        );
    }
    assert_eq!(redis.int(&["EXISTS", "k"]), 0);
    let ok = relay
        .request(Method::POST, "/resp", Some("s3cret"), body())
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(redis.cli(&["GET", "k"]), "v");
}

#[tokio::test]
async fn malformed_resp_is_400_naming_the_problem() {
    let redis = RedisServer::start();
    let relay = start(config_for(&redis)).await;
    let cases: [(Vec<u8>, &str); 4] = [
        (b"PING\r\n".to_vec(), "malformed RESP in command 1"),
        (b"*1\r\n:5\r\n".to_vec(), "malformed RESP in command 1"),
        (
            [
                encode_command(&["PING"]),
                b"*2\r\n$3\r\nGET\r\n$4\r\nab".to_vec(),
            ]
            .concat(),
            "body ends inside command 2",
        ),
        (Vec::new(), "empty body"),
    ];
    for (body, expected) in cases {
        let reply = relay.post(body.clone()).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body:?}");
        assert!(
            reply.text().contains(expected),
            "{body:?}: {}",
            reply.text()
        );
    }
}

#[tokio::test]
async fn too_big_body_and_too_many_commands_are_413() {
    let redis = RedisServer::start();
    let mut config = config_for(&redis);
    config.max_body_bytes = 1000;
    config.max_commands = 4;
    let relay = start(config).await;
    let big = "v".repeat(2000);
    let reply = relay.post(commands(&[&["SET", "big", &big]])).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(reply.text().contains("1000 bytes"), "{}", reply.text());
    let five: Vec<&[&str]> = vec![&["INCR", "n"]; 5];
    let reply = relay.post(commands(&five)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        reply.text().contains("limit of 4 commands"),
        "{}",
        reply.text()
    );
    assert_eq!(redis.int(&["DBSIZE"]), 0);
    let four: Vec<&[&str]> = vec![&["INCR", "n"]; 4];
    let reply = relay.post(commands(&four)).await;
    assert_eq!(reply.text(), ":1\r\n:2\r\n:3\r\n:4\r\n");
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_413_without_a_content_length() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = RedisServer::start();
    let mut config = config_for(&redis);
    config.max_body_bytes = 100;
    let relay = start(config).await;
    let mut stream = tokio::net::TcpStream::connect(relay.addr)
        .await
        .expect("connect");
    let value = "x".repeat(300);
    let body = commands(&[&["SET", "chunked", &value]]);
    let mut request =
        b"POST /resp HTTP/1.1\r\nhost: relay\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    request.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
    request.extend_from_slice(&body);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    stream.write_all(&request).await.expect("write");
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("response in time")
            .expect("read");
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert_eq!(redis.int(&["EXISTS", "chunked"]), 0);
}

#[tokio::test]
async fn killed_redis_is_502_quickly_and_the_relay_recovers_after_restart() {
    let mut redis = RedisServer::start();
    let relay = start(config_for(&redis)).await;
    assert_eq!(
        relay.post(commands(&[&["PING"]])).await.status,
        StatusCode::OK
    );
    redis.stop();
    for _ in 0..3 {
        let started = Instant::now();
        let reply = relay.post(commands(&[&["PING"]])).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
        assert!(reply.text().contains("unreachable"), "{}", reply.text());
        assert!(
            reply.text().contains(&format!("127.0.0.1:{}", redis.port)),
            "{}",
            reply.text()
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }
    let ready = relay.request(Method::GET, "/ready", None, Vec::new()).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    redis.restart();
    let reply = relay.post(commands(&[&["SET", "after", "restart"]])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(redis.cli(&["GET", "after"]), "restart");
    let ready = relay.request(Method::GET, "/ready", None, Vec::new()).await;
    assert_eq!(ready.status, StatusCode::OK);
}

#[tokio::test]
async fn redis_that_never_answers_is_504_after_the_timeout() {
    // Accepts connections and reads nothing back: a hung Redis.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().take(2) {
            held.push(stream);
        }
        std::thread::sleep(Duration::from_secs(5));
    });
    let mut config = RelayConfig::new(RedisEndpoint::new("127.0.0.1", port));
    config.timeout = Duration::from_millis(200);
    let relay = start(config).await;
    let started = Instant::now();
    let reply = relay.post(commands(&[&["PING"]])).await;
    let took = started.elapsed();
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        reply.text()
    );
    assert!(reply.text().contains("timeout"), "{}", reply.text());
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(2),
        "{took:?}"
    );
    drop(holder);
}

#[tokio::test]
async fn other_paths_are_404_and_other_methods_405() {
    let redis = RedisServer::start();
    let relay = start(config_for(&redis)).await;
    let get = relay.request(Method::GET, "/resp", None, Vec::new()).await;
    assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
    let other = relay
        .request(Method::POST, "/other", None, commands(&[&["PING"]]))
        .await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    let post_ready = relay
        .request(Method::POST, "/ready", None, Vec::new())
        .await;
    assert_eq!(post_ready.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn metrics_count_requests_commands_and_errors_by_kind() {
    let redis = RedisServer::start();
    let relay = start(config_for(&redis)).await;
    relay
        .post(commands(&[&["PING"], &["PING"], &["PING"]]))
        .await;
    relay.post(commands(&[&["KEYS", "*"]])).await;
    relay.post(b"garbage".to_vec()).await;
    let metrics = relay
        .request(Method::GET, "/metrics", None, Vec::new())
        .await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = metrics.text();
    for line in [
        "krowoc_relay_requests_total 3",
        "krowoc_relay_relayed_total 1",
        "krowoc_relay_commands_total 3",
        "krowoc_relay_errors_total{kind=\"command_refused\"} 1",
        "krowoc_relay_errors_total{kind=\"malformed\"} 1",
        "krowoc_relay_errors_total{kind=\"redis_timeout\"} 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

#[tokio::test]
async fn redis_url_credentials_and_database_are_used() {
    let redis = RedisServer::start();
    redis.cli(&["ACL", "SETUSER", "relay", "on", ">pw", "~*", "+@all"]);
    let url = format!("redis://relay:pw@127.0.0.1:{}/5", redis.port);
    let relay = start(RelayConfig::new(
        RedisEndpoint::from_url(&url).expect("url"),
    ))
    .await;
    let reply = relay.post(commands(&[&["SET", "in-db-5", "yes"]])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(redis.int(&["DBSIZE"]), 0, "db 0 must stay empty");
    let bad = format!("redis://relay:wrong@127.0.0.1:{}", redis.port);
    let relay = start(RelayConfig::new(
        RedisEndpoint::from_url(&bad).expect("url"),
    ))
    .await;
    let reply = relay.post(commands(&[&["PING"]])).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert!(reply.text().contains("AUTH refused"), "{}", reply.text());
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    relay: RelayArgs,
}

#[test]
fn flags_parse_with_documented_defaults_and_refuse_bad_values() {
    let cli = Cli::try_parse_from(["relay"]).expect("defaults");
    let config = RelayConfig::from_args(&cli.relay).expect("config");
    assert_eq!(cli.relay.listen, "127.0.0.1:7379");
    assert_eq!(config.max_body_bytes, 1024 * 1024);
    assert_eq!(config.max_commands, 64);
    assert_eq!(config.timeout, Duration::from_secs(1));
    assert_eq!(config.token, None);

    let cli = Cli::try_parse_from([
        "relay",
        "--redis",
        "redis://:pw@10.0.0.1:6390/2",
        "--token",
        "t",
        "--allow",
        "lpush",
        "--timeout",
        "250ms",
        "--max-commands",
        "8",
        "--pool-size",
        "4",
    ])
    .expect("flags");
    let config = RelayConfig::from_args(&cli.relay).expect("config");
    assert_eq!(config.redis.port, 6390);
    assert_eq!(config.redis.db, Some(2));
    assert_eq!(config.token.as_deref(), Some("t"));
    assert!(config.commands.allowed().any(|c| c == "LPUSH"));
    assert_eq!(config.timeout, Duration::from_millis(250));
    assert!(!format!("{config:?}").contains("pw"), "{config:?}");

    let refuse = |args: &[&str], expected: &str| {
        let mut argv = vec!["relay"];
        argv.extend_from_slice(args);
        let err = match Cli::try_parse_from(argv) {
            Err(e) => e.to_string(),
            Ok(cli) => format!(
                "{:#}",
                RelayConfig::from_args(&cli.relay).expect_err("must fail")
            ),
        };
        assert!(err.contains(expected), "{args:?}: {err}");
    };
    refuse(&["--allow", "FLUSHALL"], "always refused");
    refuse(&["--redis", "http://x"], "--redis");
    refuse(&["--timeout", "5"], "unit");
    refuse(&["--max-commands", "0"], "--max-commands 0");
    refuse(&["--token", ""], "token is empty");
    refuse(
        &["--allow-script", "/nonexistent/next.lua"],
        "--allow-script /nonexistent/next.lua: cannot read it",
    );
}

/// A token in a file (a Kubernetes Secret's key, mounted) is the token, without the trailing
/// newline an editor or `kubectl create secret --from-file` leaves; the flag is not `--token`'s
/// companion but its alternative, and an empty or missing file stops the relay naming it.
#[tokio::test]
async fn token_file_is_the_token_without_its_trailing_newline() {
    let redis = RedisServer::start();
    let file = redis.dir().join("relay-token");
    std::fs::write(&file, "s3cret\n").expect("write token");
    let path = file.to_str().expect("utf-8 path");
    let cli = Cli::try_parse_from(["relay", "--redis", &redis.url(), "--token-file", path])
        .expect("flags");
    let config = RelayConfig::from_args(&cli.relay).expect("config");
    assert_eq!(config.token.as_deref(), Some("s3cret"));
    let relay = start(config).await;
    let body = || commands(&[&["PING"]]);
    let missing = relay.request(Method::POST, "/resp", None, body()).await;
    assert_eq!(missing.status, StatusCode::FORBIDDEN);
    let ok = relay
        .request(Method::POST, "/resp", Some("s3cret"), body())
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());

    let both = Cli::try_parse_from(["relay", "--token", "t", "--token-file", path]);
    assert!(both.is_err(), "--token and --token-file together");
    std::fs::write(&file, "\n").expect("write token");
    let cli = Cli::try_parse_from(["relay", "--token-file", path]).expect("flags");
    let err = format!(
        "{:#}",
        RelayConfig::from_args(&cli.relay).expect_err("empty")
    );
    assert_eq!(err, format!("--token-file {path}: the file is empty"));
    let missing = redis.dir().join("no-such-token");
    let missing = missing.to_str().expect("utf-8 path");
    let cli = Cli::try_parse_from(["relay", "--token-file", missing]).expect("flags");
    let err = format!(
        "{:#}",
        RelayConfig::from_args(&cli.relay).expect_err("missing")
    );
    assert!(
        err.starts_with(&format!("--token-file {missing}: ")),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// The pool on its own (host-shim's proxy_redis_call uses it directly).

mod pool {
    use super::*;
    use krowoc_relay::pool::{PoolErrorKind, RedisPool};
    use std::io::{Read, Write};

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn a_pool_made_outside_a_runtime_works_inside_a_current_thread_runtime() {
        let redis = RedisServer::start();
        let pool = RedisPool::new(RedisEndpoint::from_url(&redis.url()).expect("url"), 2);
        let rt = current_thread();
        let replies = rt
            .block_on(pool.call_raw(
                Bytes::from(commands(&[&["SET", "a", "1"], &["GET", "a"]])),
                2,
                Duration::from_secs(1),
            ))
            .expect("call");
        assert_eq!(&replies[..], b"+OK\r\n$1\r\n1\r\n");
        rt.block_on(pool.ping(Duration::from_secs(1)))
            .expect("ping");
    }

    #[test]
    fn requests_are_pipelined_on_one_connection() {
        // Answers only once both PINGs have arrived: a pool that waited for each reply before
        // writing the next request would time out here.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = probe.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            let Ok((mut s, _)) = probe.accept() else {
                return;
            };
            let ping = encode_command(&["PING"]);
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            while got.len() < 2 * ping.len() {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(b"+PONG\r\n+PONG\r\n");
            std::thread::sleep(Duration::from_secs(2));
        });
        let pool = RedisPool::new(RedisEndpoint::new("127.0.0.1", port), 1);
        let rt = current_thread();
        rt.block_on(async {
            let a = pool.clone();
            let b = pool.clone();
            let first = tokio::spawn(async move { a.ping(Duration::from_secs(2)).await });
            let second = tokio::spawn(async move { b.ping(Duration::from_secs(2)).await });
            first.await.expect("task").expect("first ping");
            second.await.expect("task").expect("second ping");
        });
    }

    #[test]
    fn many_concurrent_calls_over_one_connection_each_get_their_own_replies() {
        let redis = RedisServer::start();
        let pool = RedisPool::new(RedisEndpoint::from_url(&redis.url()).expect("url"), 1);
        let rt = current_thread();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for i in 0..200 {
                let pool = pool.clone();
                tasks.push(tokio::spawn(async move {
                    let key = format!("k{i}");
                    let body = commands(&[&["INCRBY", &key, &i.to_string()], &["GET", &key]]);
                    (
                        i,
                        pool.call_raw(Bytes::from(body), 2, Duration::from_secs(2))
                            .await,
                    )
                }));
            }
            for t in tasks {
                let (i, reply) = t.await.expect("task");
                let reply = reply.expect("call");
                let n = i.to_string();
                assert_eq!(reply, format!(":{i}\r\n${}\r\n{n}\r\n", n.len()).as_bytes());
            }
        });
        assert_eq!(redis.cli(&["CLIENT", "LIST"]).lines().count(), 2);
    }

    #[test]
    fn bad_requests_are_refused_before_anything_is_sent() {
        let redis = RedisServer::start();
        let pool = RedisPool::new(RedisEndpoint::from_url(&redis.url()).expect("url"), 1);
        let rt = current_thread();
        let call = |body: Vec<u8>, count: usize| {
            rt.block_on(pool.call_raw(Bytes::from(body), count, Duration::from_secs(1)))
        };
        let mismatch = call(commands(&[&["SET", "x", "1"], &["PING"]]), 1).expect_err("count");
        assert_eq!(mismatch.kind(), PoolErrorKind::InvalidRequest);
        assert!(mismatch.to_string().contains("2 commands"), "{mismatch}");
        for unsafe_cmd in [
            &["SUBSCRIBE", "c"][..],
            &["SELECT", "2"],
            &["MULTI"],
            &["BLPOP", "l", "0"],
        ] {
            let body = commands(&[&["SET", "x", "1"], unsafe_cmd]);
            let err = call(body.clone(), 2).expect_err("unsafe");
            assert!(err.is_invalid_request(), "{err}");
            assert!(err.to_string().contains(unsafe_cmd[0]), "{err}");
            // A caller that parsed the body itself gets the same refusal.
            let parsed = krowoc_relay::pool::parse_commands(&body).expect("well formed");
            let err = rt
                .block_on(pool.call_parsed(Bytes::from(body), &parsed, Duration::from_secs(1)))
                .expect_err("unsafe");
            assert!(
                err.is_invalid_request() && err.to_string().contains(unsafe_cmd[0]),
                "{err}"
            );
        }
        let malformed = call(b"*1\r\n$4\r\nPI".to_vec(), 1).expect_err("malformed");
        assert!(malformed.to_string().contains("incomplete"), "{malformed}");
        assert_eq!(redis.int(&["EXISTS", "x"]), 0);
        assert_eq!(call(Vec::new(), 0).expect("nothing to do").len(), 0);
    }

    #[test]
    fn call_counts_the_commands_it_sends_and_refuses_what_call_raw_refuses() {
        let redis = RedisServer::start();
        let pool = RedisPool::new(RedisEndpoint::from_url(&redis.url()).expect("url"), 1);
        let rt = current_thread();
        let call =
            |body: Vec<u8>| rt.block_on(pool.call(Bytes::from(body), Duration::from_secs(1)));
        let replies = call(commands(&[
            &["SET", "c", "1"],
            &["INCR", "c"],
            &["GET", "c"],
        ]))
        .expect("three commands");
        assert_eq!(&replies[..], b"+OK\r\n:2\r\n$1\r\n2\r\n");
        let unsafe_cmd = call(commands(&[&["SET", "c", "9"], &["MULTI"]])).expect_err("unsafe");
        assert!(unsafe_cmd.is_invalid_request(), "{unsafe_cmd}");
        let malformed = call(b"*1\r\n+PING\r\n".to_vec()).expect_err("malformed");
        assert!(malformed.is_invalid_request(), "{malformed}");
        assert_eq!(redis.cli(&["GET", "c"]).trim(), "2");
        assert_eq!(call(Vec::new()).expect("nothing to do").len(), 0);
    }

    #[test]
    fn an_unreachable_redis_fails_fast_and_the_error_names_it() {
        let port = testkit::free_port();
        let pool = RedisPool::new(RedisEndpoint::new("127.0.0.1", port), 1);
        let rt = current_thread();
        let started = Instant::now();
        let err = rt
            .block_on(pool.ping(Duration::from_secs(5)))
            .expect_err("nothing listens");
        assert!(err.is_unreachable(), "{err}");
        assert!(!err.is_timeout());
        assert!(
            err.to_string()
                .contains(&format!("redis at 127.0.0.1:{port}: unreachable")),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
}
