//! What a plugin can read in which callback: header maps and properties, through the
//! abi-test-guest's `phases` scenario. The expectations are Envoy 1.40's, measured by loading the
//! same guest (built with `--no-default-features`) in Envoy 1.40 (V8) with the same requests.

mod abi_support;

use std::time::Duration;

use abi_support::{request, start, wait_for, GatewayOptions, TestGateway};
use serde_json::Value;

/// Status Ok, NotFound, BadArgument.
const OK: u64 = 0;
const NOT_FOUND: u64 = 1;
const BAD_ARGUMENT: u64 = 2;

/// For map types 0–3 (request headers, request trailers, response headers, response trailers):
/// the status of `get_header_map_pairs`, whether it listed any pair, and the status of
/// `get_header_map_value` for a name the map would hold.
fn maps(observation: &Value) -> Vec<(u64, bool, u64)> {
    (0..4)
        .map(|m| {
            let v = &observation["maps"][m.to_string()];
            let n = |i: usize| {
                v[i].as_u64()
                    .unwrap_or_else(|| panic!("map {m}: {observation}"))
            };
            (n(0), n(1) > 0, n(2))
        })
        .collect()
}

/// Map reached (pairs listed, value found).
const REACHED: (u64, bool, u64) = (OK, true, OK);
/// Map out of reach: an empty list, and BadArgument for a single value.
const OUT_OF_REACH: (u64, bool, u64) = (OK, false, BAD_ARGUMENT);
/// A map that exists but is empty (trailers in the log phase).
const EMPTY: (u64, bool, u64) = (OK, false, NOT_FOUND);

fn phases_gateway() -> TestGateway {
    start("phases", &GatewayOptions::default())
}

fn report(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "not the phases report ({e}): {:?}",
            String::from_utf8_lossy(body)
        )
    })
}

/// The log-phase record the request with `x-phase-id: id` left behind.
fn log_record(gw: &TestGateway, id: &str) -> Value {
    wait_for(Duration::from_secs(5), "the log-phase record", || {
        let (resp, _) = request(gw.addr, "GET", &format!("/report?id={id}"), &[], b"");
        (resp.status == 200).then(|| report(&resp.body))
    })
}

