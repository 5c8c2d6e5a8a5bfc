//! `cargo xtask browser-test`: the demo page in a real browser. Headless Chromium, driven
//! through chromedriver over WebDriver ([`crate::webdriver`]), opens `/demo` through the demo's
//! gateway and uses it as a person would: it clicks "rate limited" six times and sees the 429
//! with its `Retry-After`, loads the cached data twice and sees `MISS` then `HIT`, publishes a
//! note and sees it arrive in the live feed, with the request events of those clicks. The page
//! must log no script error and no Content-Security-Policy violation. A screenshot of the page
//! at the end goes to `<target>/browser/demo.png`, chromedriver's log beside it.
//!
//! It uses a demo that already serves the page on the gateway's port, else starts one on
//! Envoy; `cargo xtask test` runs it on the demo of its Envoy tour (Redis flushed first, so the
//! rate limit and the cache start empty as on a fresh demo). Every wait is bounded.

use crate::cli::{DemoHost, DemoRedis, SetupOptions};
use crate::demo::{self, Demo, GATEWAY_PORT};
use crate::procs::{self, loopback, ServiceSpec, Services, TempDir};
use crate::setup::{self, Browser};
use crate::webdriver::{self, Session};
use crate::workspace::Workspace;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The screenshot's size: the page's three columns side by side.
const WINDOW: (u32, u32) = (1500, 1150);
/// How long the page may take to connect its feed (Chromium's first start included).
const PAGE_READY: Duration = Duration::from_secs(20);
/// How long one answer, or one event in the feed, may take (`/api/cached-data` takes 1 s).
const ANSWER: Duration = Duration::from_secs(10);

/// `cargo xtask browser-test`.
pub fn run(setup: &SetupOptions) -> Result<ExitCode> {
    let browser = setup::ensure_browser(setup)?;
    let url = page_url();
    if serves_the_page() {
        let ws = Workspace::load()?;
        eprintln!(
            "xtask: browser test: a demo already serves {url}; using it (requests it served \
             before may have spent the rate limit's window)"
        );
        return Ok(exit_code(run_on(&ws, &browser, false)?));
    }
    let (ws, builds) = demo::prepare(setup, DemoHost::Envoy, DemoRedis::Single)?;
    let mut demo = Demo::start(&ws, &builds, DemoHost::Envoy, DemoRedis::Single, false)?;
    let passed = run_on(&ws, &browser, true);
    let alive = demo.check_alive();
    demo.stop();
    alive.context("a demo service exited during the browser test")?;
    Ok(exit_code(passed?))
}

