//! Tiny blocking clients for looking at the services xtask runs: one RESP command to Redis,
//! one HTTP/1.1 GET. Enough for readiness checks and bench bookkeeping, nothing more.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends one command and returns a simple-string, integer or bulk-string reply as text.
/// An error reply is an error; nil is an empty string.
pub fn redis_command(addr: SocketAddr, args: &[&str]) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("cannot connect to redis at {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(&testkit::encode_command(args))?;
    read_reply(&mut BufReader::new(stream)).with_context(|| format!("redis {args:?} at {addr}"))
}

/// Sends one command whose reply is an array of bulk strings (`KEYS`, `SMEMBERS`, …).
pub fn redis_array(addr: SocketAddr, args: &[&str]) -> Result<Vec<String>> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("cannot connect to redis at {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(&testkit::encode_command(args))?;
    let mut reader = BufReader::new(stream);
    let read = |reader: &mut BufReader<TcpStream>| -> Result<Vec<String>> {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(e) = line.strip_prefix('-') {
            bail!("redis answered an error: {e}");
        }
        let n: usize = line
            .strip_prefix('*')
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("expected an array, got {line:?}"))?;
        (0..n).map(|_| read_reply(reader)).collect()
    };
    read(&mut reader).with_context(|| format!("redis {args:?} at {addr}"))
}

fn read_reply(reader: &mut impl BufRead) -> Result<String> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at_checked(1).context("empty reply")?;
    match kind {
        "+" | ":" => Ok(rest.to_string()),
        "-" => bail!("redis answered an error: {rest}"),
        "$" => {
            let n: i64 = rest
                .parse()
                .map_err(|_| anyhow!("bad bulk length {rest:?}"))?;
            if n < 0 {
                return Ok(String::new());
            }
            let mut body = vec![0; n as usize + 2];
            reader.read_exact(&mut body)?;
            body.truncate(n as usize);
            String::from_utf8(body).context("bulk reply is not UTF-8")
        }
        _ => bail!("unexpected reply {line:?} (only simple, integer and bulk replies are read)"),
    }
}

/// `INFO commandstats` as command name → calls (`cmdstat_get:calls=3,...` → `get` → 3).
pub fn parse_commandstats(info: &str) -> BTreeMap<String, u64> {
    let mut calls = BTreeMap::new();
    for line in info.lines() {
        let Some((name, fields)) = line.trim().split_once(':') else {
            continue;
        };
        let Some(command) = name.strip_prefix("cmdstat_") else {
            continue;
        };
        let count = fields
            .split(',')
            .find_map(|f| f.strip_prefix("calls="))
            .and_then(|n| n.parse().ok());
        if let Some(count) = count {
            calls.insert(command.to_string(), count);
        }
    }
    calls
}

/// Calls per command between two snapshots, without the `INFO` calls that took them.
pub fn commandstats_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter(|(name, _)| name.as_str() != "info")
        .filter_map(|(name, &n)| {
            let d = n.saturating_sub(before.get(name).copied().unwrap_or(0));
            (d > 0).then(|| (name.clone(), d))
        })
        .collect()
}

/// A snapshot of Redis's per-command call counters.
pub fn redis_commandstats(addr: SocketAddr) -> Result<BTreeMap<String, u64>> {
    Ok(parse_commandstats(&redis_command(
        addr,
        &["INFO", "commandstats"],
    )?))
}

/// An HTTP response, as far as xtask looks at one.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` over HTTP/1.1 with `Connection: close`; reads the status line and headers.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reader = BufReader::new(stream);
    parse_response_head(&mut reader).with_context(|| format!("GET http://{addr}{path}"))
}

/// `GET path` like [`http_get`], and the body read to the end of the connection.
pub fn http_get_text(addr: SocketAddr, path: &str) -> Result<(HttpResponse, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reader = BufReader::new(stream);
    let head =
        parse_response_head(&mut reader).with_context(|| format!("GET http://{addr}{path}"))?;
    let mut body = String::new();
    reader
        .read_to_string(&mut body)
        .with_context(|| format!("reading the body of GET http://{addr}{path}"))?;
    if head
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    {
        body = dechunk(&body)
            .with_context(|| format!("the chunked body of GET http://{addr}{path}"))?;
    }
    Ok((head, body))
}

/// The data of a chunked body (chunk extensions and trailers dropped).
fn dechunk(raw: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = raw;
    loop {
        let (line, after) = rest
            .split_once("\r\n")
            .context("a chunk size line is not ended")?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16)
            .with_context(|| format!("{size:?} is not a chunk size"))?;
        if size == 0 {
            return Ok(out);
        }
        let data = after.get(..size).context("a chunk is cut short")?;
        out.push_str(data);
        rest = after[size..]
            .strip_prefix("\r\n")
            .context("a chunk is not followed by CRLF")?;
    }
}

fn parse_response_head(reader: &mut impl BufRead) -> Result<HttpResponse> {
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {:?}", status_line.trim_end()))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(HttpResponse { status, headers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunked_body_is_read_to_its_last_chunk() {
        assert_eq!(
            dechunk("3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").unwrap(),
            "abcde"
        );
        assert!(dechunk("zz\r\nabc\r\n").is_err());
        assert!(dechunk("5\r\nabc").is_err());
    }

    #[test]
    fn replies_are_read_by_kind() {
        let read = |raw: &str| read_reply(&mut raw.as_bytes());
        assert_eq!(read("+PONG\r\n").unwrap(), "PONG");
        assert_eq!(read(":42\r\n").unwrap(), "42");
        assert_eq!(read("$5\r\na\r\nbc\r\n").unwrap(), "a\r\nbc");
        assert_eq!(read("$-1\r\n").unwrap(), "");
        let e = read("-NOSCRIPT No matching script\r\n").unwrap_err();
        assert!(e.to_string().contains("NOSCRIPT"), "{e}");
        assert!(read("*1\r\n+a\r\n").is_err());
    }

    #[test]
    fn commandstats_deltas_count_calls_per_command_without_info() {
        let before = parse_commandstats(
            "# Commandstats\r\n\
             cmdstat_get:calls=10,usec=20,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r\n\
             cmdstat_info:calls=3,usec=90,usec_per_call=30.00,rejected_calls=0,failed_calls=0\r\n",
        );
        assert_eq!(before.get("get"), Some(&10));
        let after = parse_commandstats(
            "# Commandstats\r\n\
             cmdstat_get:calls=15,usec=30,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r\n\
             cmdstat_evalsha:calls=5,usec=50,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r\n\
             cmdstat_info:calls=4,usec=120,usec_per_call=30.00,rejected_calls=0,failed_calls=0\r\n",
        );
        let delta = commandstats_delta(&before, &after);
        assert_eq!(
            delta.into_iter().collect::<Vec<_>>(),
            [("evalsha".to_string(), 5), ("get".to_string(), 5)]
        );
    }

    #[test]
    fn response_heads_are_parsed() {
        let raw = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nX-Krowoc-Edge: 0.1.0\r\n\r\nok";
        let r = parse_response_head(&mut raw.as_bytes()).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-krowoc-edge"), Some("0.1.0"));
        assert_eq!(r.header("set-cookie"), None);
        assert!(parse_response_head(&mut "garbage\r\n\r\n".as_bytes()).is_err());
    }
}
