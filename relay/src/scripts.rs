//! The Lua scripts the relay lets Redis run: the filter's own, built in from the plugin's
//! `src/redis/scripts/*.lua` (the same text the plugin sends, so the same SHA1), plus the files
//! named with `--allow-script` (another plugin version during a rolling upgrade).
//!
//! `EVAL`/`EVAL_RO` and `SCRIPT LOAD` carry a script's text: the relay hashes it, as Redis does.
//! `EVALSHA`/`EVALSHA_RO` carry the SHA1. Either way the SHA1 must be on the list, else the
//! request is refused. So a token holder cannot run arbitrary Lua (`redis.call('FLUSHALL')`, a
//! busy loop that stalls Redis for every client), only the filter's scripts.
//!
//! The files are included as text rather than through a dependency on `krowoc-plugin`: that crate
//! is the wasm filter, and the relay (and host-shim, which embeds it) should not build the
//! filter's dependency tree natively to read seven strings. A unit test checks the list against
//! the folder, so a new script cannot be forgotten here.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;

use crate::pool::CommandInfo;

/// The plugin's scripts, by file name, as the plugin sends them.
pub const PLUGIN_SCRIPTS: &[(&str, &str)] = &[
    (
        "rate_limit.lua",
        include_str!("../../plugin/src/redis/scripts/rate_limit.lua"),
    ),
    (
        "rate_limit_sync.lua",
        include_str!("../../plugin/src/redis/scripts/rate_limit_sync.lua"),
    ),
    (
        "cache_lookup.lua",
        include_str!("../../plugin/src/redis/scripts/cache_lookup.lua"),
    ),
    (
        "cache_store.lua",
        include_str!("../../plugin/src/redis/scripts/cache_store.lua"),
    ),
    (
        "cache_unlock.lua",
        include_str!("../../plugin/src/redis/scripts/cache_unlock.lua"),
    ),
    (
        "cache_purge.lua",
        include_str!("../../plugin/src/redis/scripts/cache_purge.lua"),
    ),
    (
        "cache_scan_purge.lua",
        include_str!("../../plugin/src/redis/scripts/cache_scan_purge.lua"),
    ),
    (
        "events_flush.lua",
        include_str!("../../plugin/src/redis/scripts/events_flush.lua"),
    ),
    (
        "vm_registry.lua",
        include_str!("../../plugin/src/redis/scripts/vm_registry.lua"),
    ),
];

/// Commands that run or load a script, and which argument names it.
#[derive(Clone, Copy)]
enum ScriptArg {
    /// The script's text (EVAL, SCRIPT LOAD): hashed.
    Source(usize),
    /// The script's SHA1 (EVALSHA).
    Sha1(usize),
}

fn script_arg(cmd: &CommandInfo) -> Option<ScriptArg> {
    match cmd.name.as_str() {
        "EVAL" | "EVAL_RO" => Some(ScriptArg::Source(0)),
        "EVALSHA" | "EVALSHA_RO" => Some(ScriptArg::Sha1(0)),
        "SCRIPT" if cmd.subcommand.as_deref() == Some("LOAD") => Some(ScriptArg::Source(1)),
        _ => None,
    }
}

/// SHA1 of a script's text, lowercase hex, as Redis names it.
pub fn sha1_hex(source: &[u8]) -> String {
    sha1_smol::Sha1::from(source).digest().to_string()
}

/// The SHA1s of the scripts the relay lets run, each with where it came from (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptList {
    scripts: BTreeMap<String, String>,
}

impl Default for ScriptList {
    fn default() -> Self {
        ScriptList::plugin()
    }
}

impl ScriptList {
    /// The scripts of the plugin this relay was built with.
    pub fn plugin() -> ScriptList {
        let scripts = PLUGIN_SCRIPTS
            .iter()
            .map(|(name, source)| (sha1_hex(source.as_bytes()), format!("plugin {name}")))
            .collect();
        ScriptList { scripts }
    }

    /// Admits one more script by its text; returns its SHA1.
    pub fn allow_source(&mut self, origin: impl Into<String>, source: &[u8]) -> String {
        let sha = sha1_hex(source);
        self.scripts
            .entry(sha.clone())
            .or_insert_with(|| origin.into());
        sha
    }

    /// Admits the script in `path` (`--allow-script`), byte for byte; returns its SHA1.
    pub fn allow_file(&mut self, path: &Path) -> anyhow::Result<String> {
        let source = std::fs::read(path)
            .with_context(|| format!("--allow-script {}: cannot read it", path.display()))?;
        if source.iter().all(u8::is_ascii_whitespace) {
            anyhow::bail!("--allow-script {}: the file is empty", path.display());
        }
        Ok(self.allow_source(path.display().to_string(), &source))
    }

    pub fn contains(&self, sha1: &str) -> bool {
        self.scripts.contains_key(sha1)
    }

