//! Pods that already run (the agent started after them, or their namespace was enrolled
//! later) never pass through the CNI plugin again: their handles are found from the node's
//! `/proc`, as Istio's node agent does, with its safeguards.
//!
//! The pod's cgroup comes from its UID ([`super::find_pod_cgroup`]); its network namespace from
//! the **oldest** process in that cgroup tree (the sandbox's, started first; a later process
//! that made itself a namespace of its own does not win). Only processes of the pod's own
//! cgroup are considered, so a privileged process of another pod visiting this namespace, or
//! this pod's processes visiting another's, cannot pair the pod with the wrong namespace. The
//! namespace is then checked like any other (`pods::checks`): never the host's or the agent's,
//! and it must hold the pod's addresses.

use std::{
    fs,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{find_pod_cgroup, PodHandles};

/// The handles of running pod `uid` below `kubepods`, or `None` when its cgroup has no process
/// yet (a pod being created: the CNI hand-over brings it).
pub fn discover(kubepods: &Path, uid: &str) -> Option<PodHandles> {
    let cgroup = find_pod_cgroup(kubepods, uid)?;
    let pid = oldest_process(&cgroup)?;
    let netns = fs::File::open(format!("/proc/{pid}/ns/net")).ok()?;
    Some(PodHandles {
        netns: Arc::new(OwnedFd::from(netns)),
        cgroup,
        from: "proc",
        ips: Vec::new(),
    })
}

/// The process started first in `cgroup` or any cgroup below it.
fn oldest_process(cgroup: &Path) -> Option<u32> {
    let mut pids = Vec::new();
    collect_pids(cgroup, &mut pids, 0);
    pids.into_iter()
        .filter_map(|pid| start_time(pid).map(|start| (start, pid)))
        .min()
        .map(|(_, pid)| pid)
}

fn collect_pids(dir: &Path, pids: &mut Vec<u32>, depth: usize) {
    if depth > 8 {
        return; // pod → container → (rare) nested: never deeper
    }
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let children: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    for child in children {
        collect_pids(&child, pids, depth + 1);
    }
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_process_of_a_cgroup_tree_is_found() {
        // This process's own cgroup: it and its threads' process are in it.
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        let root =
            crate::config::cgroup2_root().expect("a cgroup v2 mount (run `cargo xtask setup`)");
        let dir = root.join(rel.trim_start_matches('/'));
        let oldest = oldest_process(&dir).expect("a process");
        let me = std::process::id();
        assert!(start_time(oldest).unwrap() <= start_time(me).unwrap());
    }

    #[test]
    fn start_time_reads_past_a_command_name_with_parentheses() {
        assert!(start_time(std::process::id()).is_some());
        assert_eq!(start_time(u32::MAX), None);
    }
}
