//! The Grafana dashboard (`envoy/grafana/krowoc-edge.json`) against the metrics a gateway
//! really prints: Prometheus's text format is read, the scrape job's `metric_relabel_configs`
//! from `envoy/prometheus/prometheus.yml` are applied as Prometheus applies them, and every
//! series selector in every panel's query must match at least one of the resulting series.
//!
//! The PromQL is not evaluated: a query's selectors are found by scanning it (identifiers that
//! start with one of [`METRIC_PREFIXES`], with their `{…}` matchers; names inside `by (…)` and
//! the like are label names, not metrics). That is enough to catch a panel whose metric was
//! renamed, never printed, or relabelled differently from what the panel asks.

use regex::Regex;
use serde::Deserialize;
use std::collections::BTreeMap;

/// The metric names a dashboard query may select: the filter's own and Envoy's.
pub const METRIC_PREFIXES: [&str; 2] = ["krowoc_", "envoy_"];

/// One series of Prometheus's text format: its name and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// The series of a Prometheus text exposition (comments and values dropped). A line that
/// cannot be read is an error naming it.
pub fn parse_exposition(text: &str) -> Result<Vec<Series>, String> {
    let mut series = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        series.push(parse_series(line).map_err(|e| format!("line {}: {e}: {line}", i + 1))?);
    }
    Ok(series)
}

fn parse_series(line: &str) -> Result<Series, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("{name:?} is not a metric name"));
    }
    let mut labels = BTreeMap::new();
    let rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        loop {
            while chars.next_if(|(_, c)| *c == ',' || *c == ' ').is_some() {}
            match chars.peek() {
                Some((_, '}')) => break,
                None => return Err("labels not closed".into()),
                _ => {}
            }
            let mut key = String::new();
            while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=') {
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('=')
                || chars.next().map(|(_, c)| c) != Some('"')
            {
                return Err(format!("label {key:?} has no quoted value"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => return Err("label value not closed".into()),
                    },
                    Some((_, c)) => value.push(c),
                    None => return Err("label value not closed".into()),
                }
            }
            labels.insert(key.trim().to_string(), value);
        }
    }
    Ok(Series {
        name: name.to_string(),
        labels,
    })
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// The part of `prometheus.yml` the stack uses (unknown keys refused, so a typo is an error).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrometheusConfig {
    #[serde(default)]
    pub global: Option<Global>,
    pub scrape_configs: Vec<ScrapeConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Global {
    pub scrape_interval: Option<String>,
    pub evaluation_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrapeConfig {
    pub job_name: String,
    pub metrics_path: Option<String>,
    pub scrape_interval: Option<String>,
    #[serde(default)]
    pub static_configs: Vec<StaticConfig>,
    #[serde(default)]
    pub metric_relabel_configs: Vec<RelabelConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticConfig {
    pub targets: Vec<String>,
}

/// One `metric_relabel_configs` rule. Only `action: replace` (the default) is supported.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelabelConfig {
    #[serde(default)]
    pub source_labels: Vec<String>,
    pub separator: Option<String>,
    pub regex: Option<String>,
    pub target_label: Option<String>,
    pub replacement: Option<String>,
    pub action: Option<String>,
}

impl PrometheusConfig {
    pub fn parse(text: &str) -> Result<PrometheusConfig, String> {
        serde_yaml::from_str(text).map_err(|e| format!("prometheus.yml: {e}"))
    }

    pub fn job(&self, name: &str) -> Option<&ScrapeConfig> {
        self.scrape_configs.iter().find(|j| j.job_name == name)
    }
}

/// A rule ready to apply.
pub struct Relabel {
    source_labels: Vec<String>,
    separator: String,
    regex: Regex,
    target_label: String,
    replacement: String,
}

impl ScrapeConfig {
    /// The job's relabel rules, compiled; a rule Prometheus would refuse, or one these checks
    /// cannot apply, is an error naming it.
    pub fn relabels(&self) -> Result<Vec<Relabel>, String> {
        self.metric_relabel_configs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let at = format!("job {:?}, metric_relabel_configs[{i}]", self.job_name);
                let action = r.action.as_deref().unwrap_or("replace");
                if action != "replace" {
                    return Err(format!("{at}: action {action:?} (only replace is used)"));
                }
                let target_label = r
                    .target_label
                    .clone()
                    .ok_or_else(|| format!("{at}: replace needs target_label"))?;
                // Prometheus anchors the expression at both ends.
                let pattern = r.regex.as_deref().unwrap_or("(.*)");
                let regex = Regex::new(&format!("^(?:{pattern})$"))
                    .map_err(|e| format!("{at}: regex {pattern:?}: {e}"))?;
                Ok(Relabel {
                    source_labels: r.source_labels.clone(),
                    separator: r.separator.clone().unwrap_or_else(|| ";".to_string()),
                    regex,
                    target_label,
                    replacement: r.replacement.clone().unwrap_or_else(|| "$1".to_string()),
                })
            })
            .collect()
    }
}

