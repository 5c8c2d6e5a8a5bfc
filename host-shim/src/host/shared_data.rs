//! `proxy_get_shared_data`, `proxy_set_shared_data` (with CAS), `proxy_register_shared_queue`,
//! `proxy_resolve_shared_queue`, `proxy_enqueue_shared_queue`, `proxy_dequeue_shared_queue`.

use wasmtime::Linker;

use super::{read_bytes, read_string, return_bytes, status, write_u32, HostCaller};
use crate::abi::Status;
use crate::state::HostState;

pub fn add_to_linker(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    linker.func_wrap_async(
        "env",
        "proxy_get_shared_data",
        |mut caller: HostCaller<'_>,
         (key_ptr, key_len, ret_ptr, ret_size, ret_cas): (i32, i32, i32, i32, i32)| {
            Box::new(async move {
                let key = match read_string(&mut caller, key_ptr, key_len) {
                    Ok(k) => k,
                    Err(s) => return Ok(s.code()),
                };
                let Some((value, cas)) = caller.data().shared.get_data(&key) else {
                    return Ok(Status::NotFound.code());
                };
                if let Err(s) = write_u32(&mut caller, ret_cas, cas) {
                    return Ok(s.code());
                }
                Ok(status(
                    return_bytes(&mut caller, &value, ret_ptr, ret_size).await?,
                ))
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut caller: HostCaller<'_>,
         key_ptr: i32,
         key_len: i32,
         val_ptr: i32,
         val_len: i32,
         cas: i32|
         -> i32 {
            let key = match read_string(&mut caller, key_ptr, key_len) {
                Ok(k) => k,
                Err(s) => return s.code(),
            };
            let value = match read_bytes(&mut caller, val_ptr, val_len) {
                Ok(v) => v,
                Err(s) => return s.code(),
            };
            caller
                .data()
                .shared
                .set_data(&key, value, cas as u32)
                .code()
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut caller: HostCaller<'_>, name_ptr: i32, name_len: i32, ret_id: i32| -> i32 {
            let name = match read_string(&mut caller, name_ptr, name_len) {
                Ok(n) => n,
                Err(s) => return s.code(),
            };
            let state = caller.data();
            let id = state.shared.register_queue(
                &state.identity.vm_id,
                &name,
                state.identity.worker,
                state.root_context_id,
            );
            status(write_u32(&mut caller, ret_id, id))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut caller: HostCaller<'_>,
         vm_ptr: i32,
         vm_len: i32,
         name_ptr: i32,
         name_len: i32,
         ret_id: i32|
         -> i32 {
            let vm_id = match read_string(&mut caller, vm_ptr, vm_len) {
                Ok(v) => v,
                Err(s) => return s.code(),
            };
            let name = match read_string(&mut caller, name_ptr, name_len) {
                Ok(n) => n,
                Err(s) => return s.code(),
            };
            match caller.data().shared.resolve_queue(&vm_id, &name) {
                Some(id) => status(write_u32(&mut caller, ret_id, id)),
                None => Status::NotFound.code(),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut caller: HostCaller<'_>, id: i32, ptr: i32, len: i32| -> i32 {
            let item = match read_bytes(&mut caller, ptr, len) {
                Ok(v) => v,
                Err(s) => return s.code(),
            };
            caller.data().shared.enqueue(id as u32, item).code()
        },
    )?;
    linker.func_wrap_async(
        "env",
        "proxy_dequeue_shared_queue",
        |mut caller: HostCaller<'_>, (id, ret_ptr, ret_size): (i32, i32, i32)| {
            Box::new(async move {
                match caller.data().shared.dequeue(id as u32) {
                    Ok(item) => Ok(status(
                        return_bytes(&mut caller, &item, ret_ptr, ret_size).await?,
                    )),
                    Err(s) => Ok(s.code()),
                }
            })
        },
    )?;
    Ok(())
}
