//! Redis URLs, `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]` (`rediss://` for TLS):
//! [`RedisEndpoint::from_url`] reads one (with the `url` crate) for the relay and host-shim,
//! [`RedisEndpoint::from_url_and_password`] takes the password from elsewhere (a file), and
//! [`redact_url`] hides a password in errors and logs, for them and for the demo upstream.
//!
//! ```
//! use krowoc_relay::pool::RedisEndpoint;
//! use krowoc_relay::redis_url::redact_url;
//! let e = RedisEndpoint::from_url("redis://app:s%3Acret@[::1]:6380/2").unwrap();
//! assert_eq!((e.host.as_str(), e.port, e.db), ("::1", 6380, Some(2)));
//! assert_eq!(e.password.as_deref(), Some("s:cret"));
//! assert_eq!(redact_url("redis://app:s%3Acret@[::1]:6380/2"), "redis://app:***@[::1]:6380/2");
//! ```

use percent_encoding::percent_decode_str;
use url::{Host, ParseError, Url};

use crate::pool::{EndpointError, RedisEndpoint, DEFAULT_CONNECT_TIMEOUT, DEFAULT_PORT};

const FORM: &str = "redis[s]://[[user]:password@]host[:port][/db]";

impl RedisEndpoint {
    /// Parses `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]` (user and password percent-decoded,
    /// IPv6 hosts in brackets, port 6379 by default); `rediss://` connects with TLS. Query
    /// parameters are refused rather than ignored. The last `@` ends the user info, so a
    /// password may hold an unencoded `@` or `/`; errors never show the password.
    pub fn from_url(text: &str) -> Result<RedisEndpoint, EndpointError> {
        parse(text, None)
    }

    /// Like [`RedisEndpoint::from_url`] with the password given apart from the URL (read from a
    /// file, so that it is not on a command line): the URL may name the user
    /// (`redis://USER@HOST`) but must not hold a password too.
    pub fn from_url_and_password(
        text: &str,
        password: String,
    ) -> Result<RedisEndpoint, EndpointError> {
        parse(text, Some(password))
    }
}

fn parse(text: &str, given_password: Option<String>) -> Result<RedisEndpoint, EndpointError> {
    let fail = |reason: String| EndpointError {
        url: redact_url(text),
        reason,
    };
    // Checked before `url` sees the text: it would read `localhost:6379` as the scheme
    // `localhost`.
    let (tls, rest) = match text.split_once("://") {
        Some(("redis", rest)) => (false, rest),
        Some(("rediss", rest)) => (true, rest),
        Some((scheme, _)) => {
            return Err(fail(format!(
                "scheme {scheme:?} is not redis or rediss; expected {FORM}"
            )))
        }
        None => return Err(fail(format!("no scheme; expected {FORM}"))),
    };
    // Refused before parsing: a '?' or '#' in a password would cut the host short there.
    if rest.contains(['?', '#']) {
        return Err(fail(
            "query parameters and fragments are not supported; put the database in the path (/DB)"
                .into(),
        ));
    }
    let (userinfo, hostpath) = match rest.rsplit_once('@') {
        Some((info, hostpath)) => (Some(info), hostpath),
        None => (None, rest),
    };
    let hostport = hostpath.split_once('/').map_or(hostpath, |(hp, _)| hp);
    // Everything before the last '@' is user info: encode the '/' that would end it early.
    let normalised = match userinfo {
        Some(info) => format!("redis://{}@{hostpath}", info.replace('/', "%2F")),
        None if tls => format!("redis://{rest}"),
        None => text.to_string(),
    };
    let url = Url::parse(&normalised).map_err(|e| fail(parse_error_reason(e, hostport)))?;

    let (username, password) = match (userinfo, given_password) {
        (None, given) => (None, given),
        (Some(info), Some(given)) => {
            if info.contains(':') {
                return Err(fail(
                    "the URL holds a password and a password file gives one too: keep only the file (write redis://USER@host)"
                        .into(),
                ));
            }
            let user = decode_userinfo(info).map_err(|e| fail(format!("username: {e}")))?;
            ((!user.is_empty()).then_some(user), Some(given))
        }
        (Some(info), None) => {
            if !info.contains(':') {
                return Err(fail(
                    "user info has no ':'; write redis://:PASSWORD@host or redis://USER:PASSWORD@host"
                        .into(),
                ));
            }
            let user =
                decode_userinfo(url.username()).map_err(|e| fail(format!("username: {e}")))?;
            let pass = decode_userinfo(url.password().unwrap_or(""))
                .map_err(|e| fail(format!("password: {e}")))?;
            if pass.is_empty() {
                return Err(fail("the password is empty".into()));
            }
            ((!user.is_empty()).then_some(user), Some(pass))
        }
    };
    let host = match url.host() {
        Some(Host::Domain(name)) if !name.is_empty() => name.to_string(),
        Some(Host::Ipv4(ip)) => ip.to_string(),
        Some(Host::Ipv6(ip)) => ip.to_string(),
        _ => return Err(fail("the host is empty".into())),
    };
    let port = match url.port() {
        None => DEFAULT_PORT,
        Some(0) => return Err(fail(bad_port("0"))),
        Some(port) => port,
    };
    let db = match url.path().strip_prefix('/').unwrap_or_default() {
        "" => None,
        db => Some(db.parse::<u32>().map_err(|_| {
            fail(format!(
                "database {db:?} is not a number (the path must be /DB, e.g. /0)"
            ))
        })?),
    };
    Ok(RedisEndpoint {
        host,
        port,
        username,
        password,
        db,
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        tls,
    })
}

