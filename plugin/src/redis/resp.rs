//! RESP on the wire: commands encoded as arrays of bulk strings and replies decoded with the
//! `redis-protocol` crate (RESP2). The encoder is hand-written because every Redis call on the
//! request path goes through it: it writes straight into one buffer, where the crate would
//! first build a frame per argument (the crate's encoder is the reference in a test). Replies come from the network (through the relay or the host), so decoding
//! never panics: a reply is first measured by a small iterative scanner that bounds nesting
//! depth (the crate's decoder recurses), then decoded by the crate.

use crate::redis::error::RedisError;
use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::types::OwnedFrame;

/// Deepest nesting of arrays accepted in a reply (the filter's replies are at most 2 deep).
pub const MAX_REPLY_DEPTH: usize = 8;

/// One Redis command: its arguments as bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    args: Vec<Vec<u8>>,
}

impl Command {
    pub fn new(name: &str) -> Command {
        Command {
            args: vec![name.as_bytes().to_vec()],
        }
    }

    pub fn arg(mut self, arg: impl AsRef<[u8]>) -> Command {
        self.args.push(arg.as_ref().to_vec());
        self
    }

    pub fn args<I, A>(mut self, args: I) -> Command
    where
        I: IntoIterator<Item = A>,
        A: AsRef<[u8]>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_vec()));
        self
    }

    /// The command's name (first argument) for logs and metrics.
    pub fn name(&self) -> String {
        self.args
            .first()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .unwrap_or_default()
    }

    /// Appends the command as a RESP array of bulk strings: `*<n>`, then `$<len>` and the bytes
    /// of each argument. Written directly rather than through the crate's encoder, which builds
    /// a frame tree (copying every argument) and costs about ten times as much per command —
    /// noticeable when a request-events flush encodes 64 commands; a test checks that the bytes
    /// are the crate's.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        encode_array(out, &self.args);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

/// Appends one command, given as its arguments, as a RESP array of bulk strings (for callers
/// that encode many commands from borrowed bytes without building [`Command`]s).
pub fn encode_array<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    out.reserve(16 + args.iter().map(|a| a.as_ref().len() + 16).sum::<usize>());
    push_length_line(out, b'*', args.len());
    for arg in args {
        let arg = arg.as_ref();
        push_length_line(out, b'$', arg.len());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// `<kind><n>\r\n`.
fn push_length_line(out: &mut Vec<u8>, kind: u8, n: usize) {
    out.push(kind);
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Encodes several commands back to back (a pipeline).
pub fn encode_pipeline(commands: &[Command]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in commands {
        c.encode_into(&mut out);
    }
    out
}

/// A decoded reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    /// An error reply, e.g. `NOSCRIPT No matching script...`.
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Reply>),
}

