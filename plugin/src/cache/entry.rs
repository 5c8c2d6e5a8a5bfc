//! A stored response as bytes: the `v` field of an entry. It starts with a version tag, so an
//! entry written by another format (or damaged) is recognised, treated as a miss and deleted.
//!
//! ```text
//! "KRC1"                          version tag (also checked by the lookup script)
//! u16 status                      big-endian
//! u16 n                           number of fields
//! n × (u16 name_len, name, u32 value_len, value)
//! body                            the rest
//! ```

use std::fmt;

/// The version tag of this format.
pub const MAGIC: &[u8; 4] = b"KRC1";

/// Most fields a stored response may have.
pub const MAX_FIELDS: usize = 512;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Why an entry could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryError(pub String);

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cache entry unreadable: {}", self.0)
    }
}

/// Encodes a response; fields beyond [`MAX_FIELDS`] or too long for the format are left out.
pub fn encode(status: u16, headers: &[(String, String)], body: &[u8]) -> Vec<u8> {
    let fields: Vec<&(String, String)> = headers
        .iter()
        .filter(|(k, v)| k.len() <= usize::from(u16::MAX) && u32::try_from(v.len()).is_ok())
        .take(MAX_FIELDS)
        .collect();
    let size = 8
        + fields
            .iter()
            .map(|(k, v)| 6 + k.len() + v.len())
            .sum::<usize>()
        + body.len();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&status.to_be_bytes());
    out.extend_from_slice(&(fields.len() as u16).to_be_bytes());
    for (k, v) in fields {
        out.extend_from_slice(&(k.len() as u16).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out.extend_from_slice(body);
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], EntryError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| EntryError(format!("truncated in {what} at byte {}", self.pos)))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u16(&mut self, what: &str) -> Result<u16, EntryError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, EntryError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A field name or value: UTF-8 without NUL, CR or LF (they could not be sent).
    fn text(&mut self, n: usize, what: &str) -> Result<String, EntryError> {
        let b = self.take(n, what)?;
        if b.iter().any(|c| matches!(c, 0 | b'\r' | b'\n')) {
            return Err(EntryError(format!("{what} holds a control character")));
        }
        String::from_utf8(b.to_vec()).map_err(|_| EntryError(format!("{what} is not UTF-8")))
    }
}

/// Decodes an entry, taking the bytes (the body is moved out, not copied twice).
pub fn decode(mut blob: Vec<u8>) -> Result<StoredResponse, EntryError> {
    if blob.len() < 8 || &blob[..4] != MAGIC {
        return Err(EntryError("no KRC1 version tag".into()));
    }
    let mut r = Reader {
        bytes: &blob,
        pos: 4,
    };
    let status = r.u16("status")?;
    if !(100..=599).contains(&status) {
        return Err(EntryError(format!("status {status} out of range")));
    }
    let n = usize::from(r.u16("field count")?);
    if n > MAX_FIELDS {
        return Err(EntryError(format!("{n} fields")));
    }
    let mut headers = Vec::with_capacity(n);
    for i in 0..n {
        let klen = usize::from(r.u16("field name length")?);
        let name = r.text(klen, "field name")?;
        if name.is_empty() || name.bytes().any(|b| b == b':' || b == b' ') {
            return Err(EntryError(format!("field {i} has a bad name {name:?}")));
        }
        let vlen = usize::try_from(r.u32("field value length")?)
            .map_err(|_| EntryError("field value length".into()))?;
        let value = r.text(vlen, "field value")?;
        headers.push((name, value));
    }
    let body_start = r.pos;
    blob.drain(..body_start);
    Ok(StoredResponse {
        status,
        headers,
        body: blob,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::fields as h;

    #[test]
    fn round_trips_status_fields_and_body() {
        let headers = h(&[
            ("content-type", "application/json"),
            ("cache-tag", "user:1"),
            ("x-empty", ""),
        ]);
        let body = b"{\"a\":1}\x00\xff binary is fine".to_vec();
        let blob = encode(203, &headers, &body);
        assert!(blob.starts_with(MAGIC));
        let back = decode(blob).expect("decodes");
        assert_eq!(
            back,
            StoredResponse {
                status: 203,
                headers,
                body
            }
        );
        let empty = decode(encode(204, &[], b"")).expect("decodes");
        assert_eq!(
            (empty.status, empty.headers.len(), empty.body.len()),
            (204, 0, 0)
        );
    }

    #[test]
    fn a_megabyte_body_round_trips() {
        let body: Vec<u8> = (0..1_048_576u32).map(|i| (i % 251) as u8).collect();
        let back = decode(encode(200, &h(&[("a", "b")]), &body)).expect("decodes");
        assert_eq!(back.body, body);
    }

    #[test]
    fn damaged_or_foreign_entries_are_refused_not_trapped() {
        assert!(decode(b"garbage".to_vec()).is_err());
        assert!(
            decode(b"KRC0\x00\xc8\x00\x00".to_vec()).is_err(),
            "other version"
        );
        assert!(decode(Vec::new()).is_err());
        let good = encode(200, &h(&[("content-type", "text/plain")]), b"body");
        // Any truncation inside the fields is an error (the 4-byte body may be cut anywhere).
        for cut in 5..good.len() - 4 {
            assert!(decode(good[..cut].to_vec()).is_err(), "cut at {cut}");
        }
        let mut bad_status = good.clone();
        bad_status[4] = 0xff;
        assert!(decode(bad_status).is_err());
        let nul = encode(200, &h(&[("x", "a\u{0}b")]), b"");
        assert!(decode(nul).is_err());
        let mut huge_count = good.clone();
        huge_count[6] = 0xff;
        assert!(decode(huge_count).is_err());
    }
}
