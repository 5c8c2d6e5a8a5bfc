//! The compose stack's Prometheus and Grafana: Prometheus scrapes Envoy's admin where envoy.yaml
//! serves it, over an internal network only the two share; Grafana gets its datasource and the
//! dashboard from files that are mounted where its provisioning looks, reaches Prometheus and
//! nothing else of the stack, and is published on loopback only.

use std::collections::BTreeSet;

use testkit::dashboard::{self, PrometheusConfig};

use super::checks::{join_rel, Deployment, Problem, COMPOSE};
use super::compose::{Compose, Service};

pub const PROMETHEUS_YML: &str = "envoy/prometheus/prometheus.yml";
pub const DASHBOARD: &str = "envoy/grafana/krowoc-edge.json";
pub const DATASOURCES: &str = "envoy/grafana/provisioning/datasources/prometheus.yml";
pub const DASHBOARD_PROVIDERS: &str = "envoy/grafana/provisioning/dashboards/krowoc-edge.yml";
/// The compose services these checks are about.
pub const MONITORING_SERVICES: [&str; 2] = ["prometheus", "grafana"];

/// Where Prometheus's image reads its configuration, and its port, when the command does not
/// say; Grafana's provisioning folder and port (their images' defaults).
const PROMETHEUS_DEFAULT_CONFIG: &str = "/etc/prometheus/prometheus.yml";
const PROMETHEUS_DEFAULT_PORT: u16 = 9090;
const GRAFANA_PROVISIONING: &str = "/etc/grafana/provisioning";
const GRAFANA_PORT: u16 = 3000;
/// The services Grafana must not reach: what holds data or controls the gateway.
const NOT_FOR_GRAFANA: [&str; 4] = ["redis", "relay", "upstream", "envoy"];

fn problem(file: &str, message: impl Into<String>) -> Problem {
    Problem::Monitoring {
        file: file.to_string(),
        message: message.into(),
    }
}

/// `--flag=value` or `--flag value` in a command.
fn flag(argv: &[String], name: &str) -> Option<String> {
    argv.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
            .map(str::to_string)
            .or_else(|| (a == name).then(|| argv.get(i + 1).cloned()).flatten())
    })
}

fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit_once(':')?.1.parse().ok()
}

/// The port in a health check's URL (`http://host:PORT/...`).
fn probe_port(service: &Service) -> Option<u16> {
    let test = &service.healthcheck.as_ref()?.test;
    let url = test.iter().find(|a| a.starts_with("http://"))?;
    let authority = url.strip_prefix("http://")?.split('/').next()?;
    port_of(authority)
}

fn networks(compose: &Compose, name: &str) -> BTreeSet<String> {
    compose
        .services
        .get(name)
        .map(|s| s.networks.iter().cloned().collect())
        .unwrap_or_default()
}

fn internal(compose: &Compose, network: &str) -> bool {
    compose
        .networks
        .get(network)
        .and_then(Option::as_ref)
        .is_some_and(|n| n.internal)
}

/// The repository file mounted at `target` in `service`, if any.
fn mounted_at(service: &Service, target: &str) -> Option<String> {
    service
        .binds()
        .into_iter()
        .find(|(_, t)| t == target)
        .map(|(s, _)| join_rel("envoy", &s))
}