/// Why `url` refused the text, said about the host and port (`hostport`, which holds no user
/// info): `url`'s own errors do not quote the bad part.
fn parse_error_reason(error: ParseError, hostport: &str) -> String {
    let bracketed = hostport.starts_with('[');
    if !bracketed && hostport.matches(':').count() > 1 {
        return format!("host {hostport:?}: write IPv6 addresses in brackets, e.g. [::1]:6379");
    }
    match error {
        ParseError::InvalidPort => {
            let port = match hostport.rsplit_once(']') {
                Some((_, after)) if bracketed => after.strip_prefix(':').unwrap_or(after),
                _ => hostport.rsplit_once(':').map_or("", |(_, p)| p),
            };
            bad_port(port)
        }
        ParseError::EmptyHost => "the host is empty".into(),
        other => format!("host {hostport:?}: {other}"),
    }
}

fn bad_port(port: &str) -> String {
    format!("port {port:?} is not a number from 1 to 65535")
}

/// Percent-decodes a user name or password as `url` keeps it (still encoded). `url` lets a
/// malformed escape through unchanged, so it is refused here rather than taken literally.
fn decode_userinfo(encoded: &str) -> Result<String, String> {
    let bytes = encoded.as_bytes();
    for (i, _) in encoded.match_indices('%') {
        let hex = bytes.get(i + 1..i + 3).unwrap_or_default();
        if hex.len() != 2 || !hex.iter().all(u8::is_ascii_hexdigit) {
            return Err(
                "bad percent escape: a '%' not followed by two hex digits (write %25 for '%')"
                    .into(),
            );
        }
    }
    percent_decode_str(encoded)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| "percent escapes do not decode to UTF-8".to_string())
}