/// Envoy 1.40: request headers only in `on_request_headers`, response headers only in
/// `on_response_headers`, both again in the log phase; trailers never (none were sent). A map out
/// of reach lists as empty and its values are BadArgument — which the Rust SDK panics on.
#[test]
fn header_maps_are_reachable_only_in_their_own_callback_and_the_log_phase() {
    let gw = phases_gateway();
    let (resp, _) = request(
        gw.addr,
        "POST",
        "/p",
        &[("x-phase-id", "maps")],
        b"0123456789",
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let r = report(&resp.body);
    assert_eq!(
        maps(&r["rh"]),
        [REACHED, OUT_OF_REACH, OUT_OF_REACH, OUT_OF_REACH],
        "in on_request_headers"
    );
    let request_body = r["rb"].as_array().expect("request body calls");
    assert!(!request_body.is_empty());
    for call in request_body {
        assert_eq!(maps(call), [OUT_OF_REACH; 4], "in on_request_body: {call}");
    }
    assert_eq!(
        maps(&r["sh"]),
        [OUT_OF_REACH, OUT_OF_REACH, REACHED, OUT_OF_REACH],
        "in on_response_headers"
    );
    for call in r["sb"].as_array().expect("response body calls") {
        assert_eq!(maps(call), [OUT_OF_REACH; 4], "in on_response_body: {call}");
    }
    assert_eq!(
        maps(&log_record(&gw, "maps")),
        [REACHED, EMPTY, REACHED, EMPTY],
        "in on_log"
    );
}

/// Envoy 1.40: request headers paused in `on_request_headers` stay reachable in a callout's
/// callback until the plugin resumes the request; the body callbacks after that cannot reach them.
#[test]
fn paused_request_headers_stay_reachable_in_the_callout_callback() {
    let gw = phases_gateway();
    let (resp, _) = request(gw.addr, "POST", "/pause-call", &[], b"0123456789");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let r = report(&resp.body);
    assert_eq!(maps(&r["cb"])[0], REACHED, "in the http call callback");
    for call in r["rb"].as_array().expect("request body calls") {
        assert_eq!(maps(call)[0], OUT_OF_REACH, "after the resume: {call}");
    }
}

/// A property as the guest reported it: its bytes (hex decoded), `None` for NotFound.
fn prop(observation: &Value, name: &str) -> Option<Vec<u8>> {
    let v = &observation["props"][name];
    if v.is_null() {
        return None;
    }
    let hex = v
        .as_str()
        .unwrap_or_else(|| panic!("{name}: {observation}"));
    assert!(!hex.starts_with("status"), "{name}: {hex}");
    Some(
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect(),
    )
}

fn int(v: i64) -> Option<Vec<u8>> {
    Some(v.to_le_bytes().to_vec())
}

fn text(v: &str) -> Option<Vec<u8>> {
    Some(v.as_bytes().to_vec())
}

/// Envoy 1.40 for a 10-byte POST through route `abi_route` to cluster `upstream`: 8-byte
/// integers and a 1-byte boolean; sizes as in `properties::lookup`'s notes; the upstream's
/// address once the request headers are done; no `cluster_name` / `route_name`.
#[test]
fn stream_properties_follow_envoy_in_each_phase() {
    let gw = phases_gateway();
    let (resp, _) = request(
        gw.addr,
        "POST",
        "/p",
        &[("x-phase-id", "props")],
        b"0123456789",
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let r = report(&resp.body);
    let upstream = gw.upstream.addr;
    let body_call = &r["rb"][0];
    let log = log_record(&gw, "props");
    for (phase, o) in [
        ("rh", &r["rh"]),
        ("rb", body_call),
        ("sh", &r["sh"]),
        ("log", &log),
    ] {
        assert_eq!(prop(o, "request.size"), int(10), "{phase}");
        assert_eq!(prop(o, "response.flags"), int(0), "{phase}");
        assert_eq!(prop(o, "connection.mtls"), Some(vec![0]), "{phase}");
        assert_eq!(prop(o, "cluster_name"), None, "{phase}");
        assert_eq!(prop(o, "route_name"), None, "{phase}");
        assert_eq!(prop(o, "xds.route_name"), text("abi_route"), "{phase}");
        assert_eq!(prop(o, "xds.cluster_name"), text("upstream"), "{phase}");
    }
    // Before the router picked a host there is no upstream and no response.
    assert_eq!(prop(&r["rh"], "upstream.address"), None);
    assert_eq!(prop(&r["rh"], "upstream.port"), None);
    assert_eq!(prop(&r["rh"], "response.code"), None);
    assert_eq!(prop(&r["rh"], "response.code_details"), None);
    for (phase, o) in [("rb", body_call), ("sh", &r["sh"]), ("log", &log)] {
        assert_eq!(
            prop(o, "upstream.address"),
            text(&upstream.to_string()),
            "{phase}"
        );
        assert_eq!(
            prop(o, "upstream.port"),
            int(upstream.port() as i64),
            "{phase}"
        );
    }
    for (phase, o) in [("sh", &r["sh"]), ("log", &log)] {
        assert_eq!(prop(o, "response.code"), int(200), "{phase}");
        assert_eq!(
            prop(o, "response.code_details"),
            text("via_upstream"),
            "{phase}"
        );
    }
    // Totals count the headers only while they are reachable; the body callback sees the body.
    assert_eq!(prop(body_call, "request.total_size"), int(10));
    let total =
        |o: &Value, p: &str| i64::from_le_bytes(prop(o, p).expect(p).try_into().expect("8 bytes"));
    assert!(total(&r["rh"], "request.total_size") > 10);
    assert_eq!(prop(&r["sh"], "response.size"), int(0), "nothing sent yet");
    assert!(
        total(&r["sh"], "response.total_size") > 0,
        "the response headers"
    );
    assert!(total(&log, "response.size") > 0, "the body sent");
    assert!(total(&log, "response.total_size") > total(&log, "response.size"));
}
