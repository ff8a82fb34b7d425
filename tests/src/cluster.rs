//! Kubernetes-style objects for the agent's config directory, describing a testbed's pods the
//! way the API server would, plus the two annotations by which the local stand-in for the
//! container runtime tells the agent where a pod lives (`mesh.local/netns`, `mesh.local/cgroup`).
//!
//! Each object is its own file, written atomically (temporary dotfile, then rename), so an agent
//! polling the directory never reads half a file.

use std::{
    fmt::Write as _,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use crate::{Pod, Result};

/// Label that enrolls a namespace or pod (Istio ambient's).
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Annotation that opts a namespace's or pod's mesh legs into the `sk_msg` short-cut.
pub const SHORTCUT: &str = "mesh.local/sockmap-shortcut";

/// A config directory the tests write objects into.
#[derive(Debug)]
pub struct ClusterFiles {
    dir: PathBuf,
}

impl ClusterFiles {
    /// Creates (or empties) `dir`.
    pub fn new(dir: PathBuf) -> Result<Self> {
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(crate::io_err(format!("creating {}", dir.display())))?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `text` as file `name` atomically.
    pub fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, text).map_err(crate::io_err(format!("writing {}", tmp.display())))?;
        fs::rename(&tmp, &path)
            .map_err(crate::io_err(format!("renaming to {}", path.display())))?;
        Ok(path)
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        let path = self.dir.join(name);
        fs::remove_file(&path).map_err(crate::io_err(format!("removing {}", path.display())))
    }

    /// A namespace, enrolled in the mesh when `ambient`.
    pub fn namespace(&self, name: &str, ambient: bool) -> Result<PathBuf> {
        self.namespace_with(name, ambient, &[])
    }

    /// A namespace, enrolled in the mesh when `ambient`, with `annotations`.
    pub fn namespace_with(
        &self,
        name: &str,
        ambient: bool,
        annotations: &[(&str, &str)],
    ) -> Result<PathBuf> {
        let mut meta = String::new();
        if ambient {
            let _ = write!(meta, "\n  labels:\n    {DATAPLANE_MODE}: ambient");
        }
        if !annotations.is_empty() {
            meta.push_str("\n  annotations:");
            for (k, v) in annotations {
                let _ = write!(meta, "\n    {k}: \"{v}\"");
            }
        }
        self.write(
            &format!("namespace-{name}.yaml"),
            &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{meta}\n"),
        )
    }

    /// A testbed pod as a Pod object in `namespace`, with `labels` and its runtime annotations.
    pub fn pod(
        &self,
        pod: &Pod,
        node: &str,
        namespace: &str,
        labels: &[(&str, &str)],
    ) -> Result<PathBuf> {
        let mut text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  uid: {namespace}-{name}\n  annotations:\n    mesh.local/netns: /run/netns/{netns}\n    mesh.local/cgroup: {cgroup}\n",
            name = pod.name,
            netns = pod.netns,
            cgroup = pod.cgroup.display(),
        );
        text.push_str("  labels:\n");
        if !labels.iter().any(|(k, _)| *k == "app") {
            let _ = writeln!(text, "    app: {}", pod.name);
        }
        for (k, v) in labels {
            let _ = writeln!(text, "    {k}: \"{v}\"");
        }
        let _ = write!(
            text,
            "spec:\n  nodeName: {node}\n  serviceAccountName: sa-{name}\n  containers:\n  - name: app\n    image: mesh-probe\nstatus:\n  phase: Running\n  podIP: {v4}\n  podIPs:\n  - ip: {v4}\n  - ip: {v6}\n",
            name = pod.name,
            v4 = pod.ipv4,
            v6 = pod.ipv6,
        );
        self.write(&format!("pod-{namespace}-{}.yaml", pod.name), &text)
    }

    /// A `ClusterIP` service selecting pods by `selector` (a label `key=value`).
    pub fn service(
        &self,
        namespace: &str,
        name: &str,
        vips: &[IpAddr],
        port: u16,
        target_port: u16,
        selector: (&str, &str),
    ) -> Result<PathBuf> {
        let mut text = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  clusterIP: {first}\n  clusterIPs:\n",
            first = vips.first().map(ToString::to_string).unwrap_or_default(),
        );
        for vip in vips {
            let _ = writeln!(text, "  - {vip}");
        }
        let _ = write!(
            text,
            "  ports:\n  - name: tcp\n    port: {port}\n    targetPort: {target_port}\n    protocol: TCP\n  selector:\n    {}: \"{}\"\n",
            selector.0, selector.1
        );
        self.write(&format!("service-{namespace}-{name}.yaml"), &text)
    }

    /// A `security.istio.io/v1` `PeerAuthentication` with `mode` (`STRICT`, `PERMISSIVE`, ...),
    /// for the workloads of `namespace` whose labels include all of `match_labels` (the whole
    /// namespace when empty; the whole mesh in the root namespace). Written to
    /// [`Self::peer_authentication_file`], so writing it again with another mode replaces it.
    pub fn peer_authentication(
        &self,
        namespace: &str,
        name: &str,
        mode: &str,
        match_labels: &[(&str, &str)],
    ) -> Result<PathBuf> {
        let mut text = format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n"
        );
        if !match_labels.is_empty() {
            text.push_str("  selector:\n    matchLabels:\n");
            for (k, v) in match_labels {
                let _ = writeln!(text, "      {k}: \"{v}\"");
            }
        }
        let _ = writeln!(text, "  mtls:\n    mode: {mode}");
        self.write(&Self::peer_authentication_file(namespace, name), &text)
    }

    /// File name of the `PeerAuthentication` `namespace/name` (for [`Self::remove`]).
    pub fn peer_authentication_file(namespace: &str, name: &str) -> String {
        format!("peer-authentication-{namespace}-{name}.yaml")
    }
}

impl Drop for ClusterFiles {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
