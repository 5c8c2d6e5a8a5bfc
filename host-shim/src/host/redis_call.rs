//! Higress's Redis extension: `proxy_redis_init`, `proxy_redis_call`; replies arrive through
//! `proxy_on_redis_call_response` with the raw RESP in buffer 9.

use std::sync::atomic::Ordering;
use std::time::Duration;

use wasmtime::Linker;

use super::{read_bytes, read_string, write_u32, HostCaller};
use crate::abi::Status;
use crate::state::{Callout, HostState, RedisInit};

/// Higress defaults a Redis call's timeout to 1 s when init passes 0.
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(1000);

/// A cluster name may carry `?db=N`; the cluster itself is what precedes it.
pub fn cluster_base(name: &str) -> &str {
    name.split('?').next().unwrap_or(name)
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
            let state = caller.data_mut();
            if !state.clusters.contains_key(cluster_base(&cluster)) {
                return Status::BadArgument.code();
            }
            let timeout = if timeout_ms > 0 {
                Duration::from_millis(timeout_ms as u64)
            } else {
                DEFAULT_TIMEOUT
            };
            state.redis_clusters.insert(
                cluster,
                RedisInit {
                    username: (!user.is_empty()).then_some(user),
                    password: (!pass.is_empty()).then_some(pass),
                    timeout,
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
