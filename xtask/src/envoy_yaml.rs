//! What xtask reads from, or derives from, `envoy/envoy.yaml`: the relay token in the wasm
//! filter's plugin configuration (so the demo's relay expects the token the plugin sends), and
//! a copy of the file without the wasm filter (bench's "host-shim, no filter" setup).

use anyhow::{bail, Context, Result};
use serde_yaml::Value;

const WASM_FILTER_NAME: &str = "envoy.filters.http.wasm";
const WASM_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

/// The relay token the plugin is configured to send: a string `token` or `relay_token` inside
/// the `redis` object of the wasm filter's JSON configuration. None when there is no wasm
/// filter, no configuration, or no token in it.
pub fn relay_token(yaml: &str) -> Result<Option<String>> {
    let doc: Value = serde_yaml::from_str(yaml).context("envoy.yaml is not valid YAML")?;
    let mut filters = Vec::new();
    collect_wasm_filters(&doc, &mut filters);
    for filter in filters {
        let Some(configuration) = filter
            .get("typed_config")
            .and_then(|t| t.get("config"))
            .and_then(|c| c.get("configuration"))
        else {
            continue;
        };
        // google.protobuf.StringValue carries the JSON text in `value`.
        let Some(text) = configuration.get("value").and_then(Value::as_str) else {
            continue;
        };
        let json: serde_json::Value = serde_json::from_str(text)
            .context("the wasm filter's configuration.value in envoy.yaml is not JSON")?;
        if let Some(token) = json.get("redis").and_then(find_token) {
            return Ok(Some(token));
        }
    }
    Ok(None)
}

/// The JSON text of the wasm filter's plugin configuration (the StringValue's `value`); fails
/// unless there is exactly one.
pub fn plugin_configuration(yaml: &str) -> Result<String> {
    let doc: Value = serde_yaml::from_str(yaml).context("envoy.yaml is not valid YAML")?;
    let mut filters = Vec::new();
    collect_wasm_filters(&doc, &mut filters);
    let texts: Vec<&str> = filters
        .iter()
        .filter_map(|f| {
            f.get("typed_config")?
                .get("config")?
                .get("configuration")?
                .get("value")?
                .as_str()
        })
        .collect();
    match texts.as_slice() {
        [one] => Ok(one.to_string()),
        other => bail!(
            "envoy.yaml has {} wasm filters with a configuration; expected exactly one",
            other.len()
        ),
    }
}

fn find_token(v: &serde_json::Value) -> Option<String> {
    let object = v.as_object()?;
    for key in ["relay_token", "token"] {
        if let Some(t) = object.get(key).and_then(|t| t.as_str()) {
            return Some(t.to_string());
        }
    }
    object.values().find_map(find_token)
}

/// envoy.yaml with every wasm filter removed from every `http_filters` list, everything else
/// unchanged. Fails if there was no wasm filter to remove (the result would not be the
/// "without filter" variant it claims to be).
pub fn without_wasm_filter(yaml: &str) -> Result<String> {
    let mut doc: Value = serde_yaml::from_str(yaml).context("envoy.yaml is not valid YAML")?;
    let removed = remove_wasm_filters(&mut doc);
    if removed == 0 {
        bail!("envoy.yaml has no {WASM_FILTER_NAME} entry in any http_filters list");
    }
    serde_yaml::to_string(&doc).context("cannot write envoy.yaml back as YAML")
}

/// envoy.yaml with the wasm filter's plugin configuration replaced by `json` (as the
/// StringValue's `value`), everything else unchanged. Fails if there is not exactly one filter.
pub fn with_plugin_configuration(yaml: &str, json: &str) -> Result<String> {
    serde_json::from_str::<serde_json::Value>(json)
        .context("the replacement plugin configuration is not JSON")?;
    let mut doc: Value = serde_yaml::from_str(yaml).context("envoy.yaml is not valid YAML")?;
    let replaced = replace_configuration(&mut doc, json);
    if replaced != 1 {
        bail!("envoy.yaml has {replaced} wasm filters with a configuration; expected exactly one");
    }
    serde_yaml::to_string(&doc).context("cannot write envoy.yaml back as YAML")
}

fn replace_configuration(v: &mut Value, json: &str) -> usize {
    let mut replaced = 0;
    match v {
        Value::Mapping(m) => {
            for (k, child) in m.iter_mut() {
                if k.as_str() == Some("http_filters") {
                    if let Value::Sequence(list) = child {
                        for f in list.iter_mut().filter(|f| is_wasm_filter(f)) {
                            if let Some(value) = f
                                .get_mut("typed_config")
                                .and_then(|t| t.get_mut("config"))
                                .and_then(|c| c.get_mut("configuration"))
                                .and_then(|c| c.get_mut("value"))
                            {
                                *value = Value::String(json.to_string());
                                replaced += 1;
                            }
                        }
                    }
                } else {
                    replaced += replace_configuration(child, json);
                }
            }
        }
        Value::Sequence(list) => {
            for c in list {
                replaced += replace_configuration(c, json);
            }
        }
        _ => {}
    }
    replaced
}

