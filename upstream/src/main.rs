//! `krowoc-upstream` — serves the demo upstream (see the library's docs for the endpoints).
//!
//! ```text
//! krowoc-upstream --listen 127.0.0.1:8080 --redis redis://127.0.0.1:6379 \
//!     [--cached-data-delay 1s] [--slow-delay 2s] [--channels krowoc:requests,app:events] ...
//! ```
//! Redis is one of `--redis URL`, `--redis-cluster NODES` or `--redis-sentinel NODES
//! --redis-sentinel-master NAME` (see the library's `deployment` module for the forms).
//! Every option can also come from the environment (`REDIS_URL`, `REDIS_CLUSTER`,
//! `REDIS_SENTINEL`, `REDIS_SENTINEL_MASTER`, `UPSTREAM_*`; see `--help`).
//! Prints `upstream listening on ADDR` on stdout once bound; logs go to stderr (`RUST_LOG`).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use krowoc_relay::parse_flag_duration;
use krowoc_upstream::config::DEFAULT_CHANNELS;
use krowoc_upstream::deployment::RedisSettings;
use krowoc_upstream::{app, AppState, Error, RedisDeployment, UpstreamConfig};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "krowoc-upstream",
    version,
    about = "The Krowoc Edge demo upstream: the Redis guide's endpoints and health checks"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "UPSTREAM_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// One Redis: redis://[user:pass@]host:port[/db], or rediss://… for TLS [default when no
    /// --redis-cluster or --redis-sentinel: redis://127.0.0.1:6379].
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis: Option<String>,
    /// A Redis Cluster's seed nodes: [redis[s]://[user:pass@]]HOST:PORT[,HOST:PORT…]; the scheme
    /// and credentials, written once, apply to every node.
    #[arg(
        long,
        env = "REDIS_CLUSTER",
        value_name = "NODES",
        hide_env_values = true
    )]
    redis_cluster: Option<String>,
    /// Sentinels: [redis[s]://[user:pass@]]HOST:PORT[,HOST:PORT…][/db]; the credentials and db
    /// are the master's (the sentinels are asked without credentials).
    #[arg(
        long,
        env = "REDIS_SENTINEL",
        value_name = "NODES",
        hide_env_values = true
    )]
    redis_sentinel: Option<String>,
    /// With --redis-sentinel: the name the sentinels monitor the master as.
    #[arg(long, env = "REDIS_SENTINEL_MASTER", value_name = "NAME")]
    redis_sentinel_master: Option<String>,
    /// With rediss://: trust the CA certificates in this PEM file instead of the system's roots.
    #[arg(long, env = "REDIS_TLS_CA", value_name = "FILE")]
    redis_tls_ca: Option<std::path::PathBuf>,
    /// How long GET /api/cached-data takes (e.g. 1s, 250ms, 0).
    #[arg(long, env = "UPSTREAM_CACHED_DATA_DELAY", default_value = "1s", value_parser = parse_flag_duration)]
    cached_data_delay: Duration,
    /// How long GET /api/slow-limited takes.
    #[arg(long, env = "UPSTREAM_SLOW_DELAY", default_value = "2s", value_parser = parse_flag_duration)]
    slow_delay: Duration,
    /// max-age sent with GET /api/cached-data (whole seconds).
    #[arg(long, env = "UPSTREAM_CACHE_MAX_AGE", default_value = "60s", value_parser = parse_flag_duration)]
    cache_max_age: Duration,
    /// Channels the background subscriber listens to, comma-separated.
    #[arg(long, env = "UPSTREAM_CHANNELS", value_delimiter = ',', default_values_t = DEFAULT_CHANNELS.iter().map(|c| c.to_string()))]
    channels: Vec<String>,
    /// Run no background subscriber (GET /api/recent-events stays empty).
    #[arg(long, env = "UPSTREAM_NO_SUBSCRIBER")]
    no_subscriber: bool,
    /// How many received events GET /api/recent-events can show.
    #[arg(long, env = "UPSTREAM_EVENTS_BUFFER", default_value_t = 200)]
    events_buffer: usize,
    /// Received payloads longer than this are kept truncated.
    #[arg(long, env = "UPSTREAM_MAX_EVENT_BYTES", default_value_t = 64 * 1024)]
    max_event_bytes: usize,
    /// Largest accepted JSON request body; larger answers 413.
    #[arg(long, env = "UPSTREAM_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    max_body_bytes: usize,
    /// Timeout of every Redis call and connection attempt.
    #[arg(long, env = "UPSTREAM_REDIS_TIMEOUT", default_value = "1s", value_parser = parse_flag_duration)]
    redis_timeout: Duration,
    /// The subscriber's first reconnect delay (doubles after each failure).
    #[arg(long, env = "UPSTREAM_SUBSCRIBER_BACKOFF", default_value = "100ms", value_parser = parse_flag_duration)]
    subscriber_backoff: Duration,
    /// The cap on the subscriber's reconnect delay.
    #[arg(long, env = "UPSTREAM_SUBSCRIBER_MAX_BACKOFF", default_value = "10s", value_parser = parse_flag_duration)]
    subscriber_max_backoff: Duration,
    /// How often the subscriber PINGs its connection.
    #[arg(long, env = "UPSTREAM_SUBSCRIBER_PING_INTERVAL", default_value = "15s", value_parser = parse_flag_duration)]
    subscriber_ping_interval: Duration,
    /// How many GET /api/events/stream clients may be connected at once (more get 503).
    #[arg(long, env = "UPSTREAM_MAX_EVENT_STREAMS", default_value_t = 32)]
    max_event_streams: usize,
    /// How many events a stream client may fall behind by before it skips the oldest.
    #[arg(long, env = "UPSTREAM_EVENT_STREAM_BUFFER", default_value_t = 256)]
    event_stream_buffer: usize,
    /// How often an idle event stream sends a keep-alive comment.
    #[arg(long, env = "UPSTREAM_EVENT_STREAM_KEEP_ALIVE", default_value = "15s", value_parser = parse_flag_duration)]
    event_stream_keep_alive: Duration,
}

