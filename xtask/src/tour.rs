//! `cargo xtask tour`: the README's demo tour, run as a new user would run it. A fresh demo is
//! started (the same `Demo::start` as `cargo xtask demo`), then every `$ ` command of README.md's
//! `console` blocks runs in bash, in order, at a person's pace, and its output is compared with
//! the text under it. `…` in that text stands for what differs from run to run: within a line
//! it matches any text, and a line holding only `…` matches any number of lines. The `curl`
//! lines of envoy/README.md (written for the compose stack, which serves the same envoy.yaml on
//! the same ports) run too, and must succeed with some output.
//!
//! `cargo xtask test` runs the tour after the tests, so the README cannot drift from what the
//! demo does.

use crate::cli::{DemoHost, DemoRedis, TourOptions};
use crate::demo::{Builds, Demo};
use crate::markdown;
use crate::workspace::Workspace;
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Duration;

/// The wildcard of expected outputs.
pub const ANY: char = '…';

/// Between two commands: a person reads the output before typing the next one. It also lets
/// the filter's event flushes (every 100 ms) reach Redis before the next command looks.
const PAUSE: Duration = Duration::from_millis(500);

/// A command of the tour and the output the README shows for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Where it is (file:line), for messages.
    pub place: String,
    pub command: String,
    pub expected: Vec<String>,
}

/// The `$ ` commands of a markdown text's `console` blocks, each with the lines under it (up to
/// the next command or the end of the block; trailing blank lines dropped).
pub fn console_steps(file: &str, markdown: &str) -> Result<Vec<Step>> {
    let lines = markdown::lines(markdown)
        .map_err(|start| anyhow!("{file}:{start}: a code block is not closed"))?;
    let mut steps: Vec<Step> = Vec::new();
    let mut previous: Option<usize> = None;
    for line in lines.iter().filter(|l| l.fence == Some("console")) {
        // Fence markers are dropped: a gap in the numbers is the start of another block.
        let block_start = previous != Some(line.number - 1);
        previous = Some(line.number);
        if let Some(command) = line.text.strip_prefix("$ ") {
            steps.push(Step {
                place: format!("{file}:{}", line.number),
                command: command.to_string(),
                expected: Vec::new(),
            });
        } else {
            match steps.last_mut().filter(|_| !block_start) {
                Some(step) => step.expected.push(line.text.trim_end().to_string()),
                None => bail!(
                    "{file}:{}: a console block must start with a `$ ` command line",
                    line.number
                ),
            }
        }
    }
    for step in &mut steps {
        while step.expected.last().is_some_and(|l| l.is_empty()) {
            step.expected.pop();
        }
    }
    Ok(steps)
}

/// The lines of `sh` blocks that start with `prefix` (commands for a reader to type).
pub fn sh_lines(file: &str, markdown: &str, prefix: &str) -> Result<Vec<String>> {
    let lines = markdown::lines(markdown)
        .map_err(|start| anyhow!("{file}:{start}: a code block is not closed"))?;
    Ok(lines
        .iter()
        .filter(|l| l.fence == Some("sh"))
        .map(|l| l.text.trim())
        .filter(|t| t.starts_with(prefix))
        .map(str::to_string)
        .collect())
}

/// Whether one output line matches a README line (with `…` wildcards).
pub fn line_matches(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split(ANY).collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if text.len() < first.len() + last.len() || !text.starts_with(first) || !text.ends_with(last) {
        return false;
    }
    // The leftmost place of each middle part leaves the most room for the rest.
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// Whether a command's output lines match the README's (a line of only `…` matches any number
/// of lines).
pub fn output_matches(expected: &[String], actual: &[&str]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((e, rest)) if e.trim() == ANY.to_string() => {
            (0..=actual.len()).any(|skip| output_matches(rest, &actual[skip..]))
        }
        Some((e, rest)) => {
            !actual.is_empty() && line_matches(e, actual[0]) && output_matches(rest, &actual[1..])
        }
    }
}

/// Output as the comparison sees it: `\r` dropped, trailing spaces and blank lines trimmed.
fn output_lines(stdout: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = stdout
        .lines()
        .map(|l| l.trim_end_matches('\r').trim_end())
        .collect();
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines
}

