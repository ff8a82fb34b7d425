//! The CNI environment: `CNI_COMMAND` and the variables each command requires (CNI spec 1.1,
//! "Parameters").

use std::path::PathBuf;

use crate::handover::PodRef;

/// What is wrong with the environment; reported with code 4 ("invalid necessary environment
/// variables").
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// A variable the command requires is missing or empty.
    #[error("{var} is required for {command}")]
    Missing {
        /// The variable.
        var: &'static str,
        /// The command that needs it.
        command: &'static str,
    },
    /// `CNI_COMMAND` names no command this plugin knows.
    #[error("unknown CNI_COMMAND {0:?} (expected ADD, DEL, CHECK, STATUS, GC or VERSION)")]
    UnknownCommand(String),
    /// A variable's value breaks the spec's rules.
    #[error("{var}={value:?}: {reason}")]
    Invalid {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A `CNI_ARGS` entry is not `KEY=VALUE`.
    #[error("CNI_ARGS entry {0:?} is not KEY=VALUE")]
    MalformedArgs(String),
    /// A Kubernetes key the command needs is missing from `CNI_ARGS`.
    #[error("CNI_ARGS has no {0}: the pod cannot be named to the mesh agent")]
    MissingPodArg(&'static str),
}

/// The CNI operations. `GC` (spec 1.1) is accepted and does nothing: the agent keeps no state
/// the runtime must collect (it re-learns pods from the cluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// A sandbox's network was set up by the plugins before us.
    Add,
    /// A sandbox is going away.
    Del,
    /// Is the sandbox's network still as ADD left it?
    Check,
    /// Can the plugin serve ADD (is the agent up)?
    Status,
    /// Garbage collection of stale attachments.
    Gc,
    /// Which spec versions the plugin speaks.
    Version,
}

impl Command {
    /// The command as `CNI_COMMAND` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }
}

/// The environment of one invocation, checked against what its command requires.
#[derive(Debug, Clone)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (ADD, DEL, CHECK).
    pub container_id: Option<String>,
    /// `CNI_NETNS` (ADD, CHECK; optional for DEL).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME` (ADD, DEL, CHECK).
    pub ifname: Option<String>,
    /// `CNI_ARGS`, in order.
    pub args: Vec<(String, String)>,
    /// `CNI_PATH` (ADD, DEL, CHECK); not used, as this plugin delegates to no other.
    pub path: Option<String>,
}

