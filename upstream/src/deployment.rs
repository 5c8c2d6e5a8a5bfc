//! Where the upstream's Redis is: one server (`--redis`, `REDIS_URL`), a Redis Cluster reached
//! through seed nodes (`--redis-cluster`, `REDIS_CLUSTER`), or a master that Sentinel watches
//! (`--redis-sentinel`, `REDIS_SENTINEL`, with `--redis-sentinel-master`,
//! `REDIS_SENTINEL_MASTER`). Exactly one of the three is used; without any, the default
//! `redis://127.0.0.1:6379`.
//!
//! Cluster seeds and sentinels are a node list:
//!
//! ```text
//! [redis[s]://[[USER]:PASSWORD@]]HOST:PORT[,HOST:PORT…][/DB]
//! ```
//!
//! The scheme and user info are written once, before the first node, and apply to every node:
//! `redis://app:secret@10.0.0.1:7000,10.0.0.2:7000`. A bare `HOST:PORT,…` list is plain TCP
//! without credentials; `rediss://` is TLS (with `--redis-tls-ca` as for `REDIS_URL`).
//! For a cluster the credentials are every node's, seeds and nodes found later alike, and there
//! is no `/DB` (a cluster has only database 0). For Sentinel the user info and `/DB` are the
//! master's (and its replicas'), as in `REDIS_URL`; the sentinels themselves are asked without
//! credentials, over TLS when the scheme is `rediss://`.

use std::fmt;

use krowoc_relay::pool::RedisEndpoint;
use krowoc_relay::redis_url::redact_url;

use crate::error::Error;

/// The Redis used when no option says otherwise.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The longest accepted `--redis-sentinel-master`, in bytes.
pub const MAX_MASTER_NAME_BYTES: usize = 256;

/// A command-line option and the environment variable that can set it, for messages.
#[derive(Debug, Clone, Copy)]
struct Setting {
    flag: &'static str,
    env: &'static str,
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.flag, self.env)
    }
}

const URL: Setting = Setting {
    flag: "--redis",
    env: "REDIS_URL",
};
const CLUSTER: Setting = Setting {
    flag: "--redis-cluster",
    env: "REDIS_CLUSTER",
};
const SENTINEL: Setting = Setting {
    flag: "--redis-sentinel",
    env: "REDIS_SENTINEL",
};
const SENTINEL_MASTER: Setting = Setting {
    flag: "--redis-sentinel-master",
    env: "REDIS_SENTINEL_MASTER",
};

/// The Redis options as given (flag or environment), before they are checked.
#[derive(Debug, Clone, Default)]
pub struct RedisSettings {
    pub url: Option<String>,
    pub cluster: Option<String>,
    pub sentinel: Option<String>,
    pub sentinel_master: Option<String>,
}

#[derive(Clone)]
pub enum RedisDeployment {
    /// One server: `redis[s]://[[USER]:PASSWORD@]HOST[:PORT][/DB]`, checked by
    /// [`crate::UpstreamConfig::validate`].
    Standalone { url: String },
    /// A Redis Cluster: any reachable seed tells the client the rest.
    Cluster { seeds: NodeList },
    /// A master (and replicas) that the sentinels know as `master`.
    Sentinel { sentinels: NodeList, master: String },
}

impl RedisDeployment {
    /// One standalone server at `url`.
    pub fn standalone(url: impl Into<String>) -> RedisDeployment {
        RedisDeployment::Standalone { url: url.into() }
    }

    /// A cluster reached through `seeds`, a node list (see the module docs).
    pub fn cluster(seeds: &str) -> Result<RedisDeployment, Error> {
        Ok(RedisDeployment::Cluster {
            seeds: NodeList::parse(seeds, CLUSTER)?,
        })
    }

    /// The master that the sentinels in `sentinels` (a node list) know as `master`.
    pub fn sentinel(sentinels: &str, master: &str) -> Result<RedisDeployment, Error> {
        validate_master_name(master)?;
        Ok(RedisDeployment::Sentinel {
            sentinels: NodeList::parse(sentinels, SENTINEL)?,
            master: master.to_string(),
        })
    }

