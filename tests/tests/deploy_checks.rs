//! Checks for what ships to run on Envoy, docker-compose and Higress — none of which runs on the
//! build machines — done with every means that does run here:
//!
//! * envoy.yaml loads in host-shim (which refuses fields outside its subset), and the plugin's
//!   configuration inside it passes the plugin's own validation, natively;
//! * docker-compose.yml parses (typed, unknown keys refused) and agrees with envoy.yaml: every
//!   cluster is a service listening on that port, reachable from Envoy and awaited by it; Envoy
//!   gets envoy.yaml and plugin.wasm where envoy.yaml expects them; ports, health checks,
//!   Redis URLs and the relay token line up; the relay's flags pass the relay's own parser; the
//!   relay's Redis user is the filter's ACL user in the ACL file Redis loads, with its password;
//! * every Dockerfile parses, copies only files that exist and are not dockerignored, builds
//!   one package, locked, with the plugin's features right for its host, on pinned images; the
//!   Wasm images are one layer holding /plugin.wasm;
//! * the Higress WasmPlugin's configuration passes the plugin's validation, names the cluster
//!   Higress creates for the Redis Service next to it, and equals envoy.yaml's but for the
//!   connection;
//! * the Kubernetes manifests for Istio and Envoy Gateway (envoy/kubernetes/, envoy/istio/,
//!   envoy/envoy-gateway/) parse (typed, unknown keys refused) and agree with each other: names,
//!   namespaces, labels and selectors, ports, Secrets and mounts; the relay's flags pass the
//!   relay's own parser and validation with the Secrets' files; the relay's Redis user is the
//!   filter's ACL user with its password; each plugin configuration passes the plugin's
//!   validation, names the cluster its platform creates for the relay, carries the relay's token
//!   and equals envoy.yaml's but for the connection; NetworkPolicies admit only the gateway to
//!   the relay and only the relay to Redis ([`platforms`]);
//! * Prometheus scrapes Envoy's admin over an internal network, Grafana's datasource and
//!   dashboard are provisioned where it looks, and Grafana reaches Prometheus only;
//! * plugin.wasm imports only host functions Envoy (or Higress) provides;
//! * the compose health checks' commands work against the real services.
//!
//! The checks are functions returning `Vec<Problem>` ([`checks`]); the tests below feed them the
//! repository's files and deliberately broken copies, and assert the exact problem.

#[path = "deploy_checks/checks.rs"]
mod checks;
#[path = "deploy_checks/compose.rs"]
mod compose;
#[path = "deploy_checks/dockerfile.rs"]
mod dockerfile;
#[path = "deploy_checks/dockerignore.rs"]
mod dockerignore;
#[path = "deploy_checks/kubernetes.rs"]
mod kubernetes;
#[path = "deploy_checks/monitoring.rs"]
mod monitoring;
#[path = "deploy_checks/platforms.rs"]
mod platforms;

use std::path::PathBuf;
use std::process::Command;

use checks::*;
use host_shim::envoy_config::EnvoyConfig;
use monitoring::*;
use serde_json::{json, Value};

fn assert_no_problems(problems: &[Problem]) {
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert!(
        problems.is_empty(),
        "deployment problems:\n  {}",
        lines.join("\n  ")
    );
}

/// envoy.yaml with the plugin's configuration changed by `change` (the JSON is edited as JSON).
fn envoy_yaml_with_plugin_config(change: impl FnOnce(&mut Value)) -> String {
    let mut config = krowoc_tests::yaml_plugin_config();
    change(&mut config);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = krowoc_tests::write_yaml_with_plugin_config(dir.path(), &config);
    std::fs::read_to_string(path).expect("read the edited envoy.yaml")
}

/// docker-compose.yml with one service's YAML changed by `change`.
fn compose_with(service: &str, change: impl FnOnce(&mut serde_yaml::Value)) -> String {
    let text = Deployment::repo().read(COMPOSE).expect("the compose file");
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("compose YAML");
    let s = doc
        .get_mut("services")
        .and_then(|s| s.get_mut(service))
        .unwrap_or_else(|| panic!("service {service} in {COMPOSE}"));
    change(s);
    serde_yaml::to_string(&doc).expect("compose YAML")
}

fn yaml(v: Value) -> serde_yaml::Value {
    serde_yaml::to_value(v).expect("JSON to YAML")
}

/// The 1-based line of the first line containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not found"))
}

// ---------------------------------------------------------------------------------------------
// The shipped files

#[test]
fn shipped_deployment_files_pass_every_check() {
    assert_no_problems(&check_all(&Deployment::repo()));
}

#[test]
fn envoy_yaml_loads_in_host_shim_with_a_plugin_configuration_the_plugin_accepts() {
    let path = Deployment::repo().root().join(ENVOY_YAML);
    let envoy = EnvoyConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let wasm = envoy.wasm.expect("the wasm filter");
    assert_eq!(wasm.code_path, PathBuf::from("/etc/envoy/plugin.wasm"));
    assert_eq!(wasm.runtime, "envoy.wasm.runtime.v8");
    let config = validate_plugin_config(ENVOY_YAML, wasm.configuration.as_bytes())
        .unwrap_or_else(|p| panic!("{p}"));
    assert!(envoy.clusters.contains_key(config.redis.cluster()));
    for cluster in ["upstream", "redis_relay", "redis"] {
        assert!(envoy.clusters.contains_key(cluster), "cluster {cluster}");
    }
}

#[test]
fn plugin_wasm_imports_only_host_functions_and_stock_envoy_lacks_just_the_higress_redis_calls() {
    let path = krowoc_tests::plugin_wasm();
    let wasm = std::fs::read(&path).expect("read plugin.wasm");
    assert_no_problems(&check_plugin_imports(&wasm, WasmHost::Higress));
    // The default build (the one tests run) has the redis-call feature; stock Envoy would
    // refuse it for these imports alone, which is why envoy.Dockerfile builds without it.
    for problem in check_plugin_imports(&wasm, WasmHost::StockEnvoy) {
        match &problem {
            Problem::ImportNotProvided { module, name, .. }
                if module == "env" && HIGRESS_ENV_IMPORTS.contains(&name.as_str()) => {}
            other => panic!("{other}"),
        }
    }
    // The build envoy.Dockerfile makes (--no-default-features), when one is at hand.
    if let Some(stock) = std::env::var_os("KROWOC_STOCK_PLUGIN_WASM") {
        let wasm = std::fs::read(&stock).expect("read KROWOC_STOCK_PLUGIN_WASM");
        assert_no_problems(&check_plugin_imports(&wasm, WasmHost::StockEnvoy));
    }
}

#[test]
fn import_check_reports_an_import_stock_envoy_lacks() {
    // (module (import "env" "proxy_redis_call" (func)) (import "wasi_snapshot_preview1" "sock_accept" (func)))
    let mut wasm = b"\0asm\x01\0\0\0".to_vec();
    wasm.extend([0x01, 0x04, 0x01, 0x60, 0x00, 0x00]); // type section: one () -> ()
    let mut imports = vec![0x02];
    for (module, name) in [
        ("env", "proxy_redis_call"),
        ("wasi_snapshot_preview1", "sock_accept"),
    ] {
        imports.push(module.len() as u8);
        imports.extend(module.bytes());
        imports.push(name.len() as u8);
        imports.extend(name.bytes());
        imports.extend([0x00, 0x00]); // a function of type 0
    }
    wasm.extend([0x02, imports.len() as u8]);
    wasm.extend(imports);
    assert_eq!(
        check_plugin_imports(&wasm, WasmHost::StockEnvoy),
        vec![
            Problem::ImportNotProvided {
                host: "StockEnvoy".into(),
                module: "env".into(),
                name: "proxy_redis_call".into()
            },
            Problem::ImportNotProvided {
                host: "StockEnvoy".into(),
                module: "wasi_snapshot_preview1".into(),
                name: "sock_accept".into()
            },
        ]
    );
    assert_eq!(check_plugin_imports(&wasm, WasmHost::Higress).len(), 1);
}

