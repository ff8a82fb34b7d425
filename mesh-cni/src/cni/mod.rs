//! The CNI plugin: spec 1.0/1.1 commands, read from the environment and stdin, answered on
//! stdout (result or error object) with the exit status, as the container runtime expects.
//!
//! stdout is the result channel: nothing else may write there; logs go to stderr.

mod config;
mod env;
mod plugin;

pub use config::{
    result_ips, ConfigError, NetConf, DEFAULT_TIMEOUT_MS, LOG_LEVELS, MAX_TIMEOUT_MS,
};
pub use env::{CniEnv, Command, EnvError};
pub use plugin::{run, Output};

use std::{io, path::PathBuf};

use crate::handover::{ClientError, WireError};

/// The spec versions this plugin speaks (0.3.0 onwards: results with `ips[]`).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest supported version: used for output when the input names none.
pub const LATEST_VERSION: &str = "1.1.0";

/// The spec's well-known error codes, and this plugin's own (100 and up).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content.
    pub const DECODE_FAILED: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: the agent is not there (yet); the runtime retries.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD (the agent is down or not ready).
    pub const NOT_AVAILABLE: u32 = 50;
    /// The agent refused the pod (ADD): it is meshed but cannot be captured.
    pub const REFUSED: u32 = 100;
    /// CHECK: the pod should be captured and is not.
    pub const NOT_CAPTURED: u32 = 101;
}

/// Why an invocation failed; each variant maps to a CNI error code.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// The environment (code 4).
    #[error(transparent)]
    Env(#[from] EnvError),
    /// The configuration (codes 1, 6, 7).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// stdin could not be read (code 5).
    #[error("reading the network configuration from stdin: {0}")]
    Stdin(#[source] io::Error),
    /// `CNI_NETNS` could not be opened (code 5).
    #[error("cannot open the pod's network namespace {path}: {source}")]
    OpenNetns {
        /// `CNI_NETNS`.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// `CNI_NETNS` is not a network namespace (code 4).
    #[error("CNI_NETNS {path} is not a network namespace: {source}")]
    NotNetns {
        /// `CNI_NETNS`.
        path: PathBuf,
        /// What it is instead.
        source: WireError,
    },
    /// The agent could not be asked (code 11 when it is unreachable or slow, else 5).
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// ADD: the agent refused the pod (code 100).
    #[error("the mesh agent refused pod {pod}: {reason}")]
    Refused {
        /// `namespace/name`.
        pod: String,
        /// The agent's reason.
        reason: String,
    },
    /// CHECK: the pod should be captured and is not (code 101).
    #[error("pod {pod} is not captured by the mesh agent: {reason}")]
    NotCaptured {
        /// `namespace/name`.
        pod: String,
        /// The agent's reason.
        reason: String,
    },
    /// STATUS: the agent cannot take pods (code 50).
    #[error("the mesh agent is not ready: {0}")]
    NotReady(String),
    /// STATUS: the agent could not be asked (code 50).
    #[error("the mesh agent is unavailable: {0}")]
    Unavailable(#[source] ClientError),
}

impl CniError {
    /// The CNI error code.
    pub fn code(&self) -> u32 {
        match self {
            CniError::Env(_) | CniError::NotNetns { .. } => code::INVALID_ENV,
            CniError::Config(e) => e.code(),
            CniError::Agent(e) if e.is_unavailable() => code::TRY_AGAIN_LATER,
            CniError::Stdin(_) | CniError::OpenNetns { .. } | CniError::Agent(_) => {
                code::IO_FAILURE
            }
            CniError::Refused { .. } => code::REFUSED,
            CniError::NotCaptured { .. } => code::NOT_CAPTURED,
            CniError::NotReady(_) | CniError::Unavailable(_) => code::NOT_AVAILABLE,
        }
    }

    /// What the operator can do about it: the error object's `details`.
    fn details(&self) -> &'static str {
        match self {
            CniError::Agent(e) if e.is_unavailable() => {
                "the pod is not started unmeshed: the runtime retries ADD until mesh-agent on this node accepts it"
            }
            CniError::Agent(_) => "mesh-cni and mesh-agent may be of different versions",
            CniError::Refused { .. } => "the pod is meshed and could not be captured; the runtime retries ADD",
            CniError::NotCaptured { .. } => "the pod's capture is gone; the runtime may recreate the sandbox",
            CniError::NotReady(_) | CniError::Unavailable(_) => "pods are not started until mesh-agent answers",
            CniError::Env(_) | CniError::NotNetns { .. } | CniError::Stdin(_) | CniError::OpenNetns { .. } => {
                "the container runtime called mesh-cni with an unusable environment"
            }
            CniError::Config(_) => "fix the mesh-cni entry of the CNI configuration (mesh-cni install writes it)",
        }
    }

    /// The spec's error object, to print on stdout before exiting non-zero.
    pub fn to_json(&self, cni_version: &str) -> String {
        let object = serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code(),
            "msg": self.to_string(),
            "details": self.details(),
        });
        object.to_string()
    }
}

/// The answer to VERSION: the versions this plugin speaks, labelled with the caller's version.
pub fn version_info(cni_version: &str) -> String {
    serde_json::json!({ "cniVersion": cni_version, "supportedVersions": SUPPORTED_VERSIONS })
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_objects_follow_the_spec() {
        let error = CniError::Agent(ClientError::Connect {
            path: "/var/run/mesh/cni.sock".into(),
            source: io::Error::from_raw_os_error(2),
        });
        let json: serde_json::Value = serde_json::from_str(&error.to_json("1.0.0")).unwrap();
        assert_eq!(json["cniVersion"], "1.0.0");
        assert_eq!(json["code"], 11);
        let msg = json["msg"].as_str().unwrap();
        assert!(
            msg.contains("/var/run/mesh/cni.sock") && msg.contains("os error 2"),
            "{msg}"
        );
        assert!(json["details"].as_str().unwrap().contains("retries"));
        assert_eq!(
            CniError::from(EnvError::MissingPodArg("K8S_POD_NAME")).code(),
            4
        );
        assert_eq!(CniError::NotReady(String::new()).code(), 50);
    }

    #[test]
    fn version_lists_every_supported_version() {
        let json: serde_json::Value = serde_json::from_str(&version_info("0.4.0")).unwrap();
        assert_eq!(json["cniVersion"], "0.4.0");
        assert_eq!(
            json["supportedVersions"],
            serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }
}
