//! The network configuration on stdin: the spec's fields, this plugin's own, and `prevResult`
//! (kept in its original key order, to be passed through unchanged).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use super::SUPPORTED_VERSIONS;
use crate::{
    handover::DEFAULT_SOCKET,
    json::{Json, Object},
};

/// How long the plugin waits for the agent unless `timeout_ms` says otherwise: capture (attach
/// programs, open listeners in the pod) takes milliseconds; a much longer wait means the agent
/// is stuck, and failing lets the runtime retry.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// The largest `timeout_ms`: below kubelet's default runtime request timeout (2 min), so the
/// plugin fails before the runtime gives up on it.
pub const MAX_TIMEOUT_MS: u64 = 100_000;
/// The log levels `log_level` accepts (tracing's).
pub const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// What is wrong with the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON (code 6, "failed to decode content").
    #[error("network configuration is not valid JSON: {0}")]
    Decode(#[source] serde_json::Error),
    /// JSON, but not an object (code 7).
    #[error("network configuration is not a JSON object")]
    NotAnObject,
    /// A field is missing or has the wrong type or value (code 7).
    #[error("network configuration field {field:?}: {reason}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A `cniVersion` this plugin does not speak (code 1).
    #[error("cniVersion {0:?} is not supported (supported: {versions})", versions = SUPPORTED_VERSIONS.join(", "))]
    IncompatibleVersion(String),
    /// ADD without `prevResult`: the plugin is configured alone or first (code 7).
    #[error("mesh-cni is a chained plugin and needs a prevResult: list it after the primary CNI in the conflist")]
    NotChained,
}

impl ConfigError {
    /// The CNI error code for this error.
    pub fn code(&self) -> u32 {
        match self {
            ConfigError::Decode(_) => super::code::DECODE_FAILED,
            ConfigError::IncompatibleVersion(_) => super::code::INCOMPATIBLE_VERSION,
            ConfigError::NotAnObject | ConfigError::Field { .. } | ConfigError::NotChained => {
                super::code::INVALID_CONFIG
            }
        }
    }
}

/// One plugin's network configuration, as the runtime passes it.
#[derive(Debug, Clone)]
pub struct NetConf {
    /// `cniVersion`: also the version of our output.
    pub cni_version: String,
    /// `name`: the network's name.
    pub name: String,
    /// `type`: our binary's name.
    pub plugin_type: String,
    /// `agent_socket`: the agent's hand-over socket ([`DEFAULT_SOCKET`]).
    pub agent_socket: PathBuf,
    /// `timeout_ms`: the bound on each exchange with the agent.
    pub timeout: Duration,
    /// `log_level`: the stderr log level ("info").
    pub log_level: String,
    /// `prevResult`: the chain's result so far, keys in their original order.
    pub prev_result: Option<Json>,
}

impl NetConf {
    /// Parses and checks the configuration.
    pub fn parse(stdin: &[u8]) -> Result<Self, ConfigError> {
        let json: Json = serde_json::from_slice(stdin).map_err(ConfigError::Decode)?;
        let Json::Object(object) = json else {
            return Err(ConfigError::NotAnObject);
        };
        let cni_version = required_str(&object, "cniVersion")?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(ConfigError::IncompatibleVersion(cni_version));
        }
        let agent_socket = optional_str(&object, "agent_socket")?
            .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from);
        if !agent_socket.is_absolute() {
            return Err(field("agent_socket", "must be an absolute path"));
        }
        let timeout_ms = match object.get("timeout_ms") {
            None | Some(Json::Null) => DEFAULT_TIMEOUT_MS,
            Some(Json::Number(n)) => n
                .as_u64()
                .filter(|ms| (1..=MAX_TIMEOUT_MS).contains(ms))
                .ok_or_else(|| {
                    field(
                        "timeout_ms",
                        format!("must be an integer from 1 to {MAX_TIMEOUT_MS}"),
                    )
                })?,
            Some(_) => return Err(field("timeout_ms", "must be a number")),
        };
        let log_level = optional_str(&object, "log_level")?.unwrap_or_else(|| "info".to_owned());
        if !LOG_LEVELS.contains(&log_level.as_str()) {
            return Err(field(
                "log_level",
                format!("must be one of {}", LOG_LEVELS.join(", ")),
            ));
        }
        Ok(NetConf {
            cni_version,
            name: required_str(&object, "name")?,
            plugin_type: required_str(&object, "type")?,
            agent_socket,
            timeout: Duration::from_millis(timeout_ms),
            log_level,
            prev_result: object
                .get("prevResult")
                .filter(|v| **v != Json::Null)
                .cloned(),
        })
    }

    /// The agent's socket.
    pub fn socket(&self) -> &Path {
        &self.agent_socket
    }
}