/// Runs each compose health check's command against the real service (the port rewritten to the
/// test's): they pass on healthy services and fail when Redis is gone.
#[test]
fn compose_health_checks_pass_on_the_real_services_and_fail_when_redis_is_down() {
    let d = Deployment::repo();
    let compose = d.compose().expect("compose");
    let relay_df = d
        .dockerfile("envoy/docker/relay.Dockerfile")
        .expect("relay.Dockerfile");
    let probe_source = relay_df
        .final_stage()
        .all("COPY")
        .find(|c| c.args.last().map(String::as_str) == Some("/usr/local/bin/http-ready"))
        .and_then(|c| c.args.first().cloned())
        .expect("the relay image copies http-ready");
    let probe = d.root().join(probe_source);

    let mut stack = krowoc_tests::Stack::start();
    let local_port = |service: &str, compose_port: &str| -> String {
        match service {
            "redis" => stack.redis.port.to_string(),
            "relay" => stack.relay.port().to_string(),
            "upstream" => stack.upstream.port().to_string(),
            // host-shim's admin /ready stands in for Envoy's (both 200 once serving).
            "envoy" => stack.admin.port().to_string(),
            other => panic!("no local stand-in for service {other} (port {compose_port})"),
        }
    };
    let mut probes: Vec<(String, Command)> = Vec::new();
    for (name, service) in &compose.services {
        let test = &service.healthcheck.as_ref().expect("a health check").test;
        // Prometheus's and Grafana's images are not run here: their probes' ports are held to
        // their services by check_monitoring.
        if MONITORING_SERVICES.contains(&name.as_str()) {
            continue;
        }
        let mut cmd = match test.first().map(String::as_str) {
            Some("CMD-SHELL") => {
                let text = &test[1];
                let port = text
                    .split_whitespace()
                    .skip_while(|w| *w != "-p")
                    .nth(1)
                    .expect("redis-cli -p PORT");
                let mut c = Command::new("sh");
                c.arg("-c").arg(text.replace(
                    &format!("-p {port}"),
                    &format!("-p {}", local_port(name, port)),
                ));
                c
            }
            Some("CMD") => {
                assert_eq!(test[1], "http-ready", "service {name}");
                let mut c = Command::new("bash");
                c.arg(&probe)
                    .arg(&test[2])
                    .arg(local_port(name, &test[3]))
                    .arg(&test[4]);
                c
            }
            other => panic!("service {name}: health check {other:?}"),
        };
        let status = cmd.status().expect("run the probe");
        assert!(
            status.success(),
            "service {name}: {cmd:?} failed on a healthy service"
        );
        probes.push((name.clone(), cmd));
    }
    let missing_path = Command::new("bash")
        .arg(&probe)
        .args([
            "127.0.0.1",
            &stack.relay.port().to_string(),
            "/no-such-path",
        ])
        .status()
        .expect("run the probe");
    assert!(!missing_path.success(), "a 404 must not count as healthy");

    stack.redis.stop();
    for (name, mut cmd) in probes {
        if name == "redis" || name == "relay" {
            let status = cmd.status().expect("run the probe");
            assert!(!status.success(), "service {name}: healthy without Redis");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Broken copies: each check reports the exact problem

#[test]
fn a_renamed_relay_cluster_is_reported_as_unknown_to_the_plugin() {
    let d = Deployment::repo().edit(ENVOY_YAML, |t| {
        t.replace("- name: redis_relay", "- name: resp_relay")
            .replace("cluster_name: redis_relay", "cluster_name: resp_relay")
    });
    assert_eq!(
        check_envoy(&d),
        vec![Problem::UnknownCluster {
            file: ENVOY_YAML.into(),
            cluster: "redis_relay".into(),
            named_by: "the plugin's redis.cluster".into(),
        }]
    );
}

#[test]
fn a_field_host_shim_does_not_support_is_reported_with_its_path() {
    let d = Deployment::repo().edit(ENVOY_YAML, |t| {
        t.replace(
            "    connect_timeout: 1s\n",
            "    connect_timeout: 1s\n    per_connection_buffer_limit_bytes: 1024\n",
        )
    });
    match check_envoy(&d).as_slice() {
        [Problem::EnvoyYamlRefused { message, .. }] => assert!(
            message.contains("static_resources.clusters[0].per_connection_buffer_limit_bytes"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_invalid_plugin_configuration_is_reported_with_the_plugins_own_error() {
    let yaml = envoy_yaml_with_plugin_config(|c| {
        c["routes"][0]["rate_limit"]["limits"][0]["limit"] = json!(0)
    });
    let d = Deployment::repo().with_file(ENVOY_YAML, yaml);
    match check_envoy(&d).as_slice() {
        [Problem::PluginConfigRefused { file, errors }] => {
            assert_eq!(file, ENVOY_YAML);
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(
                errors[0].contains("routes[0].rate_limit.limits[0].limit"),
                "{errors:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// The relay token envoy.yaml and docker-compose.yml ship with.
const DEMO_TOKEN: &str = "krowoc-demo-relay-token-change-me";

#[test]
fn a_relay_on_its_loopback_default_is_unreachable_from_envoy() {
    let compose = compose_with("relay", |s| {
        s["command"] = yaml(json!([
            "--redis",
            "redis://redis:6379",
            "--token",
            DEMO_TOKEN
        ]));
    });
    let d = Deployment::repo().with_file(COMPOSE, compose);
    assert_eq!(
        check_compose(&d),
        vec![Problem::ListensOnLoopback {
            service: "relay".into(),
            address: "127.0.0.1:7379".into()
        }]
    );
}

#[test]
fn a_relay_port_other_than_the_clusters_is_reported_for_the_cluster_and_the_health_check() {
    let compose = compose_with("relay", |s| {
        s["command"] = yaml(json!([
            "--listen",
            "0.0.0.0:7380",
            "--redis",
            "redis://redis:6379",
            "--token",
            DEMO_TOKEN
        ]));
    });
    let d = Deployment::repo().with_file(COMPOSE, compose);
    assert_eq!(
        check_compose(&d),
        vec![
            Problem::PortNotServed {
                what: "envoy.yaml cluster redis_relay".into(),
                service: "relay".into(),
                port: 7379,
                listening: 7380
            },
            Problem::HealthcheckPortMismatch {
                service: "relay".into(),
                probe_port: "7379".into(),
                listen_port: 7380
            },
        ]
    );
}

#[test]
fn a_misspelt_relay_flag_is_refused_by_the_relays_own_parser() {
    let compose = compose_with("relay", |s| {
        s["command"] = yaml(json!([
            "--listen",
            "0.0.0.0:7379",
            "--redis-url",
            "redis://redis:6379"
        ]));
    });
    let d = Deployment::repo().with_file(COMPOSE, compose);
    match check_compose(&d).as_slice() {
        [Problem::RelayArgsRefused { service, message }, ..] => {
            assert_eq!(service, "relay");
            assert!(message.contains("--redis-url"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_plugin_token_the_relay_does_not_get_is_a_mismatch_and_passing_it_fixes_it() {
    let yaml_text = envoy_yaml_with_plugin_config(|c| c["redis"]["token"] = json!("s3cret-token"));
    let d = Deployment::repo().with_file(ENVOY_YAML, yaml_text);
    assert_eq!(
        check_compose(&d),
        vec![Problem::RelayTokenMismatch {
            plugin: Some("s3cret-token".into()),
            relay: Some(DEMO_TOKEN.into())
        }]
    );
    let compose = compose_with("relay", |s| {
        s["command"] = yaml(json!([
            "--listen",
            "0.0.0.0:7379",
            "--redis",
            "redis://redis:6379",
            "--token",
            "s3cret-token"
        ]));
    });
    assert_no_problems(&check_compose(&d.with_file(COMPOSE, compose)));
}

const ACL_FILE: &str = "envoy/redis/users.acl";
const ACL_PASSWORD_FILE: &str = "envoy/redis/krowoc-edge.password";

#[test]
fn the_relays_redis_user_in_compose_is_the_filters_acl_user_with_the_relays_password() {
    let d = Deployment::repo();
    assert_no_problems(&check_compose(&d));

    // A command taken away from the user: the filter would meet NOPERM.
    let without_scan = d.clone().edit(ACL_FILE, |t| t.replace(" +scan", ""));
    let problems = check_compose(&without_scan);
    assert_eq!(problems.len(), 1, "{problems:?}");
    let text = problems[0].to_string();
    assert!(
        matches!(&problems[0], Problem::AclUserRules { user, .. } if user == "krowoc-edge"),
        "{text}"
    );
    assert!(text.contains("+scan"), "{text}");

    // The filter's key prefix changed in envoy.yaml but not in the user's key pattern.
    let yaml_text = envoy_yaml_with_plugin_config(|c| c["redis"]["key_prefix"] = json!("edge:"));
    let problems = check_compose(&d.clone().with_file(ENVOY_YAML, yaml_text));
    assert!(
        problems.iter().any(
            |p| matches!(p, Problem::AclUserRules { expected, .. } if expected.contains("~edge:*"))
        ),
        "{problems:?}"
    );

    // The relay's password file and the user's password differ; neither is shown.
    let other = d
        .clone()
        .with_file(ACL_PASSWORD_FILE, "another-password\n".into());
    assert_eq!(
        check_compose(&other),
        vec![Problem::AclPasswordMismatch {
            user: "krowoc-edge".into()
        }]
    );
    assert!(!Problem::AclPasswordMismatch {
        user: "krowoc-edge".into()
    }
    .to_string()
    .contains("change-me"));

    // Redis without the ACL file: the relay's user does not exist.
    let compose = compose_with("redis", |s| {
        s["command"] = yaml(json!([
            "redis-server",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no"
        ]));
    });
    assert_eq!(
        check_compose(&d.clone().with_file(COMPOSE, compose)),
        vec![Problem::AclUserMissing {
            user: "krowoc-edge".into(),
            aclfile: None
        }]
    );
}

#[test]
fn a_missing_mount_source_is_reported_and_envoy_yaml_is_then_not_mounted() {
    let compose = compose_with("envoy", |s| {
        s["volumes"] = yaml(json!(["./envoy-prod.yaml:/etc/envoy/envoy.yaml:ro"]));
    });
    let d = Deployment::repo().with_file(COMPOSE, compose);
    assert_eq!(
        check_compose(&d),
        vec![
            Problem::MountSourceMissing {
                service: "envoy".into(),
                source: "./envoy-prod.yaml".into()
            },
            Problem::EnvoyYamlNotMounted {
                service: "envoy".into(),
                config_path: "/etc/envoy/envoy.yaml".into()
            },
        ]
    );
}

#[test]
fn a_renamed_service_leaves_its_cluster_without_a_host() {
    let text = Deployment::repo().read(COMPOSE).expect("compose");
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("compose YAML");
    let services = doc["services"].as_mapping_mut().expect("services");
    let relay = services.remove("relay").expect("relay");
    services.insert("resp-relay".into(), relay);
    services["envoy"]["depends_on"] = yaml(json!({
        "resp-relay": {"condition": "service_healthy"},
        "upstream": {"condition": "service_healthy"}
    }));
    let d = Deployment::repo().with_file(COMPOSE, serde_yaml::to_string(&doc).expect("YAML"));
    assert_eq!(
        check_compose(&d),
        vec![Problem::ServiceMissing {
            from: "envoy".into(),
            what: "envoy.yaml cluster redis_relay".into(),
            host: "relay".into()
        }]
    );
}

#[test]
fn envoy_not_waiting_for_a_healthy_relay_is_reported() {
    let compose = compose_with("envoy", |s| {
        s["depends_on"]["relay"]["condition"] = yaml(json!("service_started"));
    });
    let d = Deployment::repo().with_file(COMPOSE, compose);
    assert_eq!(
        check_compose(&d),
        vec![Problem::DependsOnNotHealthy {
            service: "envoy".into(),
            dependency: "relay".into()
        }]
    );
}

#[test]
fn an_unpublished_admin_port_is_reported() {
    let compose = compose_with("envoy", |s| {
        s["ports"] = yaml(json!(["127.0.0.1:10000:10000"]));
    });
    let d = Deployment::repo().with_file(COMPOSE, compose);
    assert_eq!(
        check_compose(&d),
        vec![Problem::PortNotPublished {
            service: "envoy".into(),
            port: 9901,
            what: "admin".into()
        }]
    );
}

#[test]
fn an_upstream_pointed_at_its_own_loopback_for_redis_is_reported() {
    let compose = compose_with("upstream", |s| {
        s["environment"]["REDIS_URL"] = yaml(json!("redis://127.0.0.1:6379"));
    });
    let d = Deployment::repo().with_file(COMPOSE, compose);
    assert_eq!(
        check_compose(&d),
        vec![Problem::ServiceMissing {
            from: "upstream".into(),
            what: "upstream's Redis URL".into(),
            host: "127.0.0.1".into()
        }]
    );
}

#[test]
fn a_misspelt_compose_key_is_refused() {
    let d = Deployment::repo().edit(COMPOSE, |t| t.replacen("healthcheck:", "healthchek:", 1));
    match check_all(&d).as_slice() {
        [Problem::Unreadable { file, message }, ..] => {
            assert_eq!(file, COMPOSE);
            assert!(message.contains("healthchek"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn stock_envoy_cannot_run_transport_redis_call() {
    let yaml_text = envoy_yaml_with_plugin_config(|c| {
        c["redis"] = json!({"transport": "redis_call", "cluster": "redis"});
    });
    let d = Deployment::repo().with_file(ENVOY_YAML, yaml_text);
    assert_eq!(
        check_compose(&d),
        vec![
            // With redis_call, Envoy itself needs Redis up before it starts.
            Problem::DependsOnNotHealthy {
                service: "envoy".into(),
                dependency: "redis".into()
            },
            Problem::StockEnvoyWithoutRedisCall {
                dockerfile: "envoy/docker/envoy.Dockerfile".into(),
                transport: "redis_call".into()
            },
        ]
    );
}

const RELAY_DOCKERFILE: &str = "envoy/docker/relay.Dockerfile";
const ENVOY_DOCKERFILE: &str = "envoy/docker/envoy.Dockerfile";

#[test]
fn a_missing_copy_source_is_reported_with_its_line() {
    let d = Deployment::repo().edit(RELAY_DOCKERFILE, |t| {
        t.replace(
            "COPY envoy/docker/http-ready.sh",
            "COPY envoy/docker/http-probe.sh",
        )
    });
    let line = line_of(&d.read(RELAY_DOCKERFILE).expect("edited"), "http-probe.sh");
    assert_eq!(
        check_dockerfiles(&d),
        vec![Problem::CopySourceMissing {
            dockerfile: RELAY_DOCKERFILE.into(),
            line,
            source: "envoy/docker/http-probe.sh".into()
        }]
    );
}

#[test]
fn a_dockerignored_copy_source_is_reported_with_the_pattern() {
    let d = Deployment::repo().edit(DOCKERIGNORE, |t| t + "envoy/docker\n");
    let problems = check_dockerfiles(&d);
    assert!(!problems.is_empty());
    for p in &problems {
        match p {
            Problem::CopySourceIgnored {
                source, pattern, ..
            } => {
                assert_eq!(source, "envoy/docker/http-ready.sh");
                assert_eq!(pattern, "envoy/docker");
            }
            other => panic!("{other}"),
        }
    }
}

#[test]
fn a_workspace_member_left_out_of_a_build_stage_is_reported() {
    let d = Deployment::repo().edit(RELAY_DOCKERFILE, |t| t.replace("COPY xtask xtask\n", ""));
    assert_eq!(
        check_dockerfiles(&d),
        vec![Problem::WorkspaceMemberNotCopied {
            dockerfile: RELAY_DOCKERFILE.into(),
            stage: "build".into(),
            member: "xtask".into()
        }]
    );
}

#[test]
fn a_new_workspace_member_breaks_every_image_build_until_copied() {
    let d = Deployment::repo()
        .edit(CARGO_TOML, |t| {
            t.replacen("members = [", "members = [\"bench\", ", 1)
        })
        .with_file(
            "bench/Cargo.toml",
            "[package]\nname = \"bench\"\nversion = \"0.1.0\"\n".into(),
        );
    let problems = check_dockerfiles(&d);
    let mut files: Vec<&str> = problems
        .iter()
        .map(|p| match p {
            Problem::WorkspaceMemberNotCopied {
                dockerfile, member, ..
            } if member == "bench" => dockerfile.as_str(),
            other => panic!("{other}"),
        })
        .collect();
    files.sort();
    assert_eq!(
        files,
        vec![
            ENVOY_DOCKERFILE,
            RELAY_DOCKERFILE,
            "envoy/docker/upstream.Dockerfile",
            HIGRESS_PLUGIN_DOCKERFILE,
            K8S_PLUGIN_DOCKERFILE
        ]
    );
}

#[test]
fn a_plugin_for_stock_envoy_built_with_the_higress_imports_is_reported() {
    let d = Deployment::repo().edit(ENVOY_DOCKERFILE, |t| {
        t.replace(" --no-default-features", "")
    });
    let line = line_of(&d.read(ENVOY_DOCKERFILE).expect("edited"), "RUN --mount");
    match check_dockerfiles(&d).as_slice() {
        [Problem::PluginFeatures {
            dockerfile,
            line: l,
            message,
        }] => {
            assert_eq!((dockerfile.as_str(), *l), (ENVOY_DOCKERFILE, line));
            assert!(message.contains("--no-default-features"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_unlocked_build_of_the_whole_workspace_is_reported() {
    let d = Deployment::repo().edit(RELAY_DOCKERFILE, |t| {
        t.replace(
            "cargo build --locked --release -p krowoc-relay --bin krowoc-relay",
            "cargo build --release",
        )
    });
    let messages: Vec<String> = check_dockerfiles(&d)
        .into_iter()
        .map(|p| match p {
            Problem::CargoBuild {
                dockerfile,
                message,
                ..
            } if dockerfile == RELAY_DOCKERFILE => message,
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(
        messages[0].contains("--locked") && messages[1].contains("-p"),
        "{messages:?}"
    );
}

#[test]
fn floating_image_tags_are_reported() {
    let d = Deployment::repo()
        .edit(ENVOY_DOCKERFILE, |t| {
            t.replace("envoyproxy/envoy:v1.40.0", "envoyproxy/envoy:v1.40-latest")
        })
        .edit(COMPOSE, |t| {
            t.replace("image: redis:7.4.7-bookworm", "image: redis")
        });
    let images: Vec<String> = check_dockerfiles(&d)
        .into_iter()
        .map(|p| match p {
            Problem::ImageNotPinned { image, .. } => image,
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(images, vec!["redis", "envoyproxy/envoy:v1.40-latest"]);
}

#[test]
fn an_envoy_image_other_than_the_release_the_tests_run_is_reported() {
    let d = Deployment::repo().edit(ENVOY_DOCKERFILE, |t| {
        t.replace("envoyproxy/envoy:v1.40.0", "envoyproxy/envoy:v1.38.4")
    });
    match check_dockerfiles(&d).as_slice() {
        [Problem::EnvoyNotTested { image, tested, .. }] => {
            assert_eq!(
                (image.as_str(), tested.as_str()),
                ("envoyproxy/envoy:v1.38.4", testkit::envoy::PINNED_VERSION)
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_builder_on_another_debian_release_than_the_runtime_is_reported() {
    let d = Deployment::repo().edit(RELAY_DOCKERFILE, |t| {
        t.replace("rust:1.95.0-bookworm", "rust:1.95.0-trixie")
    });
    assert_eq!(
        check_dockerfiles(&d),
        vec![Problem::DebianSuiteMismatch {
            dockerfile: RELAY_DOCKERFILE.into(),
            builder: "rust:1.95.0-trixie".into(),
            runtime: "debian:bookworm-slim".into()
        }]
    );
}

#[test]
fn a_rust_image_older_than_the_workspace_rust_version_is_reported() {
    let d = Deployment::repo().edit(RELAY_DOCKERFILE, |t| {
        t.replace("rust:1.95.0-bookworm", "rust:1.85.0-bookworm")
    });
    match check_dockerfiles(&d).as_slice() {
        [Problem::RustTooOld {
            dockerfile, image, ..
        }] => {
            assert_eq!(
                (dockerfile.as_str(), image.as_str()),
                (RELAY_DOCKERFILE, "rust:1.85.0-bookworm")
            )
        }
        other => panic!("{other:?}"),
    }
}

fn wasmplugin_with(change: impl FnOnce(&mut serde_yaml::Value)) -> String {
    let text = Deployment::repo()
        .read(WASMPLUGIN)
        .expect("wasmplugin.yaml");
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
    change(&mut doc);
    serde_yaml::to_string(&doc).expect("YAML")
}

#[test]
fn a_higress_cluster_without_its_service_is_reported() {
    let text = wasmplugin_with(|doc| {
        doc["spec"]["defaultConfig"]["redis"]["cluster"] =
            yaml(json!("outbound|6379||redis.default.svc.cluster.local"));
    });
    let d = Deployment::repo().with_file(WASMPLUGIN, text);
    assert_eq!(
        check_higress(&d),
        vec![Problem::HigressClusterUnknown {
            file: WASMPLUGIN.into(),
            cluster: "outbound|6379||redis.default.svc.cluster.local".into(),
            message: format!(
                "{HIGRESS_SERVICES} has no Service redis in namespace default with port 6379"
            ),
        }]
    );
}

#[test]
fn an_invalid_higress_configuration_is_reported_with_the_plugins_own_error() {
    let text = wasmplugin_with(|doc| {
        doc["spec"]["defaultConfig"]["redis"]["token"] = yaml(json!("t"));
    });
    let d = Deployment::repo().with_file(WASMPLUGIN, text);
    match check_higress(&d).as_slice() {
        [Problem::PluginConfigRefused { file, errors }] => {
            assert_eq!(file, WASMPLUGIN);
            assert!(
                errors.iter().any(|e| e.contains("redis.token")),
                "{errors:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_higress_policy_that_drifts_from_envoy_yaml_is_reported() {
    let text = wasmplugin_with(|doc| {
        doc["spec"]["defaultConfig"]["routes"][0]["rate_limit"]["limits"][0]["limit"] =
            yaml(json!(50));
        doc["spec"]["defaultConfig"]["redis"]["key_prefix"] = yaml(json!("edge:"));
    });
    let d = Deployment::repo().with_file(WASMPLUGIN, text);
    assert_eq!(
        check_higress(&d),
        vec![
            Problem::VariantDiffers {
                file: WASMPLUGIN.into(),
                key: "redis.key_prefix".into()
            },
            Problem::VariantDiffers {
                file: WASMPLUGIN.into(),
                key: "routes".into()
            },
        ]
    );
}

#[test]
fn higress_match_rules_and_the_relay_transport_are_refused() {
    let text = wasmplugin_with(|doc| {
        doc["spec"]["matchRules"] = yaml(json!([{"ingress": ["default/foo"], "config": {}}]));
        doc["spec"]["defaultConfig"]["redis"]["transport"] = yaml(json!("relay"));
    });
    let d = Deployment::repo().with_file(WASMPLUGIN, text);
    let messages: Vec<String> = check_higress(&d)
        .into_iter()
        .map(|p| match p {
            Problem::HigressManifest { message, .. } => message,
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(
        messages[0].contains("matchRules") && messages[1].contains("redis_call"),
        "{messages:?}"
    );
}

#[test]
fn a_relay_on_a_reachable_network_is_reported() {
    let compose = compose_with("relay", |s| {
        s["networks"] = yaml(json!(["backend", "edge"]));
    });
    let d = Deployment::repo().with_file(COMPOSE, compose);
    assert_eq!(
        check_compose(&d),
        vec![Problem::NotInternal {
            service: "relay".into(),
            network: "edge".into()
        }]
    );
}

/// Compose's own schema validation, where a `docker-compose` binary is installed (Debian's
/// docker-compose 1.29 works without a Docker engine). Version 1 predates the top-level `name`,
/// so that line is left out of the copy it validates.
#[test]
fn compose_file_passes_docker_composes_own_validation_when_installed() {
    let Ok(version) = Command::new("docker-compose").arg("version").output() else {
        eprintln!("docker-compose is not installed: its schema validation is skipped (apt-get install docker-compose)");
        return;
    };
    assert!(version.status.success(), "docker-compose version failed");
    let d = Deployment::repo();
    let text = d.read(COMPOSE).expect("the compose file");
    // The file's own text (re-serialising would write `no` bare, a boolean to YAML 1.1 readers),
    // less the top-level `name:` line.
    let without_name: String = text
        .lines()
        .filter(|l| !l.starts_with("name:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("docker-compose.yml");
    std::fs::write(&copy, without_name).expect("write the copy");
    let out = Command::new("docker-compose")
        .arg("-f")
        .arg(&copy)
        .arg("--project-directory")
        .arg(d.root().join("envoy"))
        .args(["config", "-q"])
        .output()
        .expect("run docker-compose config");
    assert!(
        out.status.success(),
        "docker-compose config refused {COMPOSE}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The JSON examples of a markdown text (```json blocks), with their line numbers.
fn json_examples(markdown: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in markdown.lines().enumerate() {
        match (&mut current, line.trim()) {
            (None, "```json") => current = Some((n + 2, String::new())),
            (Some(_), "```") => out.extend(current.take()),
            (Some((_, text)), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    out
}

/// An example is a whole plugin configuration (it has `routes`) or its `redis` section (it has
/// `transport`); either must pass the plugin's own validation.
fn check_json_example(file: &str, line: usize, text: &str) -> Result<(), String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("{file}:{line}: not JSON: {e}"))?;
    let config = if value.get("routes").is_some() {
        value
    } else if value.get("transport").is_some() {
        json!({ "redis": value, "routes": [] })
    } else {
        return Err(format!(
            "{file}:{line}: neither a plugin configuration nor its redis section"
        ));
    };
    validate_plugin_config(file, config.to_string().as_bytes())
        .map(|_| ())
        .map_err(|p| format!("{file}:{line}: {p:?}"))
}

#[test]
fn the_readmes_json_examples_pass_the_plugins_validation() {
    let mut seen = 0;
    for doc in ["README.md", "envoy/README.md"] {
        let text = Deployment::repo().read(doc).expect(doc);
        for (line, example) in json_examples(&text) {
            seen += 1;
            if let Err(e) = check_json_example(doc, line, &example) {
                panic!("{e}");
            }
        }
    }
    assert!(seen >= 1, "no JSON example found");
    // Proof that the check can fail: a duration the plugin refuses.
    let broken = r#"{"transport": "relay", "cluster": "redis_relay", "timeout": "200 ms"}"#;
    let e = check_json_example("X.md", 3, broken).unwrap_err();
    assert!(e.contains("X.md:3") && e.contains("redis.timeout"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Istio and Envoy Gateway: each check reports the exact problem

use platforms::*;

/// `file` with its document of `kind` and `name` changed by `change` (edited as YAML).
fn manifest_with(
    file: &str,
    kind: &str,
    name: &str,
    change: impl FnOnce(&mut serde_yaml::Value),
) -> String {
    use serde::Deserialize;
    let text = Deployment::repo().read(file).expect(file);
    let mut docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("YAML"))
        .collect();
    let doc = docs
        .iter_mut()
        .find(|d| d["kind"] == *kind && d["metadata"]["name"] == *name)
        .unwrap_or_else(|| panic!("{file} has no {kind} {name}"));
    change(doc);
    docs.iter()
        .map(|d| serde_yaml::to_string(d).expect("YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The relay Deployment's args changed by `change`.
fn relay_args_with(change: impl FnOnce(&mut Vec<String>)) -> Deployment {
    let text = manifest_with(K8S_RELAY, "Deployment", "krowoc-relay", |d| {
        let c = &mut d["spec"]["template"]["spec"]["containers"][0];
        let mut args: Vec<String> = serde_yaml::from_value(c["args"].clone()).expect("args");
        change(&mut args);
        c["args"] = serde_yaml::to_value(args).expect("args");
    });
    Deployment::repo().with_file(K8S_RELAY, text)
}

const RELAY: &str = "Deployment krowoc-edge/krowoc-relay";
const RELAY_SECRET_TOKEN: &str = "Secret krowoc-edge/krowoc-relay key token";

#[test]
fn shipped_kubernetes_manifests_pass_every_check_on_both_platforms() {
    let d = Deployment::repo();
    for platform in Platform::ALL {
        assert_no_problems(&check_platform(&d, platform));
        let (objects, problems) = load(&d, platform);
        assert_no_problems(&problems);
        assert!(
            objects.len() >= 9,
            "{platform:?}: {} objects",
            objects.len()
        );
    }
}

#[test]
fn a_misspelt_or_unknown_manifest_key_and_an_unknown_kind_are_refused() {
    let d = Deployment::repo().edit(K8S_RELAY, |t| {
        t.replacen("containerPort: 7379", "containerPorts: 7379", 1)
    });
    match check_kubernetes(&d).as_slice() {
        [Problem::Unreadable { file, message }] => {
            assert_eq!(file, K8S_RELAY);
            assert!(
                message.contains("document 3") && message.contains("containerPorts"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    let d = Deployment::repo().edit(ISTIO_WASMPLUGIN, |t| {
        t.replace("  phase: STATS\n", "  phase: STATS\n  pluginPhase: STATS\n")
    });
    match check_kubernetes(&d).as_slice() {
        [Problem::Unreadable { file, message }] => {
            assert_eq!(file, ISTIO_WASMPLUGIN);
            assert!(message.contains("pluginPhase"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let d = Deployment::repo().edit(K8S_REDIS, |t| {
        t + "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n"
    });
    match check_kubernetes(&d).as_slice() {
        [Problem::Unreadable { file, message }] => {
            assert_eq!(file, K8S_REDIS);
            assert!(message.contains("v1 ConfigMap is not a kind"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_object_in_a_namespace_no_manifest_creates_is_reported() {
    let text = manifest_with(K8S_RELAY, "Secret", "krowoc-relay", |s| {
        s["metadata"]["namespace"] = yaml(json!("krowoc"));
    });
    let d = Deployment::repo().with_file(K8S_RELAY, text);
    assert_eq!(
        check_kubernetes(&d),
        vec![
            Problem::NamespaceUnknown {
                file: K8S_RELAY.into(),
                object: "Secret krowoc/krowoc-relay".into(),
                namespace: "krowoc".into()
            },
            // The relay's volume now names a Secret its namespace does not have.
            Problem::SecretMissing {
                file: K8S_RELAY.into(),
                object: RELAY.into(),
                secret: "Secret krowoc-edge/krowoc-relay".into(),
                key: None
            },
        ]
    );
}

#[test]
fn a_service_selecting_no_pods_and_a_target_port_no_pod_declares_are_reported() {
    let text = manifest_with(K8S_RELAY, "Service", "krowoc-relay", |s| {
        s["spec"]["selector"]["app"] = yaml(json!("relay"));
    });
    let problems = check_kubernetes(&Deployment::repo().with_file(K8S_RELAY, text));
    assert_eq!(
        problems[0],
        Problem::SelectorMatchesNothing {
            file: K8S_RELAY.into(),
            object: "Service krowoc-edge/krowoc-relay".into(),
            selector: "spec.selector".into()
        }
    );
    // Neither platform's cluster reaches the relay any more.
    let clusters: Vec<&str> = problems[1..]
        .iter()
        .map(|p| match p {
            Problem::ClusterNotGenerated { file, message, .. } => {
                assert!(
                    message.contains("does not select the relay's pods"),
                    "{message}"
                );
                file.as_str()
            }
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(clusters, vec![ISTIO_WASMPLUGIN, EG_EXTENSION_POLICY]);

    let text = manifest_with(K8S_REDIS, "Service", "redis", |s| {
        s["spec"]["ports"][0]["targetPort"] = yaml(json!("redis"));
    });
    assert_eq!(
        check_kubernetes(&Deployment::repo().with_file(K8S_REDIS, text)),
        vec![Problem::PortMissing {
            file: K8S_REDIS.into(),
            object: "Service krowoc-edge/redis".into(),
            what: "port 6379 (targetPort) on Deployment krowoc-edge/redis".into(),
            port: "redis".into()
        }]
    );
}

#[test]
fn a_relay_listening_on_another_port_than_its_service_targets_is_reported() {
    let d = relay_args_with(|a| a[1] = "0.0.0.0:7380".into());
    let problems = check_kubernetes(&d);
    assert!(
        matches!(&problems[0], Problem::Manifest { object, message, .. } if object == RELAY && message.contains("readinessProbe must be httpGet /ready on the port the relay listens on (7380)")),
        "{problems:?}"
    );
    assert_eq!(
        problems[1],
        Problem::ListenPortMismatch {
            file: K8S_RELAY.into(),
            object: RELAY.into(),
            what: "Service krowoc-edge/krowoc-relay (port 7379)".into(),
            port: 7379,
            listening: 7380
        }
    );
    // Each platform's NetworkPolicy admits its gateway on 7379, not on 7380.
    let gateways: Vec<&str> = problems[2..]
        .iter()
        .map(|p| match p {
            Problem::NotIsolated {
                object, message, ..
            } if object == RELAY && message.ends_with("on port 7380") => message
                .split("(namespace ")
                .nth(1)
                .and_then(|m| m.split(',').next())
                .unwrap_or_default(),
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(gateways, vec!["istio-system", EG_PROXY_NAMESPACE]);
}

#[test]
fn a_relay_on_loopback_or_with_a_misspelt_flag_is_refused_by_the_relays_own_parser() {
    let d = relay_args_with(|a| {
        a.drain(0..2);
    });
    assert_eq!(
        check_kubernetes(&d),
        vec![Problem::ListensOnLoopback {
            service: RELAY.into(),
            address: "127.0.0.1:7379".into()
        }]
    );
    let d = relay_args_with(|a| a[2] = "--redis-url".into());
    match check_kubernetes(&d).as_slice() {
        [Problem::RelayArgsRefused { service, message }] => {
            assert_eq!(service, RELAY);
            assert!(message.contains("--redis-url"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_relays_secret_files_are_validated_by_the_relay_and_must_be_mounted() {
    // An empty token: the relay's own validation refuses it, and the plugin's no longer matches.
    let text = manifest_with(K8S_RELAY, "Secret", "krowoc-relay", |s| {
        s["stringData"]["token"] = yaml(json!(""));
    });
    let problems = check_kubernetes(&Deployment::repo().with_file(K8S_RELAY, text));
    match problems.as_slice() {
        [Problem::RelayArgsRefused { service, message }, Problem::PluginTokenMismatch { file: f1, .. }, Problem::PluginTokenMismatch { file: f2, .. }] =>
        {
            assert_eq!(service, RELAY);
            assert_eq!(
                message,
                "--token-file /run/secrets/krowoc/token: the file is empty"
            );
            assert_eq!(
                (f1.as_str(), f2.as_str()),
                (ISTIO_WASMPLUGIN, EG_EXTENSION_POLICY)
            );
        }
        other => panic!("{other:?}"),
    }
    // A key the volume names is not in the Secret.
    let text = manifest_with(K8S_RELAY, "Secret", "krowoc-relay", |s| {
        let data = s["stringData"].as_mapping_mut().expect("stringData");
        let token = data.remove("token").expect("token");
        data.insert("relay-token".into(), token);
    });
    assert_eq!(
        check_kubernetes(&Deployment::repo().with_file(K8S_RELAY, text)),
        vec![Problem::SecretMissing {
            file: K8S_RELAY.into(),
            object: RELAY.into(),
            secret: "Secret krowoc-edge/krowoc-relay".into(),
            key: Some("token".into())
        }]
    );
    // A file outside every mount.
    let d = relay_args_with(|a| {
        let i = a
            .iter()
            .position(|x| x == "--token-file")
            .expect("--token-file");
        a[i + 1] = "/etc/krowoc/token".into();
    });
    assert_eq!(
        check_kubernetes(&d),
        vec![Problem::MountMissing {
            file: K8S_RELAY.into(),
            object: RELAY.into(),
            path: "/etc/krowoc/token".into()
        }]
    );
}

#[test]
fn a_plugin_token_other_than_the_relays_secret_is_reported_without_either_value() {
    let text = manifest_with(ISTIO_WASMPLUGIN, "WasmPlugin", "krowoc-edge", |w| {
        w["spec"]["pluginConfig"]["redis"]["token"] = yaml(json!("another-token"));
    });
    let problem = Problem::PluginTokenMismatch {
        file: ISTIO_WASMPLUGIN.into(),
        secret: format!("the relay reads it from {RELAY_SECRET_TOKEN}"),
    };
    assert_eq!(
        check_kubernetes(&Deployment::repo().with_file(ISTIO_WASMPLUGIN, text)),
        vec![problem.clone()]
    );
    assert!(!problem.to_string().contains("change-me"));
}

#[test]
fn the_relays_redis_user_is_the_filters_acl_user_with_the_relays_password_and_default_is_off() {
    let acl_source = format!("{K8S_REDIS} (Secret krowoc-edge/redis-acl key users.acl)");
    let without_scan = Deployment::repo().edit(K8S_REDIS, |t| t.replace(" +scan", ""));
    match check_kubernetes(&without_scan).as_slice() {
        [Problem::AclUserRules {
            user,
            expected,
            found,
        }] => {
            assert_eq!(user, "krowoc-edge");
            assert!(expected.contains("+scan") && !found.contains("+scan"));
        }
        other => panic!("{other:?}"),
    }
    let text = manifest_with(K8S_RELAY, "Secret", "krowoc-relay", |s| {
        s["stringData"]["redis-password"] = yaml(json!("another-password"));
    });
    assert_eq!(
        check_kubernetes(&Deployment::repo().with_file(K8S_RELAY, text)),
        vec![Problem::AclPasswordMismatch {
            user: "krowoc-edge".into()
        }]
    );
    let default_on = Deployment::repo().edit(K8S_REDIS, |t| {
        t.replace("user default off", "user default on nopass ~* &* +@all")
    });
    assert_eq!(
        check_kubernetes(&default_on),
        vec![Problem::AclDefaultUserOn {
            file: acl_source.clone()
        }]
    );
    let other_user = relay_args_with(|a| a[3] = "redis://edge@redis:6379".into());
    assert_eq!(
        check_kubernetes(&other_user),
        vec![Problem::AclUserMissing {
            user: "edge".into(),
            aclfile: Some(acl_source)
        }]
    );
}

#[test]
fn a_relay_pointed_at_no_redis_service_or_a_redis_on_another_port_is_reported() {
    let d = relay_args_with(|a| a[3] = "redis://krowoc-edge@redis-master:6379".into());
    assert_eq!(
        check_kubernetes(&d),
        vec![Problem::ServiceUnknown {
            file: K8S_RELAY.into(),
            from: format!("{RELAY} (--redis)"),
            host: "redis-master".into(),
            port: 6379
        }]
    );
    let d = Deployment::repo().edit(K8S_REDIS, |t| {
        t.replace(r#"args: ["--port", "6379","#, r#"args: ["--port", "6380","#)
    });
    let problems = check_kubernetes(&d);
    assert_eq!(
        problems[0],
        Problem::ListenPortMismatch {
            file: K8S_REDIS.into(),
            object: "Deployment krowoc-edge/redis".into(),
            what: "Service krowoc-edge/redis (port 6379)".into(),
            port: 6379,
            listening: 6380
        }
    );
}

#[test]
fn an_istio_cluster_that_is_not_the_relay_services_is_reported() {
    let with_cluster = |cluster: &str| {
        let text = manifest_with(ISTIO_WASMPLUGIN, "WasmPlugin", "krowoc-edge", |w| {
            w["spec"]["pluginConfig"]["redis"]["cluster"] = yaml(json!(cluster));
        });
        check_kubernetes(&Deployment::repo().with_file(ISTIO_WASMPLUGIN, text))
    };
    let message = |cluster: &str| match with_cluster(cluster).as_slice() {
        [Problem::ClusterNotGenerated {
            file,
            platform,
            cluster: c,
            message,
        }] => {
            assert_eq!(
                (file.as_str(), platform.as_str(), c.as_str()),
                (ISTIO_WASMPLUGIN, "Istio", cluster)
            );
            message.clone()
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(
        message("outbound|7380||krowoc-relay.krowoc-edge.svc.cluster.local"),
        "Service krowoc-edge/krowoc-relay has no port 7380"
    );
    assert_eq!(
        message("outbound|7379||krowoc-relay.default.svc.cluster.local"),
        "the manifests have no Service krowoc-relay in namespace default"
    );
    assert_eq!(
        message("outbound|6379||redis.krowoc-edge.svc.cluster.local"),
        "Service krowoc-edge/redis does not select the relay's pods"
    );
    assert!(message("redis_relay").contains("not an Istio cluster name"));
}

#[test]
fn an_istio_plugin_without_authority_selector_or_the_stock_image_or_in_an_early_phase_is_reported()
{
    let text = manifest_with(ISTIO_WASMPLUGIN, "WasmPlugin", "krowoc-edge", |w| {
        w["spec"]["pluginConfig"]["redis"]
            .as_mapping_mut()
            .expect("redis")
            .remove("authority");
    });
    assert_eq!(
        check_kubernetes(&Deployment::repo().with_file(ISTIO_WASMPLUGIN, text)),
        vec![Problem::AuthorityInvalid {
            file: ISTIO_WASMPLUGIN.into(),
            authority: "outbound|7379||krowoc-relay.krowoc-edge.svc.cluster.local".into()
        }]
    );
    let text = manifest_with(ISTIO_WASMPLUGIN, "WasmPlugin", "krowoc-edge", |w| {
        w["spec"].as_mapping_mut().expect("spec").remove("selector");
        w["spec"]["phase"] = yaml(json!("AUTHN"));
        w["spec"]["url"] = yaml(json!("oci://registry.example.com/krowoc-edge:0.1.0"));
        w["spec"]["failStrategy"] = yaml(json!("FAIL_OPEN"));
    });
    let messages: Vec<String> =
        check_kubernetes(&Deployment::repo().with_file(ISTIO_WASMPLUGIN, text))
            .into_iter()
            .map(|p| match p {
                Problem::Manifest { file, message, .. } if file == ISTIO_WASMPLUGIN => message,
                // Without a selector, the relay's NetworkPolicy admits other pods than it selects.
                Problem::NotIsolated { message, .. } => message,
                other => panic!("{other}"),
            })
            .collect();
    assert_eq!(messages.len(), 5, "{messages:#?}");
    assert!(messages[0].contains("spec.selector.matchLabels is empty"));
    assert!(messages[1].contains("phase AUTHN"));
    assert!(messages[2].contains("failStrategy FAIL_OPEN"));
    assert!(messages[3].contains("krowoc-edge-envoy"));
    assert!(messages[4].contains("no NetworkPolicy admits"));
}

#[test]
fn an_istio_or_envoy_gateway_policy_that_drifts_from_envoy_yaml_is_reported() {
    let text = manifest_with(ISTIO_WASMPLUGIN, "WasmPlugin", "krowoc-edge", |w| {
        w["spec"]["pluginConfig"]["routes"][0]["rate_limit"]["limits"][0]["limit"] =
            yaml(json!(50));
    });
    assert_eq!(
        check_kubernetes(&Deployment::repo().with_file(ISTIO_WASMPLUGIN, text)),
        vec![Problem::VariantDiffers {
            file: ISTIO_WASMPLUGIN.into(),
            key: "routes".into()
        }]
    );
    let text = manifest_with(
        EG_EXTENSION_POLICY,
        "EnvoyExtensionPolicy",
        "krowoc-edge",
        |p| {
            p["spec"]["wasm"][0]["config"]["redis"]["timeout"] = yaml(json!("1s"));
        },
    );
    assert_eq!(
        check_kubernetes(&Deployment::repo().with_file(EG_EXTENSION_POLICY, text)),
        vec![Problem::VariantDiffers {
            file: EG_EXTENSION_POLICY.into(),
            key: "redis.timeout".into()
        }]
    );
    // The plugin's own validation runs on each copy.
    let text = manifest_with(
        EG_EXTENSION_POLICY,
        "EnvoyExtensionPolicy",
        "krowoc-edge",
        |p| {
            p["spec"]["wasm"][0]["config"]["redis"]["timeout"] = yaml(json!("200 ms"));
        },
    );
    match check_kubernetes(&Deployment::repo().with_file(EG_EXTENSION_POLICY, text)).as_slice() {
        [Problem::PluginConfigRefused { file, errors }] => {
            assert_eq!(file, EG_EXTENSION_POLICY);
            assert!(
                errors.iter().any(|e| e.contains("redis.timeout")),
                "{errors:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_envoy_gateway_cluster_no_patch_adds_for_the_relay_is_reported() {
    let eg_cluster = |d: Deployment| match check_kubernetes(&d).as_slice() {
        [Problem::ClusterNotGenerated {
            file,
            platform,
            message,
            ..
        }] => {
            assert_eq!(
                (file.as_str(), platform.as_str()),
                (EG_EXTENSION_POLICY, "Envoy Gateway")
            );
            message.clone()
        }
        other => panic!("{other:?}"),
    };
    // The filter names a cluster no patch adds.
    let text = manifest_with(
        EG_EXTENSION_POLICY,
        "EnvoyExtensionPolicy",
        "krowoc-edge",
        |p| {
            p["spec"]["wasm"][0]["config"]["redis"]["cluster"] = yaml(json!("redis_relay"));
        },
    );
    let m = eg_cluster(Deployment::repo().with_file(EG_EXTENSION_POLICY, text));
    assert!(
        m.contains(r#"no EnvoyPatchPolicy adds a Cluster of that name (added: ["krowoc-relay"])"#),
        "{m}"
    );
    // The patch's endpoint by its short name: the Envoy resolves it in its own namespace.
    let d = Deployment::repo().edit(EG_PATCH_POLICY, |t| {
        t.replace(
            "address: krowoc-relay.krowoc-edge.svc.cluster.local",
            "address: krowoc-relay",
        )
    });
    assert_eq!(
        eg_cluster(d),
        format!("its endpoint krowoc-relay:7379: the manifests have no Service krowoc-relay in namespace {EG_PROXY_NAMESPACE}")
    );
    // The patch goes to another Gateway than the route's.
    let d = Deployment::repo().edit(EG_PATCH_POLICY, |t| {
        t.replace(
            "    kind: Gateway\n    name: krowoc-edge",
            "    kind: Gateway\n    name: eg",
        )
    });
    assert_eq!(
        eg_cluster(d),
        "EnvoyPatchPolicy krowoc-edge/krowoc-relay-cluster adds it to Gateway krowoc-edge/eg, not to the Gateway of the filter's route (krowoc-edge/krowoc-edge)"
    );
    // The names of the patch and of the cluster disagree.
    let d = Deployment::repo().edit(EG_PATCH_POLICY, |t| {
        t.replace("cluster_name: krowoc-relay", "cluster_name: relay")
    });
    assert!(eg_cluster(d).contains("must be the same"));
}

#[test]
fn an_envoy_gateway_policy_failing_open_or_on_a_route_no_manifest_defines_is_reported() {
    let text = manifest_with(
        EG_EXTENSION_POLICY,
        "EnvoyExtensionPolicy",
        "krowoc-edge",
        |p| {
            p["spec"]["wasm"][0]["failOpen"] = yaml(json!(true));
            p["spec"]["wasm"][0]["code"]["image"]["url"] =
                yaml(json!("registry.example.com/krowoc-edge:0.1.0"));
        },
    );
    let messages: Vec<String> =
        check_kubernetes(&Deployment::repo().with_file(EG_EXTENSION_POLICY, text))
            .into_iter()
            .map(|p| match p {
                Problem::Manifest { message, .. } => message,
                other => panic!("{other}"),
            })
            .collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(messages[0].contains("failOpen: true") && messages[1].contains("krowoc-edge-envoy"));

    let d = Deployment::repo().edit(EG_GATEWAY, |t| t.replace("  name: app\n", "  name: web\n"));
    assert_eq!(
        check_kubernetes(&d),
        vec![Problem::Manifest {
            file: EG_EXTENSION_POLICY.into(),
            object: "EnvoyExtensionPolicy krowoc-edge/krowoc-edge".into(),
            message: "targetRefs names HTTPRoute krowoc-edge/app, which no manifest defines".into()
        }]
    );
}

#[test]
fn redis_or_the_relay_reachable_beyond_who_must_reach_them_is_reported() {
    // The Istio policy admits another namespace's pods than the WasmPlugin's.
    let d = Deployment::repo().edit(ISTIO_NETWORK_POLICY, |t| {
        t.replace(
            "metadata.name: istio-system",
            "metadata.name: istio-ingress",
        )
    });
    assert_eq!(
        check_kubernetes(&d),
        vec![Problem::NotIsolated {
            file: K8S_RELAY.into(),
            object: RELAY.into(),
            message: "no NetworkPolicy admits the pods that must reach it (namespace istio-system, labels istio=ingressgateway) on port 7379".into()
        }]
    );
    // Redis without its NetworkPolicy.
    let text = Deployment::repo().read(K8S_REDIS).expect("redis.yaml");
    let cut = text
        .find("---\n# Only the relay reaches Redis.")
        .expect("the policy");
    let d = Deployment::repo().with_file(K8S_REDIS, text[..cut].to_string());
    assert_eq!(
        check_kubernetes(&d),
        vec![Problem::NotIsolated {
            file: K8S_REDIS.into(),
            object: "Deployment krowoc-edge/redis".into(),
            message:
                "no NetworkPolicy selects its pods for Ingress: every pod of the cluster reaches it"
                    .into()
        }]
    );
    // A rule that admits everyone.
    let text = manifest_with(EG_NETWORK_POLICY, "NetworkPolicy", "krowoc-relay", |p| {
        p["spec"]["ingress"][0]["from"] = yaml(json!([{"namespaceSelector": {}}]));
    });
    let problems = check_kubernetes(&Deployment::repo().with_file(EG_NETWORK_POLICY, text));
    assert!(
        problems.iter().any(|p| matches!(p, Problem::NotIsolated { file, message, .. } if file == EG_NETWORK_POLICY && message.contains("admits every pod"))),
        "{problems:?}"
    );
}

#[test]
fn floating_images_in_the_manifests_are_reported() {
    let d = Deployment::repo()
        .edit(K8S_REDIS, |t| {
            t.replace("image: redis:7.4.7-bookworm", "image: redis:latest")
        })
        .edit(K8S_RELAY, |t| {
            t.replace(
                "registry.example.com/krowoc-relay:0.1.0",
                "registry.example.com/krowoc-relay",
            )
        })
        .edit(ISTIO_WASMPLUGIN, |t| {
            t.replace("krowoc-edge-envoy:0.1.0", "krowoc-edge-envoy:latest")
        });
    let images: Vec<(String, String)> = check_kubernetes(&d)
        .into_iter()
        .map(|p| match p {
            Problem::ImageNotPinned { file, image, .. } => (file, image),
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(
        images,
        vec![
            (K8S_REDIS.into(), "redis:latest".into()),
            (K8S_RELAY.into(), "registry.example.com/krowoc-relay".into()),
            (
                ISTIO_WASMPLUGIN.into(),
                "registry.example.com/krowoc-edge-envoy:latest".into()
            ),
        ]
    );
}

#[test]
fn the_kubernetes_plugin_image_is_the_stock_envoy_build_in_one_layer() {
    let d = Deployment::repo().edit(K8S_PLUGIN_DOCKERFILE, |t| {
        t.replace(" --no-default-features", "")
    });
    match check_dockerfiles(&d).as_slice() {
        [Problem::PluginFeatures {
            dockerfile,
            message,
            ..
        }] => {
            assert_eq!(dockerfile, K8S_PLUGIN_DOCKERFILE);
            assert!(message.contains("--no-default-features"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let d = Deployment::repo().edit(K8S_PLUGIN_DOCKERFILE, |t| {
        t + "COPY --from=plugin /out/plugin.wasm /extra.wasm\n"
    });
    assert_eq!(
        check_dockerfiles(&d),
        vec![Problem::WasmImageLayout {
            dockerfile: K8S_PLUGIN_DOCKERFILE.into(),
            message: "the final stage has 2 COPY/ADD instructions: a Wasm image must be exactly one layer (one COPY)".into()
        }]
    );
    let d = Deployment::repo().edit(HIGRESS_PLUGIN_DOCKERFILE, |t| {
        t.replace(
            "/out/plugin.wasm /plugin.wasm",
            "/out/plugin.wasm /filter.wasm",
        )
    });
    match check_dockerfiles(&d).as_slice() {
        [Problem::WasmImageLayout {
            dockerfile,
            message,
        }] => {
            assert_eq!(dockerfile, HIGRESS_PLUGIN_DOCKERFILE);
            assert!(message.contains("not /filter.wasm"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn workload_wiring_mistakes_are_reported() {
    let manifest = |file: &str, object: &str, message: &str| Problem::Manifest {
        file: file.into(),
        object: object.into(),
        message: message.into(),
    };
    // An object without a namespace lands wherever kubectl points.
    let text = manifest_with(K8S_RELAY, "Service", "krowoc-relay", |s| {
        s["metadata"]
            .as_mapping_mut()
            .expect("metadata")
            .remove("namespace");
    });
    let problems = check_kubernetes(&Deployment::repo().with_file(K8S_RELAY, text));
    assert_eq!(
        problems[0],
        manifest(
            K8S_RELAY,
            "Service krowoc-relay",
            "no metadata.namespace: it would land in whichever namespace kubectl points at"
        )
    );
    // A Secret mounted writable, a mount of a volume the pod lacks, a probe on a port no
    // container declares, a Deployment whose selector misses its own pods.
    let d = Deployment::repo().edit(K8S_REDIS, |t| {
        t.replace(
            "              mountPath: /etc/redis\n              readOnly: true\n",
            "              mountPath: /etc/redis\n",
        )
    });
    assert_eq!(
        check_kubernetes(&d),
        vec![manifest(
            K8S_REDIS,
            "Deployment krowoc-edge/redis",
            "container redis mounts /etc/redis writable: mount Secrets readOnly"
        )]
    );
    let d = Deployment::repo().edit(K8S_RELAY, |t| {
        t.replace(
            "            - name: secrets\n              mountPath",
            "            - name: relay-secrets\n              mountPath",
        )
    });
    assert_eq!(
        check_kubernetes(&d),
        vec![manifest(
            K8S_RELAY,
            RELAY,
            r#"container relay mounts volume "relay-secrets", which the pod does not define"#
        )]
    );
    let d = Deployment::repo().edit(K8S_RELAY, |t| {
        t.replace(
            "            tcpSocket:\n              port: http-relay",
            "            tcpSocket:\n              port: http",
        )
    });
    assert_eq!(
        check_kubernetes(&d),
        vec![Problem::PortMissing {
            file: K8S_RELAY.into(),
            object: RELAY.into(),
            what: "container relay's livenessProbe".into(),
            port: "http".into()
        }]
    );
    let text = manifest_with(K8S_REDIS, "Deployment", "redis", |d| {
        d["spec"]["selector"]["matchLabels"]["app"] = yaml(json!("cache"));
    });
    assert_eq!(
        check_kubernetes(&Deployment::repo().with_file(K8S_REDIS, text)),
        vec![Problem::SelectorMatchesNothing {
            file: K8S_REDIS.into(),
            object: "Deployment krowoc-edge/redis".into(),
            selector: "spec.selector".into()
        }]
    );
}

#[test]
fn a_relay_image_login_or_acl_file_the_manifests_lack_is_reported() {
    let d = Deployment::repo().edit(K8S_RELAY, |t| {
        t.replace(
            "registry.example.com/krowoc-relay:0.1.0",
            "registry.example.com/resp-relay:0.1.0",
        )
    });
    assert_eq!(
        check_kubernetes(&d),
        vec![Problem::Manifest {
            file: K8S_RELAY.into(),
            object: "Deployment".into(),
            message: format!(
                "no container runs the relay image (…/krowoc-relay:TAG, built by {RELAY_DOCKERFILE})"
            )
        }]
    );
    // Without a user the relay would log in as `default`, which is off.
    let d = relay_args_with(|a| {
        a[3] = "redis://redis:6379".into();
        let i = a
            .iter()
            .position(|x| x == "--redis-password-file")
            .expect("flag");
        a.drain(i..i + 2);
    });
    assert_eq!(
        check_kubernetes(&d),
        vec![Problem::Manifest {
            file: K8S_RELAY.into(),
            object: RELAY.into(),
            message:
                "--redis redis://redis:6379: log in as the filter's ACL user (redis://USER@HOST)"
                    .into()
        }]
    );
    let d = Deployment::repo().edit(K8S_REDIS, |t| {
        t.replace(r#", "--aclfile", "/etc/redis/users.acl""#, "")
    });
    assert_eq!(
        check_kubernetes(&d),
        vec![Problem::AclUserMissing {
            user: "krowoc-edge".into(),
            aclfile: None
        }]
    );
}

#[test]
fn platform_wiring_mistakes_are_reported() {
    // Envoy Gateway: the route's Gateway is not in the manifests.
    let d = Deployment::repo().edit(EG_GATEWAY, |t| {
        t.replace(
            "    - name: krowoc-edge\n  rules",
            "    - name: eg\n  rules",
        )
    });
    assert_eq!(
        check_kubernetes(&d),
        vec![Problem::Manifest {
            file: EG_GATEWAY.into(),
            object: "HTTPRoute krowoc-edge/app".into(),
            message: "parentRefs names Gateway krowoc-edge/eg, which no manifest defines".into()
        }]
    );
    // Envoy Gateway: a cluster that cannot resolve a Service's name.
    let d = Deployment::repo().edit(EG_PATCH_POLICY, |t| {
        t.replace("type: STRICT_DNS", "type: STATIC")
    });
    assert_eq!(
        check_kubernetes(&d),
        vec![Problem::ClusterNotGenerated {
            file: EG_EXTENSION_POLICY.into(),
            platform: "Envoy Gateway".into(),
            cluster: "krowoc-relay".into(),
            message: "type STATIC: a Service's name needs a DNS cluster (STRICT_DNS)".into()
        }]
    );
    // Istio: a subset no DestinationRule defines.
    let d = Deployment::repo().edit(ISTIO_WASMPLUGIN, |t| {
        t.replace("outbound|7379||krowoc", "outbound|7379|v1|krowoc")
    });
    assert_eq!(
        check_kubernetes(&d),
        vec![Problem::ClusterNotGenerated {
            file: ISTIO_WASMPLUGIN.into(),
            platform: "Istio".into(),
            cluster: "outbound|7379|v1|krowoc-relay.krowoc-edge.svc.cluster.local".into(),
            message: r#"subset "v1": the relay needs no DestinationRule subset"#.into()
        }]
    );
    // Istio's proxy is Envoy: no Redis calls.
    let text = manifest_with(ISTIO_WASMPLUGIN, "WasmPlugin", "krowoc-edge", |w| {
        let redis = w["spec"]["pluginConfig"]["redis"]
            .as_mapping_mut()
            .expect("redis");
        redis.remove("token");
        redis.remove("authority");
        redis.insert("transport".into(), "redis_call".into());
    });
    assert_eq!(
        check_kubernetes(&Deployment::repo().with_file(ISTIO_WASMPLUGIN, text)),
        vec![Problem::Manifest {
            file: ISTIO_WASMPLUGIN.into(),
            object: "the plugin configuration".into(),
            message: "redis.transport must be relay: the proxy is Envoy, which has no Redis calls"
                .into()
        }]
    );
}

#[test]
fn a_relay_service_istio_does_not_export_to_the_gateway_is_reported() {
    let with_export = |to: &str| {
        let text = manifest_with(K8S_RELAY, "Service", "krowoc-relay", |s| {
            s["metadata"]["annotations"] = yaml(json!({ "networking.istio.io/exportTo": to }));
        });
        check_kubernetes(&Deployment::repo().with_file(K8S_RELAY, text))
    };
    assert_no_problems(&with_export("istio-system,krowoc-edge"));
    assert_no_problems(&with_export("*"));
    assert_eq!(
        with_export("."),
        vec![Problem::ClusterNotGenerated {
            file: ISTIO_WASMPLUGIN.into(),
            platform: "Istio".into(),
            cluster: "outbound|7379||krowoc-relay.krowoc-edge.svc.cluster.local".into(),
            message: r#"Service krowoc-edge/krowoc-relay is exported to "." (networking.istio.io/exportTo): Istio does not give its cluster to the gateway in istio-system"#.into()
        }]
    );
}

#[test]
fn an_envoy_gateway_filter_running_before_authorization_is_reported() {
    let problem = |message: &str| Problem::Manifest {
        file: EG_GATEWAY.into(),
        object: "Gateway krowoc-edge/krowoc-edge".into(),
        message: message.into(),
    };
    let default_order = "give it an EnvoyProxy (infrastructure.parametersRef) whose filterOrder puts envoy.filters.http.wasm after envoy.filters.http.rbac: by default Envoy Gateway runs Wasm before authorization, and the filter would answer from its cache for requests authorization refuses";
    let text = manifest_with(EG_GATEWAY, "Gateway", "krowoc-edge", |g| {
        g["spec"]
            .as_mapping_mut()
            .expect("spec")
            .remove("infrastructure");
    });
    assert_eq!(
        check_kubernetes(&Deployment::repo().with_file(EG_GATEWAY, text)),
        vec![problem(default_order)]
    );
    let d = Deployment::repo().edit(EG_GATEWAY, |t| {
        t.replace(
            "after: envoy.filters.http.rbac",
            "after: envoy.filters.http.jwt_authn",
        )
    });
    assert_eq!(check_kubernetes(&d), vec![problem(default_order)]);
    let d = Deployment::repo().edit(EG_GATEWAY, |t| {
        t.replace(
            "      kind: EnvoyProxy\n      name: krowoc-edge",
            "      kind: EnvoyProxy\n      name: edge",
        )
    });
    assert_eq!(
        check_kubernetes(&d),
        vec![problem(
            "infrastructure.parametersRef names EnvoyProxy krowoc-edge/edge, which no manifest defines"
        )]
    );
}

// ---------------------------------------------------------------------------------------------
// Prometheus and Grafana: broken copies

fn monitoring_problem(file: &str, message: &str) -> Problem {
    Problem::Monitoring {
        file: file.into(),
        message: message.into(),
    }
}

#[test]
fn prometheus_scraping_another_port_than_envoys_admin_is_reported() {
    let d = Deployment::repo().edit(PROMETHEUS_YML, |t| t.replace("envoy:9901", "envoy:9902"));
    assert_eq!(
        check_monitoring(&d),
        vec![monitoring_problem(
            PROMETHEUS_YML,
            "job envoy scrapes envoy:9902, but Envoy's admin is envoy:Some(9901) (envoy.yaml)"
        )]
    );
}

#[test]
fn prometheus_reaching_envoy_only_over_a_published_network_is_reported() {
    let compose = compose_with("prometheus", |s| {
        s["networks"] = yaml(json!(["edge", "dashboards"]));
    });
    let d = Deployment::repo().with_file(COMPOSE, compose);
    assert_eq!(
        check_monitoring(&d),
        vec![monitoring_problem(
            COMPOSE,
            "prometheus and envoy share no internal network (shared: [\"edge\"]): Envoy's admin must be scraped inside the stack"
        )]
    );
}

#[test]
fn an_unmounted_prometheus_configuration_is_reported() {
    let compose = compose_with("prometheus", |s| {
        s["volumes"] = yaml(json!([]));
    });
    let d = Deployment::repo().with_file(COMPOSE, compose);
    assert_eq!(
        check_monitoring(&d),
        vec![monitoring_problem(
            COMPOSE,
            "service prometheus reads /etc/prometheus/prometheus.yml, where envoy/prometheus/prometheus.yml is not mounted"
        )]
    );
}

#[test]
fn a_relabel_rule_the_checks_cannot_apply_is_reported() {
    let d = Deployment::repo().edit(PROMETHEUS_YML, |t| {
        t.replacen(
            "        target_label: route\n",
            "        target_label: route\n        action: labeldrop\n",
            1,
        )
    });
    assert_eq!(
        check_monitoring(&d),
        vec![monitoring_problem(
            PROMETHEUS_YML,
            "job \"envoy\", metric_relabel_configs[0]: action \"labeldrop\" (only replace is used)"
        )]
    );
}

#[test]
fn grafana_beside_redis_or_published_beyond_loopback_is_reported() {
    let compose = compose_with("grafana", |s| {
        s["networks"] = yaml(json!(["dashboards", "edge", "backend"]));
        s["ports"] = yaml(json!(["3000:3000"]));
    });
    let d = Deployment::repo().with_file(COMPOSE, compose);
    let problems: Vec<String> = check_monitoring(&d)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        problems,
        [
            "envoy/docker-compose.yml: service grafana: port 3000 is published beyond loopback",
            "envoy/docker-compose.yml: service grafana shares network backend with redis: it should reach Prometheus only",
            "envoy/docker-compose.yml: service grafana shares network backend with relay: it should reach Prometheus only",
            "envoy/docker-compose.yml: service grafana shares network backend with upstream: it should reach Prometheus only",
            "envoy/docker-compose.yml: service grafana shares network backend with envoy: it should reach Prometheus only",
        ]
    );
}

#[test]
fn a_datasource_elsewhere_or_a_dashboard_on_another_uid_is_reported() {
    let d = Deployment::repo().edit(DATASOURCES, |t| {
        t.replace("prometheus:9090", "prometheus:9091")
    });
    assert_eq!(
        check_monitoring(&d),
        vec![monitoring_problem(
            DATASOURCES,
            "datasource \"krowoc-prometheus\" is http://prometheus:9091, but Prometheus is prometheus:Some(9090)"
        )]
    );
    let d = Deployment::repo().edit(DATASOURCES, |t| {
        t.replace("uid: krowoc-prometheus", "uid: other")
    });
    let problems = check_monitoring(&d);
    assert!(!problems.is_empty());
    assert!(
        problems.iter().all(|p| p.to_string().contains(
            "uses datasource Some(\"krowoc-prometheus\"), the provisioned one is Some(\"other\")"
        )),
        "{problems:?}"
    );
}

#[test]
fn a_dashboard_outside_the_providers_folder_is_reported() {
    let d = Deployment::repo().edit(DASHBOARD_PROVIDERS, |t| {
        t.replace("/var/lib/grafana/dashboards", "/etc/dashboards")
    });
    assert_eq!(
        check_monitoring(&d),
        vec![monitoring_problem(
            COMPOSE,
            "service grafana: envoy/grafana/krowoc-edge.json is not mounted in a folder envoy/grafana/provisioning/dashboards/krowoc-edge.yml loads ([\"/etc/dashboards\"])"
        )]
    );
}

#[test]
fn a_moving_monitoring_image_tag_is_reported() {
    let compose = compose_with("grafana", |s| {
        s["image"] = yaml(json!("grafana/grafana:12"));
    });
    let d = Deployment::repo().with_file(COMPOSE, compose);
    assert_eq!(
        check_dockerfiles(&d),
        vec![Problem::ImageNotPinned {
            file: COMPOSE.into(),
            image: "grafana/grafana:12".into(),
            why: "give an exact release, e.g. grafana/grafana:12.1.1".into(),
        }]
    );
}
