//! The plugin's own cost per request in host-shim, with no network: one VM on one thread is
//! driven through a request's callbacks (context create, request headers, response headers,
//! response body, done, log, delete) over and over, as the gateway drives it, and the time per
//! request is printed. The end-to-end benchmark mixes this cost with sockets and scheduling on a
//! shared machine; this one isolates it. `cargo xtask bench` runs it; by hand:
//!
//! ```text
//! cargo run --release -p host-shim --example vm_bench -- PLUGIN.wasm '{"routes":[]}' [REQUESTS]
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use host_shim::abi::HeaderList;
use host_shim::shared::SharedState;
use host_shim::state::{StreamInfo, StreamState};
use host_shim::vm::{PluginModule, Vm, VmSettings};

// As in host-shim itself.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WARMUP: usize = 2_000;

fn headers(pairs: &[(&str, &str)]) -> HeaderList {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (plugin, config, requests) = match args.as_slice() {
        [plugin, config] => (plugin, config, 100_000),
        [plugin, config, n] => (
            plugin,
            config,
            n.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .with_context(|| format!("REQUESTS must be a positive number, not {n:?}"))?,
        ),
        _ => bail!("usage: vm_bench PLUGIN.wasm PLUGIN_CONFIG_JSON [REQUESTS]"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(PathBuf::from(plugin), config.clone(), requests))
}

async fn run(plugin: PathBuf, config: String, requests: usize) -> anyhow::Result<()> {
    let module = PluginModule::load(&plugin)?;
    let settings = VmSettings {
        plugin_name: "krowoc_edge".into(),
        root_id: "krowoc_edge".into(),
        vm_id: "bench".into(),
        vm_configuration: Vec::new(),
        plugin_configuration: config.into_bytes(),
        callback_deadline: Duration::from_secs(1),
        memory_limit_bytes: 256 << 20,
        env: Vec::new(),
        log_level: 2,
        log_file: None,
    };
    let mut vm = Vm::start(
        &module,
        &settings,
        0,
        Arc::new(SharedState::default()),
        Arc::new(HashMap::new()),
    )
    .await?;

    let client: SocketAddr = "127.0.0.1:50000".parse()?;
    let info = StreamInfo {
        source: client,
        destination: "127.0.0.1:10000".parse()?,
        connection_id: 1,
        start_time: SystemTime::now(),
        route_name: "health".into(),
        cluster_name: "upstream".into(),
        client_closes: false,
    };
    // What wrk sends and what the upstream's /health answers.
    let request = headers(&[
        (":authority", "127.0.0.1:10000"),
        (":path", "/health"),
        (":method", "GET"),
        (":scheme", "http"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "6f1c2a3e-4b5d-4c6e-8f70-8192a3b4c5d6"),
    ]);
    let response = headers(&[
        (":status", "200"),
        ("content-type", "application/health+json"),
        ("cache-control", "no-store"),
        ("content-length", "15"),
        ("date", "Thu, 26 Nov 2026 00:00:00 GMT"),
    ]);
    let body = br#"{"status":"ok"}"#.to_vec();

    let one = async |vm: &mut Vm| -> anyhow::Result<()> {
        let ctx = vm
            .create_stream(StreamState::new(info.clone(), request.clone()))
            .await?;
        vm.on_request_headers(ctx, true).await?;
        if let Some(s) = vm.stream(ctx) {
            s.response_headers = Some(response.clone());
        }
        vm.on_response_headers(ctx, false).await?;
        if let Some(s) = vm.stream(ctx) {
            s.response_body = body.clone();
        }
        vm.on_response_body(ctx, body.len(), true).await?;
        vm.finish_stream(ctx).await?;
        // Calls the plugin made (events, with a configuration that has them) go nowhere here.
        vm.take_callouts();
        Ok(())
    };
    for _ in 0..WARMUP {
        one(&mut vm).await?;
    }
    let started = Instant::now();
    for _ in 0..requests {
        one(&mut vm).await?;
    }
    let took = started.elapsed();
    let per_request = took.as_secs_f64() * 1e6 / requests as f64;
    println!(
        "vm_bench: {requests} requests in {:.3}s: {per_request:.2} µs per request (7 callbacks)",
        took.as_secs_f64()
    );
    Ok(())
}
