//! `krowoc-relay`: the RESP-over-HTTP relay, run beside Envoy (see the crate docs).

use clap::Parser;

// Many small, short-lived buffers on several threads, as in host-shim.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "krowoc-relay",
    version,
    about = "The RESP-over-HTTP relay that lets the Krowoc Edge filter reach Redis from stock Envoy"
)]
struct Cli {
    #[command(flatten)]
    relay: krowoc_relay::RelayArgs,
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
            eprintln!("krowoc-relay: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(krowoc_relay::run(cli.relay)) {
        eprintln!("krowoc-relay: error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn check_usage(line: &str) -> Result<(), String> {
        testkit::docs::check_usage(Cli::command(), line, false)
    }

    #[test]
    fn readme_usage() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let seen = testkit::docs::check_readme_usage(&root, "krowoc-relay", Cli::command, false);
        assert!(seen >= 1, "no krowoc-relay usage line found");
    }

    #[test]
    fn a_wrong_usage_line_is_caught() {
        assert!(check_usage("krowoc-relay --listen 127.0.0.1:7379 --token T").is_ok());
        assert!(check_usage("krowoc-relay --listen 127.0.0.1:7379 --tokn T").is_err());
        assert!(check_usage("krowoc-relay relay --listen 127.0.0.1:7379").is_err());
        assert!(check_usage("krowoc-relay --redis redis://h:1 [--tokn T]").is_err());
    }
}