pub fn check_monitoring(d: &Deployment) -> Vec<Problem> {
    let Ok(compose) = d.compose() else {
        return Vec::new(); // check_compose reports it
    };
    let mut problems = Vec::new();
    let (Some(prometheus), Some(grafana)) = (
        compose.services.get("prometheus"),
        compose.services.get("grafana"),
    ) else {
        problems.push(problem(
            COMPOSE,
            "services prometheus and grafana are both needed (the dashboard's stack)",
        ));
        return problems;
    };

    // Prometheus: its configuration, where it scrapes, and how it is reached.
    let argv = prometheus.command.clone().unwrap_or_default();
    let config_path =
        flag(&argv, "--config.file").unwrap_or_else(|| PROMETHEUS_DEFAULT_CONFIG.to_string());
    if mounted_at(prometheus, &config_path).as_deref() != Some(PROMETHEUS_YML) {
        problems.push(problem(
            COMPOSE,
            format!(
                "service prometheus reads {config_path}, where {PROMETHEUS_YML} is not mounted"
            ),
        ));
    }
    let prometheus_port = flag(&argv, "--web.listen-address")
        .map(|a| port_of(&a))
        .unwrap_or(Some(PROMETHEUS_DEFAULT_PORT));
    if probe_port(prometheus) != prometheus_port {
        problems.push(problem(
            COMPOSE,
            format!(
                "service prometheus listens on {prometheus_port:?}, its health check probes {:?}",
                probe_port(prometheus)
            ),
        ));
    }
    match d
        .read(PROMETHEUS_YML)
        .ok_or_else(|| format!("{PROMETHEUS_YML} is missing"))
        .and_then(|t| PrometheusConfig::parse(&t))
    {
        Err(e) => problems.push(problem(PROMETHEUS_YML, e)),
        Ok(config) => check_scrape(d, &compose, &config, &mut problems),
    }

    // Grafana: provisioning mounted, the datasource is that Prometheus, the dashboard loaded.
    if mounted_at(grafana, GRAFANA_PROVISIONING).as_deref() != Some("envoy/grafana/provisioning") {
        problems.push(problem(
            COMPOSE,
            format!("service grafana: envoy/grafana/provisioning is not mounted at {GRAFANA_PROVISIONING}"),
        ));
    }
    if probe_port(grafana) != Some(GRAFANA_PORT) {
        problems.push(problem(
            COMPOSE,
            format!(
                "service grafana listens on {GRAFANA_PORT}, its health check probes {:?}",
                probe_port(grafana)
            ),
        ));
    }
    for p in grafana.published() {
        match p {
            Ok(p) if p.host_ip.as_deref() == Some("127.0.0.1") => {}
            Ok(p) => problems.push(problem(
                COMPOSE,
                format!(
                    "service grafana: port {} is published beyond loopback",
                    p.host_port
                ),
            )),
            Err(e) => problems.push(problem(COMPOSE, format!("service grafana: {e}"))),
        }
    }
    let grafana_nets = networks(&compose, "grafana");
    for other in NOT_FOR_GRAFANA {
        let theirs = networks(&compose, other);
        let shared: Vec<&String> = grafana_nets.intersection(&theirs).collect();
        if let Some(net) = shared.first() {
            problems.push(problem(
                COMPOSE,
                format!("service grafana shares network {net} with {other}: it should reach Prometheus only"),
            ));
        }
    }
    let uid = check_datasource(d, &compose, prometheus_port, &mut problems);
    check_dashboard_provider(d, grafana, &mut problems);
    match d
        .read(DASHBOARD)
        .map(|t| serde_json::from_str::<serde_json::Value>(&t))
    {
        None => problems.push(problem(DASHBOARD, "missing")),
        Some(Err(e)) => problems.push(problem(DASHBOARD, format!("not JSON: {e}"))),
        Some(Ok(board)) => match dashboard::panel_queries(&board) {
            Err(e) => problems.push(problem(DASHBOARD, e)),
            Ok(queries) => {
                for q in queries {
                    if let Err(e) = dashboard::selectors(&q.expr) {
                        problems.push(problem(DASHBOARD, format!("panel {:?}: {e}", q.panel)));
                    }
                    if uid.is_some() && q.datasource_uid != uid {
                        problems.push(problem(
                            DASHBOARD,
                            format!(
                                "panel {:?} uses datasource {:?}, the provisioned one is {uid:?}",
                                q.panel, q.datasource_uid
                            ),
                        ));
                    }
                }
            }
        },
    }
    problems
}

