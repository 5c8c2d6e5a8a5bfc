//! The plugin's own cost per request, measured in process: host-shim's `vm_bench` example
//! drives one VM through a request's seven callbacks with no network. The wrk scenarios mix
//! this cost with sockets and scheduling on a shared machine, where runs move by tens of
//! percent; this figure moves far less and is what changes to host-shim or the plugin's request
//! path should be judged by.

use crate::workspace::{cargo, run_loud, Workspace};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What `--only` matches to select these measurements.
pub const NAME: &str = "in process";
const RUNS: usize = 5;
const REQUESTS: usize = 200_000;

/// One plugin configuration's runs, in µs per request.
pub struct InProcess {
    pub label: String,
    pub micros: Vec<f64>,
}

impl InProcess {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.micros.clone();
        v.sort_by(f64::total_cmp);
        v
    }
}

/// Builds the example (release, like the other bench binaries) and returns its path.
pub fn build(ws: &Workspace) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.current_dir(&ws.root).args([
        "build",
        "--release",
        "-p",
        "host-shim",
        "--example",
        "vm_bench",
    ]);
    run_loud(&mut cmd)?;
    let path = ws.target_dir.join("release/examples/vm_bench");
    anyhow::ensure!(path.is_file(), "the build made no {}", path.display());
    Ok(path)
}

/// Runs each configuration `RUNS` times, alternating between them so that a slow spell of the
/// machine does not land on one configuration only.
pub fn measure(bin: &Path, plugin: &Path, configs: &[(String, String)]) -> Result<Vec<InProcess>> {
    let mut results: Vec<InProcess> = configs
        .iter()
        .map(|(label, _)| InProcess {
            label: label.clone(),
            micros: Vec::new(),
        })
        .collect();
    for _ in 0..RUNS {
        for ((_, json), result) in configs.iter().zip(results.iter_mut()) {
            let out = Command::new(bin)
                .arg(plugin)
                .arg(json)
                .arg(REQUESTS.to_string())
                .output()
                .with_context(|| format!("cannot run {}", bin.display()))?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                bail!(
                    "vm_bench failed for {}: {}{}",
                    result.label,
                    stdout,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let micros = micros_per_request(&stdout)
                .with_context(|| format!("vm_bench printed no figure: {stdout}"))?;
            eprintln!(
                "xtask: {NAME}: {}: {micros:.2} µs per request",
                result.label
            );
            result.micros.push(micros);
        }
    }
    Ok(results)
}

/// The figure in `vm_bench: N requests in Xs: 8.77 µs per request (…)`.
fn micros_per_request(stdout: &str) -> Option<f64> {
    let before = stdout.split(" µs per request").next()?;
    before.rsplit(' ').next()?.parse().ok()
}

pub fn render(results: &[InProcess]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nIn process (`vm_bench`: one VM driven through a request's seven callbacks, no network; \
         {RUNS} runs of {REQUESTS} requests each, alternating):\n"
    );
    let _ = writeln!(
        out,
        "| plugin configuration | µs per request, median | min | max |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|");
    for r in results {
        let v = r.sorted();
        if v.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "| {} | {:.2} | {:.2} | {:.2} |",
            r.label,
            v[v.len() / 2],
            v[0],
            v[v.len() - 1]
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_figure_is_read_from_the_examples_line() {
        let line = "vm_bench: 200000 requests in 1.754s: 8.77 µs per request (7 callbacks)\n";
        assert_eq!(micros_per_request(line), Some(8.77));
        assert_eq!(micros_per_request("nothing here"), None);
    }

    #[test]
    fn the_table_shows_median_min_and_max() {
        let table = render(&[InProcess {
            label: "plugin, no policy".into(),
            micros: vec![9.0, 7.0, 8.0, 12.0, 7.5],
        }]);
        assert!(
            table.contains("| plugin, no policy | 8.00 | 7.00 | 12.00 |"),
            "{table}"
        );
    }
}