/// `cargo xtask tour`: set up, build, start a fresh demo, run the tour, stop.
pub fn run(options: &TourOptions) -> Result<ExitCode> {
    let (ws, builds) = crate::demo::prepare(&options.setup, options.host, options.redis)?;
    Ok(if run_on(&ws, &builds, options.host, options.redis)? {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs the tour against a demo on `host` started from these builds; false when any command
/// failed or printed something else than the README shows (each is reported).
pub fn run_on(ws: &Workspace, builds: &Builds, host: DemoHost, redis: DemoRedis) -> Result<bool> {
    let mut demo = Demo::start(ws, builds, host, redis, false)?;
    let toured = run_against(ws, &mut demo, host, redis);
    demo.stop();
    toured
}

/// Runs the tour against `demo`, freshly started on `host` with `redis`, and leaves it running;
/// false as for [`run_on`], an error when a demo service exited meanwhile.
pub fn run_against(
    ws: &Workspace,
    demo: &mut Demo,
    host: DemoHost,
    redis: DemoRedis,
) -> Result<bool> {
    let readme = read(&ws.root.join("README.md"))?;
    let steps = console_steps("README.md", &readme)?;
    if steps.is_empty() {
        bail!("README.md has no console block: the tour is gone");
    }
    let deploy = read(&ws.root.join("envoy/README.md"))?;
    let curls = sh_lines("envoy/README.md", &deploy, "curl ")?;

    eprintln!(
        "xtask: tour on {}: {} commands from README.md, {} curl lines from envoy/README.md",
        host.name(),
        steps.len(),
        curls.len()
    );
    let mut failures = 0;
    for step in &steps {
        std::thread::sleep(PAUSE);
        let out = shell(&ws.root, &step.command)?;
        let actual = output_lines(&out.stdout);
        if out.ok && output_matches(&step.expected, &actual) {
            eprintln!("xtask: tour: ok   {}  $ {}", step.place, step.command);
            continue;
        }
        failures += 1;
        eprintln!(
            "xtask: tour: FAIL {}  $ {}\n{}--- the README shows:\n{}\n--- it printed:\n{}\n---",
            step.place,
            step.command,
            out.status_note(),
            step.expected.join("\n"),
            actual.join("\n"),
        );
    }
    for line in &curls {
        std::thread::sleep(PAUSE);
        let out = shell(&ws.root, line)?;
        if out.ok && !out.stdout.trim().is_empty() {
            eprintln!("xtask: tour: ok   envoy/README.md  $ {line}");
        } else {
            failures += 1;
            eprintln!(
                "xtask: tour: FAIL envoy/README.md  $ {line}\n{}it printed:\n{}",
                out.status_note(),
                out.stdout
            );
        }
    }
    // Every query of the Grafana dashboard is backed by a series Envoy printed during the tour.
    if host == DemoHost::Envoy {
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], crate::demo::ADMIN_PORT));
        let (_, exposition) = crate::probe::http_get_text(admin, "/stats/prometheus")?;
        let problems = dashboard_problems(&ws.root, &exposition)?;
        if problems.is_empty() {
            eprintln!("xtask: tour: ok   every query of {DASHBOARD} has a series in Envoy's /stats/prometheus");
        } else {
            failures += problems.len();
            for p in &problems {
                eprintln!("xtask: tour: FAIL {DASHBOARD}: {p}");
            }
        }
    }
    // On a cluster, the tour's data must be spread: every master holds some of it.
    if redis == DemoRedis::Cluster {
        let keys = crate::demo::keys_per_master()?;
        let shown: Vec<String> = keys.iter().map(|(p, n)| format!("{p}: {n}")).collect();
        if keys.iter().all(|(_, n)| *n > 0) {
            eprintln!("xtask: tour: keys per master: {}", shown.join(", "));
        } else {
            failures += 1;
            eprintln!(
                "xtask: tour: FAIL the filter's and the upstream's keys are not on every master ({})",
                shown.join(", ")
            );
        }
    }
    // A service that died during the tour is a failure even if every output matched.
    demo.check_alive()
        .context("a demo service exited during the tour")?;
    if failures > 0 {
        eprintln!(
            "xtask: tour: {failures} command(s) did not do what the README says (demo logs: {})",
            ws.target_dir.join("demo").display()
        );
        return Ok(false);
    }
    eprintln!("xtask: tour: every command did what the README says");
    Ok(true)
}

/// The Grafana dashboard, and the Prometheus configuration whose relabelling it relies on.
const DASHBOARD: &str = "envoy/grafana/krowoc-edge.json";
const PROMETHEUS: &str = "envoy/prometheus/prometheus.yml";
/// The datasource uid the dashboard's panels must name (provisioned in
/// envoy/grafana/provisioning/datasources/prometheus.yml).
const DATASOURCE_UID: &str = "krowoc-prometheus";