impl Reply {
    /// The error prefix (`NOSCRIPT`, `MOVED`, `ERR`, ...) of an error reply.
    pub fn error_prefix(&self) -> Option<&str> {
        match self {
            Reply::Error(msg) => Some(msg.split(' ').next().unwrap_or("")),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Reply::Int(i) => Some(*i),
            Reply::Bulk(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }
}

impl From<OwnedFrame> for Reply {
    fn from(frame: OwnedFrame) -> Reply {
        match frame {
            OwnedFrame::SimpleString(s) => Reply::Status(String::from_utf8_lossy(&s).into_owned()),
            OwnedFrame::Error(e) => Reply::Error(e),
            OwnedFrame::Integer(i) => Reply::Int(i),
            OwnedFrame::BulkString(b) => Reply::Bulk(b),
            OwnedFrame::Array(items) => Reply::Array(items.into_iter().map(Reply::from).collect()),
            OwnedFrame::Null => Reply::Nil,
        }
    }
}

/// Outcome of measuring one frame.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// A complete frame of this many bytes.
    Complete(usize),
    Incomplete,
    Invalid(String),
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

fn parse_len(line: &[u8]) -> Option<i64> {
    std::str::from_utf8(line).ok()?.parse().ok()
}

/// Measures the frame at the start of `buf` without recursion, refusing nesting deeper than
/// [`MAX_REPLY_DEPTH`] and anything that is not RESP2.
fn scan_frame(buf: &[u8]) -> Scan {
    let mut pos = 0usize;
    // Elements still expected at each open array level.
    let mut open: Vec<i64> = Vec::new();
    loop {
        let Some(&kind) = buf.get(pos) else {
            return Scan::Incomplete;
        };
        let Some(line_end) = find_crlf(buf, pos + 1) else {
            return Scan::Incomplete;
        };
        let line = &buf[pos + 1..line_end];
        pos = line_end + 2;
        match kind {
            b'+' | b'-' => {}
            b':' => {
                if parse_len(line).is_none() {
                    return Scan::Invalid(format!(
                        "integer reply {:?} is not a number",
                        String::from_utf8_lossy(line)
                    ));
                }
            }
            b'$' => match parse_len(line) {
                Some(-1) => {}
                Some(n) if n >= 0 => {
                    let Ok(n) = usize::try_from(n) else {
                        return Scan::Invalid("bulk string length out of range".into());
                    };
                    let Some(end) = pos.checked_add(n).and_then(|e| e.checked_add(2)) else {
                        return Scan::Invalid("bulk string length out of range".into());
                    };
                    if buf.len() < end {
                        return Scan::Incomplete;
                    }
                    if &buf[end - 2..end] != b"\r\n" {
                        return Scan::Invalid("bulk string not terminated by CRLF".into());
                    }
                    pos = end;
                }
                _ => {
                    return Scan::Invalid(format!(
                        "bad bulk string length {:?}",
                        String::from_utf8_lossy(line)
                    ))
                }
            },
            b'*' => match parse_len(line) {
                Some(-1) | Some(0) => {}
                Some(n) if n > 0 => {
                    if open.len() >= MAX_REPLY_DEPTH {
                        return Scan::Invalid(format!(
                            "reply nested deeper than {MAX_REPLY_DEPTH} arrays"
                        ));
                    }
                    open.push(n);
                    continue;
                }
                _ => {
                    return Scan::Invalid(format!(
                        "bad array length {:?}",
                        String::from_utf8_lossy(line)
                    ))
                }
            },
            other => {
                return Scan::Invalid(format!("unexpected RESP type byte 0x{other:02x}"));
            }
        }
        // One element finished: close every array it completes.
        loop {
            match open.last_mut() {
                None => return Scan::Complete(pos),
                Some(left) => {
                    *left -= 1;
                    if *left > 0 {
                        break;
                    }
                    open.pop();
                }
            }
        }
    }
}

/// Decodes exactly `expected` replies from `buf`; anything else (garbage, truncation, extra
/// bytes) is a protocol error.
pub fn decode_replies(buf: &[u8], expected: usize) -> Result<Vec<Reply>, RedisError> {
    let mut replies = Vec::with_capacity(expected.min(64));
    let mut pos = 0;
    while replies.len() < expected {
        let rest = &buf[pos..];
        let len = match scan_frame(rest) {
            Scan::Complete(len) => len,
            Scan::Incomplete => {
                return Err(RedisError::protocol(format!(
                    "reply {} of {expected} is truncated ({} bytes)",
                    replies.len() + 1,
                    rest.len()
                )))
            }
            Scan::Invalid(why) => {
                return Err(RedisError::protocol(format!(
                    "reply {} of {expected} is not RESP: {why}",
                    replies.len() + 1
                )))
            }
        };
        match decode(&rest[..len]) {
            Ok(Some((frame, used))) if used == len => replies.push(Reply::from(frame)),
            Ok(_) => {
                return Err(RedisError::protocol(format!(
                    "reply {} of {expected} did not decode to one frame",
                    replies.len() + 1
                )))
            }
            Err(e) => {
                return Err(RedisError::protocol(format!(
                    "reply {} of {expected} is not RESP: {e}",
                    replies.len() + 1
                )))
            }
        }
        pos += len;
    }
    if pos != buf.len() {
        return Err(RedisError::protocol(format!(
            "{} unexpected bytes after {expected} replies",
            buf.len() - pos
        )));
    }
    Ok(replies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_encode_as_arrays_of_bulk_strings() {
        let c = Command::new("SET").arg("k").arg(b"v\r\n".as_slice());
        assert_eq!(
            c.encode(),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n".to_vec()
        );
        let p = encode_pipeline(&[Command::new("PING"), Command::new("TIME")]);
        assert_eq!(p, b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nTIME\r\n".to_vec());
        assert_eq!(Command::new("EVALSHA").args(["a", "b"]).name(), "EVALSHA");
    }

    #[test]
    fn commands_encode_exactly_as_the_crate_encodes_them() {
        use redis_protocol::resp2::encode::encode;
        use redis_protocol::resp2::types::Resp2Frame;
        let big = vec![0xffu8; 70_000];
        let commands = [
            Command::new("PING"),
            Command::new("SET").arg("").arg(b"\r\n\0".as_slice()),
            Command::new("PUBLISH").arg("krowoc:requests").arg(&big),
            Command::new("EVALSHA").args((0..12).map(|i| i.to_string())),
        ];
        for c in &commands {
            let frame = OwnedFrame::Array(
                c.args
                    .iter()
                    .map(|a| OwnedFrame::BulkString(a.clone()))
                    .collect(),
            );
            let mut expected = vec![0u8; frame.encode_len(false)];
            let n = encode(&mut expected, &frame, false).expect("crate encodes");
            expected.truncate(n);
            assert_eq!(c.encode(), expected, "{}", c.name());
            let borrowed: Vec<&[u8]> = c.args.iter().map(Vec::as_slice).collect();
            let mut direct = Vec::new();
            encode_array(&mut direct, &borrowed);
            assert_eq!(direct, expected, "{}", c.name());
        }
    }

    #[test]
    fn replies_decode_to_typed_values() {
        let raw = b"+OK\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n:1\r\n*1\r\n$0\r\n\r\n-NOSCRIPT No matching script\r\n*0\r\n";
        let replies = decode_replies(raw, 7).expect("valid");
        assert_eq!(
            replies,
            vec![
                Reply::Status("OK".into()),
                Reply::Int(42),
                Reply::Bulk(b"abc".to_vec()),
                Reply::Nil,
                Reply::Array(vec![Reply::Int(1), Reply::Array(vec![Reply::Bulk(vec![])])]),
                Reply::Error("NOSCRIPT No matching script".into()),
                Reply::Array(vec![]),
            ]
        );
        assert_eq!(replies[5].error_prefix(), Some("NOSCRIPT"));
        assert_eq!(replies[1].as_int(), Some(42));
    }

    #[test]
    fn garbage_is_a_protocol_error_never_a_panic() {
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"hello".to_vec(),
            b"+OK".to_vec(),
            b":abc\r\n".to_vec(),
            b"$5\r\nab\r\n".to_vec(),
            b"$2\r\nabcd\r\n".to_vec(),
            b"$-7\r\n".to_vec(),
            b"$99999999999999999999\r\n".to_vec(),
            b"*99999999999\r\n:1\r\n".to_vec(),
            b"*-2\r\n".to_vec(),
            b"%1\r\n+a\r\n+b\r\n".to_vec(),
            b"+OK\r\n+extra\r\n".to_vec(),
            vec![0xff; 64],
            b"*1\r\n".repeat(100_000),
        ];
        for raw in cases {
            let err = decode_replies(&raw, 1).expect_err("garbage must not decode");
            assert!(err.is_protocol(), "{err:?}");
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let mut ok = b"*1\r\n".repeat(MAX_REPLY_DEPTH);
        ok.extend_from_slice(b":1\r\n");
        assert!(decode_replies(&ok, 1).is_ok());
        let mut deep = b"*1\r\n".repeat(MAX_REPLY_DEPTH + 1);
        deep.extend_from_slice(b":1\r\n");
        assert!(decode_replies(&deep, 1).is_err());
    }

    #[test]
    fn scanner_measures_frames_exactly() {
        assert_eq!(scan_frame(b"*2\r\n:1\r\n:2\r\nrest"), Scan::Complete(12));
        assert_eq!(scan_frame(b"*2\r\n:1\r\n"), Scan::Incomplete);
        assert_eq!(scan_frame(b"*-1\r\n"), Scan::Complete(5));
        assert_eq!(scan_frame(b"*1\r\n$-1\r\n"), Scan::Complete(9));
    }
}