    /// Picks the one deployment the options describe, refusing conflicting ones.
    pub fn from_settings(settings: RedisSettings) -> Result<RedisDeployment, Error> {
        let given: Vec<Setting> = [
            (URL, settings.url.is_some()),
            (CLUSTER, settings.cluster.is_some()),
            (SENTINEL, settings.sentinel.is_some()),
        ]
        .into_iter()
        .filter_map(|(setting, set)| set.then_some(setting))
        .collect();
        if let [first, second, ..] = given[..] {
            return Err(Error::config(
                second.flag,
                format!(
                    "{first} is set too: use exactly one of {}, {} and {}",
                    URL.flag, CLUSTER.flag, SENTINEL.flag
                ),
            ));
        }
        if settings.sentinel_master.is_some() && settings.sentinel.is_none() {
            return Err(Error::config(
                SENTINEL_MASTER.flag,
                format!("names a Sentinel master, but {SENTINEL} is not set"),
            ));
        }
        match settings {
            RedisSettings {
                cluster: Some(seeds),
                ..
            } => RedisDeployment::cluster(&seeds),
            RedisSettings {
                sentinel: Some(sentinels),
                sentinel_master,
                ..
            } => match sentinel_master {
                Some(master) => RedisDeployment::sentinel(&sentinels, &master),
                None => Err(Error::config(
                    SENTINEL_MASTER.flag,
                    format!(
                        "is required with {SENTINEL}: the name the sentinels monitor the master as"
                    ),
                )),
            },
            RedisSettings { url, .. } => Ok(RedisDeployment::standalone(
                url.unwrap_or_else(|| DEFAULT_REDIS_URL.to_string()),
            )),
        }
    }

    /// True when connections use TLS (`rediss://`).
    pub fn uses_tls(&self) -> bool {
        match self {
            RedisDeployment::Standalone { url } => url.starts_with("rediss://"),
            RedisDeployment::Cluster { seeds } => seeds.tls,
            RedisDeployment::Sentinel { sentinels, .. } => sentinels.tls,
        }
    }

    /// `standalone`, `cluster` or `sentinel`.
    pub fn mode(&self) -> &'static str {
        match self {
            RedisDeployment::Standalone { .. } => "standalone",
            RedisDeployment::Cluster { .. } => "cluster",
            RedisDeployment::Sentinel { .. } => "sentinel",
        }
    }

    /// The option that chose this deployment, for errors (e.g. `--redis-cluster`).
    pub fn flag(&self) -> &'static str {
        match self {
            RedisDeployment::Standalone { .. } => URL.flag,
            RedisDeployment::Cluster { .. } => CLUSTER.flag,
            RedisDeployment::Sentinel { .. } => SENTINEL.flag,
        }
    }
}

/// The deployment as an operator wrote it, with any password hidden: for logs and errors.
impl fmt::Display for RedisDeployment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisDeployment::Standalone { url } => f.write_str(&redact_url(url)),
            RedisDeployment::Cluster { seeds } => write!(f, "cluster {seeds}"),
            RedisDeployment::Sentinel { sentinels, master } => {
                write!(f, "master {master:?} of sentinels {sentinels}")
            }
        }
    }
}

impl fmt::Debug for RedisDeployment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisDeployment({self})")
    }
}

fn validate_master_name(name: &str) -> Result<(), Error> {
    let bad = |why: String| Error::config(SENTINEL_MASTER.flag, why);
    if name.is_empty() {
        return Err(bad("is empty".into()));
    }
    if name.len() > MAX_MASTER_NAME_BYTES {
        return Err(bad(format!(
            "is {} bytes long; the limit is {MAX_MASTER_NAME_BYTES}",
            name.len()
        )));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(format!(
            "{name:?} holds a space or control character, which Sentinel names cannot"
        )));
    }
    Ok(())
}

/// One node: a host (name, IPv4, or IPv6 without brackets) and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeAddress {
    pub host: String,
    pub port: u16,
}

impl NodeAddress {
    pub fn new(host: impl Into<String>, port: u16) -> NodeAddress {
        NodeAddress {
            host: host.into(),
            port,
        }
    }
}