/// The dashboard's queries that match no series of `exposition` (Envoy's Prometheus text)
/// once the `envoy` job's relabelling of prometheus.yml is applied.
fn dashboard_problems(root: &Path, exposition: &str) -> Result<Vec<String>> {
    use testkit::dashboard;
    let config = dashboard::PrometheusConfig::parse(&read(&root.join(PROMETHEUS))?)
        .map_err(|e| anyhow!(e))?;
    let job = config
        .job("envoy")
        .ok_or_else(|| anyhow!("{PROMETHEUS} has no `envoy` scrape job"))?;
    let rules = job.relabels().map_err(|e| anyhow!("{PROMETHEUS}: {e}"))?;
    let series = dashboard::parse_exposition(exposition)
        .map_err(|e| anyhow!("Envoy's /stats/prometheus: {e}"))?;
    let board: serde_json::Value = serde_json::from_str(&read(&root.join(DASHBOARD))?)
        .with_context(|| format!("{DASHBOARD} is not JSON"))?;
    Ok(dashboard::check(
        &board,
        &dashboard::relabel(&series, &rules),
        DATASOURCE_UID,
    ))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

struct ShellOutput {
    ok: bool,
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

impl ShellOutput {
    fn status_note(&self) -> String {
        if self.ok {
            String::new()
        } else {
            format!(
                "--- it exited with {} (stderr: {})\n",
                self.status,
                self.stderr.trim()
            )
        }
    }
}

/// Runs a README line in bash, as a reader would paste it.
fn shell(dir: &Path, line: &str) -> Result<ShellOutput> {
    let out = Command::new("bash")
        .args(["-c", line])
        .current_dir(dir)
        .output()
        .with_context(|| format!("cannot run bash for `{line}`"))?;
    Ok(ShellOutput {
        ok: out.status.success(),
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Envoy printed in a demo after a few requests (trimmed to what the check needs).
    fn envoy_exposition() -> String {
        let mut text = String::from(
            "envoy_http_downstream_rq_xx{envoy_response_code_class=\"2\",envoy_http_conn_manager_prefix=\"gateway\"} 7\n",
        );
        for m in [
            "envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"2\",envoy_cluster_name=\"redis_relay\"} 18",
            "envoy_cluster_upstream_rq_timeout{envoy_cluster_name=\"redis_relay\"} 0",
            "envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"redis_relay\",le=\"+Inf\"} 18",
            "krowoc_events_batch_size_bucket{le=\"+Inf\"} 3",
            "krowoc_events_batch_size_sum{} 12",
            "krowoc_events_batch_size_count{} 3",
        ] {
            text.push_str(m);
            text.push('\n');
        }
        for what in [
            "allowed",
            "denied",
            "fallback_allowed",
            "fallback_denied",
            "redis_errors",
        ] {
            text.push_str(&format!("krowoc_rate_limit_rate_limited_{what}{{}} 1\n"));
        }
        for what in [
            "hits",
            "misses",
            "expired",
            "stale",
            "bypass",
            "stores",
            "store_failures",
            "not_stored",
            "redis_errors",
            "corrupt",
            "coalesced",
            "not_modified",
        ] {
            text.push_str(&format!("krowoc_cache_cached_data_{what}{{}} 1\n"));
        }
        for m in [
            "krowoc_cache_purges",
            "krowoc_cache_purged_entries",
            "krowoc_cache_purge_failures",
            "krowoc_cache_revalidations",
            "krowoc_redis_calls",
            "krowoc_redis_errors",
            "krowoc_redis_timeouts",
            "krowoc_redis_noscript",
            "krowoc_redis_short_circuited",
            "krowoc_redis_shared",
            "krowoc_redis_breaker_open",
            "krowoc_redis_breaker_opened",
            "krowoc_events_recorded",
            "krowoc_events_published",
            "krowoc_events_dropped",
            "krowoc_events_partial",
            "krowoc_events_rejected",
            "krowoc_events_sampled_out",
            "krowoc_events_possible_duplicates",
            "krowoc_events_queued",
            "krowoc_events_flushes",
            "krowoc_events_flush_failures",
            "krowoc_events_requeued",
        ] {
            text.push_str(&format!("{m}{{}} 0\n"));
        }
        text
    }

    #[test]
    fn the_dashboard_is_backed_by_envoys_series_and_a_missing_one_is_named() {
        let root = Workspace::load().unwrap().root;
        let full = envoy_exposition();
        assert_eq!(
            dashboard_problems(&root, &full).unwrap(),
            Vec::<String>::new()
        );
        // Envoy without the relay cluster's timing: the panel that needs it says so.
        let without: String = full
            .lines()
            .filter(|l| !l.starts_with("envoy_cluster_upstream_rq_time_bucket"))
            .map(|l| format!("{l}\n"))
            .collect();
        let problems = dashboard_problems(&root, &without).unwrap();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("panel \"Relay round trip\": envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"redis_relay\"} matches no series"),
            "{problems:?}"
        );
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn commands_and_their_outputs_are_read_from_console_blocks_only() {
        let md = "intro\n```sh\n$ not a step\n```\n\n```console\n$ echo a\na\n\n$ true\n\n```\n\
                  text\n```console\n$ printf 'x\\ny'\nx\n…\n```\n";
        let steps = console_steps("R.md", md).unwrap();
        assert_eq!(steps.len(), 3, "{steps:?}");
        assert_eq!(steps[0].place, "R.md:7");
        assert_eq!(steps[0].command, "echo a");
        assert_eq!(steps[0].expected, vec!["a"]);
        assert_eq!(steps[1].command, "true");
        assert!(steps[1].expected.is_empty());
        assert_eq!(steps[2].expected, vec!["x", "…"]);
    }

    #[test]
    fn a_console_block_without_a_command_or_unclosed_is_refused() {
        let e = console_steps("R.md", "```console\noutput\n```\n").unwrap_err();
        assert!(e.to_string().contains("R.md:2"), "{e}");
        let e = console_steps("R.md", "```console\n$ true\n").unwrap_err();
        assert!(e.to_string().contains("not closed"), "{e}");
        // A second block must start with its own command, not continue the first one's output.
        let e = console_steps("R.md", "```console\n$ a\n```\n```console\nb\n```\n").unwrap_err();
        assert!(e.to_string().contains("R.md:5"), "{e}");
    }

    #[test]
    fn the_wildcard_stands_for_any_text_within_a_line() {
        assert!(line_matches("age: 0", "age: 0"));
        assert!(!line_matches("age: 0", "age: 1"));
        assert!(line_matches("age: …", "age: 17"));
        assert!(line_matches("age: …", "age: "));
        assert!(line_matches(
            r#"{"id":"…","n":…}"#,
            r#"{"id":"9a51-x","n":12}"#
        ));
        assert!(!line_matches(
            r#"{"id":"…","n":…}"#,
            r#"{"id":"9a51","m":1}"#
        ));
        assert!(line_matches("a…b…c", "a-b-b-c"));
        assert!(
            !line_matches("ab…ba", "aba"),
            "prefix and suffix may not overlap"
        );
        assert!(!line_matches("x…", "y"));
    }

    #[test]
    fn a_wildcard_line_stands_for_any_number_of_lines() {
        let e = lines("HTTP/1.1 200 OK\n…\nx-cache: HIT");
        assert!(output_matches(&e, &["HTTP/1.1 200 OK", "x-cache: HIT"]));
        assert!(output_matches(
            &e,
            &["HTTP/1.1 200 OK", "date: d", "age: 3", "x-cache: HIT"]
        ));
        assert!(!output_matches(&e, &["HTTP/1.1 200 OK", "x-cache: MISS"]));
        assert!(
            !output_matches(&lines("a"), &["a", "b"]),
            "extra lines fail"
        );
        assert!(
            !output_matches(&lines("a\nb"), &["a"]),
            "missing lines fail"
        );
        assert!(output_matches(&[], &[]));
    }

    #[test]
    fn output_is_compared_without_carriage_returns_or_trailing_blank_lines() {
        assert_eq!(
            output_lines("HTTP/1.1 200 OK\r\nage: 0  \r\n\r\n{}\n\n"),
            vec!["HTTP/1.1 200 OK", "age: 0", "", "{}"]
        );
    }

    #[test]
    fn sh_lines_are_picked_by_prefix() {
        let md = "```sh\ncurl -s x | grep y\n  curl z   \nls\n```\n```console\ncurl no\n```\n";
        assert_eq!(
            sh_lines("R.md", md, "curl ").unwrap(),
            vec!["curl -s x | grep y", "curl z"]
        );
    }

    /// The README's own tour parses, and a changed output is caught: the check can fail.
    #[test]
    fn the_readme_tour_parses_and_a_wrong_output_would_fail_it() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let steps = console_steps("README.md", &readme).unwrap();
        assert!(steps.len() >= 6, "{steps:?}");
        assert!(steps.iter().all(|s| !s.command.trim().is_empty()));
        let hit = steps
            .iter()
            .find(|s| s.expected.iter().any(|l| l == "x-cache: HIT"))
            .expect("the tour shows a cache hit");
        let as_printed: Vec<String> = hit.expected.iter().map(|l| l.replace(ANY, "7")).collect();
        let refs: Vec<&str> = as_printed.iter().map(String::as_str).collect();
        assert!(output_matches(&hit.expected, &refs));
        let broken: Vec<&str> = refs
            .iter()
            .map(|l| {
                if *l == "x-cache: HIT" {
                    "x-cache: MISS"
                } else {
                    l
                }
            })
            .collect();
        assert!(!output_matches(&hit.expected, &broken));
    }
}
