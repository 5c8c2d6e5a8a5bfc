//! The workspace as cargo sees it (`cargo metadata`), and the builds xtask runs in it:
//! the wasm crates and the native binaries.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The wasm32-wasip1 target every guest crate is built for.
pub const WASM_TARGET: &str = "wasm32-wasip1";
/// The cargo profile the guests are built with (size-optimised release, see Cargo.toml).
pub const WASM_PROFILE: &str = "wasm";
/// The filter, always built.
pub const PLUGIN_CRATE: &str = "krowoc-plugin";
/// `cargo` arguments of the plugin build stock Envoy loads (envoy/README.md shows this command).
pub const STOCK_PLUGIN_ARGS: [&str; 8] = [
    "build",
    "-p",
    PLUGIN_CRATE,
    "--no-default-features",
    "--target",
    WASM_TARGET,
    "--profile",
    WASM_PROFILE,
];
/// `cargo` arguments of the binaries' build (the README's Tests section shows this command).
/// The tests' build, which `cargo xtask test` runs before the checks.
pub const TEST_BUILD_ARGS: [&str; 3] = ["test", "--workspace", "--no-run"];

pub const BINARIES_ARGS: [&str; 7] = [
    "build",
    "-p",
    "host-shim",
    "-p",
    "krowoc-relay",
    "-p",
    "krowoc-upstream",
];
/// Every wasm crate the tests need; those after the plugin are built when they are workspace
/// members (a test guest may come and go without xtask changing).
pub const WASM_CRATES: &[&str] = &[PLUGIN_CRATE, "abi-test-guest"];

/// The native binaries demo, test and bench start.
pub const HOST_SHIM_BIN: &str = "host-shim";
pub const UPSTREAM_BIN: &str = "krowoc-upstream";
pub const RELAY_BIN: &str = "krowoc-relay";

#[derive(Debug, Clone, PartialEq)]
pub struct Workspace {
    pub root: PathBuf,
    /// Honours CARGO_TARGET_DIR and `build.target-dir`, because cargo metadata does.
    pub target_dir: PathBuf,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    pub targets: Vec<Target>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub name: String,
    pub kinds: Vec<String>,
}

/// What `build_wasm` produced.
#[derive(Debug, Clone)]
pub struct WasmBuild {
    /// The directory holding every built .wasm (passed to tests as KROWOC_WASM_DIR).
    pub dir: PathBuf,
    /// The filter (passed to tests as KROWOC_PLUGIN_WASM, to host-shim as --plugin).
    pub plugin: PathBuf,
}

/// Paths of the native binaries for one profile.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub host_shim: PathBuf,
    pub relay: PathBuf,
    pub upstream: PathBuf,
}

/// The cargo that runs us (set by cargo for `cargo run`), else `cargo` on PATH.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Runs a command with inherited stdio, naming it on failure.
pub fn run_loud(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// A command as a shell-like line, for logs and error messages.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(' ') {
            format!("{a:?}")
        } else {
            a.into_owned()
        }
    }));
    parts.join(" ")
}

