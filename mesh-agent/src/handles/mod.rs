//! Runtime handles on Kubernetes: where each pod of this node lives (its network namespace, as
//! an open descriptor, and its cgroup v2 directory), learnt from the container runtime's
//! hand-over (`mesh-cni`, [`cni`]) — never from the Pod object, whose annotations its author
//! writes.
//!
//! The store is keyed by the pod's UID, so a pod deleted and created again under the same name
//! never inherits its predecessor's namespace. The pod's cgroup is found from its UID in the
//! kubelet's layouts ([`find_pod_cgroup`]), as Cilium does: `kubepods/[burstable|besteffort/]
//! pod<uid>` (cgroupfs driver) or `kubepods.slice/kubepods[-<qos>].slice/kubepods[-<qos>]-pod<uid
//! with _>.slice` (systemd driver), below the `--kubepods-cgroup` root.

pub mod cni;
pub mod procfs;

use std::{
    collections::HashMap,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use mesh_cluster::Workload;
use tokio::sync::watch;

use crate::{netns::NetnsRef, pods::DesiredPod};

/// Where one pod lives.
#[derive(Clone, Debug)]
pub struct PodHandles {
    pub netns: Arc<OwnedFd>,
    pub cgroup: PathBuf,
    /// Who told: `cni` (the hand-over) or `proc` (the scan of running processes).
    pub from: &'static str,
    /// The addresses the runtime gave the pod (the CNI result), used until the Pod's status
    /// in the API has them (kubelet writes it after the sandbox is set up).
    pub ips: Vec<std::net::IpAddr>,
}

/// The handles of this node's pods, by pod UID; every change bumps a version the serving loop
/// waits on.
#[derive(Debug)]
pub struct HandleStore {
    pods: Mutex<HashMap<String, PodHandles>>,
    changed: watch::Sender<u64>,
    kubepods: PathBuf,
}

impl HandleStore {
    /// A store whose pods' cgroups are found below `kubepods` (the cgroup2 mount, or the
    /// directory holding the kubelet's `kubepods` tree).
    pub fn new(kubepods: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            pods: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(0),
            kubepods,
        })
    }

    /// The root below which pods' cgroups are looked for.
    pub fn kubepods(&self) -> &Path {
        &self.kubepods
    }

    /// Records where pod `uid` lives.
    pub fn insert(&self, uid: &str, handles: PodHandles) {
        self.lock().insert(uid.to_owned(), handles);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Forgets pod `uid` (its sandbox is gone).
    pub fn remove(&self, uid: &str) {
        if self.lock().remove(uid).is_some() {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    pub fn get(&self, uid: &str) -> Option<PodHandles> {
        self.lock().get(uid).cloned()
    }

    /// Resolves when the store changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PodHandles>> {
        self.pods.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the agent needs to capture enrolled pod `w` of this node: its handles, or why they
    /// are not known (then it is reported uncaptured and retried).
    pub fn desired(&self, w: &Workload) -> DesiredPod {
        let handles = w.uid.as_deref().and_then(|uid| {
            self.get(uid).or_else(|| {
                // Running before the agent (or enrolled later): found from /proc, then kept.
                let found = procfs::discover(&self.kubepods, uid)?;
                tracing::info!(pod = %w, cgroup = %found.cgroup.display(), "running pod found from /proc");
                self.lock().insert(uid.to_owned(), found.clone());
                Some(found)
            })
        });
        let ips = match (&handles, w.ips.is_empty()) {
            (Some(h), true) => h.ips.clone(),
            _ => w.ips.clone(),
        };
        let (netns, cgroup) = match handles {
            Some(h) => (
                NetnsRef::Fd {
                    fd: h.netns,
                    from: h.from,
                },
                h.cgroup,
            ),
            None => (
                NetnsRef::Unknown(
                    "no hand-over from the CNI plugin for this pod (UID) yet, and no process in its cgroup"
                        .to_owned(),
                ),
                PathBuf::new(),
            ),
        };
        DesiredPod {
            name: w.to_string(),
            netns,
            cgroup,
            ips,
            identity: w.identity.clone(),
            shortcut: w.shortcut,
        }
    }
}

/// The cgroup directory of pod `uid`, in the kubelet's cgroupfs or systemd layout (every
/// quality-of-service class). `root` is the kubepods directory itself (`--kubepods-cgroup
/// /sys/fs/cgroup/kubepods`) or a directory holding it (the cgroup2 mount: `kubepods`,
/// `kubepods.slice`, or kind's `kubelet/kubepods`, `kubelet.slice/kubelet-kubepods.slice`).
/// `None` if there is none.
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return None; // a UID is a UUID: never a path component of another shape
    }
    let systemd_uid = uid.replace('-', "_");
    let in_kubepods = |dir: PathBuf| {
        let mut candidates = vec![dir.join(format!("pod{uid}"))];
        for qos in ["burstable", "besteffort"] {
            candidates.push(dir.join(qos).join(format!("pod{uid}")));
        }
        // systemd: slice names carry their parents' prefix (kubepods-burstable-pod<uid>.slice).
        let prefix = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".slice"))
            .unwrap_or("kubepods")
            .to_owned();
        candidates.push(dir.join(format!("{prefix}-pod{systemd_uid}.slice")));
        for qos in ["burstable", "besteffort"] {
            candidates.push(dir.join(format!(
                "{prefix}-{qos}.slice/{prefix}-{qos}-pod{systemd_uid}.slice"
            )));
        }
        candidates
    };
    let mut candidates = in_kubepods(root.to_path_buf());
    for tree in [
        "kubepods",
        "kubepods.slice",
        "kubelet/kubepods",
        "kubelet.slice/kubelet-kubepods.slice",
    ] {
        candidates.extend(in_kubepods(root.join(tree)));
    }
    candidates.into_iter().find(|dir| dir.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cgroups_are_found_in_every_kubelet_layout_and_only_for_uuids() {
        let root = std::env::temp_dir().join(format!("mesh-agent-kubepods-{}", std::process::id()));
        let uid = "0b7a3c1e-2f4d-4e6a-9b8c-1d2e3f405162";
        let under = |rel: &str| {
            let dir = root.join(rel);
            std::fs::create_dir_all(&dir).unwrap();
            dir
        };
        let systemd_uid = uid.replace('-', "_");
        for rel in [
            format!("kubepods/pod{uid}"),
            format!("kubepods/burstable/pod{uid}"),
            format!("kubepods/besteffort/pod{uid}"),
            format!("kubepods.slice/kubepods-pod{systemd_uid}.slice"),
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice"
            ),
            format!("kubelet/kubepods/besteffort/pod{uid}"),
            format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{systemd_uid}.slice"),
        ] {
            let dir = under(&rel);
            assert_eq!(find_pod_cgroup(&root, uid), Some(dir.clone()), "{rel}");
            std::fs::remove_dir(&dir).unwrap();
        }
        assert_eq!(find_pod_cgroup(&root, uid), None);
        // The kubepods directory itself as the root.
        let dir = under(&format!("kubepods/burstable/pod{uid}"));
        assert_eq!(
            find_pod_cgroup(&root.join("kubepods"), uid),
            Some(dir.clone())
        );
        std::fs::remove_dir(&dir).unwrap();
        under("kubepods/pod..");
        assert_eq!(find_pod_cgroup(&root, ".."), None, "not a UID");
        assert_eq!(find_pod_cgroup(&root, ""), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
