//! `proxy_define_metric`, `proxy_get_metric`, `proxy_record_metric`, `proxy_increment_metric`.

use wasmtime::Linker;

use super::{read_string, status, write_u32, write_u64, HostCaller};
use crate::state::HostState;

pub fn add_to_linker(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut caller: HostCaller<'_>, kind: i32, name_ptr: i32, name_len: i32, ret_id: i32| -> i32 {
            let name = match read_string(&mut caller, name_ptr, name_len) {
                Ok(n) => n,
                Err(s) => return s.code(),
            };
            match caller.data().shared.define_metric(kind, &name) {
                Ok(id) => status(write_u32(&mut caller, ret_id, id)),
                Err(s) => s.code(),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut caller: HostCaller<'_>, id: i32, ret: i32| -> i32 {
            match caller.data().shared.get_metric(id as u32) {
                Ok(v) => status(write_u64(&mut caller, ret, v)),
                Err(s) => s.code(),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |caller: HostCaller<'_>, id: i32, value: i64| -> i32 {
            caller.data().shared.record_metric(id as u32, value).code()
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |caller: HostCaller<'_>, id: i32, delta: i64| -> i32 {
            caller
                .data()
                .shared
                .increment_metric(id as u32, delta)
                .code()
        },
    )?;
    Ok(())
}
