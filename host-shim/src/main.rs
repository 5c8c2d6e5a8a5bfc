//! `host-shim run` (the gateway) and `host-shim relay` (the RESP relay).

use clap::{Parser, Subcommand};

// The request path allocates many small, short-lived buffers on several threads; glibc's
// malloc showed up as ~12% of the gateway's CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "host-shim",
    version,
    about = "A proxy-wasm host on wasmtime that runs envoy.yaml, and the RESP relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway described by an Envoy bootstrap, with its wasm filter.
    Run(host_shim::run::RunArgs),
    /// Run the RESP-over-HTTP relay that lets the filter reach Redis from stock Envoy.
    Relay(host_shim::relay::RelayArgs),
}

fn main() {
    let cli = Cli::parse();
    krowoc_relay::process::serve("host-shim", async {
        match cli.command {
            Command::Run(args) => host_shim::run::run(args).await,
            Command::Relay(args) => host_shim::relay::run(args).await,
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn check_usage(line: &str) -> Result<(), String> {
        testkit::docs::check_usage(Cli::command(), line, true)
    }

    #[test]
    fn readme_usage() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let seen = testkit::docs::check_readme_usage(&root, "host-shim", Cli::command, true);
        assert!(seen >= 3, "only {seen} host-shim usage lines found");
    }

    #[test]
    fn a_wrong_usage_line_is_caught() {
        assert!(check_usage("host-shim relay --listen 127.0.0.1:7379 --token T").is_ok());
        assert!(check_usage("host-shim relay --listen 127.0.0.1:7379 --tokn T").is_err());
        assert!(check_usage("host-shim run --config x.yaml [--clusters A=B]...").is_err());
        assert!(check_usage("host-shim run --config x.yaml [--cluster NAME=HOST:PORT]...").is_ok());
        assert!(check_usage("host-shim serve").is_err());
    }
}