/// `series` as Prometheus stores them after `rules` (each rule in order, on the result of the
/// one before; `__name__` is the metric's name).
pub fn relabel(series: &[Series], rules: &[Relabel]) -> Vec<Series> {
    series
        .iter()
        .map(|s| {
            let mut labels = s.labels.clone();
            labels.insert("__name__".to_string(), s.name.clone());
            for rule in rules {
                let value = rule
                    .source_labels
                    .iter()
                    .map(|l| labels.get(l).map(String::as_str).unwrap_or(""))
                    .collect::<Vec<_>>()
                    .join(&rule.separator);
                let Some(caps) = rule.regex.captures(&value) else {
                    continue;
                };
                let mut out = String::new();
                caps.expand(&rule.replacement, &mut out);
                if out.is_empty() {
                    labels.remove(&rule.target_label);
                } else {
                    labels.insert(rule.target_label.clone(), out);
                }
            }
            let name = labels.remove("__name__").unwrap_or_default();
            Series { name, labels }
        })
        .collect()
}

/// A label matcher of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    pub label: String,
    pub op: String,
    pub value: String,
}

/// A series selector found in a query: `name{matchers}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub name: String,
    pub matchers: Vec<Matcher>,
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name)?;
        if !self.matchers.is_empty() {
            let m: Vec<String> = self
                .matchers
                .iter()
                .map(|m| format!("{}{}{:?}", m.label, m.op, m.value))
                .collect();
            write!(f, "{{{}}}", m.join(","))?;
        }
        Ok(())
    }
}

/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The series selectors of a PromQL query whose names start with one of [`METRIC_PREFIXES`].
pub fn selectors(query: &str) -> Result<Vec<Selector>, String> {
    let bytes: Vec<char> = query.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&bytes, i)?;
            continue;
        }
        if c == '{' {
            // Matchers without a metric name before them: not used by the dashboard.
            return Err(format!("a selector without a metric name in {query:?}"));
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric() || bytes[i] == '_' || bytes[i] == ':')
            {
                i += 1;
            }
            let word: String = bytes[start..i].iter().collect();
            let mut j = i;
            while j < bytes.len() && bytes[j].is_whitespace() {
                j += 1;
            }
            if LABEL_LISTS.contains(&word.as_str()) && bytes.get(j) == Some(&'(') {
                let close = bytes[j..]
                    .iter()
                    .position(|c| *c == ')')
                    .ok_or_else(|| format!("`{word} (` not closed in {query:?}"))?;
                i = j + close + 1;
                continue;
            }
            if bytes.get(j) == Some(&'(') {
                continue; // a function
            }
            let mut matchers = Vec::new();
            if bytes.get(j) == Some(&'{') {
                let (m, end) = parse_matchers(&bytes, j + 1)
                    .map_err(|e| format!("{e} after {word} in {query:?}"))?;
                matchers = m;
                i = end;
            }
            if METRIC_PREFIXES.iter().any(|p| word.starts_with(p)) {
                out.push(Selector {
                    name: word,
                    matchers,
                });
            }
            continue;
        }
        i += 1;
    }
    Ok(out)
}

fn skip_string(chars: &[char], start: usize) -> Result<usize, String> {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err("a string is not closed".into())
}

