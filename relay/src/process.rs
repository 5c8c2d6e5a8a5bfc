//! How the project's server binaries (`krowoc-relay`, `host-shim`) start and end.

use std::future::Future;

/// Logs to stderr at `RUST_LOG` (`info` by default), runs `work` on a two-thread runtime, and
/// exits 1 with `<program>: error: …` when it fails (or the runtime cannot start).
pub fn serve(program: &str, work: impl Future<Output = anyhow::Result<()>>) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(work) {
        eprintln!("{program}: error: {e:#}");
        std::process::exit(1);
    }
}
