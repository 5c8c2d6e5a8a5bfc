//! Command-line parsing, by hand: a few subcommands and flags do not justify a proc-macro build.

use anyhow::{anyhow, bail, Context, Result};
use std::time::Duration;

pub const USAGE: &str = "\
usage: cargo xtask <command> [flags]

commands:
  demo           set up, build, start redis (6390), upstream (8080), relay (7379) and
                 Envoy with envoy/envoy.yaml (gateway 10000, admin 9901); Ctrl-C stops all
      --host HOST         envoy (default) or host-shim: the proxy that runs the filter
      --exit-after SECS   stop cleanly after SECS seconds (also: env DEMO_EXIT_AFTER=SECS)
      --follow-logs       echo the services' logs here (they always go to <target>/demo/*.log)
      --redis MODE        single (default: one redis-server on 6390), cluster (3 masters and 3
                          replicas on 6391-6396), sentinel (master 6390, replica 6391, sentinels
                          26390-26392) or tls (redis-server on 6390 with TLS only, a CA and
                          certificates generated under <target>/demo/)
  test           set up (Envoy too), build the wasm crates and binaries, then cargo fmt
                 --check, cargo clippy -D warnings, cargo test --workspace (every gateway
                 test on Envoy and on host-shim), the README tour on both hosts and the
                 browser test (on the Envoy tour's demo)
  tour           start a fresh demo and run the README's tour against it, comparing every
                 command's output with the README's (the demo's ports must be free)
      --host HOST         envoy (default) or host-shim
      --redis MODE        as for demo
  browser-test   open the demo page (/demo) through the gateway in headless Chromium (Debian's
                 chromium and chromium-driver, installed when missing) and use it: six clicks
                 on \"rate limited\" end in a 429 with Retry-After, cached data twice is MISS
                 then HIT, a published note reaches the live feed with the clicks' request
                 events; a screenshot goes to <target>/browser/demo.png. Uses a demo that
                 serves the page on 10000, else starts one on Envoy
  bench          release build, then the plugin's cost per request in process, and wrk
                 against the same upstream directly and through each host (Envoy, then
                 host-shim): without the filter, the plugin with no policy, a rate limit,
                 cache hits, misses and pass-through, events, envoy.yaml's policies; at one
                 connection a relay PING, a Redis PING and the p50 a rate limit adds; one
                 table in <target>/bench/results.md and results.json
      --host HOST         only this host (envoy or host-shim; default both)
      --duration SECS     measured seconds per scenario (default 10)
      --warmup SECS       unmeasured seconds before each scenario (default 2)
      --connections N     wrk connections (default 64)
      --threads N         wrk threads (default 2)
      --only TEXT         run only scenarios whose name contains TEXT (repeatable); \"in process\"
                          is the plugin's cost per request without network (vm_bench)
  build-plugin   build the wasm crates and print their paths and sizes
  soak           the demo stack (every policy) under steady wrk load on each host, sampling the
                 gateway's, the relay's and Redis's memory, Redis's keys and the events stream;
                 fails when the gateway's or the relay's memory grows past the first sample
                 after warm-up (tables in <target>/soak)
      --minutes N         minutes per host (default 10)
      --host HOST         only this host (envoy or host-shim; default both)
  fuzz           mutate the inputs of the parsers that read untrusted bytes (Redis replies,
                 configuration, cache entries, purge directives, header maps, relay bodies)
                 for a while each; `test` runs the same targets briefly
      --seconds SECS      time per target (default 60)

flags for every command:
      --no-install        never run rustup/apt-get/pip; stop with the command to run instead";

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Help,
    BuildPlugin(SetupOptions),
    Demo(DemoOptions),
    Test(SetupOptions),
    Tour(TourOptions),
    BrowserTest(SetupOptions),
    Bench(BenchOptions),
    Fuzz(FuzzOptions),
    Soak(SoakOptions),
}

#[derive(Debug, Clone, PartialEq)]
pub struct SoakOptions {
    pub setup: SetupOptions,
    /// Load per host after the warm-up.
    pub duration: Duration,
    /// How often memory and keys are sampled.
    pub interval: Duration,
    /// One host, or both when None.
    pub host: Option<DemoHost>,
}

impl SoakOptions {
    pub fn hosts(&self) -> Vec<DemoHost> {
        match self.host {
            Some(h) => vec![h],
            None => DemoHost::ALL.to_vec(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FuzzOptions {
    pub setup: SetupOptions,
    /// How long each fuzz target runs.
    pub per_target: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SetupOptions {
    /// Whether setup may install what is missing (rustup target/components, apt-get).
    pub install: bool,
}

/// The proxy that runs the filter in the demo and the tour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoHost {
    Envoy,
    HostShim,
}

impl DemoHost {
    pub const ALL: [DemoHost; 2] = [DemoHost::Envoy, DemoHost::HostShim];

    pub fn name(self) -> &'static str {
        match self {
            DemoHost::Envoy => "envoy",
            DemoHost::HostShim => "host-shim",
        }
    }

    fn parse(text: &str) -> Result<DemoHost> {
        DemoHost::ALL
            .into_iter()
            .find(|h| h.name() == text)
            .ok_or_else(|| anyhow!("--host {text:?}: expected envoy or host-shim"))
    }
}

/// Which Redis the demo runs and the relay and upstream use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DemoRedis {
    #[default]
    Single,
    Cluster,
    Sentinel,
    Tls,
}

impl DemoRedis {
    pub const ALL: [DemoRedis; 4] = [
        DemoRedis::Single,
        DemoRedis::Cluster,
        DemoRedis::Sentinel,
        DemoRedis::Tls,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DemoRedis::Single => "single",
            DemoRedis::Cluster => "cluster",
            DemoRedis::Sentinel => "sentinel",
            DemoRedis::Tls => "tls",
        }
    }

    fn parse(text: &str) -> Result<DemoRedis> {
        DemoRedis::ALL
            .into_iter()
            .find(|m| m.name() == text)
            .ok_or_else(|| anyhow!("--redis {text:?}: expected single, cluster, sentinel or tls"))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TourOptions {
    pub setup: SetupOptions,
    pub host: DemoHost,
    pub redis: DemoRedis,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DemoOptions {
    pub setup: SetupOptions,
    pub host: DemoHost,
    pub redis: DemoRedis,
    pub exit_after: Option<Duration>,
    pub follow_logs: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BenchOptions {
    pub setup: SetupOptions,
    pub duration: Duration,
    pub warmup: Duration,
    pub connections: u32,
    pub threads: u32,
    pub only: Vec<String>,
    /// One host, or both (Envoy first) when None.
    pub host: Option<DemoHost>,
}

impl BenchOptions {
    /// `cargo xtask bench` without flags (`install`: set up what the machine lacks).
    pub fn defaults(install: bool) -> BenchOptions {
        BenchOptions {
            setup: SetupOptions { install },
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            connections: 64,
            threads: 2,
            only: Vec::new(),
            host: None,
        }
    }
}

/// Parses the arguments after `cargo xtask`, reading `DEMO_EXIT_AFTER` from the environment.
pub fn parse(args: &[String]) -> Result<Command> {
    parse_with_env(args, std::env::var("DEMO_EXIT_AFTER").ok())
}

pub(crate) fn parse_with_env(args: &[String], demo_exit_after: Option<String>) -> Result<Command> {
    let Some((command, rest)) = args.split_first() else {
        return Ok(Command::Help);
    };
    let mut flags = Flags::new(rest);
    let mut setup = SetupOptions { install: true };
    let parsed = match command.as_str() {
        "help" | "-h" | "--help" => return Ok(Command::Help),
        "build-plugin" => {
            only_no_install(&mut flags, &mut setup)?;
            Command::BuildPlugin(setup)
        }
        "test" => {
            only_no_install(&mut flags, &mut setup)?;
            Command::Test(setup)
        }
        "browser-test" => {
            only_no_install(&mut flags, &mut setup)?;
            Command::BrowserTest(setup)
        }
        "tour" => {
            let mut host = DemoHost::Envoy;
            let mut redis = DemoRedis::Single;
            flags.for_each(|name, value| match name {
                "--no-install" => {
                    setup.install = false;
                    Ok(())
                }
                "--host" => {
                    host = DemoHost::parse(value.take(name)?)?;
                    Ok(())
                }
                "--redis" => {
                    redis = DemoRedis::parse(value.take(name)?)?;
                    Ok(())
                }
                _ => Err(unknown(name)),
            })?;
            Command::Tour(TourOptions { setup, host, redis })
        }
        "demo" => {
            let mut exit_after = match demo_exit_after.as_deref() {
                Some(v) if !v.trim().is_empty() => {
                    Some(parse_secs(v).context("environment variable DEMO_EXIT_AFTER")?)
                }
                _ => None,
            };
            let mut follow_logs = false;
            let mut host = DemoHost::Envoy;
            let mut redis = DemoRedis::Single;
            flags.for_each(|name, value| match name {
                "--redis" => {
                    redis = DemoRedis::parse(value.take(name)?)?;
                    Ok(())
                }
                "--no-install" => {
                    setup.install = false;
                    Ok(())
                }
                "--host" => {
                    host = DemoHost::parse(value.take(name)?)?;
                    Ok(())
                }
                "--follow-logs" => {
                    follow_logs = true;
                    Ok(())
                }
                "--exit-after" => {
                    exit_after = Some(parse_secs(value.take(name)?)?);
                    Ok(())
                }
                _ => Err(unknown(name)),
            })?;
            Command::Demo(DemoOptions {
                setup,
                host,
                redis,
                exit_after,
                follow_logs,
            })
        }
        "bench" => {
            let mut o = BenchOptions::defaults(true);
            flags.for_each(|name, value| match name {
                "--no-install" => {
                    o.setup.install = false;
                    Ok(())
                }
                "--duration" => {
                    o.duration = parse_secs(value.take(name)?)?;
                    Ok(())
                }
                "--warmup" => {
                    o.warmup = parse_secs(value.take(name)?)?;
                    Ok(())
                }
                "--connections" => {
                    o.connections = parse_count(name, value.take(name)?)?;
                    Ok(())
                }
                "--threads" => {
                    o.threads = parse_count(name, value.take(name)?)?;
                    Ok(())
                }
                "--only" => {
                    o.only.push(value.take(name)?.to_string());
                    Ok(())
                }
                "--host" => {
                    o.host = Some(DemoHost::parse(value.take(name)?)?);
                    Ok(())
                }
                _ => Err(unknown(name)),
            })?;
            if o.duration.is_zero() {
                bail!("--duration must be at least 1 second");
            }
            if o.connections < o.threads {
                bail!(
                    "--connections ({}) must be at least --threads ({}): wrk gives each thread at least one connection",
                    o.connections,
                    o.threads
                );
            }
            Command::Bench(o)
        }
        "soak" => {
            let mut minutes = 10u32;
            let mut host = None;
            flags.for_each(|name, value| match name {
                "--no-install" => {
                    setup.install = false;
                    Ok(())
                }
                "--minutes" => {
                    minutes = parse_count(name, value.take(name)?)?;
                    Ok(())
                }
                "--host" => {
                    host = Some(DemoHost::parse(value.take(name)?)?);
                    Ok(())
                }
                _ => Err(unknown(name)),
            })?;
            let duration = Duration::from_secs(u64::from(minutes) * 60);
            Command::Soak(SoakOptions {
                setup,
                duration,
                // Ten samples at least, none shorter than 10 s.
                interval: (duration / 10).max(Duration::from_secs(10)),
                host,
            })
        }
        "fuzz" => {
            let mut per_target = Duration::from_secs(60);
            flags.for_each(|name, value| match name {
                "--no-install" => {
                    setup.install = false;
                    Ok(())
                }
                "--seconds" => {
                    per_target = parse_secs(value.take(name)?)?;
                    Ok(())
                }
                _ => Err(unknown(name)),
            })?;
            if per_target.is_zero() {
                bail!("--seconds must be at least 1");
            }
            Command::Fuzz(FuzzOptions { setup, per_target })
        }
        other => bail!("unknown command {other:?}"),
    };
    Ok(parsed)
}

/// The flags of a command that takes only `--no-install`.
fn only_no_install(flags: &mut Flags<'_>, setup: &mut SetupOptions) -> Result<()> {
    flags.for_each(|name, _| match name {
        "--no-install" => {
            setup.install = false;
            Ok(())
        }
        _ => Err(unknown(name)),
    })
}

fn unknown(flag: &str) -> anyhow::Error {
    anyhow!("unknown flag {flag:?}")
}

/// Seconds as `10` or `10s`.
fn parse_secs(text: &str) -> Result<Duration> {
    let digits = text.trim().strip_suffix('s').unwrap_or(text.trim());
    let secs: u64 = digits
        .parse()
        .map_err(|_| anyhow!("{text:?} is not a number of seconds (write 10 or 10s)"))?;
    Ok(Duration::from_secs(secs))
}

fn parse_count(flag: &str, text: &str) -> Result<u32> {
    match text.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => bail!("{flag} wants a positive whole number, not {text:?}"),
    }
}

/// `--name value` and `--name=value` flags, visited in order.
struct Flags<'a> {
    args: &'a [String],
}

/// The value slot of one flag: taken at most once, by flags that want a value.
struct Value<'a> {
    inline: Option<&'a str>,
    next: Option<&'a str>,
    used_next: bool,
}

impl<'a> Value<'a> {
    fn take(&mut self, flag: &str) -> Result<&'a str> {
        if let Some(v) = self.inline.take() {
            return Ok(v);
        }
        match self.next {
            Some(v) if !self.used_next => {
                self.used_next = true;
                Ok(v)
            }
            _ => bail!("{flag} needs a value"),
        }
    }
}

impl<'a> Flags<'a> {
    fn new(args: &'a [String]) -> Self {
        Flags { args }
    }

    fn for_each(
        &mut self,
        mut visit: impl FnMut(&str, &mut Value<'a>) -> Result<()>,
    ) -> Result<()> {
        let mut i = 0;
        while i < self.args.len() {
            let arg = self.args[i].as_str();
            if !arg.starts_with("--") {
                bail!("unexpected argument {arg:?}");
            }
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (arg, None),
            };
            let had_inline = inline.is_some();
            let mut value = Value {
                inline,
                next: self.args.get(i + 1).map(String::as_str),
                used_next: false,
            };
            visit(name, &mut value)?;
            if had_inline && value.inline.is_some() {
                bail!("{name} takes no value");
            }
            i += if value.used_next { 2 } else { 1 };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn no_arguments_means_help() {
        assert_eq!(parse_with_env(&[], None).unwrap(), Command::Help);
    }

    #[test]
    fn demo_exit_after_comes_from_flag_or_environment() {
        let from_flag = parse_with_env(&args(&["demo", "--exit-after", "20"]), None).unwrap();
        let Command::Demo(o) = from_flag else {
            panic!("not demo: {from_flag:?}")
        };
        assert_eq!(o.exit_after, Some(Duration::from_secs(20)));

        let from_env = parse_with_env(&args(&["demo"]), Some("7s".into())).unwrap();
        let Command::Demo(o) = from_env else {
            panic!("not demo: {from_env:?}")
        };
        assert_eq!(o.exit_after, Some(Duration::from_secs(7)));
        assert!(o.setup.install);

        // The flag wins over the environment.
        let both = parse_with_env(&args(&["demo", "--exit-after=3"]), Some("9".into())).unwrap();
        let Command::Demo(o) = both else {
            panic!("not demo: {both:?}")
        };
        assert_eq!(o.exit_after, Some(Duration::from_secs(3)));
    }

    #[test]
    fn demo_and_tour_run_envoy_unless_host_shim_is_chosen() {
        let Command::Demo(o) = parse_with_env(&args(&["demo"]), None).unwrap() else {
            panic!("not demo")
        };
        assert_eq!(o.host, DemoHost::Envoy);
        let Command::Demo(o) =
            parse_with_env(&args(&["demo", "--host", "host-shim"]), None).unwrap()
        else {
            panic!("not demo")
        };
        assert_eq!(o.host, DemoHost::HostShim);
        let Command::Tour(o) = parse_with_env(&args(&["tour", "--host=host-shim"]), None).unwrap()
        else {
            panic!("not tour")
        };
        assert_eq!(o.host, DemoHost::HostShim);
    }

    #[test]
    fn bench_flags_override_defaults() {
        let c = parse_with_env(
            &args(&[
                "bench",
                "--duration",
                "3",
                "--connections=16",
                "--only",
                "plugin",
                "--host",
                "envoy",
                "--no-install",
            ]),
            None,
        )
        .unwrap();
        let Command::Bench(o) = c else {
            panic!("not bench: {c:?}")
        };
        assert_eq!(o.duration, Duration::from_secs(3));
        assert_eq!(o.connections, 16);
        assert_eq!(o.threads, 2);
        assert_eq!(o.only, vec!["plugin".to_string()]);
        assert_eq!(o.host, Some(DemoHost::Envoy));
        assert!(!o.setup.install);
        let Command::Bench(o) = parse_with_env(&args(&["bench"]), None).unwrap() else {
            panic!("not bench")
        };
        assert_eq!(o.host, None, "both hosts unless one is chosen");
    }

    #[test]
    fn bad_flags_are_named() {
        let e = parse_with_env(&args(&["test", "--fast"]), None).unwrap_err();
        assert!(e.to_string().contains("--fast"), "{e}");
        let e = parse_with_env(&args(&["bench", "--duration"]), None).unwrap_err();
        assert!(e.to_string().contains("--duration needs a value"), "{e}");
        let e = parse_with_env(&args(&["bench", "--threads", "0"]), None).unwrap_err();
        assert!(e.to_string().contains("--threads"), "{e}");
        let e = parse_with_env(&args(&["demo", "--follow-logs=yes"]), None).unwrap_err();
        assert!(e.to_string().contains("takes no value"), "{e}");
        let e = parse_with_env(&args(&["demo"]), Some("soon".into())).unwrap_err();
        assert!(format!("{e:#}").contains("DEMO_EXIT_AFTER"), "{e:#}");
        let e = parse_with_env(&args(&["demo", "--host", "nginx"]), None).unwrap_err();
        assert!(e.to_string().contains("nginx"), "{e}");
        let e = parse_with_env(&args(&["deploy"]), None).unwrap_err();
        assert!(e.to_string().contains("deploy"), "{e}");
    }
}
