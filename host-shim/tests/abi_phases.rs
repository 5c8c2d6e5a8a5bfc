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
