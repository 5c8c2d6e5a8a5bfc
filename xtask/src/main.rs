//! `cargo xtask` — the project's one entry point for building, setting up and running things:
//!
//! ```text
//! cargo xtask demo          # set up, build, run redis + upstream + relay + host-shim; Ctrl-C stops all
//! cargo xtask test          # set up, build the wasm crates, fmt check, clippy -D warnings, every test, the tour
//! cargo xtask tour          # a fresh demo, and the README's tour run against it as written
//! cargo xtask browser-test  # the demo page in headless Chromium, through the gateway
//! cargo xtask bench         # release build; wrk against direct upstream / host-shim / host-shim + plugin
//! cargo xtask build-plugin  # build the .wasm crates and print their paths and sizes
//! ```
//!
//! Setup (shared by demo, test and bench) installs what a fresh machine lacks: the
//! `wasm32-wasip1` target with rustup, and `redis-server` (and `wrk` for bench) with apt-get
//! when running as root on Debian/Ubuntu; otherwise it stops with the command to run.

mod bench;
mod browser;
mod cli;
mod demo;
#[cfg(test)]
mod doc_commands;
mod envoy_install;
mod envoy_yaml;
mod markdown;
mod probe;
mod procs;
mod setup;
mod soak;
mod test_suite;
mod tour;
mod vm_bench;
mod webdriver;
mod workspace;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match cli::parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("xtask: {e:#}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    let result = match command {
        cli::Command::Help => {
            println!("{}", cli::USAGE);
            Ok(ExitCode::SUCCESS)
        }
        cli::Command::BuildPlugin(o) => build_plugin(&o).map(|()| ExitCode::SUCCESS),
        cli::Command::Demo(o) => demo::run(&o),
        cli::Command::Test(o) => test_suite::run(&o),
        cli::Command::Tour(o) => tour::run(&o),
        cli::Command::BrowserTest(o) => browser::run(&o),
        cli::Command::Bench(o) => bench::run(&o).map(|()| ExitCode::SUCCESS),
        cli::Command::Fuzz(o) => fuzz(&o),
        cli::Command::Soak(o) => soak::run(&o),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn build_plugin(options: &cli::SetupOptions) -> anyhow::Result<()> {
    setup::ensure(&setup::Needs::wasm_only(), options)?;
    let ws = workspace::Workspace::load()?;
    ws.build_wasm()?;
    Ok(())
}

/// `cargo xtask fuzz`: every crate's `fuzz` test target, each target for `--seconds`.
fn fuzz(options: &cli::FuzzOptions) -> anyhow::Result<ExitCode> {
    setup::ensure(&setup::Needs::default(), &options.setup)?;
    let ws = workspace::Workspace::load()?;
    let mut cmd = workspace::cargo();
    cmd.current_dir(&ws.root)
        .args([
            "test",
            "--workspace",
            "--test",
            "fuzz",
            "--",
            "--test-threads=1",
        ])
        .env(
            "KROWOC_FUZZ_SECONDS",
            options.per_target.as_secs().to_string(),
        );
    workspace::run_loud(&mut cmd)?;
    Ok(ExitCode::SUCCESS)
}
