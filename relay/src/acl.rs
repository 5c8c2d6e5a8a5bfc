//! The least-privilege Redis ACL user the relay (or Higress's `redis_call` cluster) logs in as:
//! exactly the commands the filter sends and its scripts run, only keys under the filter's key
//! prefix, only the event channels it publishes to. [`filter_user_rules`] renders the rules of
//! `ACL SETUSER`; the README shows the line for the shipped configuration, and a test keeps the
//! two and the scripts' commands in step.
//!
//! ```
//! use krowoc_relay::acl::filter_user_rules;
//! let rules = filter_user_rules("krowoc:", &["krowoc:requests"]).join(" ");
//! assert!(rules.starts_with("reset on ~krowoc:* &krowoc:requests -@all +asking +cluster|slots +del +eval +evalsha"));
//! ```
//!
//! A command outside the list or a key outside the prefix is answered `NOPERM` by Redis: the
//! relay passes that reply through like any other, the filter counts it as a Redis error reply
//! about the call (not about Redis's health), and nothing sends it again in a loop.

/// Every command the filter needs: what it sends itself (`EVALSHA`, with `EVAL` on NOSCRIPT;
/// `DEL` of a cache entry; `PUBLISH` and `XADD` of events, through the relay), what its Lua
/// scripts call (`plugin/src/redis/scripts/*.lua`), and the relay's `PING` for `/ready`, with
/// `ASKING` and `CLUSTER SLOTS` on a Redis Cluster (following redirects, reading the slot map).
/// `AUTH` needs no permission; add `+select` when the URL names a database other than 0.
pub const FILTER_ACL_COMMANDS: &[&str] = &[
    "ASKING",
    "CLUSTER|SLOTS",
    "DEL",
    "EVAL",
    "EVALSHA",
    "GET",
    "HGET",
    "HMGET",
    "HSET",
    "INCRBY",
    "PEXPIRE",
    "PING",
    "PTTL",
    "PUBLISH",
    "SADD",
    "SCAN",
    "SET",
    "SMEMBERS",
    "TIME",
    "TYPE",
    "XADD",
    "ZADD",
    "ZCARD",
    "ZRANGE",
    "ZREM",
    "ZREMRANGEBYSCORE",
];

/// The `ACL SETUSER <user>` rules for the filter's user, without a password (append
/// `>PASSWORD`, or `#SHA256` in an ACL file): `reset on`, keys `~<key_prefix>*`, each
/// `&<channel>`, then `-@all` and `+<command>` for each of [`FILTER_ACL_COMMANDS`].
pub fn filter_user_rules(key_prefix: &str, channels: &[&str]) -> Vec<String> {
    let mut rules = vec![
        "reset".to_string(),
        "on".to_string(),
        format!("~{}*", glob_escape(key_prefix)),
    ];
    rules.extend(channels.iter().map(|c| format!("&{}", glob_escape(c))));
    rules.push("-@all".to_string());
    rules.extend(
        FILTER_ACL_COMMANDS
            .iter()
            .map(|c| format!("+{}", c.to_ascii_lowercase())),
    );
    rules
}

/// `text` matched literally by a Redis glob pattern.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scripts::PLUGIN_SCRIPTS;
    use std::collections::BTreeSet;

    /// The commands a script names in `redis.call('X'`, `redis.pcall('X'` and
    /// `pcall(redis.call, 'X'`.
    fn script_commands(source: &str) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        for opener in ["redis.call(", "redis.pcall(", "pcall(redis.call,"] {
            for (at, _) in source.match_indices(opener) {
                let rest = source[at + opener.len()..].trim_start();
                let Some(quote) = rest.chars().next().filter(|q| *q == '\'' || *q == '"') else {
                    continue;
                };
                let name: String = rest[1..].chars().take_while(|c| *c != quote).collect();
                found.insert(name.to_ascii_uppercase());
            }
        }
        found
    }

    #[test]
    fn every_command_the_scripts_call_is_granted_and_nothing_else_beyond_the_filters_own() {
        let mut called = BTreeSet::new();
        for (file, source) in PLUGIN_SCRIPTS {
            let commands = script_commands(source);
            assert!(!commands.is_empty(), "{file} calls no command?");
            called.extend(commands);
        }
        let granted: BTreeSet<String> = FILTER_ACL_COMMANDS.iter().map(|c| c.to_string()).collect();
        let missing: Vec<_> = called.difference(&granted).collect();
        assert!(
            missing.is_empty(),
            "scripts call commands the ACL user lacks: {missing:?}"
        );
        // Beyond the scripts' own: what the filter and the relay send directly (the relay's
        // ASKING and CLUSTER SLOTS on a cluster).
        let direct: BTreeSet<String> = granted.difference(&called).cloned().collect();
        let expected: BTreeSet<String> = ["ASKING", "CLUSTER|SLOTS", "EVAL", "EVALSHA", "PING"]
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(direct, expected);
        let mut sorted = FILTER_ACL_COMMANDS.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, FILTER_ACL_COMMANDS, "keep the list sorted");
        // What the filter sends itself, the relay relays.
        for c in ["EVAL", "EVALSHA", "PING", "DEL", "PUBLISH", "XADD"] {
            assert!(FILTER_ACL_COMMANDS.contains(&c), "{c}");
            assert!(
                crate::FILTER_COMMANDS.contains(&c),
                "{c} is not in FILTER_COMMANDS"
            );
        }
    }

    #[test]
    fn rules_escape_glob_characters_of_the_prefix_and_channels() {
        let rules = filter_user_rules("a*b?", &["ev[1]"]);
        assert_eq!(rules[2], "~a\\*b\\?*");
        assert_eq!(rules[3], "&ev\\[1\\]");
    }

    #[test]
    fn the_readme_shows_the_rules_for_the_shipped_prefix_and_channel() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let line = format!(
            "ACL SETUSER krowoc-edge {} >PASSWORD",
            filter_user_rules("krowoc:", &["krowoc:requests"]).join(" ")
        );
        for doc in ["README.md", "envoy/README.md"] {
            let text = std::fs::read_to_string(root.join(doc)).expect("read README");
            assert!(
                text.contains(&line),
                "{doc} should show the filter's ACL user as\n{line}"
            );
        }
    }
}