impl fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A parsed node list: the nodes, and the scheme, credentials and database they share.
#[derive(Clone)]
pub struct NodeList {
    pub nodes: Vec<NodeAddress>,
    pub tls: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: Option<u32>,
    /// The list as written, password hidden.
    shown: String,
}

impl NodeList {
    fn parse(text: &str, setting: Setting) -> Result<NodeList, Error> {
        let shown = redact_url(text);
        let fail = |why: String| Error::config(setting.flag, format!("{shown:?}: {why}"));
        let text = text.trim();
        if text.is_empty() {
            return Err(Error::config(
                setting.flag,
                "is empty; expected HOST:PORT[,HOST:PORT…]",
            ));
        }
        // A scheme belongs to the first node only; one further on is refused below.
        let first = text.split(',').next().unwrap_or_default();
        let scheme_given = first.contains("://");
        let (scheme, rest) = match text.split_once("://").filter(|_| scheme_given) {
            Some((scheme @ ("redis" | "rediss"), rest)) => (scheme, rest),
            Some((scheme, _)) => {
                return Err(fail(format!(
                    "scheme {scheme:?} is not redis or rediss; expected \
                     [redis[s]://[[USER]:PASSWORD@]]HOST:PORT[,HOST:PORT…]"
                )))
            }
            None => ("redis", text),
        };
        // The last '@' ends the user info, as in a Redis URL: a password may hold '@' or ','.
        let (userinfo, hostpath) = match rest.rsplit_once('@') {
            Some(_) if !scheme_given => {
                return Err(fail(
                    "user info needs the URL form: redis://USER:PASSWORD@HOST:PORT,HOST:PORT"
                        .into(),
                ))
            }
            Some((info, hostpath)) => (Some(info), hostpath),
            None => (None, rest),
        };
        if let Some((i, item)) = hostpath
            .split(',')
            .enumerate()
            .find(|(_, item)| item.contains("://"))
        {
            return Err(fail(format!(
                "node #{} {:?} has a scheme of its own: write the scheme and user info once, \
                 before the first node (redis://USER:PASSWORD@HOST1:PORT1,HOST2:PORT2)",
                i + 1,
                item.trim()
            )));
        }
        let (hosts, path) = match hostpath.split_once('/') {
            Some((hosts, path)) => (hosts, Some(path)),
            None => (hostpath, None),
        };
        let prefix = match userinfo {
            Some(info) => format!("{scheme}://{info}@"),
            None => format!("{scheme}://"),
        };
        let suffix = path.map(|p| format!("/{p}")).unwrap_or_default();

        let mut list = NodeList {
            nodes: Vec::new(),
            tls: scheme == "rediss",
            username: None,
            password: None,
            db: None,
            shown: shown.clone(),
        };
        for (i, item) in hosts.split(',').enumerate() {
            let item = item.trim();
            let which = format!("node #{} {item:?}", i + 1);
            if item.is_empty() {
                return Err(fail(format!(
                    "node #{} is empty; expected HOST:PORT",
                    i + 1
                )));
            }
            if !has_port(item) {
                return Err(fail(format!("{which} has no port; expected HOST:PORT")));
            }
            let endpoint = RedisEndpoint::from_url(&format!("{prefix}{item}{suffix}"))
                .map_err(|e| fail(format!("{which}: {}", e.reason)))?;
            let node = NodeAddress::new(endpoint.host, endpoint.port);
            if list.nodes.contains(&node) {
                return Err(fail(format!("{which} is listed twice")));
            }
            list.nodes.push(node);
            list.username = endpoint.username;
            list.password = endpoint.password;
            list.db = endpoint.db;
        }
        if setting.flag == CLUSTER.flag && list.db.is_some() {
            return Err(fail(
                "a database cannot be chosen (/DB): a Redis Cluster has only database 0".into(),
            ));
        }
        Ok(list)
    }

    /// The same nodes and scheme without user, password or database: how the sentinels are
    /// asked.
    pub fn without_credentials(&self) -> NodeList {
        NodeList {
            username: None,
            password: None,
            db: None,
            ..self.clone()
        }
    }

