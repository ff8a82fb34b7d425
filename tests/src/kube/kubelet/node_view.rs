//! Each testbed node's own file system, as the node's processes see it. The nodes of a testbed
//! share one machine, but a `DaemonSet` names the same host paths on every node (its CNI
//! configuration directory, its hand-over socket, its cgroup root), which on real nodes are
//! different files. So every process the kubelet starts for a node (container launchers and CNI
//! plugins, both through the launcher `mtb-run`) runs in a mount namespace of its own in which the testbed-wide path
//! [`NodeView::root`] (`<testbed scratch>/node-root`) is that node's kubelet directory, and
//! `<root>/cgroup` is the node's kubepods cgroup. Everything else (the kernel's file systems,
//! `/proc`, bpffs, binaries) is the machine's. Charts installed on the testbed point their host
//! paths below [`NodeView::root`]; nothing outside the testbed's scratch directory is touched.

use std::path::{Path, PathBuf};

/// A node's view: where the shared path leads for this node.
#[derive(Clone, Debug)]
pub struct NodeView {
    root: PathBuf,
    dir: PathBuf,
    kubepods: PathBuf,
}

/// The name of the shared mount point below a testbed's scratch directory.
const ROOT_NAME: &str = "node-root";

impl NodeView {
    /// The view in which `<scratch>/node-root` is `dir` and `<scratch>/node-root/cgroup` is
    /// `kubepods`. Creates the mount points.
    pub fn new(scratch: &Path, dir: &Path, kubepods: &Path) -> std::io::Result<Self> {
        let root = Self::root_in(scratch);
        for d in [root.clone(), dir.join("cgroup"), dir.join("run")] {
            std::fs::create_dir_all(&d)?;
        }
        Ok(Self {
            root,
            dir: dir.to_path_buf(),
            kubepods: kubepods.to_path_buf(),
        })
    }

    /// The path every node sees as its own directory, for a testbed whose scratch directory is
    /// `scratch`.
    pub fn root_in(scratch: &Path) -> PathBuf {
        scratch.join(ROOT_NAME)
    }

    /// The shared path (the same on every node of the testbed).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a path as the node's processes see it is in the machine's file system (itself when
    /// it is outside the view).
    pub fn to_machine(&self, path: &Path) -> PathBuf {
        let Ok(rest) = path.strip_prefix(&self.root) else {
            return path.to_path_buf();
        };
        match rest.strip_prefix("cgroup") {
            Ok(below) => self.kubepods.join(below),
            Err(_) => self.dir.join(rest),
        }
    }

    /// The launcher's (`mtb-run`) flags that put the process it starts into the node's view:
    /// in its new mount namespace, the two bind mounts, before anything else.
    pub fn launcher_flags(&self) -> Vec<String> {
        vec![
            "--node-bind".into(),
            format!("{}:{}", self.dir.display(), self.root.display()),
            "--node-bind".into(),
            format!(
                "{}:{}",
                self.kubepods.display(),
                self.root.join("cgroup").display()
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_in_the_view_lead_to_the_node_s_directory_and_cgroup() {
        let view = NodeView {
            root: "/s/node-root".into(),
            dir: "/s/kubelet-a".into(),
            kubepods: "/cg/t/kubepods-a".into(),
        };
        assert_eq!(
            view.to_machine(Path::new("/s/node-root/cni/net.d")),
            Path::new("/s/kubelet-a/cni/net.d")
        );
        assert_eq!(
            view.to_machine(Path::new("/s/node-root/cgroup/burstable")),
            Path::new("/cg/t/kubepods-a/burstable")
        );
        assert_eq!(
            view.to_machine(Path::new("/s/node-root/cgroupx")),
            Path::new("/s/kubelet-a/cgroupx")
        );
        assert_eq!(
            view.to_machine(Path::new("/sys/fs/bpf")),
            Path::new("/sys/fs/bpf")
        );
    }
}
