//! One invocation: environment and stdin in, stdout and exit status out. The binary is a thin
//! wrapper around [`run`]; tests call it with a map for the environment.

use std::{fs::File, os::fd::AsFd};

use super::{
    config::{result_ips, ConfigError, NetConf},
    env::{CniEnv, Command, EnvError},
    version_info, CniError, LATEST_VERSION, SUPPORTED_VERSIONS,
};
use crate::handover::{netns_inode, AgentStatus, Client, Verdict};

/// What the invocation prints on stdout and its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// A result, version information, an error object, or nothing.
    pub stdout: String,
    /// 0 on success, 1 on error (the error object says which).
    pub exit_code: i32,
}

impl Output {
    /// The output for `error`, labelled with the version of the configuration on stdin when it
    /// names a supported one (the spec's error object), logged on stderr.
    pub fn error(error: &CniError, stdin: &[u8]) -> Self {
        tracing::error!(code = error.code(), "{error}");
        Output {
            stdout: error.to_json(&caller_version(stdin)),
            exit_code: 1,
        }
    }
}

/// Runs one CNI invocation: `lookup` reads the environment, `stdin` is the network
/// configuration.
pub fn run(lookup: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Output {
    match dispatch(lookup, stdin) {
        Ok(stdout) => Output {
            stdout,
            exit_code: 0,
        },
        Err(error) => Output::error(&error, stdin),
    }
}

fn dispatch(lookup: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<String, CniError> {
    let env = CniEnv::from_lookup(lookup)?;
    if env.command == Command::Version {
        return Ok(version_info(&caller_version(stdin)));
    }
    let conf = NetConf::parse(stdin)?;
    match env.command {
        Command::Add => add(&env, &conf),
        Command::Del => Ok(del(&env, &conf)),
        Command::Check => check(&env, &conf),
        Command::Status => status(&conf),
        Command::Gc | Command::Version => Ok(String::new()),
    }
}

/// ADD: hand the pod and its namespace to the agent; pass `prevResult` through unless the
/// agent refuses, cannot be reached, or does not answer in time (then the pod does not start
/// and the runtime retries).
fn add(env: &CniEnv, conf: &NetConf) -> Result<String, CniError> {
    let prev = conf.prev_result.as_ref().ok_or(ConfigError::NotChained)?;
    let pod = env.pod(result_ips(prev)?)?;
    let path = env.netns.as_ref().ok_or(EnvError::Missing {
        var: "CNI_NETNS",
        command: "ADD",
    })?;
    let netns = File::open(path).map_err(|source| CniError::OpenNetns {
        path: path.clone(),
        source,
    })?;
    netns_inode(netns.as_fd()).map_err(|source| CniError::NotNetns {
        path: path.clone(),
        source,
    })?;
    let client = Client::connect(conf.socket(), conf.timeout)?;
    match client.add(&pod, netns.as_fd())? {
        Verdict::Captured => {
            tracing::info!(pod = %pod, ips = ?pod.ips, "pod captured by the mesh agent");
        }
        Verdict::NotMeshed => tracing::info!(pod = %pod, "pod not meshed"),
        Verdict::Refused { reason } => {
            return Err(CniError::Refused {
                pod: pod.to_string(),
                reason,
            })
        }
    }
    // A chained plugin that changes nothing returns the previous result as it came.
    Ok(serde_json::to_string(prev).expect("a JSON value always serializes"))
}

/// DEL: tell the agent, but never fail because of it: the sandbox must be able to go away
/// while the agent is down, and the agent re-learns its pods from the cluster.
fn del(env: &CniEnv, conf: &NetConf) -> String {
    let ips = conf
        .prev_result
        .as_ref()
        .and_then(|prev| result_ips(prev).ok())
        .unwrap_or_default();
    let pod = match env.pod(ips) {
        Ok(pod) => pod,
        Err(error) => {
            tracing::warn!(%error, "DEL without the pod's name; nothing to tell the mesh agent");
            return String::new();
        }
    };
    match Client::connect(conf.socket(), conf.timeout).and_then(|client| client.del(&pod)) {
        Ok(()) => tracing::info!(pod = %pod, "pod released by the mesh agent"),
        Err(error) => {
            tracing::warn!(pod = %pod, %error, "DEL not delivered to the mesh agent; it re-learns pods");
        }
    }
    String::new()
}

/// CHECK: the pod must be as the agent wants it (captured, or not meshed).
fn check(env: &CniEnv, conf: &NetConf) -> Result<String, CniError> {
    let ips = match &conf.prev_result {
        Some(prev) => result_ips(prev)?,
        None => Vec::new(),
    };
    let pod = env.pod(ips)?;
    let client = Client::connect(conf.socket(), conf.timeout)?;
    match client.check(&pod)? {
        Verdict::Captured | Verdict::NotMeshed => Ok(String::new()),
        Verdict::Refused { reason } => Err(CniError::NotCaptured {
            pod: pod.to_string(),
            reason,
        }),
    }
}

/// STATUS: ready only when the agent answers and says so, so the runtime reports the node's
/// network as not ready while the agent is down.
fn status(conf: &NetConf) -> Result<String, CniError> {
    let client = Client::connect(conf.socket(), conf.timeout).map_err(CniError::Unavailable)?;
    match client.status().map_err(CniError::Unavailable)? {
        AgentStatus::Ready => Ok(String::new()),
        AgentStatus::NotReady { reason } => Err(CniError::NotReady(reason)),
    }
}

/// The `cniVersion` on stdin when it is a supported one, else the latest (for VERSION and
/// error objects, which must be printed even when the configuration is unusable).
fn caller_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn run_with(pairs: &[(&str, &str)], stdin: &str) -> Output {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        run(|k| map.get(k).map(|v| (*v).to_owned()), stdin.as_bytes())
    }

    fn error_code(output: &Output) -> u64 {
        assert_eq!(output.exit_code, 1, "{output:?}");
        let json: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
        json["code"].as_u64().unwrap()
    }

    #[test]
    fn version_answers_without_a_configuration() {
        let out = run_with(&[("CNI_COMMAND", "VERSION")], "");
        assert_eq!(out.exit_code, 0);
        assert!(
            out.stdout.contains(r#""cniVersion":"1.1.0""#),
            "{}",
            out.stdout
        );
        let out = run_with(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.3.1"}"#);
        assert!(
            out.stdout.contains(r#""cniVersion":"0.3.1""#),
            "{}",
            out.stdout
        );
    }

    #[test]
    fn bad_invocations_get_error_objects() {
        assert_eq!(error_code(&run_with(&[], "{}")), 4);
        let conf = r#"{"cniVersion":"1.0.0","name":"k8s","type":"mesh-cni"}"#;
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/proc/self/ns/net"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b"),
        ];
        let out = run_with(&add, conf);
        assert_eq!(error_code(&out), 7, "ADD needs a prevResult");
        assert!(out.stdout.contains(r#""cniVersion":"1.0.0""#));
        assert_eq!(error_code(&run_with(&add, "not json")), 6);
        let out = run_with(&[("CNI_COMMAND", "GC")], conf);
        assert_eq!(
            out,
            Output {
                stdout: String::new(),
                exit_code: 0
            }
        );
    }
}
