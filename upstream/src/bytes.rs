//! `GET /api/bytes?size=N`: N bytes, cacheable for a minute. Not one of the guide's endpoints:
//! `cargo xtask bench` measures cache hits by body size with it.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

use crate::input::QueryParams;
use crate::Error;

/// The largest body it serves: 1 MiB.
pub const MAX_SIZE: usize = 1024 * 1024;

/// `size` bytes of `x` (`application/octet-stream`, `Cache-Control: public, max-age=60`); a
/// missing, unreadable or too large `size` is a 400 naming it.
pub async fn bytes(params: QueryParams) -> Result<Response, Error> {
    let raw = params
        .single("size")?
        .ok_or_else(|| Error::invalid_field("size", "query parameter `size` is required"))?;
    let size: usize = raw.parse().ok().filter(|n| *n <= MAX_SIZE).ok_or_else(|| {
        Error::invalid_field(
            "size",
            format!("`size` must be a number of bytes from 0 to {MAX_SIZE}; got {raw:?}"),
        )
    })?;
    let mut response = vec![b'x'; size].into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=60"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::to_bytes;

    fn query(pairs: &[(&str, &str)]) -> QueryParams {
        QueryParams(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[tokio::test]
    async fn serves_the_size_asked_cacheable() {
        let r = bytes(query(&[("size", "65536")])).await.unwrap();
        assert_eq!(r.headers()[header::CACHE_CONTROL], "public, max-age=60");
        let body = to_bytes(r.into_body(), MAX_SIZE).await.unwrap();
        assert_eq!(body.len(), 65536);
        assert!(body.iter().all(|b| *b == b'x'));
    }

    #[tokio::test]
    async fn a_missing_bad_or_too_large_size_is_refused_by_name() {
        for pairs in [
            vec![],
            vec![("size", "ten")],
            vec![("size", "1048577")],
            vec![("size", "1"), ("size", "2")],
        ] {
            let e = bytes(query(&pairs)).await.unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidField, "{pairs:?}");
            assert!(e.to_string().contains("size"), "{pairs:?}: {e}");
        }
    }
}
