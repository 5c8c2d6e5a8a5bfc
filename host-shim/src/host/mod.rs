//! The host side of the ABI: one module per family of `env` imports, plus the guest-memory
//! helpers they share. `add_to_linker` links them all.

pub mod buffers;
pub mod grpc;
pub mod headers;
pub mod http_call;
pub mod metrics;
pub mod misc;
pub mod properties;
pub mod redis_call;
pub mod shared_data;
pub mod stream;
pub mod wasi;

use wasmtime::{Caller, Linker, Memory};

use crate::abi::Status;
use crate::state::HostState;

pub type HostCaller<'a> = Caller<'a, HostState>;

/// Links every `env` import host-shim provides, and WASI preview 1.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    misc::add_to_linker(linker)?;
    headers::add_to_linker(linker)?;
    buffers::add_to_linker(linker)?;
    http_call::add_to_linker(linker)?;
    redis_call::add_to_linker(linker)?;
    shared_data::add_to_linker(linker)?;
    metrics::add_to_linker(linker)?;
    properties::add_to_linker(linker)?;
    stream::add_to_linker(linker)?;
    grpc::add_to_linker(linker)?;
    wasi::add_to_linker(linker)?;
    Ok(())
}

fn memory(caller: &mut HostCaller<'_>) -> Result<Memory, Status> {
    caller.data().memory.ok_or(Status::InvalidMemoryAccess)
}

/// Copies `len` bytes at `ptr` out of guest memory.
pub fn read_bytes(caller: &mut HostCaller<'_>, ptr: i32, len: i32) -> Result<Vec<u8>, Status> {
    let mem = memory(caller)?;
    let data = mem.data(&caller);
    let start = ptr as u32 as usize;
    let end = start
        .checked_add(len as u32 as usize)
        .ok_or(Status::InvalidMemoryAccess)?;
    data.get(start..end)
        .map(|s| s.to_vec())
        .ok_or(Status::InvalidMemoryAccess)
}

/// Reads a UTF-8 string (invalid UTF-8 is a bad argument).
pub fn read_string(caller: &mut HostCaller<'_>, ptr: i32, len: i32) -> Result<String, Status> {
    String::from_utf8(read_bytes(caller, ptr, len)?).map_err(|_| Status::BadArgument)
}

pub fn write_bytes(caller: &mut HostCaller<'_>, ptr: u32, bytes: &[u8]) -> Result<(), Status> {
    let mem = memory(caller)?;
    mem.write(caller, ptr as usize, bytes)
        .map_err(|_| Status::InvalidMemoryAccess)
}

pub fn write_u32(caller: &mut HostCaller<'_>, ptr: i32, v: u32) -> Result<(), Status> {
    write_bytes(caller, ptr as u32, &v.to_le_bytes())
}

pub fn write_u64(caller: &mut HostCaller<'_>, ptr: i32, v: u64) -> Result<(), Status> {
    write_bytes(caller, ptr as u32, &v.to_le_bytes())
}

/// Allocates `data.len()` bytes in the guest (its `malloc`, else `proxy_on_memory_allocate`),
/// copies `data` there and writes the pointer and size to the two out-pointers. Empty data is
/// written as 0/0 without allocating. A trap inside the guest allocator is returned as `Err` so
/// that it stays a trap.
pub async fn return_bytes(
    caller: &mut HostCaller<'_>,
    data: &[u8],
    ret_ptr: i32,
    ret_size: i32,
) -> wasmtime::Result<Result<(), Status>> {
    if data.is_empty() {
        return Ok(write_u32(caller, ret_ptr, 0).and_then(|_| write_u32(caller, ret_size, 0)));
    }
    let Some(alloc) = caller.data().guest_alloc.clone() else {
        return Ok(Err(Status::InternalFailure));
    };
    let ptr = alloc.call_async(&mut *caller, data.len() as i32).await? as u32;
    if ptr == 0 {
        return Ok(Err(Status::InternalFailure));
    }
    Ok(write_bytes(caller, ptr, data)
        .and_then(|_| write_u32(caller, ret_ptr, ptr))
        .and_then(|_| write_u32(caller, ret_size, data.len() as u32)))
}

/// Turns a host-call result into the status code the guest sees.
pub fn status(r: Result<(), Status>) -> i32 {
    match r {
        Ok(()) => Status::Ok.code(),
        Err(s) => s.code(),
    }
}
