//! State shared across the worker VMs, driven by abi-test-guest: shared data with
//! compare-and-swap, shared queues with `on_queue_ready`, metrics (read back by the plugin, in
//! `SharedState::prometheus_text` and on the admin endpoint), and ticks (counted per VM, with an
//! HTTP call dispatched from the root context).

mod abi_support;

use std::time::{Duration, Instant};

use abi_support::{header, request, start, wait_for, GatewayOptions, TestGateway};

/// The VMs of a gateway with `workers` workers that tick and take callouts, as in Envoy 1.40
/// (measured with `--concurrency 1`: three VMs start; 1 and 2 tick): the main thread's (1) and
/// one per worker (2…). VM 0 is the base VM the others are cloned from: started and configured,
/// it never ticks and serves nothing.
fn ticking_vms(workers: u32) -> std::ops::RangeInclusive<u32> {
    1..=workers + 1
}

fn workers(n: usize) -> GatewayOptions {
    GatewayOptions {
        workers: n,
        ..GatewayOptions::default()
    }
}

// ---- shared data ----------------------------------------------------------------------------

#[test]
fn every_vm_takes_a_distinct_index_through_compare_and_swap_at_start() {
    let gw = start("shared", &workers(4));
    // The base and main-thread VMs, then four worker VMs at once, incremented one counter with
    // CAS retries: no lost update.
    assert_eq!(gw.shared_text("abi/vm_counter").as_deref(), Some("6"));
    for _ in 0..8 {
        let (resp, _) = request(gw.addr, "GET", "/get?key=none", &[], b"");
        let vm: u32 = header(&resp, "x-vm").parse().unwrap_or(99);
        assert!((2..6).contains(&vm), "requests go to worker VMs: {vm}");
    }
}

#[test]
fn shared_data_set_with_a_stale_cas_is_a_cas_mismatch() {
    let gw = start("shared", &workers(1));
    let get = |key: &str| request(gw.addr, "GET", &format!("/get?key={key}"), &[], b"").0;
    let set = |q: &str| {
        let (resp, _) = request(gw.addr, "GET", &format!("/set?{q}"), &[], b"");
        header(&resp, "x-status").to_string()
    };
    let missing = get("abi/none");
    assert_eq!(header(&missing, "x-found"), "false");
    assert_eq!(header(&missing, "x-cas"), "0");

    assert_eq!(set("key=abi/k&value=v1"), "Ok");
    let first = get("abi/k");
    assert_eq!(first.text(), "v1");
    let cas1 = header(&first, "x-cas").to_string();
    assert_ne!(cas1, "0", "a stored value has a cas");

    assert_eq!(set(&format!("key=abi/k&value=v2&cas={cas1}")), "Ok");
    assert_eq!(
        set(&format!("key=abi/k&value=v3&cas={cas1}")),
        "CasMismatch"
    );
    let now = get("abi/k");
    assert_eq!(now.text(), "v2", "the stale write changed nothing");
    assert_ne!(header(&now, "x-cas"), cas1, "every write moves the cas");
    assert_eq!(
        set("key=abi/k&value=v4"),
        "Ok",
        "cas 0 writes unconditionally"
    );
    assert_eq!(get("abi/k").text(), "v4");
}

#[test]
fn shared_data_written_by_one_vm_is_read_by_every_vm() {
    let gw = start("shared", &workers(2));
    let value = format!("probe-{}", std::process::id());
    let (resp, _) = request(
        gw.addr,
        "GET",
        &format!("/set?key=abi/probe&value={value}"),
        &[],
        b"",
    );
    assert_eq!(header(&resp, "x-status"), "Ok");
    // Each ticking VM copies abi/probe to abi/seen/<its index> on its ticks.
    for vm in ticking_vms(2) {
        let key = format!("abi/seen/{vm}");
        let seen = wait_for(Duration::from_secs(5), &key, || gw.shared_text(&key));
        assert_eq!(
            seen,
            value,
            "VM {vm} read what VM {} wrote",
            header(&resp, "x-vm")
        );
    }
}

// ---- queues ---------------------------------------------------------------------------------

fn enqueue(gw: &TestGateway, item: &str) {
    let (resp, _) = request(gw.addr, "GET", &format!("/enqueue?item={item}"), &[], b"");
    assert_eq!(resp.status, 200, "{:?}", resp.headers);
    assert_eq!(header(&resp, "x-enqueue"), "Ok");
    assert_eq!(
        header(&resp, "x-resolved-id"),
        header(&resp, "x-registered-id")
    );
}

#[test]
fn enqueued_items_wake_on_queue_ready_and_are_dequeued_in_order() {
    let gw = start("queues", &workers(1));
    let (resp, _) = request(gw.addr, "GET", "/dequeue", &[], b"");
    assert_eq!(
        header(&resp, "x-dequeued"),
        "empty",
        "an empty queue dequeues nothing"
    );
    for item in ["a", "b", "c"] {
        enqueue(&gw, item);
    }
    wait_for(Duration::from_secs(5), "a,b,c dequeued", || {
        (gw.shared_text("abi/dequeued").as_deref() == Some("a,b,c")).then_some(())
    });
}

#[test]
fn items_enqueued_on_any_vm_reach_on_queue_ready() {
    let gw = start("queues", &workers(2));
    let items: Vec<String> = (0..6).map(|i| format!("i{i}")).collect();
    for item in &items {
        enqueue(&gw, item);
    }
    wait_for(Duration::from_secs(5), "every item dequeued once", || {
        let mut got: Vec<String> = gw
            .shared_text("abi/dequeued")?
            .split(',')
            .map(str::to_string)
            .collect();
        got.sort();
        (got == items).then_some(())
    });
}

