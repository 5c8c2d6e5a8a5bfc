//! A small W3C WebDriver client for chromedriver: plain HTTP and JSON (testkit's blocking HTTP
//! client), one request per command, no browser library. Enough to open a page, find elements
//! by CSS selector, click, type, run a script that reads the page, read the browser's console
//! and take a screenshot.

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// The key of an element reference in WebDriver's JSON.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Headless Chromium as this machine runs it as root: no sandbox, no GPU, and none of the
/// background connections (updates, sync, QUIC probes) that a closed network refuses.
pub const CHROMIUM_FLAGS: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// One browser session of a chromedriver listening on `driver`.
pub struct Session {
    driver: SocketAddr,
    id: String,
}

/// An element of the current page.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Session {
    /// Starts Chromium (`binary`) through chromedriver with [`CHROMIUM_FLAGS`], a profile in
    /// `profile` (empty and new) and a window of `width`×`height`.
    pub fn start(
        driver: SocketAddr,
        binary: &Path,
        profile: &Path,
        (width, height): (u32, u32),
    ) -> Result<Session> {
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| f.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        args.push(format!("--window-size={width},{height}"));
        let capabilities = json!({
            "capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": binary, "args": args},
                "goog:loggingPrefs": {"browser": "ALL"},
                "timeouts": {"pageLoad": 15_000, "script": 5_000, "implicit": 0},
            }}
        });
        let value = command(driver, "POST", "/session", Some(&capabilities))
            .context("chromedriver could not start Chromium")?;
        let id = value["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("a new session without an id: {value}"))?
            .to_string();
        Ok(Session { driver, id })
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        command(
            self.driver,
            method,
            &format!("/session/{}{path}", self.id),
            body,
        )
    }

    /// Loads `url` and waits for it (the session's page-load timeout bounds the wait).
    pub fn open(&self, url: &str) -> Result<()> {
        self.call("POST", "/url", Some(&json!({ "url": url })))
            .map(|_| ())
            .with_context(|| format!("opening {url}"))
    }

    /// The first element matching the CSS `selector`.
    pub fn find(&self, selector: &str) -> Result<Element> {
        let value = self
            .call(
                "POST",
                "/element",
                Some(&json!({"using": "css selector", "value": selector})),
            )
            .with_context(|| format!("finding {selector}"))?;
        value[ELEMENT_KEY]
            .as_str()
            .map(|id| Element(id.to_string()))
            .ok_or_else(|| anyhow!("no element reference for {selector}: {value}"))
    }

    /// Clicks the element matching `selector`, as a user would (WebDriver's element click).
    pub fn click(&self, selector: &str) -> Result<()> {
        let element = self.find(selector)?;
        self.call(
            "POST",
            &format!("/element/{}/click", element.0),
            Some(&json!({})),
        )
        .with_context(|| format!("clicking {selector}"))
        .map(|_| ())
    }

    /// Replaces the text of the input matching `selector` by typing `text`.
    pub fn type_into(&self, selector: &str, text: &str) -> Result<()> {
        let element = self.find(selector)?;
        self.call(
            "POST",
            &format!("/element/{}/clear", element.0),
            Some(&json!({})),
        )
        .with_context(|| format!("clearing {selector}"))?;
        self.call(
            "POST",
            &format!("/element/{}/value", element.0),
            Some(&json!({ "text": text })),
        )
        .with_context(|| format!("typing into {selector}"))
        .map(|_| ())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page; its return value.
    pub fn script(&self, script: &str, args: &[Value]) -> Result<Value> {
        self.call(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
        .context("running a script in the page")
    }

    /// Runs `script` until it returns something other than `null` or `false`, every 50 ms for at
    /// most `timeout`; that value, or an error naming `what` with the last value seen.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        script: &str,
        args: &[Value],
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.script(script, args)?;
            if !matches!(value, Value::Null | Value::Bool(false)) {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The browser console's entries since the last call (chromedriver's log endpoint).
    pub fn console(&self) -> Result<Vec<Value>> {
        let value = self.call("POST", "/se/log", Some(&json!({"type": "browser"})))?;
        Ok(value.as_array().cloned().unwrap_or_default())
    }

    /// A PNG of the window.
    pub fn screenshot(&self) -> Result<Vec<u8>> {
        let value = self.call("GET", "/screenshot", None)?;
        let text = value
            .as_str()
            .ok_or_else(|| anyhow!("a screenshot that is not base64 text"))?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .context("decoding the screenshot")
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Closes Chromium; chromedriver stops it if this fails.
        if let Err(e) = self.call("DELETE", "", None) {
            eprintln!("xtask: closing the browser session: {e:#}");
        }
    }
}

/// Whether chromedriver at `driver` says it is ready for a new session.
pub fn ready(driver: SocketAddr) -> bool {
    command(driver, "GET", "/status", None).is_ok_and(|v| v["ready"] == json!(true))
}

/// One WebDriver command: its `value`, or an error with WebDriver's `error` and `message`.
fn command(driver: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let headers = [("content-type", "application/json; charset=utf-8")];
    let response = testkit::http::try_request(driver, method, path, &headers, body.as_bytes())
        .with_context(|| format!("{method} {path} to chromedriver at {driver}"))?;
    let reply: Value = serde_json::from_slice(&response.body).with_context(|| {
        format!(
            "{method} {path}: chromedriver answered {} with {:?}",
            response.status,
            response.text()
        )
    })?;
    let value = reply["value"].clone();
    if response.status != 200 {
        let error = value["error"].as_str().unwrap_or("unknown error");
        let message = value["message"].as_str().unwrap_or_default();
        let first_line = message.lines().next().unwrap_or_default();
        bail!("{method} {path}: {error}: {first_line}");
    }
    Ok(value)
}
