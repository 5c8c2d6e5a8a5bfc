//! Setup shared by demo, test and bench: make sure the machine has what they need, installing
//! it when that is safe (rustup for Rust targets and components; apt-get as root on
//! Debian/Ubuntu for programs), and otherwise stopping with the exact command to run.
//! Idempotent: nothing runs when everything is there. Loud: everything that runs is printed.

use crate::cli::SetupOptions;
use crate::workspace::{cargo, describe, run_loud, WASM_TARGET};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What a command needs beyond a Rust toolchain.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs {
    pub wasm_target: bool,
    pub redis: bool,
    pub wrk: bool,
    /// docker-compose (v1, Debian's): only its `config` command, which validates
    /// envoy/docker-compose.yml in the deploy checks; no Docker engine is needed.
    pub compose: bool,
    /// rustfmt and clippy (for `cargo xtask test`).
    pub lint_tools: bool,
    /// curl: the README tour's commands (run by `cargo xtask test`, typed by demo users).
    pub curl: bool,
    /// Chromium and chromedriver: the browser test of the demo page.
    pub browser: bool,
}

impl Needs {
    pub fn wasm_only() -> Needs {
        Needs {
            wasm_target: true,
            ..Needs::default()
        }
    }
}

/// A program found on PATH, and the Debian package that provides it.
struct Program {
    binary: &'static str,
    debian_package: &'static str,
}

const REDIS: Program = Program {
    binary: "redis-server",
    debian_package: "redis-server",
};
/// redis-cli: the tests build Redis Clusters with `redis-cli --cluster create`.
const REDIS_CLI: Program = Program {
    binary: "redis-cli",
    debian_package: "redis-tools",
};
/// redis-sentinel: the tests run Sentinel-managed failovers (testkit's `RedisSentinel`).
const REDIS_SENTINEL: Program = Program {
    binary: "redis-sentinel",
    debian_package: "redis-sentinel",
};
const WRK: Program = Program {
    binary: "wrk",
    debian_package: "wrk",
};
const CURL: Program = Program {
    binary: "curl",
    debian_package: "curl",
};
const COMPOSE: Program = Program {
    binary: "docker-compose",
    debian_package: "docker-compose",
};
const CHROMIUM: Program = Program {
    binary: "chromium",
    debian_package: "chromium",
};
/// chromedriver: the WebDriver server the browser test drives Chromium through.
const CHROMEDRIVER: Program = Program {
    binary: "chromedriver",
    debian_package: "chromium-driver",
};

/// The browser the demo page is tested in.
#[derive(Debug, Clone)]
pub struct Browser {
    pub chromium: PathBuf,
    pub chromedriver: PathBuf,
}

/// Chromium and chromedriver, installed with apt-get when missing (as for any program).
pub fn ensure_browser(options: &SetupOptions) -> Result<Browser> {
    ensure(
        &Needs {
            browser: true,
            ..Needs::default()
        },
        options,
    )?;
    let found = |p: &Program| {
        find_on_path(p.binary).with_context(|| format!("{} is not on PATH after setup", p.binary))
    };
    Ok(Browser {
        chromium: found(&CHROMIUM)?,
        chromedriver: found(&CHROMEDRIVER)?,
    })
}

pub fn ensure(needs: &Needs, options: &SetupOptions) -> Result<()> {
    if needs.wasm_target {
        ensure_wasm_target(options)?;
    }
    if needs.lint_tools {
        ensure_lint_tools(options)?;
    }
    let mut programs = Vec::new();
    if needs.redis {
        programs.push(&REDIS);
        programs.push(&REDIS_CLI);
        programs.push(&REDIS_SENTINEL);
    }
    if needs.wrk {
        programs.push(&WRK);
    }
    if needs.compose {
        programs.push(&COMPOSE);
    }
    if needs.curl {
        programs.push(&CURL);
    }
    if needs.browser {
        programs.push(&CHROMIUM);
        programs.push(&CHROMEDRIVER);
    }
    ensure_programs(&programs, options)
}

fn ensure_wasm_target(options: &SetupOptions) -> Result<()> {
    if find_on_path("rustup").is_none() {
        // Without rustup the target is either in the sysroot or cannot be added by us.
        let sysroot = command_stdout(Command::new("rustc").args(["--print", "sysroot"]))?;
        let dir = Path::new(sysroot.trim())
            .join("lib/rustlib")
            .join(WASM_TARGET);
        if dir.is_dir() {
            return Ok(());
        }
        bail!(
            "the Rust target {WASM_TARGET} is not installed ({} is missing) and rustup is not \
             on PATH: install the target for your toolchain (with rustup: \
             `rustup target add {WASM_TARGET}`)",
            dir.display()
        );
    }
    let installed = command_stdout(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l.trim() == WASM_TARGET) {
        return Ok(());
    }
    let mut add = Command::new("rustup");
    add.args(["target", "add", WASM_TARGET]);
    if !options.install {
        bail!(
            "the Rust target {WASM_TARGET} is missing; run `{}` (or drop --no-install)",
            describe(&add)
        );
    }
    eprintln!("xtask: setup: the Rust target {WASM_TARGET} is missing; adding it");
    run_loud(&mut add)
}