/// The URL with its password replaced by `***` (`user:***@`), or its whole user info when it
/// has no `:` (`***@`), for errors, logs and health output.
///
/// By hand on purpose: it must also hide the secret of text that does not parse as a URL, and
/// it cuts at the last `@` as [`RedisEndpoint::from_url`] does, so an unencoded `/` in a
/// password is hidden too.
pub fn redact_url(text: &str) -> String {
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (&text[..scheme.len() + 3], rest),
        None => ("", text),
    };
    match rest.rsplit_once('@') {
        None => text.to_string(),
        Some((userinfo, hostpath)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}{user}:***@{hostpath}"),
            None => format!("{scheme}***@{hostpath}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> RedisEndpoint {
        RedisEndpoint::from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn refusal(url: &str) -> String {
        match RedisEndpoint::from_url(url) {
            Ok(e) => panic!("{url} was accepted as {e:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn hosts_ports_and_databases() {
        let cases = [
            ("redis://h", "h", 6379, None),
            ("redis://h/", "h", 6379, None),
            ("redis://h:1/0", "h", 1, Some(0)),
            ("redis://10.0.0.7:6380/15", "10.0.0.7", 6380, Some(15)),
            ("redis://[::1]", "::1", 6379, None),
            ("redis://[2001:db8::7]:7000/2", "2001:db8::7", 7000, Some(2)),
            (
                "redis://Cache.Internal:65535",
                "Cache.Internal",
                65535,
                None,
            ),
        ];
        for (url, host, port, db) in cases {
            let e = parse(url);
            assert_eq!((e.host.as_str(), e.port, e.db), (host, port, db), "{url}");
            assert!(e.username.is_none() && e.password.is_none(), "{url}");
        }
        assert_eq!(
            parse("redis://[2001:db8::7]:7000").address(),
            "[2001:db8::7]:7000"
        );
    }

    #[test]
    fn credentials_are_percent_decoded() {
        let e = parse("redis://app%2Done:p%40ss%20w%C3%B6rd@h");
        assert_eq!(e.username.as_deref(), Some("app-one"));
        assert_eq!(e.password.as_deref(), Some("p@ss wörd"));
        let e = parse("redis://:only-a-password@h");
        assert_eq!(
            (e.username, e.password.as_deref()),
            (None, Some("only-a-password"))
        );
    }

    #[test]
    fn rediss_means_tls_and_reads_the_same_parts() {
        let e = parse("rediss://u:pw@cache.internal:6380/1");
        assert!(e.tls);
        assert_eq!(
            (e.host.as_str(), e.port, e.db),
            ("cache.internal", 6380, Some(1))
        );
        assert_eq!(e.password.as_deref(), Some("pw"));
        assert!(parse("rediss://[::1]").tls);
        assert!(!parse("redis://h").tls);
    }

    #[test]
    fn a_password_given_apart_takes_the_user_from_the_url_and_refuses_a_second_password() {
        let given = |url: &str| RedisEndpoint::from_url_and_password(url, "from-file".into());
        let e = given("rediss://krowoc-edge@h:6380").unwrap();
        assert_eq!(e.username.as_deref(), Some("krowoc-edge"));
        assert_eq!(e.password.as_deref(), Some("from-file"));
        let e = given("redis://h").unwrap();
        assert_eq!(
            (e.username, e.password.as_deref()),
            (None, Some("from-file"))
        );
        let err = given("redis://u:hunter2@h").unwrap_err().to_string();
        assert!(err.contains("a password file gives one too"), "{err}");
        assert!(
            !err.contains("hunter2") && !err.contains("from-file"),
            "{err}"
        );
        let err = given("redis://u%zz@h").unwrap_err().to_string();
        assert!(err.contains("username: bad percent escape"), "{err}");
    }

    #[test]
    fn the_last_at_ends_the_user_info() {
        let e = parse("redis://u:a@b/c:d@h:7/1");
        assert_eq!(e.username.as_deref(), Some("u"));
        assert_eq!(e.password.as_deref(), Some("a@b/c:d"));
        assert_eq!((e.host.as_str(), e.port, e.db), ("h", 7, Some(1)));
    }

    #[test]
    fn refusals_name_the_wrong_part() {
        let cases = [
            ("localhost:6379", "no scheme"),
            ("REDIS://h", "scheme \"REDIS\""),
            ("unix:///tmp/redis.sock", "scheme \"unix\""),
            ("rediss://", "host is empty"),
            ("redis://h:0", "port \"0\""),
            ("redis://h:65536", "port \"65536\""),
            ("redis://[::1]:x", "port \"x\""),
            ("redis://[::1", "host \"[::1\""),
            ("redis://h/x", "database \"x\""),
            ("redis://h/1/2", "database \"1/2\""),
            ("redis://", "host is empty"),
            ("redis://u:p@", "host is empty"),
            ("redis://h#frag", "fragments"),
            ("redis://@h", "no ':'"),
            ("redis://u:@h", "password is empty"),
            ("redis://u:%4@h", "password: bad percent escape"),
            (
                "redis://%ff:p@h",
                "username: percent escapes do not decode to UTF-8",
            ),
            ("redis://fe80::1", "brackets"),
        ];
        for (url, expected) in cases {
            let err = refusal(url);
            assert!(err.contains(expected), "{url}: {err}");
        }
    }

    #[test]
    fn refusals_never_show_the_password() {
        for url in [
            "redis://u:hunter2@h:99999",
            "redis://u:hunter2@h/db",
            "redis://u:hunt/er2@h:x",
            "redis://u:hunt?er2@h",
            "redis://u:hunter2%zz@h",
            "redis://u:hunter2@",
            "redis://u:hunter2@[::1",
        ] {
            let err = RedisEndpoint::from_url(url).unwrap_err();
            for shown in [err.to_string(), format!("{err:?}")] {
                assert!(!shown.contains("hunt"), "{url}: {shown}");
                assert!(shown.contains("u:***@"), "{url}: {shown}");
            }
        }
    }

    #[test]
    fn redaction_hides_the_password_or_the_whole_user_info() {
        let cases = [
            ("redis://user:secret@h:6379/0", "redis://user:***@h:6379/0"),
            ("redis://:secret@h", "redis://:***@h"),
            ("redis://secret@h:6379", "redis://***@h:6379"),
            ("redis://u:se/cr@et@h/1", "redis://u:***@h/1"),
            ("user:secret@h:6379", "user:***@h:6379"),
            ("redis://h:6379", "redis://h:6379"),
            ("not a url", "not a url"),
        ];
        for (url, redacted) in cases {
            assert_eq!(redact_url(url), redacted, "{url}");
        }
    }
}
