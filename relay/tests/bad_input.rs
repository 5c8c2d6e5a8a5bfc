//! The relay's bad-input table against a real redis-server: no or a wrong token, every command
//! it refuses, scripts not on its list, bodies and command counts over the limits, and RESP it
//! cannot read. Each case gets its status and a plain-text reason; after each one a good PING
//! is answered, and at the end Redis holds exactly what it held before (no refused request
//! reached it).

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use testkit::{encode_command, RedisServer};

use krowoc_relay::pool::{RedisEndpoint, SHARED_CONNECTION_UNSAFE};
use krowoc_relay::scripts::sha1_hex;
use krowoc_relay::{serve, RelayConfig, ALWAYS_REFUSED, TOKEN_HEADER};

const TOKEN: &str = "relay-token-for-bad-input";
const MAX_BODY: usize = 4096;
const MAX_COMMANDS: usize = 8;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// One request to the relay and what it must get.
struct Case {
    name: String,
    method: Method,
    path: &'static str,
    token: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    /// A part of the plain-text reason.
    reason: String,
}

fn resp(name: impl Into<String>, body: Vec<u8>, status: u16, reason: impl Into<String>) -> Case {
    Case {
        name: name.into(),
        method: Method::POST,
        path: "/resp",
        token: Some(TOKEN),
        body,
        status,
        reason: reason.into(),
    }
}

/// `cmd` after a SET that must not run either: a request is refused whole.
fn after_a_write(cmd: &[&str]) -> Vec<u8> {
    [
        encode_command(&["SET", "written", "1"]),
        encode_command(cmd),
    ]
    .concat()
}

const HOSTILE_SCRIPTS: [&str; 3] = [
    "return redis.call('FLUSHALL')",
    "while true do end",
    "redis.call('SET', 'forged', '1') return 1",
];

fn cases() -> Vec<Case> {
    let ping = encode_command(&["PING"]);
    let mut out = vec![
        // -- the token
        Case {
            token: None,
            ..resp(
                "no token",
                ping.clone(),
                403,
                format!("missing {TOKEN_HEADER}"),
            )
        },
        Case {
            token: Some("wrong"),
            ..resp(
                "wrong token",
                ping.clone(),
                403,
                format!("wrong {TOKEN_HEADER}"),
            )
        },
        Case {
            token: Some(""),
            ..resp("empty token", ping.clone(), 403, "wrong")
        },
        Case {
            token: Some("RELAY-TOKEN-FOR-BAD-INPUT"),
            ..resp("token in other case", ping.clone(), 403, "wrong")
        },
        Case {
            token: Some("relay-token-for-bad-inpu"),
            ..resp("token prefix", ping.clone(), 403, "wrong")
        },
        Case {
            token: Some("relay-token-for-bad-input2"),
            ..resp("token with more after it", ping.clone(), 403, "wrong")
        },
        Case {
            token: None,
            ..resp(
                "no token with a refused command",
                encode_command(&["FLUSHALL"]),
                403,
                "missing",
            )
        },
        // -- the HTTP surface
        Case {
            method: Method::GET,
            ..resp("get instead of post", Vec::new(), 405, "use POST")
        },
        Case {
            path: "/eval",
            ..resp("another path", ping.clone(), 404, "no such path")
        },
    ];
    // -- every command the relay always refuses, and those its pool cannot share
    let mut refused: Vec<&str> = ALWAYS_REFUSED.to_vec();
    for name in SHARED_CONNECTION_UNSAFE {
        if !refused.contains(name) {
            refused.push(name);
        }
    }
    for name in refused {
        out.push(resp(
            format!("refused {name}"),
            after_a_write(&[name, "x"]),
            403,
            format!("command {name} is refused by the relay"),
        ));
    }
    // Lower case is the same command.
    out.push(resp(
        "refused flushall in lower case",
        after_a_write(&["flushall"]),
        403,
        "command FLUSHALL is refused",
    ));
    for name in [
        "LPUSH",
        "INFO",
        "DBSIZE",
        "RANDOMKEY",
        "EVAL_RO",
        "EVALSHA_RO",
    ] {
        out.push(resp(
            format!("not allowed {name}"),
            after_a_write(&[name, "x"]),
            403,
            format!("command {name} is not in the relay's allow-list"),
        ));
    }
    for sub in ["FLUSH", "KILL", "DEBUG"] {
        out.push(resp(
            format!("SCRIPT {sub}"),
            after_a_write(&["SCRIPT", sub]),
            403,
            format!("command SCRIPT {sub} is refused"),
        ));
    }
    out.push(resp(
        "SCRIPT without a subcommand",
        after_a_write(&["SCRIPT"]),
        403,
        "without LOAD or EXISTS",
    ));
    // -- scripts not on the relay's list: 403 naming the SHA1
    for (i, script) in HOSTILE_SCRIPTS.iter().enumerate() {
        let sha = sha1_hex(script.as_bytes());
        out.push(resp(
            format!("unknown script {i} by EVAL"),
            after_a_write(&["EVAL", script, "0"]),
            403,
            sha.clone(),
        ));
        out.push(resp(
            format!("unknown script {i} by EVALSHA"),
            after_a_write(&["EVALSHA", &sha, "0"]),
            403,
            sha.clone(),
        ));
        out.push(resp(
            format!("unknown script {i} by SCRIPT LOAD"),
            after_a_write(&["SCRIPT", "LOAD", script]),
            403,
            format!("script {sha} is not one of the relay's scripts"),
        ));
    }
    let sha = sha1_hex(HOSTILE_SCRIPTS[0].as_bytes());
    out.push(resp(
        "unknown script by EVALSHA in upper case",
        after_a_write(&["EVALSHA", &sha.to_ascii_uppercase(), "0"]),
        403,
        "not one of the relay's scripts",
    ));
    // -- limits
    let big = "v".repeat(MAX_BODY);
    out.push(resp(
        "body over the limit",
        encode_command(&["SET", "big", &big]),
        413,
        format!("limit of {MAX_BODY} bytes"),
    ));
    out.push(resp(
        "too many commands",
        ping.repeat(MAX_COMMANDS + 1),
        413,
        format!("limit of {MAX_COMMANDS} commands"),
    ));
    // -- RESP the relay cannot read
    let malformed: [(&str, &[u8], &str); 14] = [
        ("empty body", b"", "empty body"),
        ("inline command", b"PING\r\n", "malformed RESP in command 1"),
        (
            "inline write",
            b"SET written 1\r\n",
            "malformed RESP in command 1",
        ),
        (
            "nested array",
            b"*1\r\n*1\r\n$4\r\nPING\r\n",
            "malformed RESP in command 1",
        ),
        (
            "integer argument",
            b"*1\r\n:5\r\n",
            "malformed RESP in command 1",
        ),
        (
            "simple string argument",
            b"*1\r\n+PING\r\n",
            "malformed RESP",
        ),
        ("empty array", b"*0\r\n", "empty command"),
        ("null array", b"*-1\r\n", "not a non-negative number"),
        (
            "empty command name",
            b"*1\r\n$0\r\n\r\n",
            "empty command name",
        ),
        (
            "bulk longer than sent",
            b"*1\r\n$10\r\nPING\r\n",
            "incomplete RESP",
        ),
        (
            "bulk not followed by crlf",
            b"*1\r\n$4\r\nPINGXX\r\n",
            "not followed by CRLF",
        ),
        (
            "length not digits",
            b"*1\r\n$4x\r\nPING\r\n",
            "not a non-negative number",
        ),
        ("RESP3 set type", b"~1\r\n$4\r\nPING\r\n", "malformed RESP"),
        ("binary garbage", b"\x00\xff\xfe\r\n\r\n", "malformed RESP"),
    ];
    for (name, body, reason) in malformed {
        out.push(resp(name, body.to_vec(), 400, reason));
    }
    out.push(resp(
        "a good command then a cut-off one",
        [ping.clone(), b"*2\r\n$3\r\nGET\r\n$4\r\nab".to_vec()].concat(),
        400,
        "ends inside command 2",
    ));
    out.push(resp(
        "array longer than sent",
        b"*99999999999\r\n$4\r\nPING\r\n".to_vec(),
        400,
        "RESP",
    ));
    out
}