    /// `(sha1, origin)` of every script on the list.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.scripts.iter().map(|(s, o)| (s.as_str(), o.as_str()))
    }

    pub fn len(&self) -> usize {
        self.scripts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scripts.is_empty()
    }

    /// Ok when `cmd` runs or loads no script, or one on the list; else why not, naming the SHA1.
    /// `body` is the request body `cmd` was parsed from.
    pub fn check(&self, cmd: &CommandInfo, body: &[u8]) -> Result<(), String> {
        let Some(which) = script_arg(cmd) else {
            return Ok(());
        };
        let (ScriptArg::Source(i) | ScriptArg::Sha1(i)) = which;
        let Some(arg) = cmd.arg(body, i) else {
            return Err(format!("{} without a script is refused", command_name(cmd)));
        };
        let sha = match which {
            ScriptArg::Source(_) => sha1_hex(arg),
            // Redis reads the SHA1 case-insensitively.
            ScriptArg::Sha1(_) => String::from_utf8_lossy(arg).to_ascii_lowercase(),
        };
        if self.contains(&sha) {
            return Ok(());
        }
        Err(format!(
            "{}: script {} is not one of the relay's scripts (the filter's own and --allow-script files)",
            command_name(cmd),
            crate::printable(&sha)
        ))
    }
}

fn command_name(cmd: &CommandInfo) -> String {
    match (&cmd.name[..], &cmd.subcommand) {
        ("SCRIPT", Some(sub)) => format!("SCRIPT {sub}"),
        (name, _) => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::parse_commands;

    fn body(args: &[&[u8]]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    fn check(list: &ScriptList, args: &[&[u8]]) -> Result<(), String> {
        let b = body(args);
        let cmds = parse_commands(&b).unwrap();
        list.check(&cmds[0], &b)
    }

    #[test]
    fn every_lua_file_of_the_plugin_is_on_the_list() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin/src/redis/scripts");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".lua"))
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = PLUGIN_SCRIPTS.iter().map(|(n, _)| n.to_string()).collect();
        listed.sort();
        assert_eq!(listed, on_disk, "relay/src/scripts.rs PLUGIN_SCRIPTS");
        assert_eq!(ScriptList::plugin().len(), PLUGIN_SCRIPTS.len());
    }

    #[test]
    fn plugin_scripts_pass_by_text_and_by_sha1_in_any_case() {
        let list = ScriptList::plugin();
        for (name, source) in PLUGIN_SCRIPTS {
            let sha = sha1_hex(source.as_bytes());
            assert!(
                check(&list, &[b"EVAL", source.as_bytes(), b"0"]).is_ok(),
                "{name}"
            );
            assert!(
                check(&list, &[b"EVALSHA", sha.as_bytes(), b"0"]).is_ok(),
                "{name}"
            );
            let upper = sha.to_ascii_uppercase();
            assert!(check(&list, &[b"evalsha", upper.as_bytes(), b"0"]).is_ok());
            assert!(check(&list, &[b"SCRIPT", b"load", source.as_bytes()]).is_ok());
        }
    }

    #[test]
    fn other_scripts_are_refused_naming_their_sha1() {
        let list = ScriptList::plugin();
        let sha = sha1_hex(b"return 1");
        assert_eq!(sha, "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
        for args in [
            &[&b"EVAL"[..], b"return 1", b"0"][..],
            &[b"EVAL_RO", b"return 1", b"0"],
            &[b"EVALSHA", sha.as_bytes(), b"0"],
            &[b"EVALSHA_RO", sha.as_bytes(), b"0"],
            &[b"SCRIPT", b"LOAD", b"return 1"],
        ] {
            let err = check(&list, args).unwrap_err();
            assert!(err.contains(&sha), "{err}");
        }
        let err = check(&list, &[b"EVAL"]).unwrap_err();
        assert!(err.contains("without a script"), "{err}");
        let err = check(&list, &[b"SCRIPT", b"LOAD"]).unwrap_err();
        assert!(err.contains("SCRIPT LOAD without a script"), "{err}");
    }

    #[test]
    fn commands_that_run_no_script_are_not_its_business() {
        let list = ScriptList::plugin();
        assert!(check(&list, &[b"GET", b"k"]).is_ok());
        assert!(check(&list, &[b"SCRIPT", b"EXISTS", b"abc"]).is_ok());
    }

    #[test]
    fn allowed_files_join_the_list() {
        let dir = std::env::temp_dir().join(format!("krowoc-relay-scripts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("next.lua");
        std::fs::write(&file, "return 2").unwrap();
        let mut list = ScriptList::plugin();
        let sha = list.allow_file(&file).unwrap();
        assert_eq!(sha, sha1_hex(b"return 2"));
        assert!(check(&list, &[b"EVAL", b"return 2", b"0"]).is_ok());
        let err = list.allow_file(&dir.join("missing.lua")).unwrap_err();
        assert!(
            format!("{err:#}").contains("missing.lua: cannot read it"),
            "{err:#}"
        );
        std::fs::write(&file, "\n").unwrap();
        let err = list.allow_file(&file).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