impl CniEnv {
    /// Reads the environment through `lookup` (the process environment in the binary, a map in
    /// tests) and checks the variables `CNI_COMMAND` requires.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let get = |var: &str| lookup(var).filter(|v| !v.is_empty());
        let raw = get("CNI_COMMAND").ok_or(EnvError::Missing {
            var: "CNI_COMMAND",
            command: "any call",
        })?;
        let command = match raw.as_str() {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return Err(EnvError::UnknownCommand(raw)),
        };
        let env = CniEnv {
            command,
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS").map(PathBuf::from),
            ifname: get("CNI_IFNAME"),
            args: parse_args(&get("CNI_ARGS").unwrap_or_default())?,
            path: get("CNI_PATH"),
        };
        let needs_sandbox = matches!(command, Command::Add | Command::Del | Command::Check);
        let name = command.name();
        if needs_sandbox {
            let id = env.container_id.as_deref().ok_or(EnvError::Missing {
                var: "CNI_CONTAINERID",
                command: name,
            })?;
            check_container_id(id)?;
            let ifname = env.ifname.as_deref().ok_or(EnvError::Missing {
                var: "CNI_IFNAME",
                command: name,
            })?;
            check_ifname(ifname)?;
            env.path.as_ref().ok_or(EnvError::Missing {
                var: "CNI_PATH",
                command: name,
            })?;
        }
        if matches!(command, Command::Add | Command::Check) && env.netns.is_none() {
            return Err(EnvError::Missing {
                var: "CNI_NETNS",
                command: name,
            });
        }
        Ok(env)
    }

    /// The value of `key` in `CNI_ARGS` (the last one when repeated).
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The pod as the agent knows it: namespace and name (required) and uid from `CNI_ARGS`,
    /// sandbox and interface from the environment, and the given addresses.
    pub fn pod(&self, ips: Vec<std::net::IpAddr>) -> Result<PodRef, EnvError> {
        let namespace = self
            .arg("K8S_POD_NAMESPACE")
            .ok_or(EnvError::MissingPodArg("K8S_POD_NAMESPACE"))?;
        let name = self
            .arg("K8S_POD_NAME")
            .ok_or(EnvError::MissingPodArg("K8S_POD_NAME"))?;
        let command = self.command.name();
        Ok(PodRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: self.arg("K8S_POD_UID").map(str::to_owned),
            container_id: self.container_id.clone().ok_or(EnvError::Missing {
                var: "CNI_CONTAINERID",
                command,
            })?,
            ifname: self.ifname.clone().ok_or(EnvError::Missing {
                var: "CNI_IFNAME",
                command,
            })?,
            ips,
            netns_path: self.netns.as_ref().map(|p| p.display().to_string()),
        })
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;` (empty entries skipped, unknown keys kept
/// and ignored, as runtimes set `IgnoreUnknown=1`).
fn parse_args(raw: &str) -> Result<Vec<(String, String)>, EnvError> {
    raw.split(';')
        .filter(|entry| !entry.is_empty())
        .map(|entry| match entry.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
            _ => Err(EnvError::MalformedArgs(entry.to_owned())),
        })
        .collect()
}

/// Spec: "must not be empty; must start with an alphanumeric character, optionally followed
/// by any combination of one or more alphanumeric characters, underscore, dot or hyphen".
fn check_container_id(id: &str) -> Result<(), EnvError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else {
        Err(EnvError::Invalid {
            var: "CNI_CONTAINERID",
            value: id.to_owned(),
            reason: "must be alphanumeric, then alphanumerics, '_', '.' or '-'",
        })
    }
}

/// Spec: a Linux interface name (at most 15 bytes, not `.` or `..`, no `/`, `:` or spaces).
fn check_ifname(name: &str) -> Result<(), EnvError> {
    let bad_char = name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if name.len() > 15 || name == "." || name == ".." || bad_char {
        Err(EnvError::Invalid {
            var: "CNI_IFNAME",
            value: name.to_owned(),
            reason: "not a valid interface name",
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<CniEnv, EnvError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        CniEnv::from_lookup(|k| map.get(k).cloned())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", "/var/run/netns/cni-1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=web-0;K8S_POD_UID=u-1;K8S_POD_INFRA_CONTAINER_ID=c0ffee"),
    ];

    #[test]
    fn add_reads_the_pod_from_cni_args() {
        let env = env(ADD).unwrap();
        assert_eq!(env.command, Command::Add);
        let pod = env.pod(vec!["10.0.0.7".parse().unwrap()]).unwrap();
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("mesh", "web-0")
        );
        assert_eq!(pod.uid.as_deref(), Some("u-1"));
        assert_eq!(pod.container_id, "c0ffee");
        assert_eq!(pod.netns_path.as_deref(), Some("/var/run/netns/cni-1"));
    }

    #[test]
    fn each_command_requires_its_variables() {
        let without = |var: &str| {
            env(&ADD
                .iter()
                .copied()
                .filter(|(k, _)| *k != var)
                .collect::<Vec<_>>())
        };
        for var in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"] {
            assert!(
                matches!(without(var), Err(EnvError::Missing { var: v, .. }) if v == var),
                "{var}"
            );
        }
        assert!(matches!(
            without("CNI_COMMAND"),
            Err(EnvError::Missing {
                var: "CNI_COMMAND",
                ..
            })
        ));
        let del = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/x"),
        ];
        assert!(
            env(&del).unwrap().netns.is_none(),
            "DEL may come without a netns"
        );
        assert_eq!(
            env(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
            Command::Version
        );
        assert_eq!(
            env(&[("CNI_COMMAND", "STATUS")]).unwrap().command,
            Command::Status
        );
        assert!(matches!(
            env(&[("CNI_COMMAND", "FROB")]),
            Err(EnvError::UnknownCommand(_))
        ));
    }

    #[test]
    fn bad_values_are_refused() {
        let with = |var: &str, value: &str| {
            env(&ADD
                .iter()
                .map(|&(k, v)| if k == var { (k, value) } else { (k, v) })
                .collect::<Vec<_>>())
        };
        assert!(matches!(
            with("CNI_CONTAINERID", "-abc"),
            Err(EnvError::Invalid { .. })
        ));
        assert!(matches!(
            with("CNI_IFNAME", "a-very-long-interface"),
            Err(EnvError::Invalid { .. })
        ));
        assert!(matches!(
            with("CNI_ARGS", "K8S_POD_NAME"),
            Err(EnvError::MalformedArgs(_))
        ));
        let no_name = with("CNI_ARGS", "K8S_POD_NAMESPACE=mesh").unwrap();
        assert!(matches!(
            no_name.pod(vec![]),
            Err(EnvError::MissingPodArg("K8S_POD_NAME"))
        ));
    }
}
