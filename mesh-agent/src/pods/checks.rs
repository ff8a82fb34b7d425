//! Checks of a pod's runtime handles before the agent attaches anything to them. Whatever
//! source names a pod's network namespace, cgroup and addresses (the config directory today, the
//! CNI plugin and a `/proc` scan later), a wrong one must be refused, never used: the agent's own
//! or the host's namespace would have the agent capture the node's traffic, an address of the
//! node's would relay the node's inbound connections under the pod's identity, and a cgroup
//! that contains the agent would have it capture its own connections in a loop.
//!
//! The cluster model already refuses addresses that can never be a pod's (unspecified,
//! loopback, link-local, multicast); these checks need the running system.

use std::{
    collections::HashSet,
    fs, io,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::netns::{Netns, NetnsError};

/// A network namespace's identity: the device and inode of its `nsfs` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

impl NsId {
    fn of(path: &Path) -> io::Result<Self> {
        Ok(Self::from_metadata(&fs::metadata(path)?))
    }

    /// Of an open namespace: `fstat` on its descriptor, so a path that changed meaning since
    /// it was opened (or a descriptor without a path) cannot mislead the check.
    fn of_open(netns: &Netns) -> io::Result<Self> {
        Ok(Self::from_metadata(&netns.file().metadata()?))
    }

    fn from_metadata(m: &fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// Why a pod's runtime handles were refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("its network namespace {path} is the agent's own")]
    AgentNetns { path: PathBuf },
    #[error("its network namespace {path} is the host's")]
    HostNetns { path: PathBuf },
    #[error("its network namespace {path} is also pod {other}'s")]
    SharedNetns { path: PathBuf, other: String },
    #[error("its address {ip} is not configured in its network namespace {path}")]
    AddressNotInNetns { ip: IpAddr, path: PathBuf },
    #[error("its address {ip} is one of this node's own")]
    NodeAddress { ip: IpAddr },
    #[error("its cgroup {path} is the cgroup v2 root")]
    CgroupRoot { path: PathBuf },
    #[error("its cgroup {path} contains the agent's own cgroup {agent}")]
    ContainsAgent { path: PathBuf, agent: PathBuf },
    #[error("its cgroup {path} overlaps pod {other}'s cgroup {other_path}")]
    CgroupOverlap {
        path: PathBuf,
        other: String,
        other_path: PathBuf,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// The cookie of the host's (the initial) network namespace: it is the first one the kernel
/// creates, and cookies count up from 1.
pub const INIT_NETNS_COOKIE: u64 = 1;

/// What the agent knows about its own place on the node.
#[derive(Debug)]
pub struct Host {
    own_netns: NsId,
    /// The host's, when `/proc/1/ns/net` can be read (else its cookie tells it).
    initial_netns: Option<NsId>,
    /// The agent's cgroup v2 directory, canonical.
    agent_cgroup: PathBuf,
    /// The cgroup v2 mount point, canonical.
    cgroup_root: PathBuf,
    /// The addresses configured in the agent's (the node's) network namespace.
    node_addresses: HashSet<IpAddr>,
}

/// Another pod this agent captures: its name, namespace and cgroup.
#[derive(Debug)]
pub struct Other<'a> {
    pub name: &'a str,
    pub netns: NsId,
    pub cgroup: &'a Path,
}

impl Host {
    /// Reads the agent's namespace (`/proc/self/ns/net`), the host's (`/proc/1/ns/net`), its
    /// cgroup `agent_cgroup` under the cgroup v2 mount `cgroup_root`, and the node's addresses.
    pub fn discover(agent_cgroup: &Path, cgroup_root: &Path) -> Result<Self, Refusal> {
        let ns = |path: &'static str| {
            NsId::of(Path::new(path)).map_err(|source| Refusal::Io {
                what: "reading network namespace",
                path: path.into(),
                source,
            })
        };
        let canonical = |path: &Path| {
            fs::canonicalize(path).map_err(|source| Refusal::Io {
                what: "resolving cgroup",
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(Self {
            own_netns: ns("/proc/self/ns/net")?,
            initial_netns: NsId::of(Path::new("/proc/1/ns/net")).ok(),
            agent_cgroup: canonical(agent_cgroup)?,
            cgroup_root: canonical(cgroup_root)?,
            node_addresses: local_addresses().map_err(|source| Refusal::Io {
                what: "listing the addresses of",
                path: "the agent's network namespace".into(),
                source,
            })?,
        })
    }

    /// The identity of the namespace `netns` (whose cookie is `cookie`), refused if it is the
    /// agent's or the host's.
    pub fn check_netns(&self, netns: &Netns, cookie: u64) -> Result<NsId, Refusal> {
        let id = NsId::of_open(netns).map_err(|source| Refusal::Io {
            what: "reading network namespace",
            path: netns.path().to_path_buf(),
            source,
        })?;
        let path = netns.path().to_path_buf();
        if id == self.own_netns {
            return Err(Refusal::AgentNetns { path });
        }
        if self.initial_netns == Some(id) || cookie == INIT_NETNS_COOKIE {
            return Err(Refusal::HostNetns { path });
        }
        Ok(id)
    }

    /// Every one of `ips` is configured in `netns` and none is the node's.
    pub fn check_addresses(&self, netns: &Netns, ips: &[IpAddr]) -> Result<(), Refusal> {
        if let Some(ip) = ips.iter().find(|ip| self.node_addresses.contains(ip)) {
            return Err(Refusal::NodeAddress { ip: *ip });
        }
        let in_pod = netns.run(local_addresses)?;
        match ips.iter().find(|ip| !in_pod.contains(ip)) {
            Some(ip) => Err(Refusal::AddressNotInNetns {
                ip: *ip,
                path: netns.path().to_path_buf(),
            }),
            None => Ok(()),
        }
    }

    /// The canonical path of `cgroup`, refused if it is the root, contains the agent, or
    /// overlaps (contains or is inside) another captured pod's.
    pub fn check_cgroup<'a>(
        &self,
        cgroup: &Path,
        others: impl IntoIterator<Item = Other<'a>>,
    ) -> Result<PathBuf, Refusal> {
        let path = fs::canonicalize(cgroup).map_err(|source| Refusal::Io {
            what: "resolving cgroup",
            path: cgroup.to_path_buf(),
            source,
        })?;
        if path == self.cgroup_root {
            return Err(Refusal::CgroupRoot { path });
        }
        if self.agent_cgroup.starts_with(&path) {
            return Err(Refusal::ContainsAgent {
                path,
                agent: self.agent_cgroup.clone(),
            });
        }
        for other in others {
            if path.starts_with(other.cgroup) || other.cgroup.starts_with(&path) {
                return Err(Refusal::CgroupOverlap {
                    path,
                    other: other.name.to_owned(),
                    other_path: other.cgroup.to_path_buf(),
                });
            }
        }
        Ok(path)
    }
}

/// Refuses `netns` if another captured pod has it.
pub fn check_shared_netns<'a>(
    netns: &Netns,
    id: NsId,
    others: impl IntoIterator<Item = Other<'a>>,
) -> Result<(), Refusal> {
    match others.into_iter().find(|o| o.netns == id) {
        Some(other) => Err(Refusal::SharedNetns {
            path: netns.path().to_path_buf(),
            other: other.name.to_owned(),
        }),
        None => Ok(()),
    }
}

/// The addresses configured on the interfaces of the calling thread's network namespace
/// (IPv4-mapped IPv6 folded into IPv4, as the cluster model keeps them).
fn local_addresses() -> io::Result<HashSet<IpAddr>> {
    crate::node_addrs::local_addresses().map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(agent_cgroup: &Path, root: &Path) -> Host {
        Host {
            own_netns: NsId { dev: 1, ino: 10 },
            initial_netns: Some(NsId { dev: 1, ino: 11 }),
            agent_cgroup: agent_cgroup.to_path_buf(),
            cgroup_root: root.to_path_buf(),
            node_addresses: ["198.18.0.1".parse().unwrap()].into_iter().collect(),
        }
    }

    fn other<'a>(name: &'a str, cgroup: &'a Path) -> Other<'a> {
        Other {
            name,
            netns: NsId { dev: 0, ino: 0 },
            cgroup,
        }
    }

    /// Real directories standing for a cgroup tree (only the paths' shapes matter here).
    fn tree() -> (PathBuf, PathBuf, PathBuf, PathBuf) {
        let root = std::env::temp_dir().join(format!("mesh-checks-{}", std::process::id()));
        let node = root.join("node");
        let agent = node.join("agent");
        let pod = node.join("pod-a");
        for d in [&agent, &pod, &pod.join("container")] {
            fs::create_dir_all(d).unwrap();
        }
        let canonical = |p: &Path| fs::canonicalize(p).unwrap();
        (
            canonical(&root),
            canonical(&node),
            canonical(&agent),
            canonical(&pod),
        )
    }

    #[test]
    fn cgroups_that_are_the_root_contain_the_agent_or_overlap_a_pod_are_refused() {
        let (root, node, agent, pod) = tree();
        let h = host(&agent, &root);
        assert_eq!(h.check_cgroup(&pod, []).unwrap(), pod);
        let e = h.check_cgroup(&root, []).unwrap_err();
        assert!(matches!(e, Refusal::CgroupRoot { .. }), "{e}");
        for contains in [&node, &agent] {
            let e = h.check_cgroup(contains, []).unwrap_err();
            assert!(matches!(e, Refusal::ContainsAgent { .. }), "{e}");
            assert!(
                e.to_string().contains("contains the agent's own cgroup"),
                "{e}"
            );
        }
        // A cgroup inside another pod's, and one that contains it.
        let inner = pod.join("container");
        let e = h.check_cgroup(&inner, [other("shop/a", &pod)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "its cgroup {} overlaps pod shop/a's cgroup {}",
                inner.display(),
                pod.display()
            )
        );
        let e = h.check_cgroup(&pod, [other("shop/b", &inner)]).unwrap_err();
        assert!(matches!(e, Refusal::CgroupOverlap { .. }), "{e}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_agents_and_the_hosts_namespaces_are_refused() {
        let own = Netns::open(Path::new("/proc/self/ns/net")).unwrap();
        let real = Host {
            own_netns: NsId::of(Path::new("/proc/self/ns/net")).unwrap(),
            initial_netns: None,
            agent_cgroup: PathBuf::from("/nonexistent/agent"),
            cgroup_root: PathBuf::from("/nonexistent"),
            node_addresses: HashSet::new(),
        };
        let e = real.check_netns(&own, 42).unwrap_err();
        assert_eq!(
            e.to_string(),
            "its network namespace /proc/self/ns/net is the agent's own"
        );
        // The host's is known by its cookie even where /proc/1 cannot be read.
        let elsewhere = Host {
            own_netns: NsId { dev: 0, ino: 0 },
            ..real
        };
        let e = elsewhere.check_netns(&own, INIT_NETNS_COOKIE).unwrap_err();
        assert!(matches!(e, Refusal::HostNetns { .. }), "{e}");
        elsewhere.check_netns(&own, 42).unwrap();
    }

    #[test]
    fn node_addresses_and_addresses_missing_from_the_namespace_are_refused() {
        let own = Netns::open(Path::new("/proc/self/ns/net")).unwrap();
        let h = host(Path::new("/nonexistent/agent"), Path::new("/nonexistent"));
        let e = h
            .check_addresses(&own, &["198.18.0.1".parse().unwrap()])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "its address 198.18.0.1 is one of this node's own"
        );
        // The test's own namespace has loopback; 192.0.2.7 (TEST-NET-1) is nowhere.
        h.check_addresses(&own, &["127.0.0.1".parse().unwrap()])
            .unwrap();
        let e = h
            .check_addresses(&own, &["192.0.2.7".parse().unwrap()])
            .unwrap_err();
        assert!(matches!(e, Refusal::AddressNotInNetns { .. }), "{e}");
    }
}
