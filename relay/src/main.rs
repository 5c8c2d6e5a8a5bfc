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
    let cli = Cli::parse();
    krowoc_relay::process::serve("krowoc-relay", krowoc_relay::run(cli.relay));
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