async fn send(client: &HttpClient, addr: SocketAddr, c: &Case) -> (u16, String) {
    let mut req = Request::builder()
        .method(c.method.clone())
        .uri(format!("http://{addr}{}", c.path))
        .header("content-type", "application/x-resp");
    if let Some(t) = c.token {
        req = req.header(TOKEN_HEADER, t);
    }
    let req = req
        .body(Full::new(Bytes::from(c.body.clone())))
        .expect("request");
    let resp = client.request(req).await.expect("the relay answers");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn each_bad_request_is_refused_with_its_reason_and_redis_is_untouched() {
    let redis = RedisServer::start();
    redis.cli(&["SET", "guard", "still-here"]);
    let mut config = RelayConfig::new(RedisEndpoint::from_url(&redis.url()).expect("redis url"));
    config.token = Some(TOKEN.into());
    config.max_body_bytes = MAX_BODY;
    config.max_commands = MAX_COMMANDS;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(serve(listener, config));
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let ping = resp("good ping", encode_command(&["PING"]), 200, "+PONG");

    let table = cases();
    assert!(table.len() >= 60, "{} cases", table.len());
    let mut failures = Vec::new();
    for c in &table {
        let (status, text) = send(&client, addr, c).await;
        if status != c.status || !text.contains(&c.reason) {
            failures.push(format!(
                "{}: want {} {:?}, got {status} {text:?}",
                c.name, c.status, c.reason
            ));
        }
        let (status, text) = send(&client, addr, &ping).await;
        if status != 200 || text != "+PONG\r\n" {
            failures.push(format!("after {}: PING got {status} {text:?}", c.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases answered otherwise:\n  {}",
        failures.len(),
        table.len(),
        failures.join("\n  ")
    );

    // Nothing of a refused request reached Redis: no write, no wipe, no script, no BUSY.
    assert_eq!(redis.cli(&["PING"]), "PONG");
    assert_eq!(redis.cli(&["GET", "guard"]), "still-here");
    assert_eq!(redis.int(&["EXISTS", "written", "forged", "big"]), 0);
    assert_eq!(redis.int(&["DBSIZE"]), 1);
    for script in HOSTILE_SCRIPTS {
        let sha = sha1_hex(script.as_bytes());
        assert_eq!(redis.cli(&["SCRIPT", "EXISTS", &sha]), "0", "{script}");
    }
    task.abort();
}
