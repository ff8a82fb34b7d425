//! A real Kubernetes control plane for the privileged tests: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler of one pinned release (`tests/kube/go.mod`, built
//! by `cargo xtask setup` into `target/kube/bin/mesh-kcp`), with real TLS everywhere, RBAC and
//! the Node authorizer, service-account tokens, and the upstream Istio and Gateway API CRDs.
//!
//! Everything listens on 127.0.0.1 of the root network namespace, on free ports; nothing else
//! of the root namespace is touched. Processes in a testbed node's namespace reach the API
//! server through [`ControlPlane::expose_in`]. The processes run in the cgroup
//! `<cgroup2>/mesh-testbed/mtb-<pid>-<seq>` and keep their files in `$TMPDIR/mtb-<pid>-<seq>`,
//! named like a testbed's, so a killed test's leftovers are removed by the next sweep
//! ([`crate::sweep_stale`]) and noticed by `cargo xtask test`'s final check.

mod access;
mod agent_access;
mod ca_access;
mod components;
pub mod conformance;
mod control_plane;
mod crds;
pub mod dns;
mod forward;
pub mod install;
mod kubeconfig;
pub mod kubelet;
pub mod mesh;
mod objects;
mod pki;
mod scratch;

pub use agent_access::{agent_rbac_manifest, AGENT_ACCOUNT, AGENT_NAMESPACE, RELEASE};
pub use ca_access::{ca_access_manifest, CA_ACCOUNT, CA_AUDIENCE};
pub use components::{
    Component, Ports, KUBERNETES_SERVICE_IP, SERVICE_ACCOUNT_ISSUER, SERVICE_CIDR_V4,
    SERVICE_CIDR_V6,
};
pub use control_plane::ControlPlane;
pub use crds::FIELD_MANAGER;
pub use kubeconfig::Credentials;
pub use kubelet::{Kubelet, KubeletOptions};
pub use mesh::KubeMesh;
pub use objects::{eventually, now, register_node};
pub use pki::CertFiles;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

/// Environment variable naming another `mesh-kcp` binary to run.
pub const BINARY_ENV: &str = "MESH_KCP_BIN";

/// Everything that can go wrong starting or using the control plane. Each variant says what
/// was being done; a component that stopped carries its last lines of output.
#[derive(thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Testbed(#[from] crate::Error),
    #[error("the Kubernetes control plane cannot run: {0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Api { what: String, source: kube::Error },
    #[error("{what}: {source}")]
    Kubeconfig {
        what: String,
        source: kube::config::KubeconfigError,
    },
    #[error("making certificates: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("{component} exited ({status}) while {doing}; its last output:\n{output}")]
    Exited {
        component: &'static str,
        status: String,
        doing: String,
        output: String,
    },
    #[error("timed out after {after:?} waiting for {what}: {detail}")]
    Timeout {
        what: String,
        after: Duration,
        detail: String,
    },
    #[error("{what}: {detail}")]
    Invalid { what: String, detail: String },
}

/// `Debug` shows the message, as [`crate::Error`]'s does: tests `expect()` these errors.
impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The Go module that pins the control plane and the CRDs (`tests/kube`).
pub fn go_module_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kube")
}

/// Where `cargo xtask setup` puts `mesh-kcp`, relative to the workspace root.
pub const BINARY_PATH: &str = "target/kube/bin/mesh-kcp";

/// Where `cargo xtask setup` puts `helm` (built from `tests/helm`), relative to the workspace
/// root.
pub const HELM_PATH: &str = "target/kube/bin/helm";

/// The `helm` binary `cargo xtask setup` built.
pub fn helm_binary() -> Result<PathBuf> {
    built(HELM_PATH, "tests/helm", "")
}

/// Where `cargo xtask setup` puts the Gateway API conformance suite's test binary (built from
/// `tests/gamma`), relative to the workspace root.
pub const GAMMA_PATH: &str = "target/kube/bin/gamma-conformance";

/// The conformance suite's binary `cargo xtask setup` built.
pub fn gamma_binary() -> Result<PathBuf> {
    built(GAMMA_PATH, "tests/gamma", "")
}

/// The binary `cargo xtask setup` built at `path` (relative to the workspace root) from the Go
/// module `module`, or what to do (`or_else`: another way, if any).
fn built(path: &str, module: &str, or_else: &str) -> Result<PathBuf> {
    Ok(crate::built_tool(path, module, or_else)?)
}

/// The chart (`deploy/chart`).
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/chart")
}

/// The chart's `templates` as `helm template` renders them (release [`RELEASE`] in
/// [`AGENT_NAMESPACE`], default values); `what` names them in errors.
pub fn helm_template(templates: &[&str], what: &str) -> Result<String> {
    let helm = helm_binary()?;
    let mut command = std::process::Command::new(&helm);
    command
        .args(["template", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", AGENT_NAMESPACE]);
    for template in templates {
        command.args(["--show-only", &format!("templates/{template}")]);
    }
    let out = command
        .output()
        .map_err(|e| Error::Setup(format!("running {}: {e}", helm.display())))?;
    if !out.status.success() {
        return Err(Error::Invalid {
            what: what.into(),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    String::from_utf8(out.stdout).map_err(|e| Error::Invalid {
        what: what.into(),
        detail: e.to_string(),
    })
}

/// The `mesh-kcp` binary: `$MESH_KCP_BIN` if set, otherwise what `cargo xtask setup` built.
pub fn binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(BINARY_ENV) {
        return Ok(PathBuf::from(path));
    }
    built(
        BINARY_PATH,
        "tests/kube",
        &format!(" (or set {BINARY_ENV})"),
    )
}
