//! `cargo xtask test` (what CI runs): setup (Envoy and Chromium too), the wasm crates and
//! binaries, then formatting, clippy with warnings denied, every test in the workspace (gateway
//! tests on Envoy and on host-shim), the README's tour run against a fresh demo on each host,
//! and the browser test of the demo page on a fresh Envoy demo (skipped, saying why, where
//! Chromium cannot be installed). Each step prints its name and duration; the first failing
//! step stops the run with its exit code.

use crate::browser;
use crate::cli::{DemoHost, DemoRedis, SetupOptions};
use crate::demo::{Builds, Demo};
use crate::envoy_install;
use crate::setup::{self, Needs};
use crate::tour;
use crate::workspace::{cargo, describe, Workspace};
use anyhow::{Context, Result};
use std::ffi::OsString;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

/// Environment variables every test process gets (the e2e tests read them).
pub const ENV_PLUGIN_WASM: &str = "KROWOC_PLUGIN_WASM";
pub const ENV_WASM_DIR: &str = "KROWOC_WASM_DIR";
/// The plugin built for stock Envoy (no Higress imports); the deploy checks read its imports.
pub const ENV_STOCK_PLUGIN_WASM: &str = "KROWOC_STOCK_PLUGIN_WASM";
pub const ENV_HOST_SHIM_BIN: &str = "KROWOC_HOST_SHIM_BIN";
pub const ENV_UPSTREAM_BIN: &str = "KROWOC_UPSTREAM_BIN";

/// The cargo steps after the builds, in order (the README's Tests section lists them).
pub const CHECKS: [(&str, &[&str]); 3] = [
    ("cargo fmt --check", &["fmt", "--all", "--", "--check"]),
    (
        "cargo clippy",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    ),
    ("cargo test", &["test", "--workspace"]),
];

