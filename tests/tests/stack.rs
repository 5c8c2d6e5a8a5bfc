//! The whole stack as `cargo xtask demo` runs it: envoy/envoy.yaml in Envoy (and in host-shim)
//! with the real plugin, in front of the real upstream, with Redis behind the relay.

use krowoc_tests::{metric_value, Host, Stack};

krowoc_tests::on_both_hosts!(gateway_serves_the_upstream_through_the_plugin);
fn gateway_serves_the_upstream_through_the_plugin(host: Host) {
    let stack = Stack::on(host);
    let resp = stack.get("/health");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.header("x-krowoc-edge"),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(resp.json()["status"], "pass");

    // The upstream's deep health check, through the gateway, sees the stack's Redis.
    let deep = stack.get("/health/deep");
    assert_eq!(deep.status, 200, "{}", deep.text());
    assert_eq!(deep.header("content-type"), Some("application/health+json"));

    // The admin listener reports readiness and counts the requests.
    let ready = testkit::http::get(stack.admin, "/ready");
    assert_eq!((ready.status, ready.text().trim()), (200, "LIVE"));
    let metrics = stack.metrics();
    let requests = match host {
        Host::HostShim => "host_shim_requests_total",
        Host::Envoy => {
            r#"envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix="gateway"}"#
        }
    };
    assert!(metric_value(&metrics, requests) >= 2, "{metrics}");
}

krowoc_tests::on_both_hosts!(unknown_paths_get_the_upstreams_404_through_the_filter);
fn unknown_paths_get_the_upstreams_404_through_the_filter(host: Host) {
    let stack = Stack::on(host);
    let resp = stack.get("/no/such/endpoint");
    assert_eq!(resp.status, 404);
    assert!(resp.header("x-krowoc-edge").is_some());
}