#[test]
fn an_unregistered_queue_does_not_resolve_and_cannot_be_enqueued_to() {
    let gw = start("queues", &workers(1));
    let (resp, _) = request(gw.addr, "GET", "/resolve-missing", &[], b"");
    assert_eq!(header(&resp, "x-resolved"), "none");
    let (resp, _) = request(gw.addr, "GET", "/enqueue-unknown", &[], b"");
    assert_eq!(header(&resp, "x-enqueue"), "NotFound");
}

// ---- metrics --------------------------------------------------------------------------------

#[test]
fn plugin_metrics_are_shared_by_name_across_vms_and_read_back() {
    let gw = start("metrics", &workers(2));
    let mut last = None;
    for q in ["gauge=7&hist=100", "hist=50", "inc_gauge=-2"] {
        let (resp, _) = request(gw.addr, "GET", &format!("/m?{q}"), &[], b"");
        assert_eq!(resp.status, 200);
        for h in [
            "x-increment",
            "x-record-gauge",
            "x-record-hist",
            "x-inc-gauge",
        ] {
            if let Some(v) = resp.header(h) {
                assert_eq!(v, "Ok", "{h} for {q}");
            }
        }
        last = Some(resp);
    }
    let last = last.unwrap_or_else(|| unreachable!());
    assert_eq!(
        header(&last, "x-counter"),
        "3",
        "both VMs add to the one counter"
    );
    assert_eq!(header(&last, "x-gauge"), "5", "7, then -2");

    let (resp, _) = request(gw.addr, "GET", "/m?dec_counter", &[], b"");
    assert_eq!(
        header(&resp, "x-dec-counter"),
        "BadArgument",
        "a counter only goes up"
    );
    assert_eq!(header(&resp, "x-counter"), "4");

    let text = gw.metrics_text();
    for line in [
        "# TYPE abi_requests counter",
        "abi_requests{} 4",
        "# TYPE abi_gauge gauge",
        "abi_gauge{} 5",
        "# TYPE abi_latency_ms histogram",
        "abi_latency_ms_count{} 2",
        "abi_latency_ms_sum{} 150",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
}

#[test]
fn plugin_metrics_are_served_on_the_admin_endpoint() {
    let gw = start("metrics", &workers(1));
    let (resp, _) = request(gw.addr, "GET", "/m?gauge=11", &[], b"");
    assert_eq!(resp.status, 200);

    let rt = tokio::runtime::Runtime::new().expect("admin runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the admin listener");
    let admin = listener.local_addr().expect("admin address");
    rt.spawn(host_shim::admin::serve(
        listener,
        gw.shared.clone(),
        gw.readiness(),
    ));

    let stats = testkit::http::get(admin, "/stats/prometheus");
    assert_eq!(stats.status, 200);
    let text = stats.text();
    for line in [
        "abi_requests{} 1",
        "abi_gauge{} 11",
        "host_shim_requests_total 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
    let ready = testkit::http::get(admin, "/ready");
    assert_eq!((ready.status, ready.text().trim()), (200, "LIVE"));
}

// ---- ticks ----------------------------------------------------------------------------------

fn ticks(gw: &TestGateway, vm: u32) -> u32 {
    gw.shared_text(&format!("abi/ticks/{vm}"))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

#[test]
fn ticks_fire_on_every_vm_at_the_configured_period() {
    let gw = start("ticks", &workers(2));
    for vm in ticking_vms(2) {
        wait_for(
            Duration::from_secs(5),
            &format!("3 ticks on VM {vm}"),
            || (ticks(&gw, vm) >= 3).then_some(()),
        );
    }
    // 20 ms period: about 25 ticks in half a second per VM; allow for a loaded machine.
    let before = ticks(&gw, 1);
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let fired = ticks(&gw, 1) - before;
    let ms = started.elapsed().as_millis() as u32;
    assert!(fired >= 5, "only {fired} ticks in {ms} ms");
    assert!(
        fired <= ms / 20 + 2,
        "{fired} ticks in {ms} ms is faster than the 20 ms period"
    );
    assert_eq!(ticks(&gw, 0), 0, "the base VM never ticks");
}

#[test]
fn an_http_call_dispatched_from_on_tick_is_answered_on_the_root_context() {
    let gw = start("ticks", &workers(2));
    for vm in ticking_vms(2) {
        let key = format!("abi/tick-call/{vm}");
        let deadline = Instant::now() + Duration::from_secs(5);
        let answer = loop {
            if let Some(answer) = gw.shared_text(&key) {
                break answer;
            }
            assert!(
                Instant::now() < deadline,
                "no {key} after 5 s; VMs started {:?}, ticks {} / {}, answers {:?}, upstream saw {:?}\n{}",
                gw.shared_text("abi/vm_counter"),
                ticks(&gw, 1),
                ticks(&gw, 2),
                (0..4)
                    .map(|i| gw.shared_text(&format!("abi/tick-call/{i}")))
                    .collect::<Vec<_>>(),
                gw.upstream
                    .seen()
                    .iter()
                    .map(|s| s.path.clone())
                    .collect::<Vec<_>>(),
                gw.metrics_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(answer.starts_with("200 "), "VM {vm}: {answer}");
        assert!(answer.ends_with("token-ok=true"), "VM {vm}: {answer}");
    }
    let calls = gw
        .upstream
        .seen()
        .iter()
        .filter(|s| s.path == "/tick-call")
        .count();
    assert_eq!(calls, 3, "one call from the first tick of each ticking VM");
}
