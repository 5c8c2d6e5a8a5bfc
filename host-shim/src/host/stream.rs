//! `proxy_continue_stream`, `proxy_close_stream`, `proxy_send_local_response`: the calls that
//! move a paused stream on, and the plugin's own replies.

use wasmtime::Linker;

use super::{read_bytes, read_string, HostCaller};
use crate::abi::{decode_header_map, stream, Status};
use crate::state::{HostState, LocalResponse};

pub fn add_to_linker(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut caller: HostCaller<'_>, stream_type: i32| -> i32 {
            let Some(s) = caller.data_mut().current_stream() else {
                return Status::NotFound.code();
            };
            match stream_type {
                stream::HTTP_REQUEST => s.resume_request = true,
                stream::HTTP_RESPONSE => s.resume_response = true,
                _ => return Status::BadArgument.code(),
            }
            s.wake.notify_one();
            Status::Ok.code()
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_close_stream",
        |mut caller: HostCaller<'_>, _stream_type: i32| -> i32 {
            let Some(s) = caller.data_mut().current_stream() else {
                return Status::NotFound.code();
            };
            s.closed = true;
            s.wake.notify_one();
            Status::Ok.code()
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut caller: HostCaller<'_>,
         status_code: i32,
         details_ptr: i32,
         details_len: i32,
         body_ptr: i32,
         body_len: i32,
         hdrs_ptr: i32,
         hdrs_len: i32,
         _grpc_status: i32|
         -> i32 {
            let read = |caller: &mut HostCaller<'_>| -> Result<_, Status> {
                let details = read_string(caller, details_ptr, details_len).unwrap_or_default();
                let body = read_bytes(caller, body_ptr, body_len)?;
                let headers = decode_header_map(&read_bytes(caller, hdrs_ptr, hdrs_len)?)
                    .ok_or(Status::SerializationFailure)?;
                Ok((details, body, headers))
            };
            let (details, body, headers) = match read(&mut caller) {
                Ok(v) => v,
                Err(s) => return s.code(),
            };
            if !(100..=999).contains(&status_code) {
                return Status::BadArgument.code();
            }
            let Some(s) = caller.data_mut().current_stream() else {
                return Status::NotFound.code();
            };
            if s.local_response.is_some() {
                // A second local reply on one stream is a plugin bug; the first one stands.
                tracing::warn!("plugin sent a second local response on one stream; ignored");
                return Status::Ok.code();
            }
            s.local_details = Some(details.clone());
            s.local_response = Some(LocalResponse {
                status: status_code as u16,
                details,
                body,
                headers,
                closes_connection: false,
            });
            s.wake.notify_one();
            Status::Ok.code()
        },
    )?;
    Ok(())
}
