//! Every Lua script the filter runs, and how it is called. Each lives in `src/redis/scripts/*.lua`
//! (with a header comment: KEYS, ARGV, reply) and is called with EVALSHA (EVAL on NOSCRIPT);
//! its SHA1 is computed once, when the feature that runs it is built for a configuration.

use crate::redis::resp::Command;

/// A script's source and SHA1 (hex), as Redis names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Script {
    pub name: &'static str,
    pub source: &'static str,
    pub sha1: String,
}

impl Script {
    pub fn new(name: &'static str, source: &'static str) -> Script {
        Script {
            name,
            source,
            sha1: sha1_smol::Sha1::from(source).digest().to_string(),
        }
    }

    /// `EVALSHA sha numkeys keys... args...`
    pub fn evalsha(&self, keys: &[String], args: &[String]) -> Command {
        self.command(false, keys, None, args)
    }

    /// `EVAL source numkeys keys... args...` (after NOSCRIPT; it also loads the script).
    pub fn eval(&self, keys: &[String], args: &[String]) -> Command {
        self.command(true, keys, None, args)
    }

    /// The `EVALSHA` to send and the `EVAL` for NOSCRIPT, with `blob` (bytes, not UTF-8 in
    /// general) as the first argument before `args`.
    pub fn pair(
        &self,
        keys: &[String],
        blob: Option<&[u8]>,
        args: &[String],
    ) -> (Command, Option<Command>) {
        (
            self.command(false, keys, blob, args),
            Some(self.command(true, keys, blob, args)),
        )
    }

    fn command(
        &self,
        eval: bool,
        keys: &[String],
        blob: Option<&[u8]>,
        args: &[String],
    ) -> Command {
        let head = if eval {
            Command::new("EVAL").arg(self.source)
        } else {
            Command::new("EVALSHA").arg(&self.sha1)
        };
        let mut c = head.arg(keys.len().to_string()).args(keys);
        if let Some(b) = blob {
            c = c.arg(b);
        }
        c.args(args)
    }
}

/// The rate limiter's script (every algorithm, several limits in one call).
pub const RATE_LIMIT_LUA: &str = include_str!("scripts/rate_limit.lua");
/// A VM's reconciliation of one `sync` limit's window with the shared count.
pub const RATE_LIMIT_SYNC_LUA: &str = include_str!("scripts/rate_limit_sync.lua");
/// The cache's lookup (entry + fill lock).
pub const CACHE_LOOKUP_LUA: &str = include_str!("scripts/cache_lookup.lua");
/// The cache's store (entry + indexes + lock release).
pub const CACHE_STORE_LUA: &str = include_str!("scripts/cache_store.lua");
/// The cache's lock release.
pub const CACHE_UNLOCK_LUA: &str = include_str!("scripts/cache_unlock.lua");
/// The cache's index purge.
pub const CACHE_PURGE_LUA: &str = include_str!("scripts/cache_purge.lua");
/// One step of the cache's pattern purge.
pub const CACHE_SCAN_PURGE_LUA: &str = include_str!("scripts/cache_scan_purge.lua");
/// An event batch for transport `redis_call` (which forwards one command per call).
pub const EVENTS_FLUSH_LUA: &str = include_str!("scripts/events_flush.lua");
/// How many VMs share the rate limits (`failure_mode: local`).
pub const VM_REGISTRY_LUA: &str = include_str!("scripts/vm_registry.lua");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha1_is_the_one_redis_computes() {
        // SHA1("return 1"), as `SCRIPT LOAD "return 1"` answers.
        let s = Script::new("t", "return 1");
        assert_eq!(s.sha1, "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
        let c = s.evalsha(&["k".into()], &["a".into()]);
        assert_eq!(
            c.encode(),
            b"*5\r\n$7\r\nEVALSHA\r\n$40\r\ne0e1f9fabfc9d4800c877a703b823ac0578ff8db\r\n$1\r\n1\r\n$1\r\nk\r\n$1\r\na\r\n".to_vec()
        );
    }

    #[test]
    fn scripts_have_header_comments() {
        for line in ["-- KEYS", "-- ARGV", "-- Reply"] {
            assert!(
                RATE_LIMIT_LUA.lines().any(|l| l.starts_with(line)),
                "rate_limit.lua lacks {line}"
            );
        }
    }
}