impl Workspace {
    pub fn load() -> Result<Workspace> {
        let output = cargo()
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .output()
            .context("cannot run `cargo metadata`")?;
        if !output.status.success() {
            bail!(
                "`cargo metadata --format-version 1 --no-deps` failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let text = String::from_utf8(output.stdout).context("cargo metadata printed non-UTF-8")?;
        Workspace::from_metadata(&text)
    }

    /// Parses `cargo metadata --format-version 1 --no-deps` output.
    pub fn from_metadata(json: &str) -> Result<Workspace> {
        let v: serde_json::Value =
            serde_json::from_str(json).context("cargo metadata output is not JSON")?;
        let string = |v: &serde_json::Value, field: &str| -> Result<String> {
            v.get(field)
                .and_then(|s| s.as_str())
                .map(str::to_string)
                .with_context(|| format!("cargo metadata: `{field}` missing or not a string"))
        };
        let root = PathBuf::from(string(&v, "workspace_root")?);
        let target_dir = PathBuf::from(string(&v, "target_directory")?);
        let member_ids: Vec<&str> = v
            .get("workspace_members")
            .and_then(|m| m.as_array())
            .context("cargo metadata: `workspace_members` missing")?
            .iter()
            .filter_map(|id| id.as_str())
            .collect();
        let mut members = Vec::new();
        for p in v
            .get("packages")
            .and_then(|p| p.as_array())
            .context("cargo metadata: `packages` missing")?
        {
            let id = string(p, "id")?;
            if !member_ids.contains(&id.as_str()) {
                continue;
            }
            let mut targets = Vec::new();
            for t in p
                .get("targets")
                .and_then(|t| t.as_array())
                .into_iter()
                .flatten()
            {
                targets.push(Target {
                    name: string(t, "name")?,
                    kinds: t
                        .get("kind")
                        .and_then(|k| k.as_array())
                        .into_iter()
                        .flatten()
                        .filter_map(|k| k.as_str().map(str::to_string))
                        .collect(),
                });
            }
            members.push(Member {
                name: string(p, "name")?,
                targets,
            });
        }
        Ok(Workspace {
            root,
            target_dir,
            members,
        })
    }

    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    /// `<target>/wasm32-wasip1/wasm`: where every guest .wasm lands.
    pub fn wasm_dir(&self) -> PathBuf {
        self.target_dir.join(WASM_TARGET).join(WASM_PROFILE)
    }

    /// The crates of [`WASM_CRATES`] that are workspace members; the plugin must be one.
    pub fn wasm_crates(&self) -> Result<Vec<&Member>> {
        if self.member(PLUGIN_CRATE).is_none() {
            bail!(
                "package {PLUGIN_CRATE} is not a member of the workspace at {}",
                self.root.display()
            );
        }
        Ok(WASM_CRATES
            .iter()
            .filter_map(|name| self.member(name))
            .collect())
    }

    /// Builds every wasm crate in one cargo call and prints each .wasm's path and size.
    pub fn build_wasm(&self) -> Result<WasmBuild> {
        let crates = self.wasm_crates()?;
        let mut cmd = cargo();
        cmd.current_dir(&self.root).args([
            "build",
            "--target",
            WASM_TARGET,
            "--profile",
            WASM_PROFILE,
        ]);
        for c in &crates {
            cmd.args(["-p", &c.name]);
        }
        run_loud(&mut cmd)?;
        let dir = self.wasm_dir();
        let mut plugin = None;
        for c in &crates {
            let files = wasm_artifacts(c, &dir);
            if files.is_empty() {
                bail!(
                    "package {} has no cdylib or bin target, so it builds no .wasm",
                    c.name
                );
            }
            for f in files {
                let size = std::fs::metadata(&f)
                    .with_context(|| {
                        format!("{} was built but {} is missing", c.name, f.display())
                    })?
                    .len();
                println!("{}  {}", f.display(), human_size(size));
                if c.name == PLUGIN_CRATE && plugin.is_none() {
                    plugin = Some(f);
                }
            }
        }
        let plugin = plugin.with_context(|| format!("{PLUGIN_CRATE} built no .wasm"))?;
        Ok(WasmBuild { dir, plugin })
    }

    /// Builds the plugin as stock Envoy loads it (`--no-default-features`: no Higress Redis
    /// imports) into its own target dir, since it has the same file name as the default build.
    /// The other wasm crates (the ABI test guest) are built the same way beside it, for the
    /// suites that load them in Envoy.
    pub fn build_stock_plugin(&self) -> Result<PathBuf> {
        let target_dir = self.target_dir.join("stock-plugin");
        let mut cmd = cargo();
        cmd.current_dir(&self.root)
            .args(STOCK_PLUGIN_ARGS)
            .arg("--target-dir")
            .arg(&target_dir);
        for c in self.wasm_crates()? {
            if c.name != PLUGIN_CRATE {
                cmd.args(["-p", &c.name]);
            }
        }
        run_loud(&mut cmd)?;
        let path = target_dir
            .join(WASM_TARGET)
            .join(WASM_PROFILE)
            .join(format!("{}.wasm", PLUGIN_CRATE.replace('-', "_")));
        anyhow::ensure!(
            path.is_file(),
            "the stock plugin build made no {}",
            path.display()
        );
        println!("{}  (stock Envoy build)", path.display());
        Ok(path)
    }

    /// Builds host-shim and the upstream with the dev profile (`release: false`, the profile the
    /// tests use too, so nothing is compiled twice) or with `--release` (bench only).
    pub fn build_binaries(&self, release: bool) -> Result<Binaries> {
        let mut cmd = cargo();
        cmd.current_dir(&self.root).args(BINARIES_ARGS);
        if release {
            cmd.arg("--release");
        }
        run_loud(&mut cmd)?;
        self.binaries_in(if release { "release" } else { "debug" })
    }

    /// Every test of the workspace built, and with them the binaries (`cargo test --workspace
    /// --no-run`). The binaries then share the tests' build of every dependency: built on their
    /// own (`cargo build -p …`), some dependencies resolve other features and are compiled twice.
    pub fn build_tests_and_binaries(&self) -> Result<Binaries> {
        let mut cmd = cargo();
        cmd.current_dir(&self.root).args(TEST_BUILD_ARGS);
        run_loud(&mut cmd)?;
        self.binaries_in("debug")
    }

    fn binaries_in(&self, profile_dir: &str) -> Result<Binaries> {
        let dir = self.target_dir.join(profile_dir);
        let bins = Binaries {
            host_shim: dir.join(HOST_SHIM_BIN),
            relay: dir.join(RELAY_BIN),
            upstream: dir.join(UPSTREAM_BIN),
        };
        for b in [&bins.host_shim, &bins.relay, &bins.upstream] {
            if !b.is_file() {
                bail!("the build succeeded but {} is missing", b.display());
            }
        }
        Ok(bins)
    }
}

/// The .wasm files cargo writes for a package's cdylib (name with `_`) and bin (name as is)
/// targets when building for wasm32-wasip1.
pub fn wasm_artifacts(member: &Member, dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for t in &member.targets {
        if t.kinds.iter().any(|k| k == "cdylib") {
            files.push(dir.join(format!("{}.wasm", t.name.replace('-', "_"))));
        } else if t.kinds.iter().any(|k| k == "bin") {
            files.push(dir.join(format!("{}.wasm", t.name)));
        }
    }
    files
}

pub fn human_size(bytes: u64) -> String {
    if bytes >= 1024 * 1024 {
        format!(
            "{:.2} MiB ({bytes} bytes)",
            bytes as f64 / (1024.0 * 1024.0)
        )
    } else if bytes >= 1024 {
        format!("{:.1} KiB ({bytes} bytes)", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Trimmed from real `cargo metadata --format-version 1 --no-deps` output.
    const METADATA: &str = r#"{
      "packages": [
        {"name": "krowoc-plugin", "id": "path+file:///w/plugin#krowoc-plugin@0.1.0",
         "targets": [{"name": "krowoc_plugin", "kind": ["cdylib", "rlib"]}]},
        {"name": "host-shim", "id": "path+file:///w/host-shim#0.1.0",
         "targets": [{"name": "host_shim", "kind": ["lib"]}, {"name": "host-shim", "kind": ["bin"]}]},
        {"name": "abi-test-guest", "id": "path+file:///w/tests/guest#0.1.0",
         "targets": [{"name": "abi-test-guest", "kind": ["cdylib"]}]}
      ],
      "workspace_members": ["path+file:///w/plugin#krowoc-plugin@0.1.0", "path+file:///w/host-shim#0.1.0"],
      "target_directory": "/somewhere/else/target",
      "workspace_root": "/w",
      "version": 1
    }"#;

    #[test]
    fn target_dir_and_members_come_from_cargo_metadata() {
        let ws = Workspace::from_metadata(METADATA).unwrap();
        assert_eq!(ws.root, PathBuf::from("/w"));
        assert_eq!(ws.target_dir, PathBuf::from("/somewhere/else/target"));
        assert_eq!(
            ws.wasm_dir(),
            PathBuf::from("/somewhere/else/target/wasm32-wasip1/wasm")
        );
        // A package listed but not a workspace member is not one.
        let names: Vec<_> = ws.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["krowoc-plugin", "host-shim"]);
    }

    #[test]
    fn optional_wasm_crates_are_built_only_when_they_are_members() {
        let ws = Workspace::from_metadata(METADATA).unwrap();
        let crates: Vec<_> = ws.wasm_crates().unwrap().iter().map(|m| &m.name).collect();
        assert_eq!(crates, ["krowoc-plugin"]);

        let with_guest = METADATA.replace(
            r#""path+file:///w/host-shim#0.1.0"]"#,
            r#""path+file:///w/host-shim#0.1.0", "path+file:///w/tests/guest#0.1.0"]"#,
        );
        let ws = Workspace::from_metadata(&with_guest).unwrap();
        let crates: Vec<_> = ws.wasm_crates().unwrap().iter().map(|m| &m.name).collect();
        assert_eq!(crates, ["krowoc-plugin", "abi-test-guest"]);
    }

    #[test]
    fn a_workspace_without_the_plugin_is_refused_by_name() {
        let ws = Workspace::from_metadata(
            &METADATA.replace("#krowoc-plugin@0.1.0\", \"", "#gone\", \""),
        )
        .unwrap();
        let e = ws.wasm_crates().unwrap_err();
        assert!(e.to_string().contains("krowoc-plugin"), "{e}");
    }

    #[test]
    fn wasm_file_names_follow_cargo() {
        let ws = Workspace::from_metadata(METADATA).unwrap();
        let dir = Path::new("/t");
        let plugin = ws.member("krowoc-plugin").unwrap();
        assert_eq!(
            wasm_artifacts(plugin, dir),
            [dir.join("krowoc_plugin.wasm")]
        );
        let bin = Member {
            name: "guest".into(),
            targets: vec![Target {
                name: "abi-guest".into(),
                kinds: vec!["bin".into()],
            }],
        };
        assert_eq!(wasm_artifacts(&bin, dir), [dir.join("abi-guest.wasm")]);
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_size(512), "512 bytes");
        assert_eq!(human_size(2048), "2.0 KiB (2048 bytes)");
        assert_eq!(human_size(3 * 1024 * 1024), "3.00 MiB (3145728 bytes)");
    }
}