fn exit_code(passed: bool) -> ExitCode {
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn page_url() -> String {
    format!("http://{}/demo", loopback(GATEWAY_PORT))
}

/// Whether something on the gateway's port answers `/demo` with the page.
fn serves_the_page() -> bool {
    testkit::http::try_request(loopback(GATEWAY_PORT), "GET", "/demo", &[], b"").is_ok_and(|r| {
        r.status == 200
            && r.header("content-type")
                .is_some_and(|t| t.starts_with("text/html"))
    })
}

/// Runs the browser against the demo serving on the gateway's port; false when a check failed
/// (each is reported). `fresh`: the demo's rate limit and cache are empty, so exactly the sixth
/// click is refused.
pub fn run_on(ws: &Workspace, browser: &Browser, fresh: bool) -> Result<bool> {
    let started = Instant::now();
    let dir = ws.target_dir.join("browser");
    let profile = TempDir::fresh(&dir, "profile")?;
    let screenshot = dir.join("demo.png");
    let _ = std::fs::remove_file(&screenshot);

    let mut services = Services::new(&dir, false)?;
    let port = procs::free_port()?;
    let mut driver = Command::new(&browser.chromedriver);
    driver.args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()]);
    services.start(ServiceSpec {
        name: "chromedriver".into(),
        command: driver,
        ready_addr: loopback(port),
        ready_line: Some("ChromeDriver was started successfully".into()),
        startup_timeout: Duration::from_secs(20),
    })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !webdriver::ready(loopback(port)) {
        if Instant::now() >= deadline {
            bail!("chromedriver on {port} did not become ready in 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let session = Session::start(loopback(port), &browser.chromium, profile.path(), WINDOW)?;
    eprintln!(
        "xtask: browser test: Chromium is up ({:.1}s); opening {}",
        started.elapsed().as_secs_f64(),
        page_url()
    );

    let mut report = Report::default();
    let used = use_the_page(&session, fresh, &mut report);
    if let Err(e) = &used {
        report.fail(format!("{e:#}"));
    }
    match session
        .screenshot()
        .and_then(|png| write(&screenshot, &png))
    {
        Ok(()) => eprintln!("xtask: browser test: screenshot {}", screenshot.display()),
        Err(e) => report.fail(format!("no screenshot: {e:#}")),
    }
    drop(session);
    services.stop_all();
    let took = started.elapsed().as_secs_f64();
    if report.failures > 0 {
        eprintln!(
            "xtask: browser test: {} check(s) failed ({took:.1}s; chromedriver's log in {})",
            report.failures,
            dir.display()
        );
        return Ok(false);
    }
    eprintln!("xtask: browser test: the page did all it should ({took:.1}s)");
    Ok(true)
}

fn write(path: &PathBuf, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// What the checks found, printed as they go.
#[derive(Default)]
struct Report {
    failures: usize,
}

impl Report {
    fn ok(&mut self, what: impl AsRef<str>) {
        eprintln!("xtask: browser test: ok   {}", what.as_ref());
    }

    fn fail(&mut self, what: impl AsRef<str>) {
        self.failures += 1;
        eprintln!("xtask: browser test: FAIL {}", what.as_ref());
    }

    fn check(&mut self, passed: bool, what: impl AsRef<str>) {
        if passed {
            self.ok(what)
        } else {
            self.fail(what)
        }
    }
}

/// The answers shown for one endpoint, in the order of the clicks: `{n, status, headers}`.
const ANSWERS: &str = "
    const items = document.querySelectorAll('#answer-list li[data-endpoint=\"' + arguments[0] + '\"]');
    return Array.from(items).map((li) => ({
        n: Number(li.dataset.n),
        status: Number(li.dataset.status),
        headers: Object.fromEntries(Array.from(li.querySelectorAll('dd'))
            .map((dd) => [dd.dataset.header, dd.textContent])),
    })).sort((a, b) => a.n - b.n);";

/// The number of answers shown for one endpoint, once it is at least `arguments[1]`.
const ANSWERED: &str = "
    const n = document.querySelectorAll('#answer-list li[data-endpoint=\"' + arguments[0] + '\"]').length;
    return n >= arguments[1] ? n : null;";

/// The text of the first feed item matching a selector (and containing a text, if given).
const FEED_ITEM: &str = "
    const items = Array.from(document.querySelectorAll('#feed-list ' + arguments[0]));
    const item = items.find((li) => !arguments[1] || li.textContent.includes(arguments[1]));
    return item ? item.textContent : null;";

/// Clicks `button` and waits until its answer is shown; all of that endpoint's answers.
fn click_and_wait(session: &Session, button: &str) -> Result<Vec<Value>> {
    let before = session.script(ANSWERED, &[json!(button), json!(0)])?;
    let before = before.as_u64().unwrap_or(0);
    session.click(&format!("#{button}"))?;
    session.wait_for(
        &format!("the answer to {button}"),
        ANSWER,
        ANSWERED,
        &[json!(button), json!(before + 1)],
    )?;
    let answers = session.script(ANSWERS, &[json!(button)])?;
    Ok(answers.as_array().cloned().unwrap_or_default())
}

fn use_the_page(session: &Session, fresh: bool, report: &mut Report) -> Result<()> {
    session.open(&page_url())?;
    let status = session.wait_for(
        "the feed to be live",
        PAGE_READY,
        "const s = document.getElementById('feed-status');
         return s.dataset.state === 'subscribed' ? s.textContent : null;",
        &[],
    )?;
    report.ok(format!("the page loaded and its feed is live ({status})"));

    // The guide's @RateLimiter.limit(5, 60): six clicks, the sixth refused by the filter.
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers = click_and_wait(session, "rate-limited")?;
    }
    let statuses: Vec<u64> = answers
        .iter()
        .filter_map(|a| a["status"].as_u64())
        .collect();
    let refused_from = statuses.iter().position(|s| *s == 429);
    let shape_ok = match refused_from {
        Some(i) => {
            statuses[..i].iter().all(|s| *s == 200) && statuses[i..].iter().all(|s| *s == 429)
        }
        None => false,
    };
    let expected = if fresh {
        statuses == [200, 200, 200, 200, 200, 429]
    } else {
        shape_ok && statuses.len() == 6
    };
    report.check(
        expected,
        format!("six clicks on \"rate limited\" answered {statuses:?}"),
    );
    let last = answers.last().cloned().unwrap_or(Value::Null);
    let retry_after = last["headers"]["retry-after"].as_str().unwrap_or_default();
    report.check(
        last["status"] == 429 && retry_after.parse::<u64>().is_ok_and(|s| s > 0),
        format!("the 429 shows retry-after: {retry_after:?}"),
    );
    let policy = last["headers"]["ratelimit-policy"]
        .as_str()
        .unwrap_or_default();
    report.check(
        policy.contains("\"per_minute\";q=5;w=60"),
        format!("the 429 shows ratelimit-policy: {policy:?}"),
    );

    // The guide's @cache(ttl=60): a user of our own, so the first call is a miss on any demo.
    let user = format!("browser-{}", unix_ms());
    session.type_into("#user-id", &user)?;
    click_and_wait(session, "cached-data")?;
    let answers = click_and_wait(session, "cached-data")?;
    let caches: Vec<&str> = answers
        .iter()
        .map(|a| a["headers"]["x-cache"].as_str().unwrap_or("(none)"))
        .collect();
    report.check(
        caches == ["MISS", "HIT"],
        format!("\"cached data\" for {user} twice shows x-cache {caches:?}"),
    );
    let cache_status = answers
        .last()
        .and_then(|a| a["headers"]["cache-status"].as_str())
        .unwrap_or_default()
        .to_string();
    report.check(
        cache_status.starts_with("krowoc; hit"),
        format!("the hit shows cache-status: {cache_status:?}"),
    );

    // RedisPubSub.publish: the note arrives in the live feed.
    let note = format!("browser note {}", unix_ms());
    session.type_into("#note", &note)?;
    let published = click_and_wait(session, "publish-event")?;
    report.check(
        published.last().is_some_and(|a| a["status"] == 200),
        "\"publish event\" answered 200",
    );
    let arrived = session.wait_for(
        "the note in the feed",
        ANSWER,
        FEED_ITEM,
        &[json!("li[data-channel=\"app:events\"]"), json!(note)],
    )?;
    report.ok(format!("the note arrived in the feed: {arrived:?}"));

    // The filter's request events for those clicks arrive on the same feed.
    for (selector, what) in [
        (
            "li[data-path=\"/api/rate-limited\"][data-status=\"429\"]",
            "the refused click's request event",
        ),
        (
            "li[data-path=\"/api/cached-data\"][data-cache=\"HIT\"]",
            "the cache hit's request event",
        ),
        (
            "li[data-path=\"/api/publish-event\"][data-status=\"200\"]",
            "the publish click's request event",
        ),
    ] {
        let item = session.wait_for(what, ANSWER, FEED_ITEM, &[json!(selector), json!("")])?;
        report.ok(format!("{what} is in the feed: {item:?}"));
    }

    // Under its Content-Security-Policy the page ran without a violation or a script error
    // (a 429's "failed to load resource" is the network's entry, not the page's).
    let console = session.console()?;
    let problems: Vec<String> = console
        .iter()
        .filter(|e| {
            let message = e["message"].as_str().unwrap_or_default();
            e["source"] == "javascript"
                || message.contains("Content Security Policy")
                || (e["level"] == "SEVERE" && e["source"] != "network")
        })
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect();
    report.check(
        problems.is_empty(),
        format!(
            "the console shows no script error or policy violation ({} entries){}",
            console.len(),
            if problems.is_empty() {
                String::new()
            } else {
                format!(": {problems:?}")
            }
        ),
    );
    Ok(())
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}