impl Cli {
    fn config(self) -> Result<UpstreamConfig, Error> {
        let redis = RedisDeployment::from_settings(RedisSettings {
            url: self.redis,
            cluster: self.redis_cluster,
            sentinel: self.redis_sentinel,
            sentinel_master: self.redis_sentinel_master,
        })?;
        Ok(UpstreamConfig {
            redis,
            redis_tls_ca: self.redis_tls_ca,
            cached_data_delay: self.cached_data_delay,
            slow_delay: self.slow_delay,
            cache_max_age: self.cache_max_age,
            channels: if self.no_subscriber {
                Vec::new()
            } else {
                self.channels
            },
            events_buffer: self.events_buffer,
            max_event_bytes: self.max_event_bytes,
            max_body_bytes: self.max_body_bytes,
            redis_timeout: self.redis_timeout,
            subscriber_backoff_initial: self.subscriber_backoff,
            subscriber_backoff_max: self.subscriber_max_backoff,
            subscriber_ping_interval: self.subscriber_ping_interval,
            max_event_streams: self.max_event_streams,
            event_stream_buffer: self.event_stream_buffer,
            event_stream_keep_alive: self.event_stream_keep_alive,
        })
    }
}

/// A configuration error, naming the environment variable beside the option it is about.
fn explain(error: &Error) -> String {
    let Some(flag) = error.field() else {
        return error.to_string();
    };
    let env = Cli::command()
        .get_arguments()
        .find(|a| {
            a.get_long()
                .is_some_and(|long| flag.strip_prefix("--") == Some(long))
        })
        .and_then(|a| a.get_env())
        .map(|env| env.to_string_lossy().into_owned());
    match env {
        Some(env) => format!("{flag} ({env}): {}", error.message()),
        None => error.to_string(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let cli = Cli::parse();
    let listen = cli.listen.clone();
    let state = match cli.config().and_then(AppState::start) {
        Ok(state) => state,
        Err(e) => {
            eprintln!("krowoc-upstream: invalid configuration: {}", explain(&e));
            return ExitCode::from(2);
        }
    };
    let config = state.config();
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("krowoc-upstream: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = match listener.local_addr() {
        Ok(addr) => addr.to_string(),
        Err(_) => listen.clone(),
    };
    println!("upstream listening on {addr}");
    tracing::info!(
        redis = %config.redis,
        channels = ?config.channels,
        "upstream listening on {addr}"
    );

    let streams = state.clone();
    let served = axum::serve(listener, app(state))
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            // Open event streams would hold the graceful shutdown forever.
            streams.close_event_streams();
        })
        .await;
    match served {
        Ok(()) => {
            tracing::info!("upstream stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("krowoc-upstream: server failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}