/// The `envoy` job scrapes Envoy's admin, as envoy.yaml serves it, over an internal network.
fn check_scrape(
    d: &Deployment,
    compose: &Compose,
    config: &PrometheusConfig,
    problems: &mut Vec<Problem>,
) {
    let Some(job) = config.job("envoy") else {
        problems.push(problem(PROMETHEUS_YML, "no `envoy` scrape job"));
        return;
    };
    if let Err(e) = job.relabels() {
        problems.push(problem(PROMETHEUS_YML, e));
    }
    if job.metrics_path.as_deref() != Some("/stats/prometheus") {
        problems.push(problem(
            PROMETHEUS_YML,
            format!(
                "job envoy: metrics_path {:?}, Envoy's admin serves /stats/prometheus",
                job.metrics_path
            ),
        ));
    }
    let admin_port = d.envoy().ok().and_then(|e| e.admin.map(|a| a.port));
    let targets: Vec<&String> = job.static_configs.iter().flat_map(|s| &s.targets).collect();
    if targets.is_empty() {
        problems.push(problem(PROMETHEUS_YML, "job envoy has no targets"));
    }
    for target in targets {
        let (host, port) = target.rsplit_once(':').unwrap_or((target, ""));
        if host != "envoy" || port.parse().ok() != admin_port {
            problems.push(problem(
                PROMETHEUS_YML,
                format!("job envoy scrapes {target}, but Envoy's admin is envoy:{admin_port:?} (envoy.yaml)"),
            ));
            continue;
        }
        let shared: Vec<String> = networks(compose, "prometheus")
            .intersection(&networks(compose, "envoy"))
            .cloned()
            .collect();
        if !shared.iter().any(|n| internal(compose, n)) {
            problems.push(problem(
                COMPOSE,
                format!("prometheus and envoy share no internal network (shared: {shared:?}): Envoy's admin must be scraped inside the stack"),
            ));
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Datasources {
    #[serde(rename = "apiVersion")]
    _api_version: u32,
    datasources: Vec<Datasource>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Datasource {
    #[serde(rename = "name")]
    _name: String,
    uid: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "access")]
    _access: Option<String>,
    url: String,
    #[serde(rename = "isDefault")]
    _is_default: Option<bool>,
    #[serde(rename = "editable")]
    _editable: Option<bool>,
}

/// The provisioned datasource is the stack's Prometheus, reachable from Grafana; its uid.
fn check_datasource(
    d: &Deployment,
    compose: &Compose,
    prometheus_port: Option<u16>,
    problems: &mut Vec<Problem>,
) -> Option<String> {
    let parsed = d
        .read(DATASOURCES)
        .ok_or_else(|| "missing".to_string())
        .and_then(|t| serde_yaml::from_str::<Datasources>(&t).map_err(|e| e.to_string()));
    let sources = match parsed {
        Ok(s) => s.datasources,
        Err(e) => {
            problems.push(problem(DATASOURCES, e));
            return None;
        }
    };
    let Some(source) = sources.iter().find(|s| s.kind == "prometheus") else {
        problems.push(problem(DATASOURCES, "no prometheus datasource"));
        return None;
    };
    let authority = source
        .url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .unwrap_or_default();
    let (host, port) = authority.rsplit_once(':').unwrap_or((authority, ""));
    if host != "prometheus" || port.parse().ok() != prometheus_port {
        problems.push(problem(
            DATASOURCES,
            format!(
                "datasource {:?} is {}, but Prometheus is prometheus:{prometheus_port:?}",
                source.uid, source.url
            ),
        ));
    } else if networks(compose, "grafana")
        .intersection(&networks(compose, "prometheus"))
        .next()
        .is_none()
    {
        problems.push(problem(COMPOSE, "grafana and prometheus share no network"));
    }
    Some(source.uid.clone())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Providers {
    #[serde(rename = "apiVersion")]
    _api_version: u32,
    providers: Vec<Provider>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Provider {
    #[serde(rename = "name")]
    _name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "disableDeletion")]
    _disable_deletion: Option<bool>,
    #[serde(rename = "allowUiUpdates")]
    _allow_ui_updates: Option<bool>,
    options: ProviderOptions,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderOptions {
    path: String,
}

/// The dashboard is mounted in the folder a file provider loads.
fn check_dashboard_provider(d: &Deployment, grafana: &Service, problems: &mut Vec<Problem>) {
    let parsed = d
        .read(DASHBOARD_PROVIDERS)
        .ok_or_else(|| "missing".to_string())
        .and_then(|t| serde_yaml::from_str::<Providers>(&t).map_err(|e| e.to_string()));
    let providers = match parsed {
        Ok(p) => p.providers,
        Err(e) => {
            problems.push(problem(DASHBOARD_PROVIDERS, e));
            return;
        }
    };
    let folders: Vec<&str> = providers
        .iter()
        .filter(|p| p.kind == "file")
        .map(|p| p.options.path.trim_end_matches('/'))
        .collect();
    let loaded = grafana.binds().into_iter().any(|(source, target)| {
        join_rel("envoy", &source) == DASHBOARD
            && target
                .rsplit_once('/')
                .is_some_and(|(dir, _)| folders.contains(&dir))
    });
    if !loaded {
        problems.push(problem(
            COMPOSE,
            format!("service grafana: {DASHBOARD} is not mounted in a folder {DASHBOARD_PROVIDERS} loads ({folders:?})"),
        ));
    }
}