/// The pod's addresses in a CNI result (spec 0.3.0 and later: `ips[].address` in CIDR form).
/// An address whose `interface` is a host-side interface (no `sandbox`) is not the pod's and
/// is skipped.
pub fn result_ips(result: &Json) -> Result<Vec<IpAddr>, ConfigError> {
    let result = result
        .as_object()
        .ok_or_else(|| field("prevResult", "must be an object"))?;
    let interfaces = match result.get("interfaces") {
        Some(Json::Array(items)) => items.as_slice(),
        _ => &[],
    };
    let in_sandbox = |index: usize| {
        interfaces
            .get(index)
            .and_then(Json::as_object)
            .and_then(|i| i.get("sandbox"))
            .and_then(Json::as_str)
            .is_some_and(|s| !s.is_empty())
    };
    let ips = match result.get("ips") {
        None | Some(Json::Null) => return Ok(Vec::new()),
        Some(Json::Array(ips)) => ips,
        Some(_) => return Err(field("prevResult", "ips must be an array")),
    };
    let mut out = Vec::new();
    for ip in ips {
        let ip = ip
            .as_object()
            .ok_or_else(|| field("prevResult", "ips[] must be objects"))?;
        let address = ip
            .get("address")
            .and_then(Json::as_str)
            .ok_or_else(|| field("prevResult", "ips[].address missing"))?;
        let addr = address
            .split_once('/')
            .map_or(address, |(addr, _)| addr)
            .parse::<IpAddr>()
            .map_err(|e| field("prevResult", format!("ips[].address {address:?}: {e}")))?;
        let interface = ip.get("interface").map(|i| i.to_value().as_u64());
        match interface {
            Some(Some(index)) if !interfaces.is_empty() => {
                if usize::try_from(index).is_ok_and(in_sandbox) {
                    out.push(addr);
                }
            }
            _ => out.push(addr),
        }
    }
    Ok(out)
}

fn field(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        reason: reason.into(),
    }
}

fn required_str(object: &Object, name: &'static str) -> Result<String, ConfigError> {
    optional_str(object, name)?.ok_or_else(|| field(name, "is required"))
}

fn optional_str(object: &Object, name: &'static str) -> Result<Option<String>, ConfigError> {
    match object.get(name) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) if s.is_empty() => Err(field(name, "must not be empty")),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(field(name, "must be a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_own_fields() {
        let conf =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"k8s","type":"mesh-cni"}"#).unwrap();
        assert_eq!(conf.agent_socket, Path::new(DEFAULT_SOCKET));
        assert_eq!(conf.timeout, Duration::from_millis(DEFAULT_TIMEOUT_MS));
        assert!(conf.prev_result.is_none());
        let text = br#"{"cniVersion":"1.1.0","name":"k8s","type":"mesh-cni","agent_socket":"/run/a.sock","timeout_ms":250,"log_level":"debug"}"#;
        let conf = NetConf::parse(text).unwrap();
        assert_eq!(
            (conf.agent_socket.to_str(), conf.timeout.as_millis()),
            (Some("/run/a.sock"), 250)
        );
        assert_eq!(conf.log_level, "debug");
    }

    #[test]
    fn errors_carry_the_spec_codes() {
        let code = |text: &str| NetConf::parse(text.as_bytes()).unwrap_err().code();
        assert_eq!(code("{nope"), 6);
        assert_eq!(code("[]"), 7);
        assert_eq!(code(r#"{"cniVersion":"0.2.0","name":"n","type":"t"}"#), 1);
        assert_eq!(code(r#"{"cniVersion":"1.0.0","type":"t"}"#), 7);
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","type":"t","timeout_ms":0}"#),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","type":"t","timeout_ms":"5"}"#),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","type":"t","agent_socket":"rel.sock"}"#),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","type":"t","log_level":"loud"}"#),
            7
        );
    }

    #[test]
    fn result_ips_keep_the_pods_addresses_only() {
        let result: Json = serde_json::from_str(
            r#"{"cniVersion":"1.0.0",
                "interfaces":[{"name":"cni0"},{"name":"veth1"},{"name":"eth0","sandbox":"/var/run/netns/x"}],
                "ips":[{"address":"10.22.0.5/16","gateway":"10.22.0.1","interface":2},
                       {"address":"fd00::5/64","interface":2},
                       {"address":"10.22.0.1/16","interface":0}]}"#,
        )
        .unwrap();
        let ips = result_ips(&result).unwrap();
        assert_eq!(
            ips,
            vec![
                "10.22.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        let bare: Json = serde_json::from_str(r#"{"ips":[{"address":"10.1.2.3/32"}]}"#).unwrap();
        assert_eq!(result_ips(&bare).unwrap().len(), 1);
        let bad: Json = serde_json::from_str(r#"{"ips":[{"address":"nope/3"}]}"#).unwrap();
        assert!(result_ips(&bad).is_err());
    }
}
