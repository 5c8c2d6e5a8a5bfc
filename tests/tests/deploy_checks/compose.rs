//! The subset of the Compose specification that envoy/docker-compose.yml uses, typed, with
//! unknown keys refused (a misspelt `healthchek` is an error, not an ignored key).

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compose {
    /// The project name (read so the key is known; nothing depends on it).
    #[serde(default)]
    #[allow(dead_code)]
    pub name: Option<String>,
    pub services: BTreeMap<String, Service>,
    #[serde(default)]
    pub networks: BTreeMap<String, Option<Network>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub build: Option<Build>,
    /// Exec form only: a list of words.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub environment: BTreeMap<String, Scalar>,
    /// Documentation of the ports other services use; the checks use the listen addresses.
    #[serde(default)]
    #[allow(dead_code)]
    pub expose: Vec<Scalar>,
    /// Short syntax: `[HOST_IP:]HOST_PORT:CONTAINER_PORT`.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Short syntax: `SOURCE:TARGET[:MODE]`.
    #[serde(default)]
    pub volumes: Vec<String>,
    #[serde(default)]
    pub networks: Vec<String>,
    #[serde(default)]
    pub depends_on: BTreeMap<String, DependsOn>,
    #[serde(default)]
    pub healthcheck: Option<Healthcheck>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    pub context: String,
    #[serde(default)]
    pub dockerfile: Option<String>,
    #[serde(default)]
    pub target: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DependsOn {
    pub condition: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // timings are read so their keys are known; the checks use `test`
pub struct Healthcheck {
    /// `["CMD", prog, args...]` or `["CMD-SHELL", "shell text"]`.
    pub test: Vec<String>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<u32>,
    #[serde(default)]
    pub start_period: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    #[serde(default)]
    pub internal: bool,
}

/// `[HOST_IP:]HOST_PORT:CONTAINER_PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub host_ip: Option<String>,
    pub host_port: u16,
    pub container_port: u16,
}

/// A string, number or boolean written where Compose wants a string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    String(String),
    Number(i64),
    Bool(bool),
}

impl Scalar {
    pub fn as_string(&self) -> String {
        match self {
            Scalar::String(s) => s.clone(),
            Scalar::Number(n) => n.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

impl Compose {
    pub fn parse(text: &str) -> Result<Compose, String> {
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }
}

impl Service {
    pub fn env(&self, name: &str) -> Option<String> {
        self.environment.get(name).map(Scalar::as_string)
    }

    /// Published ports, or why one cannot be read.
    pub fn published(&self) -> Vec<Result<Published, String>> {
        self.ports
            .iter()
            .map(|p| {
                let spec = p.split('/').next().unwrap_or(p);
                let parts: Vec<&str> = spec.split(':').collect();
                let num = |s: &str| {
                    s.parse::<u16>()
                        .map_err(|_| format!("port {p:?}: {s:?} is not a port number"))
                };
                match parts.as_slice() {
                    [host, container] => Ok(Published {
                        host_ip: None,
                        host_port: num(host)?,
                        container_port: num(container)?,
                    }),
                    [ip, host, container] => Ok(Published {
                        host_ip: Some(ip.to_string()),
                        host_port: num(host)?,
                        container_port: num(container)?,
                    }),
                    _ => Err(format!("port {p:?}: expected [IP:]HOST:CONTAINER")),
                }
            })
            .collect()
    }

    /// Bind mounts as (source, target).
    pub fn binds(&self) -> Vec<(String, String)> {
        self.volumes
            .iter()
            .filter_map(|v| {
                let mut parts = v.split(':');
                let source = parts.next()?;
                let target = parts.next()?;
                Some((source.to_string(), target.to_string()))
            })
            .collect()
    }
}
