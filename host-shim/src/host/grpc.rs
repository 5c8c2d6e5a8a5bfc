//! `proxy_grpc_call`, `proxy_grpc_stream`, `proxy_grpc_send`, `proxy_grpc_cancel`,
//! `proxy_grpc_close`: linked so that plugins declaring them load, answered `Unimplemented`
//! (host-shim has no gRPC clusters).

use wasmtime::Linker;

use super::HostCaller;
use crate::abi::Status;
use crate::state::HostState;

pub fn add_to_linker(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    const NO: i32 = Status::Unimplemented as i32;
    linker.func_wrap(
        "env",
        "proxy_grpc_call",
        |_: HostCaller<'_>,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32|
         -> i32 { NO },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_stream",
        |_: HostCaller<'_>,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32|
         -> i32 { NO },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_send",
        |_: HostCaller<'_>, _: i32, _: i32, _: i32, _: i32| -> i32 { NO },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_cancel",
        |_: HostCaller<'_>, _: i32| -> i32 { NO },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_close",
        |_: HostCaller<'_>, _: i32| -> i32 { NO },
    )?;
    Ok(())
}
