//! `GET /demo`: the page and its files, each with a strict Content-Security-Policy and
//! `nosniff`; nothing inline for the policy to have to allow; and every button calls an endpoint
//! the service has.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{fast_config, get, send};
use krowoc_upstream::demo::CONTENT_SECURITY_POLICY;
use krowoc_upstream::{app, AppState};
use testkit::RedisServer;

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                      connect-src 'self'; img-src 'self'; base-uri 'none'; \
                      form-action 'none'; frame-ancestors 'none'";

fn service(redis: &RedisServer) -> axum::Router {
    app(AppState::start(fast_config(&redis.url())).expect("config"))
}

/// The values of every `name="…"` attribute in `html`, in order.
fn attribute_values<'a>(html: &'a str, name: &str) -> Vec<&'a str> {
    let marker = format!(" {name}=\"");
    html.match_indices(&marker)
        .filter_map(|(i, _)| {
            let rest = &html[i + marker.len()..];
            rest.find('"').map(|end| &rest[..end])
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_files_are_served_under_a_strict_policy() {
    assert_eq!(CONTENT_SECURITY_POLICY, POLICY);
    let redis = RedisServer::start();
    let app = service(&redis);
    for (path, content_type) in [
        ("/demo", "text/html; charset=utf-8"),
        ("/demo/app.js", "text/javascript; charset=utf-8"),
        ("/demo/app.css", "text/css; charset=utf-8"),
        ("/demo/favicon.svg", "image/svg+xml"),
    ] {
        let r = get(&app, path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
        assert_eq!(r.header("content-type"), Some(content_type), "{path}");
        assert_eq!(r.header("content-security-policy"), Some(POLICY), "{path}");
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{path}");
        // Nothing of it is stored by a cache in front (the filter honours no-store).
        assert_eq!(r.header("cache-control"), Some("no-store"), "{path}");
        assert!(!r.text.is_empty(), "{path}");
    }
    let r = get(&app, "/demo/other.js").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_has_nothing_inline_and_loads_only_its_own_files() {
    let redis = RedisServer::start();
    let app = service(&redis);
    let page = get(&app, "/demo").await.text;
    let lower = page.to_ascii_lowercase();

    // Every script is a same-origin file; no style element, style attribute or handler.
    let scripts = lower.matches("<script").count();
    assert_eq!(scripts, 1, "one script");
    assert!(lower.contains(r#"<script src="/demo/app.js" defer></script>"#));
    assert!(!lower.contains("<style"), "a style element");
    assert!(!lower.contains(" style="), "a style attribute");
    assert!(!lower.contains("javascript:"), "a javascript: URL");
    let handlers: Vec<&str> = lower
        .split(|c: char| c.is_whitespace())
        .filter(|w| w.starts_with("on") && w.contains('='))
        .collect();
    assert!(handlers.is_empty(), "inline handlers: {handlers:?}");
    let mut linked = attribute_values(&page, "href");
    linked.extend(attribute_values(&page, "src"));
    linked.sort_unstable();
    assert_eq!(
        linked,
        vec!["/demo/app.css", "/demo/app.js", "/demo/favicon.svg"]
    );
    for file in &linked {
        assert_eq!(get(&app, file).await.status, StatusCode::OK, "{file}");
    }

    // The script talks to its own origin only, and never builds HTML from text.
    let script = get(&app, "/demo/app.js").await.text;
    for banned in [
        "http:",
        "https:",
        "ws:",
        "innerHTML",
        "outerHTML",
        "eval(",
        "document.write",
    ] {
        assert!(!script.contains(banned), "app.js uses {banned}");
    }
    assert!(script.contains(r#"new EventSource("/api/events/stream")"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_button_calls_one_of_the_guides_endpoints() {
    let redis = RedisServer::start();
    let app = service(&redis);
    let page = get(&app, "/demo").await.text;
    let methods = attribute_values(&page, "data-method");
    let paths = attribute_values(&page, "data-path");
    let buttons: Vec<(&str, &str)> = methods.into_iter().zip(paths).collect();
    assert_eq!(
        buttons,
        vec![
            ("GET", "/api/cached-data"),
            ("POST", "/api/invalidate-cache"),
            ("POST", "/api/publish-event"),
            ("GET", "/api/recent-events"),
            ("GET", "/api/rate-limited"),
            ("GET", "/api/slow-limited"),
        ]
    );
    for (method, path) in buttons {
        let body = match path {
            "/api/invalidate-cache" => r#"{"user_id":"42"}"#,
            "/api/publish-event" => r#"{"channel":"app:events","message":"from the page test"}"#,
            _ => "",
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("request");
        let r = send(&app, request).await;
        assert_eq!(r.status, StatusCode::OK, "{method} {path}: {}", r.text);
    }
}
