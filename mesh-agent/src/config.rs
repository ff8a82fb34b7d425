//! The agent's configuration: parsed once from the command line into [`AgentConfig`], validated,
//! and logged at start.

use std::{
    collections::HashSet,
    fmt,
    path::{Path, PathBuf},
};

use nix::sys::statfs::{statfs, BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC};

/// Default directory under which the agent pins its maps (one subdirectory per node name).
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/mesh-agent";

/// Validated agent configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// Name of the node this agent serves (Kubernetes node name).
    pub node_name: String,
    /// bpffs directory that holds this agent's pinned maps. Created at start.
    pub bpffs_dir: PathBuf,
    /// cgroup v2 directories of the pods whose sockets the programs observe.
    pub cgroups: Vec<PathBuf>,
    /// Leave the pins in place at a clean shutdown (for a restart that adopts them).
    pub keep_pins: bool,
}

/// What is wrong with a configuration. Each variant names the offending value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("node name {0:?} is not a valid DNS label (1-63 of a-z, 0-9, '-', not starting or ending with '-')")]
    NodeName(String),
    #[error("bpffs directory {path}: no part of this path is on a bpf filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`, or run `cargo xtask setup`)")]
    NotBpffs { path: PathBuf },
    #[error("cgroup {path}: {source}")]
    CgroupUnreadable { path: PathBuf, source: nix::Error },
    #[error(
        "cgroup {path} is not a cgroup v2 directory (mount cgroup2 and give a directory inside it)"
    )]
    NotCgroup2 { path: PathBuf },
    #[error("cgroup {path} is listed twice")]
    DuplicateCgroup { path: PathBuf },
}

impl AgentConfig {
    /// Checks every field against the machine: names, file systems, duplicates.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if !is_dns_label(&self.node_name) {
            return Err(ConfigError::NodeName(self.node_name));
        }
        if !on_bpffs(&self.bpffs_dir) {
            return Err(ConfigError::NotBpffs {
                path: self.bpffs_dir,
            });
        }
        let mut seen = HashSet::new();
        for path in &self.cgroups {
            let fs = statfs(path).map_err(|source| ConfigError::CgroupUnreadable {
                path: path.clone(),
                source,
            })?;
            if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
                return Err(ConfigError::NotCgroup2 { path: path.clone() });
            }
            if !seen.insert(path) {
                return Err(ConfigError::DuplicateCgroup { path: path.clone() });
            }
        }
        Ok(self)
    }
}

impl fmt::Display for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node={} bpffs_dir={} keep_pins={} cgroups=[",
            self.node_name,
            self.bpffs_dir.display(),
            self.keep_pins
        )?;
        for (i, c) in self.cgroups.iter().enumerate() {
            write!(f, "{}{}", if i == 0 { "" } else { ", " }, c.display())?;
        }
        f.write_str("]")
    }
}

/// RFC 1123 label, as Kubernetes requires for node names' components.
fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// True when `path`, or its closest existing ancestor, is on bpffs (the directory itself may not
/// exist yet; the agent creates it).
fn on_bpffs(path: &Path) -> bool {
    path.ancestors()
        .find(|p| p.exists())
        .and_then(|p| statfs(p).ok())
        .is_some_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(node: &str) -> AgentConfig {
        AgentConfig {
            node_name: node.into(),
            bpffs_dir: "/nonexistent".into(),
            cgroups: vec![],
            keep_pins: false,
        }
    }

    #[test]
    fn dns_labels() {
        for ok in ["n0", "node-1", "a", &"x".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "Node", "a_b", "a.b", &"x".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn bad_node_name_is_named_in_the_error() {
        let err = config("Bad_Name").validate().unwrap_err();
        assert!(err.to_string().contains("\"Bad_Name\""), "{err}");
    }

    #[test]
    fn bpffs_dir_off_bpffs_is_rejected() {
        // `/tmp` is never a bpf filesystem.
        let mut c = config("n0");
        c.bpffs_dir = "/tmp/mesh-agent-config-test/does-not-exist".into();
        let err = c.validate().unwrap_err();
        assert!(matches!(err, ConfigError::NotBpffs { .. }), "{err}");
        assert!(
            err.to_string().contains("/tmp/mesh-agent-config-test"),
            "{err}"
        );
    }

    #[test]
    fn display_lists_every_field() {
        let mut c = config("n0");
        c.cgroups = vec!["/a".into(), "/b".into()];
        assert_eq!(
            c.to_string(),
            "node=n0 bpffs_dir=/nonexistent keep_pins=false cgroups=[/a, /b]"
        );
    }
}
