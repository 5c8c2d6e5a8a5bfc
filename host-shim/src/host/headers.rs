//! `proxy_get_header_map_pairs`, `proxy_set_header_map_pairs`, `proxy_get_header_map_value`,
//! `proxy_replace_header_map_value`, `proxy_add_header_map_value`,
//! `proxy_remove_header_map_value`.

use wasmtime::Linker;

use super::{read_bytes, read_string, return_bytes, status, HostCaller};
use crate::abi::{decode_header_map, encode_header_map, map, HeaderList, Status};
use crate::state::HostState;

/// The header map a map type names, as Envoy resolves it: absent maps (no response yet, no
/// trailers, no call response, headers outside their phase — see `StreamState::enter`) are a
/// bad argument.
fn header_map(state: &mut HostState, map_type: i32) -> Result<&mut HeaderList, Status> {
    match map_type {
        map::HTTP_CALL_RESPONSE_HEADERS => state
            .http_call_response
            .as_mut()
            .map(|r| &mut r.headers)
            .ok_or(Status::BadArgument),
        map::HTTP_CALL_RESPONSE_TRAILERS => state
            .http_call_response
            .as_mut()
            .map(|r| &mut r.trailers)
            .ok_or(Status::BadArgument),
        map::REQUEST_HEADERS
        | map::REQUEST_TRAILERS
        | map::RESPONSE_HEADERS
        | map::RESPONSE_TRAILERS => {
            let stream = state.current_stream().ok_or(Status::BadArgument)?;
            let readable = stream.readable;
            match map_type {
                map::REQUEST_HEADERS if readable.request_headers => Ok(&mut stream.request_headers),
                map::REQUEST_HEADERS => Err(Status::BadArgument),
                map::RESPONSE_HEADERS if !readable.response_headers => Err(Status::BadArgument),
                map::REQUEST_TRAILERS => {
                    stream.request_trailers.as_mut().ok_or(Status::BadArgument)
                }
                map::RESPONSE_HEADERS => {
                    stream.response_headers.as_mut().ok_or(Status::BadArgument)
                }
                _ => stream.response_trailers.as_mut().ok_or(Status::BadArgument),
            }
        }
        _ => Err(Status::BadArgument),
    }
}

/// Envoy 1.40 (measured): replacing a header removes every copy of the name and appends the new
/// value at the end of the map.
pub fn replace_value(headers: &mut HeaderList, key: &str, value: Vec<u8>) {
    headers.retain(|(k, _)| k != key);
    headers.push((key.to_string(), value));
}

pub fn add_to_linker(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    linker.func_wrap_async(
        "env",
        "proxy_get_header_map_pairs",
        |mut caller: HostCaller<'_>, (map_type, ret_ptr, ret_size): (i32, i32, i32)| {
            Box::new(async move {
                let bytes = match header_map(caller.data_mut(), map_type) {
                    Ok(h) => encode_header_map(h),
                    // Envoy lists a map it cannot reach as empty (the single-value and edit calls
                    // are refused instead).
                    Err(_) if (0..=map::HTTP_CALL_RESPONSE_TRAILERS).contains(&map_type) => {
                        Vec::new()
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
        "proxy_set_header_map_pairs",
        |mut caller: HostCaller<'_>, map_type: i32, ptr: i32, len: i32| -> i32 {
            let bytes = match read_bytes(&mut caller, ptr, len) {
                Ok(b) => b,
                Err(s) => return s.code(),
            };
            let Some(pairs) = decode_header_map(&bytes) else {
                return Status::SerializationFailure.code();
            };
            match header_map(caller.data_mut(), map_type) {
                Ok(h) => {
                    *h = pairs;
                    Status::Ok.code()
                }
                Err(s) => s.code(),
            }
        },
    )?;
    linker.func_wrap_async(
        "env",
        "proxy_get_header_map_value",
        |mut caller: HostCaller<'_>,
         (map_type, key_ptr, key_len, ret_ptr, ret_size): (i32, i32, i32, i32, i32)| {
            Box::new(async move {
                let key = match read_string(&mut caller, key_ptr, key_len) {
                    Ok(k) => k.to_ascii_lowercase(),
                    Err(s) => return Ok(s.code()),
                };
                let value = match header_map(caller.data_mut(), map_type) {
                    Ok(h) => match h.iter().find(|(k, _)| *k == key) {
                        Some((_, v)) => v.clone(),
                        None => return Ok(Status::NotFound.code()),
                    },
                    Err(s) => return Ok(s.code()),
                };
                Ok(status(
                    return_bytes(&mut caller, &value, ret_ptr, ret_size).await?,
                ))
            })
        },
    )?;
    for (name, op) in [
        ("proxy_replace_header_map_value", Edit::Replace),
        ("proxy_add_header_map_value", Edit::Add),
    ] {
        linker.func_wrap(
            "env",
            name,
            move |mut caller: HostCaller<'_>,
                  map_type: i32,
                  key_ptr: i32,
                  key_len: i32,
                  val_ptr: i32,
                  val_len: i32|
                  -> i32 {
                let key = match read_string(&mut caller, key_ptr, key_len) {
                    Ok(k) => k.to_ascii_lowercase(),
                    Err(s) => return s.code(),
                };
                let value = match read_bytes(&mut caller, val_ptr, val_len) {
                    Ok(v) => v,
                    Err(s) => return s.code(),
                };
                match header_map(caller.data_mut(), map_type) {
                    Ok(h) => {
                        match op {
                            Edit::Replace => replace_value(h, &key, value),
                            Edit::Add => h.push((key, value)),
                        }
                        Status::Ok.code()
                    }
                    Err(s) => s.code(),
                }
            },
        )?;
    }
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut caller: HostCaller<'_>, map_type: i32, key_ptr: i32, key_len: i32| -> i32 {
            let key = match read_string(&mut caller, key_ptr, key_len) {
                Ok(k) => k.to_ascii_lowercase(),
                Err(s) => return s.code(),
            };
            match header_map(caller.data_mut(), map_type) {
                Ok(h) => {
                    h.retain(|(k, _)| *k != key);
                    Status::Ok.code()
                }
                Err(s) => s.code(),
            }
        },
    )?;
    Ok(())
}

#[derive(Clone, Copy)]
enum Edit {
    Replace,
    Add,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_drops_every_copy_and_appends_at_the_end() {
        let mut h: HeaderList = vec![
            ("a".into(), b"1".to_vec()),
            ("b".into(), b"2".to_vec()),
            ("a".into(), b"3".to_vec()),
        ];
        replace_value(&mut h, "a", b"x".to_vec());
        assert_eq!(
            h,
            vec![("b".into(), b"2".to_vec()), ("a".into(), b"x".to_vec())]
        );
        replace_value(&mut h, "c", b"y".to_vec());
        assert_eq!(h.last(), Some(&("c".to_string(), b"y".to_vec())));
    }
}
