//! A relay for tests, started from its flags on a free loopback port on its own runtime, and a
//! blocking HTTP client for it.

#![allow(dead_code)]

use std::net::SocketAddr;

use clap::Parser;
use testkit::encode_command;

use krowoc_relay::{serve, RelayArgs, RelayConfig};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    relay: RelayArgs,
}

/// The relay's configuration from its flags, as `krowoc-relay ARGS…` reads them.
pub fn config(args: &[&str]) -> anyhow::Result<RelayConfig> {
    let mut argv = vec!["krowoc-relay"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).map_err(|e| anyhow::anyhow!("{e}"))?;
    RelayConfig::from_args(&cli.relay)
}

/// A relay serving `config` on a free loopback port, on its own runtime thread; stops on drop.
pub struct Relay {
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Relay {
    pub fn start(config: RelayConfig) -> Relay {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        runtime.spawn(serve(listener, config));
        Relay {
            addr,
            runtime: Some(runtime),
        }
    }

    /// POST /resp of `cmds`, encoded.
    pub fn post(&self, cmds: &[&[&str]]) -> testkit::http::Response {
        let body: Vec<u8> = cmds.iter().flat_map(|c| encode_command(c)).collect();
        testkit::http::request(self.addr, "POST", "/resp", &[], &body)
    }

    pub fn get(&self, path: &str) -> testkit::http::Response {
        testkit::http::get(self.addr, path)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