fn parse_matchers(chars: &[char], mut i: usize) -> Result<(Vec<Matcher>, usize), String> {
    let mut matchers = Vec::new();
    loop {
        while i < chars.len() && (chars[i].is_whitespace() || chars[i] == ',') {
            i += 1;
        }
        match chars.get(i) {
            Some('}') => return Ok((matchers, i + 1)),
            None => return Err("matchers not closed".into()),
            _ => {}
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        let label: String = chars[start..i].iter().collect();
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let op = ["=~", "!~", "!=", "="]
            .into_iter()
            .find(|op| chars[i..].iter().take(op.len()).copied().eq(op.chars()))
            .ok_or_else(|| format!("no operator after label {label:?}"))?;
        i += op.len();
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if chars.get(i) != Some(&'"') {
            return Err(format!(
                "label {label:?}: the value is not a double-quoted string"
            ));
        }
        let end = skip_string(chars, i)?;
        let raw: String = chars[i + 1..end - 1].iter().collect();
        let value = raw.replace("\\\\", "\\").replace("\\\"", "\"");
        matchers.push(Matcher {
            label,
            op: op.to_string(),
            value,
        });
        i = end;
    }
}

impl Selector {
    /// Whether `series` is one this selector selects (regexes anchored, as in PromQL).
    pub fn matches(&self, series: &Series) -> Result<bool, String> {
        if series.name != self.name {
            return Ok(false);
        }
        for m in &self.matchers {
            let value = series
                .labels
                .get(&m.label)
                .map(String::as_str)
                .unwrap_or("");
            let ok = match m.op.as_str() {
                "=" => value == m.value,
                "!=" => value != m.value,
                op => {
                    let re = Regex::new(&format!("^(?:{})$", m.value))
                        .map_err(|e| format!("{self}: {e}"))?;
                    (op == "=~") == re.is_match(value)
                }
            };
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// A panel query of the dashboard.
#[derive(Debug, Clone)]
pub struct PanelQuery {
    pub panel: String,
    pub datasource_uid: Option<String>,
    pub expr: String,
}

/// Every query of a Grafana dashboard's panels (rows' nested panels included), with the
/// datasource uid each one uses (the target's, else its panel's). A panel without a query is
/// an error naming it.
pub fn panel_queries(dashboard: &serde_json::Value) -> Result<Vec<PanelQuery>, String> {
    let mut out = Vec::new();
    let panels = dashboard
        .get("panels")
        .and_then(|p| p.as_array())
        .ok_or("the dashboard has no panels")?;
    let mut stack: Vec<&serde_json::Value> = panels.iter().rev().collect();
    while let Some(panel) = stack.pop() {
        let title = panel
            .get("title")
            .and_then(|t| t.as_str())
            .unwrap_or("(untitled)")
            .to_string();
        if panel.get("type").and_then(|t| t.as_str()) == Some("row") {
            if let Some(inner) = panel.get("panels").and_then(|p| p.as_array()) {
                stack.extend(inner.iter().rev());
            }
            continue;
        }
        let uid = |v: &serde_json::Value| {
            v.get("datasource")
                .and_then(|d| d.get("uid"))
                .and_then(|u| u.as_str())
                .map(str::to_string)
        };
        let targets = panel
            .get("targets")
            .and_then(|t| t.as_array())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("panel {title:?} has no queries"))?;
        for target in targets {
            let expr = target
                .get("expr")
                .and_then(|e| e.as_str())
                .ok_or_else(|| format!("panel {title:?}: a target without expr"))?;
            out.push(PanelQuery {
                panel: title.clone(),
                datasource_uid: uid(target).or_else(|| uid(panel)),
                expr: expr.to_string(),
            });
        }
    }
    Ok(out)
}

/// What is wrong with `dashboard` against `series` (already relabelled): each problem names
/// the panel and the selector that matches nothing, or a query that cannot be read, or a
/// query on another datasource than `datasource_uid`. Empty when every panel is backed.
pub fn check(
    dashboard: &serde_json::Value,
    series: &[Series],
    datasource_uid: &str,
) -> Vec<String> {
    let queries = match panel_queries(dashboard) {
        Ok(q) => q,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    for q in &queries {
        if q.datasource_uid.as_deref() != Some(datasource_uid) {
            problems.push(format!(
                "panel {:?}: datasource uid {:?}, not the provisioned {datasource_uid:?}",
                q.panel, q.datasource_uid
            ));
        }
        let found = match selectors(&q.expr) {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!("panel {:?}: {e}", q.panel));
                continue;
            }
        };
        if found.is_empty() {
            problems.push(format!("panel {:?}: no metric in {:?}", q.panel, q.expr));
        }
        for sel in found {
            let mut any = false;
            for s in series {
                match sel.matches(s) {
                    Ok(true) => {
                        any = true;
                        break;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        problems.push(format!("panel {:?}: {e}", q.panel));
                        break;
                    }
                }
            }
            if !any {
                problems.push(format!(
                    "panel {:?}: {sel} matches no series the gateway printed",
                    q.panel
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TEXT: &str = "# TYPE krowoc_rate_limit_rate_limited_allowed counter\n\
        krowoc_rate_limit_rate_limited_allowed{} 5\n\
        krowoc_rate_limit_rate_limited_fallback_allowed{} 0\n\
        envoy_cluster_upstream_rq_total{envoy_cluster_name=\"redis_relay\"} 18\n\
        krowoc_events_batch_size_bucket{le=\"+Inf\"} 3\n";

    fn rules() -> Vec<Relabel> {
        let yaml = r#"
scrape_configs:
  - job_name: envoy
    metric_relabel_configs:
      - source_labels: [__name__]
        regex: 'krowoc_rate_limit_(.+?)_(allowed|denied|fallback_allowed)'
        target_label: route
      - source_labels: [__name__]
        regex: 'krowoc_rate_limit_(.+?)_(allowed|denied|fallback_allowed)'
        target_label: outcome
        replacement: '$2'
      - source_labels: [__name__]
        regex: 'krowoc_rate_limit_(.+?)_(allowed|denied|fallback_allowed)'
        target_label: __name__
        replacement: krowoc_rate_limit_decisions
"#;
        PrometheusConfig::parse(yaml)
            .unwrap()
            .job("envoy")
            .unwrap()
            .relabels()
            .unwrap()
    }

    #[test]
    fn the_exposition_is_read_with_its_labels() {
        let s = parse_exposition(TEXT).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[2].name, "envoy_cluster_upstream_rq_total");
        assert_eq!(s[2].labels["envoy_cluster_name"], "redis_relay");
        assert_eq!(s[3].labels["le"], "+Inf");
        let e = parse_exposition("ok 1\nbad{le=\"x} 1\n").unwrap_err();
        assert!(e.starts_with("line 2: label value not closed"), "{e}");
    }

    #[test]
    fn relabelling_is_anchored_and_lazy_as_prometheus_applies_it() {
        let s = relabel(&parse_exposition(TEXT).unwrap(), &rules());
        assert_eq!(s[0].name, "krowoc_rate_limit_decisions");
        assert_eq!(s[0].labels["route"], "rate_limited");
        assert_eq!(s[0].labels["outcome"], "allowed");
        // The shortest route that leaves a whole outcome: not "rate_limited_fallback".
        assert_eq!(s[1].labels["route"], "rate_limited");
        assert_eq!(s[1].labels["outcome"], "fallback_allowed");
        assert_eq!(s[2].name, "envoy_cluster_upstream_rq_total");
        assert!(!s[2].labels.contains_key("route"));
    }

    #[test]
    fn selectors_skip_functions_label_lists_and_strings() {
        let q = r#"sum by (route, envoy_response_code_class) (rate(krowoc_rate_limit_decisions{outcome=~"allowed|denied", route!="x"}[$__rate_interval])) / on (route) group_left envoy_cluster_upstream_rq_total{envoy_cluster_name="redis_relay"}"#;
        let s = selectors(q).unwrap();
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(
            s[0].to_string(),
            r#"krowoc_rate_limit_decisions{outcome=~"allowed|denied",route!="x"}"#
        );
        assert_eq!(s[1].name, "envoy_cluster_upstream_rq_total");
        assert!(selectors(r#"rate({job="envoy"}[1m])"#).is_err());
    }

    fn dashboard(expr: &str, uid: &str) -> serde_json::Value {
        json!({"panels": [{"type": "row", "title": "Rate limits", "panels": [
            {"type": "timeseries", "title": "Decisions", "datasource": {"type": "prometheus", "uid": uid},
             "targets": [{"refId": "A", "expr": expr}]}
        ]}]})
    }

    #[test]
    fn a_backed_dashboard_has_no_problems_and_a_broken_one_names_its_panel() {
        let s = relabel(&parse_exposition(TEXT).unwrap(), &rules());
        let good = dashboard(
            r#"sum by (outcome) (rate(krowoc_rate_limit_decisions{route="rate_limited"}[5m]))"#,
            "prom",
        );
        assert_eq!(check(&good, &s, "prom"), Vec::<String>::new());

        let renamed = dashboard("rate(krowoc_rate_limit_verdicts[5m])", "prom");
        assert_eq!(
            check(&renamed, &s, "prom"),
            ["panel \"Decisions\": krowoc_rate_limit_verdicts matches no series the gateway printed"]
        );
        let wrong_label = dashboard(r#"krowoc_rate_limit_decisions{outcome="shadow"}"#, "prom");
        assert_eq!(check(&wrong_label, &s, "prom").len(), 1);
        let other_source = dashboard("krowoc_rate_limit_decisions", "other");
        assert_eq!(
            check(&other_source, &s, "prom"),
            ["panel \"Decisions\": datasource uid Some(\"other\"), not the provisioned \"prom\""]
        );
        // Without the relabelling the dashboard's names do not exist.
        let raw = parse_exposition(TEXT).unwrap();
        assert_eq!(check(&good, &raw, "prom").len(), 1);
    }

    #[test]
    fn unsupported_rules_are_refused_by_name() {
        let yaml = "scrape_configs:\n  - job_name: envoy\n    metric_relabel_configs:\n      - action: drop\n        source_labels: [__name__]\n";
        let e = PrometheusConfig::parse(yaml).unwrap().scrape_configs[0]
            .relabels()
            .err()
            .unwrap();
        assert_eq!(
            e,
            "job \"envoy\", metric_relabel_configs[0]: action \"drop\" (only replace is used)"
        );
        assert!(PrometheusConfig::parse("scrape_config: []").is_err());
    }
}