fn is_wasm_filter(v: &Value) -> bool {
    v.get("name").and_then(Value::as_str) == Some(WASM_FILTER_NAME)
        || v.get("typed_config")
            .and_then(|t| t.get("@type"))
            .and_then(Value::as_str)
            == Some(WASM_FILTER_TYPE)
}

fn collect_wasm_filters<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Mapping(m) => {
            for (k, child) in m {
                if k.as_str() == Some("http_filters") {
                    if let Value::Sequence(list) = child {
                        out.extend(list.iter().filter(|f| is_wasm_filter(f)));
                    }
                }
                collect_wasm_filters(child, out);
            }
        }
        Value::Sequence(list) => list.iter().for_each(|c| collect_wasm_filters(c, out)),
        _ => {}
    }
}

fn remove_wasm_filters(v: &mut Value) -> usize {
    let mut removed = 0;
    match v {
        Value::Mapping(m) => {
            for (k, child) in m.iter_mut() {
                if k.as_str() == Some("http_filters") {
                    if let Value::Sequence(list) = child {
                        let before = list.len();
                        list.retain(|f| !is_wasm_filter(f));
                        removed += before - list.len();
                    }
                }
                removed += remove_wasm_filters(child);
            }
        }
        Value::Sequence(list) => {
            for c in list {
                removed += remove_wasm_filters(c);
            }
        }
        _ => {}
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENVOY_YAML: &str = r#"
static_resources:
  listeners:
  - name: main
    address:
      socket_address: { address: 0.0.0.0, port_value: 10000 }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: upstream }
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: krowoc
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: |
                    {"redis": {"transport": "relay", "cluster": "redis_relay", "token": "s3cret"}}
                vm_config:
                  runtime: envoy.wasm.runtime.v8
                  code: { local: { filename: /etc/envoy/plugin.wasm } }
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
"#;

    #[test]
    fn the_relay_token_is_read_from_the_plugin_configuration() {
        assert_eq!(relay_token(ENVOY_YAML).unwrap().as_deref(), Some("s3cret"));
        let nested = ENVOY_YAML.replace(
            r#""token": "s3cret""#,
            r#""relay": {"relay_token": "nested"}"#,
        );
        assert_eq!(relay_token(&nested).unwrap().as_deref(), Some("nested"));
    }

    #[test]
    fn the_plugin_configuration_text_is_read_and_a_missing_filter_is_an_error() {
        let json = plugin_configuration(ENVOY_YAML).unwrap();
        assert!(json.contains(r#""token": "s3cret""#), "{json}");
        let none = without_wasm_filter(ENVOY_YAML).unwrap();
        let e = plugin_configuration(&none).unwrap_err();
        assert!(e.to_string().contains("0 wasm filters"), "{e}");
    }

    #[test]
    fn no_token_configured_means_none() {
        let without = ENVOY_YAML.replace(r#", "token": "s3cret""#, "");
        assert_eq!(relay_token(&without).unwrap(), None);
    }

    #[test]
    fn a_configuration_that_is_not_json_is_an_error_naming_it() {
        let broken = ENVOY_YAML.replace(r#"{"redis""#, r#"{redis"#);
        let e = relay_token(&broken).unwrap_err();
        assert!(e.to_string().contains("configuration.value"), "{e}");
    }

    #[test]
    fn the_plugin_configuration_is_replaced_and_nothing_else() {
        let out = with_plugin_configuration(ENVOY_YAML, r#"{"routes":[]}"#).unwrap();
        assert_eq!(relay_token(&out).unwrap(), None);
        let doc: Value = serde_yaml::from_str(&out).unwrap();
        let mut filters = Vec::new();
        collect_wasm_filters(&doc, &mut filters);
        assert_eq!(
            filters[0]["typed_config"]["config"]["configuration"]["value"].as_str(),
            Some(r#"{"routes":[]}"#)
        );
        assert!(out.contains("envoy.filters.http.router"));
        assert!(with_plugin_configuration(ENVOY_YAML, "not json").is_err());
    }

    #[test]
    fn removing_the_wasm_filter_keeps_the_router_and_everything_else() {
        let stripped = without_wasm_filter(ENVOY_YAML).unwrap();
        let doc: Value = serde_yaml::from_str(&stripped).unwrap();
        let hcm = &doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0];
        let filters = hcm["typed_config"]["http_filters"].as_sequence().unwrap();
        assert_eq!(filters.len(), 1);
        assert_eq!(
            filters[0]["name"].as_str(),
            Some("envoy.filters.http.router")
        );
        assert_eq!(
            doc["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
                .as_u64(),
            Some(10000)
        );
        assert_eq!(
            hcm["typed_config"]["stat_prefix"].as_str(),
            Some("ingress_http")
        );
        assert!(!stripped.contains("wasm"), "{stripped}");
        assert_eq!(relay_token(&stripped).unwrap(), None);
    }

    #[test]
    fn a_yaml_without_a_wasm_filter_cannot_be_stripped() {
        let stripped = without_wasm_filter(ENVOY_YAML).unwrap();
        let e = without_wasm_filter(&stripped).unwrap_err();
        assert!(e.to_string().contains("envoy.filters.http.wasm"), "{e}");
    }
}
