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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("host-shim: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Run(args) => host_shim::run::run(args).await,
            Command::Relay(args) => host_shim::relay::run(args).await,
        }
    });
    if let Err(e) = result {
        eprintln!("host-shim: error: {e:#}");
        std::process::exit(1);
    }
}
