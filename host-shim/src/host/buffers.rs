//! `proxy_get_buffer_bytes`, `proxy_set_buffer_bytes`: bodies, the HTTP call response, the VM and
//! plugin configuration, and (Higress) the Redis call response.

use wasmtime::Linker;

use super::{read_bytes, return_bytes, status, HostCaller};
use crate::abi::{buffer, Status};
use crate::state::HostState;

fn buffer_slice(state: &mut HostState, buf_type: i32) -> Result<&[u8], Status> {
    match buf_type {
        buffer::HTTP_REQUEST_BODY => state
            .current_stream()
            .map(|s| s.request_body.as_slice())
            .ok_or(Status::NotFound),
        buffer::HTTP_RESPONSE_BODY => state
            .current_stream()
            .map(|s| s.response_body.as_slice())
            .ok_or(Status::NotFound),
        buffer::HTTP_CALL_RESPONSE_BODY => state
            .http_call_response
            .as_ref()
            .map(|r| r.body.as_slice())
            .ok_or(Status::NotFound),
        buffer::VM_CONFIGURATION => Ok(state.vm_configuration.as_slice()),
        buffer::PLUGIN_CONFIGURATION => Ok(state.plugin_configuration.as_slice()),
        buffer::REDIS_CALL_RESPONSE => state.redis_call_response.as_deref().ok_or(Status::NotFound),
        _ => Err(Status::NotFound),
    }
}

/// Envoy's rule for writing into a body: at 0, replace the first `length` bytes (0: prepend);
/// at or past the end, append; anything else is a bad argument.
pub fn splice_body(
    body: &mut Vec<u8>,
    start: usize,
    length: usize,
    data: &[u8],
) -> Result<(), Status> {
    if start == 0 {
        let drained = length.min(body.len());
        body.splice(0..drained, data.iter().copied());
        Ok(())
    } else if start >= body.len() {
        body.extend_from_slice(data);
        Ok(())
    } else {
        Err(Status::BadArgument)
    }
}

pub fn add_to_linker(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    linker.func_wrap_async(
        "env",
        "proxy_get_buffer_bytes",
        |mut caller: HostCaller<'_>,
         (buf_type, start, max_size, ret_ptr, ret_size): (i32, i32, i32, i32, i32)| {
            Box::new(async move {
                let bytes = match buffer_slice(caller.data_mut(), buf_type) {
                    Ok(b) => {
                        // max_size is commonly u32::MAX: clamp in 64-bit arithmetic.
                        let len = b.len() as u64;
                        let start = (start as u32 as u64).min(len);
                        let end = start.saturating_add(max_size as u32 as u64).min(len);
                        b[start as usize..end as usize].to_vec()
                    }
                    Err(s) => return Ok(s.code()),
                };
                Ok(status(
                    return_bytes(&mut caller, &bytes, ret_ptr, ret_size).await?,
                ))
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut caller: HostCaller<'_>,
         buf_type: i32,
         start: i32,
         length: i32,
         ptr: i32,
         len: i32|
         -> i32 {
            let data = match read_bytes(&mut caller, ptr, len) {
                Ok(d) => d,
                Err(s) => return s.code(),
            };
            let Some(stream) = caller.data_mut().current_stream() else {
                return Status::NotFound.code();
            };
            let (body, modified) = match buf_type {
                buffer::HTTP_REQUEST_BODY => {
                    (&mut stream.request_body, &mut stream.request_body_modified)
                }
                buffer::HTTP_RESPONSE_BODY => (
                    &mut stream.response_body,
                    &mut stream.response_body_modified,
                ),
                _ => return Status::NotFound.code(),
            };
            *modified = true;
            status(splice_body(
                body,
                start as u32 as usize,
                length as u32 as usize,
                &data,
            ))
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_follows_envoys_rules() {
        let mut b = b"hello".to_vec();
        splice_body(&mut b, 0, 5, b"bye").unwrap();
        assert_eq!(b, b"bye");
        splice_body(&mut b, 0, 0, b">").unwrap();
        assert_eq!(b, b">bye");
        splice_body(&mut b, 4, 0, b"!").unwrap();
        assert_eq!(b, b">bye!");
        assert_eq!(splice_body(&mut b, 2, 1, b"x"), Err(Status::BadArgument));
        splice_body(&mut b, 0, usize::MAX, b"").unwrap();
        assert!(b.is_empty());
    }
}
