//! Higress's Redis extension: `proxy_redis_init`, `proxy_redis_call`; replies arrive through
//! `proxy_on_redis_call_response` with the raw RESP in buffer 9.
//!
//! Higress is the reference here (stock Envoy has no such calls): a cluster is named by the part
//! of the upstream name before `?`, and options may follow it. Higress's Go SDK initialises
//! `outbound|6379||redis.static?buffer_flush_timeout=3&max_buffer_size_before_flush=1024` and then
//! calls `outbound|6379||redis.static`: both name one initialised cluster.

use std::sync::atomic::Ordering;
use std::time::Duration;

use wasmtime::Linker;

use super::{read_bytes, read_string, write_u32, HostCaller};
use crate::abi::Status;
use crate::state::{Callout, HostState, RedisInit};

/// Higress defaults a Redis call's timeout to 1 s when init passes 0.
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(1000);

/// A cluster name may carry `?db=N` and other options; the cluster itself is what precedes it.
pub fn cluster_base(name: &str) -> &str {
    name.split('?').next().unwrap_or(name)
}

/// The options after `?` in a Redis upstream name, as Higress reads them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterOptions {
    /// `db=N`: the database selected on every connection.
    pub db: Option<u32>,
}

/// Parses `name?k=v&k=v` into the cluster and its options. `buffer_flush_timeout` and
/// `max_buffer_size_before_flush` (Higress's client batching) must be numbers and are accepted
/// without effect: host-shim writes each call at once. Other keys are ignored, as Higress does.
/// The query is split by hand: Higress passes it unencoded, there is nothing to decode.
pub fn parse_cluster_name(name: &str) -> Result<(&str, ClusterOptions), String> {
    let Some((base, query)) = name.split_once('?') else {
        return Ok((name, ClusterOptions::default()));
    };
    let mut options = ClusterOptions::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number = || {
            value.parse::<u64>().map_err(|_| {
                format!("redis cluster {name:?}: option {key} is not a number: {value:?}")
            })
        };
        match key {
            "db" => {
                let db = number()?;
                options.db = Some(
                    u32::try_from(db)
                        .map_err(|_| format!("redis cluster {name:?}: db {db} is out of range"))?,
                );
            }
            "buffer_flush_timeout" | "max_buffer_size_before_flush" => {
                number()?;
            }
            other => tracing::debug!("redis cluster {name:?}: option {other} ignored"),
        }
    }
    Ok((base, options))
}

pub fn add_to_linker(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_redis_init",
        |mut caller: HostCaller<'_>,
         up_ptr: i32,
         up_len: i32,
         user_ptr: i32,
         user_len: i32,
         pass_ptr: i32,
         pass_len: i32,
         timeout_ms: i32|
         -> i32 {
            let read = |caller: &mut HostCaller<'_>| -> Result<_, Status> {
                Ok((
                    read_string(caller, up_ptr, up_len)?,
                    read_string(caller, user_ptr, user_len)?,
                    read_string(caller, pass_ptr, pass_len)?,
                ))
            };
            let (cluster, user, pass) = match read(&mut caller) {
                Ok(v) => v,
                Err(s) => return s.code(),
            };
            let (base, options) = match parse_cluster_name(&cluster) {
                Ok(parsed) => parsed,
                Err(e) => {
                    tracing::warn!("proxy_redis_init: {e}");
                    return Status::BadArgument.code();
                }
            };
            let state = caller.data_mut();
            if !state.clusters.contains_key(base) {
                return Status::BadArgument.code();
            }
            let timeout = if timeout_ms > 0 {
                Duration::from_millis(timeout_ms as u64)
            } else {
                DEFAULT_TIMEOUT
            };
            state.redis_clusters.insert(
                base.to_string(),
                RedisInit {
                    username: (!user.is_empty()).then_some(user),
                    password: (!pass.is_empty()).then_some(pass),
                    timeout,
                    db: options.db,
                },
            );
            Status::Ok.code()
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_redis_call",
        |mut caller: HostCaller<'_>,
         up_ptr: i32,
         up_len: i32,
         query_ptr: i32,
         query_len: i32,
         ret_token: i32|
         -> i32 {
            let cluster = match read_string(&mut caller, up_ptr, up_len) {
                Ok(c) => c,
                Err(s) => return s.code(),
            };
            let query = match read_bytes(&mut caller, query_ptr, query_len) {
                Ok(q) => q,
                Err(s) => return s.code(),
            };
            // The call names the cluster as init did, with or without the options.
            let cluster = cluster_base(&cluster).to_string();
            let state = caller.data_mut();
            if !state.redis_clusters.contains_key(&cluster) || query.is_empty() {
                return Status::BadArgument.code();
            }
            let token = state.new_token(true);
            state
                .shared
                .counters
                .redis_callouts
                .fetch_add(1, Ordering::Relaxed);
            state.callouts.push(Callout::Redis {
                token,
                cluster,
                query,
            });
            match write_u32(&mut caller, ret_token, token) {
                Ok(()) => Status::Ok.code(),
                Err(s) => s.code(),
            }
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higress_go_sdk_cluster_name_parses_to_its_cluster_and_accepts_the_batching_options() {
        let name =
            "outbound|6379||redis.static?buffer_flush_timeout=3&max_buffer_size_before_flush=1024";
        assert_eq!(
            parse_cluster_name(name),
            Ok(("outbound|6379||redis.static", ClusterOptions { db: None }))
        );
        assert_eq!(
            parse_cluster_name("redis?db=2&buffer_flush_timeout=3"),
            Ok(("redis", ClusterOptions { db: Some(2) }))
        );
        assert_eq!(
            parse_cluster_name("redis"),
            Ok(("redis", ClusterOptions::default()))
        );
        assert!(parse_cluster_name("redis?db=two").is_err());
        assert!(parse_cluster_name("redis?max_buffer_size_before_flush=lots").is_err());
    }
}