pub fn run(options: &SetupOptions) -> Result<ExitCode> {
    let started = Instant::now();
    let mut timings: Vec<(&str, Duration)> = Vec::new();

    let t = step("setup");
    setup::ensure(
        &Needs {
            wasm_target: true,
            redis: true,
            compose: true,
            lint_tools: true,
            curl: true,
            ..Needs::default()
        },
        options,
    )?;
    let ws = Workspace::load()?;
    let envoy = envoy_install::ensure(&ws.target_dir, options)?;
    eprintln!("xtask: Envoy {} at {}", envoy.version, envoy.path.display());
    // Without a browser only the browser test is skipped (and says so).
    let browser = setup::ensure_browser(options).map_err(|e| format!("{e:#}"));
    match &browser {
        Ok(b) => eprintln!("xtask: Chromium at {}", b.chromium.display()),
        Err(e) => eprintln!("xtask: setup: no browser, so the browser test will be skipped: {e}"),
    }
    timings.push(("setup", done("setup", t)));

    let t = step("build wasm crates");
    let wasm = ws.build_wasm()?;
    let stock_plugin = ws.build_stock_plugin()?;
    timings.push(("build wasm crates", done("build wasm crates", t)));

    let t = step("build tests and binaries");
    let bins = ws.build_tests_and_binaries()?;
    timings.push((
        "build tests and binaries",
        done("build tests and binaries", t),
    ));

    let env: Vec<(&str, OsString)> = vec![
        (ENV_PLUGIN_WASM, wasm.plugin.clone().into()),
        (ENV_WASM_DIR, wasm.dir.clone().into()),
        (ENV_STOCK_PLUGIN_WASM, stock_plugin.clone().into()),
        (ENV_HOST_SHIM_BIN, bins.host_shim.clone().into()),
        (ENV_UPSTREAM_BIN, bins.upstream.clone().into()),
        (testkit::envoy::ENV_ENVOY, envoy.path.clone().into()),
    ];
    for (k, v) in &env {
        eprintln!("xtask: tests get {k}={}", v.to_string_lossy());
    }

    for (name, args) in CHECKS {
        let t = step(name);
        let mut cmd = cargo();
        cmd.current_dir(&ws.root)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)));
        let code = run_step(&mut cmd)?;
        let took = done(name, t);
        timings.push((name, took));
        if code != 0 {
            eprintln!("xtask: step `{name}` failed with exit code {code}; stopping here");
            print_summary(&timings, started.elapsed());
            return Ok(ExitCode::from(code));
        }
    }
    // Last: the README's tour against a fresh demo on each host (the demo's fixed ports must be
    // free).
    let builds = Builds {
        wasm,
        stock_plugin,
        bins,
        envoy: Some(envoy),
    };
    // On one Redis on both hosts; on a cluster, behind Sentinel and over TLS on Envoy.
    for (name, host, redis) in [
        ("README tour (envoy)", DemoHost::Envoy, DemoRedis::Single),
        (
            "README tour (host-shim)",
            DemoHost::HostShim,
            DemoRedis::Single,
        ),
        (
            "README tour (envoy, redis cluster)",
            DemoHost::Envoy,
            DemoRedis::Cluster,
        ),
        (
            "README tour (envoy, redis sentinel)",
            DemoHost::Envoy,
            DemoRedis::Sentinel,
        ),
        (
            "README tour (envoy, redis tls)",
            DemoHost::Envoy,
            DemoRedis::Tls,
        ),
    ] {
        let t = step(name);
        let mut demo = Demo::start(&ws, &builds, host, redis, false)?;
        let toured = tour::run_against(&ws, &mut demo, host, redis);
        timings.push((name, done(name, t)));
        if !toured? {
            eprintln!("xtask: step `{name}` failed; the README and the demo disagree");
            print_summary(&timings, started.elapsed());
            return Ok(ExitCode::FAILURE);
        }
        demo.stop();
        // The browser test on a fresh Envoy demo: the tour's has left its client over the rate
        // limit, which each VM remembers past an emptied Redis.
        if (host, redis) == (DemoHost::Envoy, DemoRedis::Single) {
            let name = "browser test (envoy)";
            let t = step(name);
            let passed = match &browser {
                Ok(b) => {
                    let fresh = Demo::start(&ws, &builds, host, redis, false)?;
                    let passed = browser::run_on(&ws, b, true);
                    fresh.stop();
                    passed
                }
                Err(why) => {
                    eprintln!("xtask: step `{name}` skipped: no browser ({why})");
                    Ok(true)
                }
            };
            timings.push((name, done(name, t)));
            if !passed? {
                eprintln!("xtask: step `{name}` failed; the demo page did not do what it should");
                print_summary(&timings, started.elapsed());
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    print_summary(&timings, started.elapsed());
    eprintln!("xtask: all checks passed");
    Ok(ExitCode::SUCCESS)
}

fn step(name: &str) -> Instant {
    eprintln!("\nxtask: ==> {name}");
    Instant::now()
}

fn done(name: &str, started: Instant) -> Duration {
    let took = started.elapsed();
    eprintln!("xtask: <== {name} ({})", seconds(took));
    took
}

/// Runs a step's command; its exit code (128 + signal when killed), clamped to 1..=255 on failure.
fn run_step(cmd: &mut Command) -> Result<u8> {
    use std::os::unix::process::ExitStatusExt;
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if status.success() {
        return Ok(0);
    }
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    Ok(u8::try_from(code).ok().filter(|&c| c != 0).unwrap_or(1))
}

fn print_summary(timings: &[(&str, Duration)], total: Duration) {
    eprintln!("\nxtask: step timings");
    for (name, took) in timings {
        eprintln!("  {name:<24} {:>8}", seconds(*took));
    }
    eprintln!("  {:<24} {:>8}", "total", seconds(total));
}

fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_step_reports_its_own_exit_code() {
        assert_eq!(
            run_step(Command::new("sh").args(["-c", "exit 0"])).unwrap(),
            0
        );
        assert_eq!(
            run_step(Command::new("sh").args(["-c", "exit 101"])).unwrap(),
            101
        );
        assert_eq!(
            run_step(Command::new("sh").args(["-c", "kill -TERM $$"])).unwrap(),
            128 + 15
        );
    }
}
