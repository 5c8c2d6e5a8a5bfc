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

/// The names of a response's fields, in order, without the ones a host adds or not by framing.
fn field_names(resp: &testkit::http::Response) -> Vec<&str> {
    resp.headers
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !matches!(*k, "transfer-encoding" | "connection"))
        .collect()
}

krowoc_tests::on_both_hosts!(a_proxied_response_gets_the_routers_timing_and_envoys_server_last);
fn a_proxied_response_gets_the_routers_timing_and_envoys_server_last(host: Host) {
    let stack = Stack::on(host);
    let resp = stack.get("/health");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let names = field_names(&resp);
    let at = |name: &str| {
        names
            .iter()
            .position(|k| *k == name)
            .unwrap_or_else(|| panic!("no {name} in {names:?}"))
    };
    // The router's timing follows the upstream's fields and precedes the filter's own.
    assert!(
        at("content-length") < at("x-envoy-upstream-service-time"),
        "{names:?}"
    );
    assert!(
        at("x-envoy-upstream-service-time") < at("x-krowoc-edge"),
        "{names:?}"
    );
    assert!(resp
        .header("x-envoy-upstream-service-time")
        .is_some_and(|v| v.parse::<u64>().is_ok()));
    assert_eq!(names.last(), Some(&"server"), "{names:?}");
    assert_eq!(resp.header("server"), Some("envoy"));
}

krowoc_tests::on_both_hosts!(a_local_reply_has_no_router_timing_and_ends_with_date_and_server);
fn a_local_reply_has_no_router_timing_and_ends_with_date_and_server(host: Host) {
    let stack = Stack::on(host);
    // The purge API without its token: the filter's own local reply.
    let resp = stack.request("POST", "/_krowoc/cache/purge", &[], b"");
    assert_eq!(resp.status, 403, "{}", resp.text());
    let names = field_names(&resp);
    assert_eq!(
        resp.header("x-envoy-upstream-service-time"),
        None,
        "{names:?}"
    );
    assert_eq!(names[names.len() - 2..], ["date", "server"], "{names:?}");
    assert_eq!(
        resp.header("content-length"),
        Some(resp.body.len().to_string().as_str())
    );
}