    /// The redis crate's connection settings for `node` with this list's scheme and
    /// credentials (without TLS certificates: see [`crate::redis_link`]).
    pub fn connection_info(&self, node: &NodeAddress) -> redis::ConnectionInfo {
        let addr = if self.tls {
            redis::ConnectionAddr::TcpTls {
                host: node.host.clone(),
                port: node.port,
                insecure: false,
                tls_params: None,
            }
        } else {
            redis::ConnectionAddr::Tcp(node.host.clone(), node.port)
        };
        let mut settings = redis::RedisConnectionInfo::default();
        if let Some(user) = &self.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        if let Some(db) = self.db {
            settings = settings.set_db(i64::from(db));
        }
        redis::IntoConnectionInfo::into_connection_info(addr)
            .map(|info| info.set_redis_settings(settings))
            .expect("a ConnectionAddr always converts")
    }
}

impl fmt::Display for NodeList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for NodeList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeList({})", self.shown)
    }
}

/// True when `item` ends in `:PORT` after its host (`[v6]:PORT` for IPv6). An unbracketed IPv6
/// address counts as having one, so that the URL parser explains the brackets.
fn has_port(item: &str) -> bool {
    match item.strip_prefix('[') {
        Some(rest) => rest
            .split_once(']')
            .is_some_and(|(_, after)| after.starts_with(':')),
        None => item.contains(':'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(
        url: Option<&str>,
        cluster: Option<&str>,
        sentinel: Option<&str>,
        master: Option<&str>,
    ) -> RedisSettings {
        RedisSettings {
            url: url.map(String::from),
            cluster: cluster.map(String::from),
            sentinel: sentinel.map(String::from),
            sentinel_master: master.map(String::from),
        }
    }

    fn nodes(list: &NodeList) -> Vec<String> {
        list.nodes.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn no_option_means_the_default_standalone_url() {
        let d = RedisDeployment::from_settings(RedisSettings::default()).unwrap();
        assert!(matches!(d, RedisDeployment::Standalone { ref url } if url == DEFAULT_REDIS_URL));
        assert_eq!(d.mode(), "standalone");
    }

    #[test]
    fn a_bare_cluster_list_is_plain_tcp_without_credentials() {
        let d = RedisDeployment::from_settings(settings(
            None,
            Some("10.0.0.1:7000, cache-2:7001,[::1]:7002"),
            None,
            None,
        ))
        .unwrap();
        let RedisDeployment::Cluster { seeds } = &d else {
            panic!("{d:?}")
        };
        assert_eq!(
            nodes(seeds),
            ["10.0.0.1:7000", "cache-2:7001", "[::1]:7002"]
        );
        assert!(!seeds.tls && seeds.username.is_none() && seeds.password.is_none());
        assert_eq!(seeds.nodes[2].host, "::1");
    }

    #[test]
    fn scheme_and_credentials_written_once_apply_to_every_node() {
        let d = RedisDeployment::cluster("rediss://app:s%3Acret,x@h1:7000,h2:7001").unwrap();
        let RedisDeployment::Cluster { seeds } = &d else {
            panic!("{d:?}")
        };
        assert!(seeds.tls);
        assert_eq!(seeds.username.as_deref(), Some("app"));
        assert_eq!(seeds.password.as_deref(), Some("s:cret,x"));
        assert_eq!(nodes(seeds), ["h1:7000", "h2:7001"]);
        let info = seeds.connection_info(&seeds.nodes[1]);
        assert_eq!(info.addr().to_string(), "h2:7001");
        assert_eq!(info.redis_settings().password(), Some("s:cret,x"));
        assert!(d.uses_tls());
    }

    #[test]
    fn sentinel_lists_carry_the_masters_database() {
        let d = RedisDeployment::from_settings(settings(
            None,
            None,
            Some("redis://:pw@s1:26379,s2:26379/3"),
            Some("krowoc"),
        ))
        .unwrap();
        let RedisDeployment::Sentinel { sentinels, master } = &d else {
            panic!("{d:?}")
        };
        assert_eq!(master, "krowoc");
        assert_eq!(nodes(sentinels), ["s1:26379", "s2:26379"]);
        assert_eq!(sentinels.db, Some(3));
        assert_eq!(sentinels.password.as_deref(), Some("pw"));
    }

    #[test]
    fn conflicting_options_are_refused_naming_both() {
        let cases = [
            settings(Some("redis://h:1"), Some("h:2"), None, None),
            settings(Some("redis://h:1"), None, Some("h:3"), Some("m")),
            settings(None, Some("h:2"), Some("h:3"), Some("m")),
        ];
        for case in cases {
            let err = RedisDeployment::from_settings(case.clone()).expect_err("a conflict");
            let text = err.to_string();
            assert!(text.contains("exactly one of"), "{text}");
            let named = ["REDIS_URL", "REDIS_CLUSTER", "REDIS_SENTINEL"]
                .iter()
                .filter(|env| text.contains(*env) || err.field() == Some(env_flag(env)))
                .count();
            assert_eq!(named, 2, "{case:?}: {text}");
        }
    }

    fn env_flag(env: &str) -> &'static str {
        match env {
            "REDIS_URL" => "--redis",
            "REDIS_CLUSTER" => "--redis-cluster",
            _ => "--redis-sentinel",
        }
    }

    #[test]
    fn the_sentinel_master_name_goes_with_sentinels_only() {
        let err = RedisDeployment::from_settings(settings(None, None, Some("s:26379"), None))
            .expect_err("no master name");
        assert_eq!(err.field(), Some("--redis-sentinel-master"));
        assert!(err.to_string().contains("REDIS_SENTINEL"), "{err}");
        let err = RedisDeployment::from_settings(settings(None, Some("h:1"), None, Some("m")))
            .expect_err("a master name without sentinels");
        assert_eq!(err.field(), Some("--redis-sentinel-master"));
        for bad in ["", "two words", "tab\there"] {
            let err = RedisDeployment::sentinel("s:26379", bad).expect_err(bad);
            assert_eq!(err.field(), Some("--redis-sentinel-master"), "{bad:?}");
        }
    }

    #[test]
    fn bad_node_lists_name_the_option_and_the_node() {
        let cases = [
            ("", "empty"),
            ("h1:7000,", "node #2 is empty"),
            ("h1:7000,h2", "node #2 \"h2\" has no port"),
            ("h1:7000,h1:7000", "listed twice"),
            ("h1:notaport", "port"),
            (
                "h1:7000,redis://h2:7001",
                "node #2 \"redis://h2:7001\" has a scheme",
            ),
            (
                "redis://h1:7000,redis://h2:7001",
                "node #2 \"redis://h2:7001\" has a scheme",
            ),
            ("http://h1:7000", "scheme \"http\""),
            ("user:secret@h1:7000", "needs the URL form"),
            ("redis://h1:7000/2", "only database 0"),
            ("::1:7000", "brackets"),
        ];
        for (text, expected) in cases {
            let err = RedisDeployment::cluster(text).expect_err(text);
            assert_eq!(err.field(), Some("--redis-cluster"), "{text}");
            assert!(err.to_string().contains(expected), "{text}: {err}");
        }
        let err = RedisDeployment::sentinel("s1", "m").expect_err("no port");
        assert_eq!(err.field(), Some("--redis-sentinel"));
    }

    #[test]
    fn passwords_never_show_in_errors_or_debug_output() {
        for text in [
            "redis://app:hunter2@h1:7000,h2",
            "redis://app:hunter2@h1:7000,redis://h2:1",
            "redis://app:hunter2@h1:bad",
            "user:hunter2@h1:7000",
        ] {
            let err = RedisDeployment::cluster(text).expect_err(text);
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
        let d = RedisDeployment::cluster("redis://app:hunter2@h1:7000,h2:7001").unwrap();
        assert!(!format!("{d:?} {d}").contains("hunter2"), "{d:?}");
        assert!(format!("{d}").contains("app:***@h1:7000,h2:7001"), "{d}");
        let d = RedisDeployment::standalone("redis://:hunter2@h:1");
        assert!(!format!("{d:?} {d}").contains("hunter2"), "{d:?}");
    }
}