fn ensure_lint_tools(options: &SetupOptions) -> Result<()> {
    let missing: Vec<&str> = [("fmt", "rustfmt"), ("clippy", "clippy")]
        .into_iter()
        .filter(|(sub, _)| {
            !cargo()
                .args([sub, "--version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(_, component)| component)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut add = Command::new("rustup");
    add.args(["component", "add"]).args(&missing);
    if !options.install || find_on_path("rustup").is_none() {
        bail!(
            "the Rust components {} are missing; run `{}`",
            missing.join(", "),
            describe(&add)
        );
    }
    eprintln!(
        "xtask: setup: the Rust components {} are missing; adding them",
        missing.join(", ")
    );
    run_loud(&mut add)
}

fn ensure_programs(programs: &[&Program], options: &SetupOptions) -> Result<()> {
    let missing: Vec<&Program> = programs
        .iter()
        .copied()
        .filter(|p| find_on_path(p.binary).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let binaries: Vec<&str> = missing.iter().map(|p| p.binary).collect();
    let packages: Vec<&str> = missing.iter().map(|p| p.debian_package).collect();
    let debian = Path::new("/etc/debian_version").exists();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let install_line = format!("apt-get install -y {}", packages.join(" "));
    if !debian {
        bail!(
            "{} not found on PATH; install {} with your package manager \
             (Debian/Ubuntu: `{install_line}`; macOS: `brew install {}`) and run again",
            binaries.join(" and "),
            if missing.len() == 1 { "it" } else { "them" },
            brew_formulas(&binaries).join(" ")
        );
    }
    if !root || !options.install {
        bail!(
            "{} not found on PATH; run `sudo apt-get update && sudo {install_line}` and run again",
            binaries.join(" and ")
        );
    }
    eprintln!(
        "xtask: setup: {} not found on PATH; installing {} with apt-get",
        binaries.join(" and "),
        packages.join(" ")
    );
    apt_install(&packages)?;
    for p in &missing {
        if find_on_path(p.binary).is_none() {
            bail!(
                "apt-get installed {} but {} is still not on PATH",
                p.debian_package,
                p.binary
            );
        }
    }
    Ok(())
}

/// Homebrew's formulas for `binaries`: one `redis` formula ships redis-server, redis-cli and
/// redis-sentinel.
fn brew_formulas<'a>(binaries: &[&'a str]) -> Vec<&'a str> {
    let mut formulas: Vec<&str> = Vec::new();
    for b in binaries {
        let formula = if b.starts_with("redis-") { "redis" } else { b };
        if !formulas.contains(&formula) {
            formulas.push(formula);
        }
    }
    formulas
}

/// `apt-get update`, then `apt-get install` of `packages` (Debian, as root).
pub fn apt_install(packages: &[&str]) -> Result<()> {
    run_loud(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    run_loud(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The first executable file named `binary` in PATH.
pub fn find_on_path(binary: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn command_stdout(cmd: &mut Command) -> Result<String> {
    let output = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))?;
    if !output.status.success() {
        bail!("`{}` failed ({})", describe(cmd), output.status);
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("`{}` printed non-UTF-8", describe(cmd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_on_path_and_missing_ones_are_not() {
        // `sh` is on PATH on every machine that can run these tests.
        assert!(find_on_path("sh").is_some());
        assert!(find_on_path("krowoc-no-such-program").is_none());
    }

    #[test]
    fn the_redis_programs_come_from_one_brew_formula() {
        assert_eq!(
            brew_formulas(&["redis-server", "redis-cli", "redis-sentinel", "wrk"]),
            vec!["redis", "wrk"]
        );
    }

    #[test]
    fn nothing_missing_means_nothing_runs() {
        // With no needs, setup must not run (or refuse) anything, even with install off.
        ensure(&Needs::default(), &SetupOptions { install: false }).unwrap();
    }

    #[test]
    fn a_missing_program_without_install_stops_with_the_command_to_run() {
        let ghost = Program {
            binary: "krowoc-no-such-program",
            debian_package: "krowoc-ghost",
        };
        let e = ensure_programs(&[&ghost], &SetupOptions { install: false }).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("krowoc-no-such-program"), "{text}");
        assert!(text.contains("apt-get install -y krowoc-ghost"), "{text}");
    }
}
