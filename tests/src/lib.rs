//! Testbed: a simulated cluster on one machine, for the mesh's privileged tests, demo and
//! benchmarks.
//!
//! A [`Testbed`] has N nodes and M pods per node. Every node and pod is a network namespace of
//! its own; nodes are joined by a bridge that lives in a further namespace, pods hang off their
//! node by a veth pair, and each pod (and node) has a cgroup v2 directory. Processes started with
//! [`Pod::command`] run inside the pod's namespace and cgroup, so cgroup-attached kernel programs
//! see them exactly as they would see a Kubernetes pod's containers.
//!
//! Nothing is ever created in the machine's root network namespace. Names carry the owning
//! process id, so testbeds of parallel tests never collide, and the leftovers of a test that was
//! killed (and so never ran its destructors) are removed by the next testbed created on the
//! machine ([`sweep_stale`]).
#![forbid(unsafe_code)]

pub mod agent;
pub mod cluster;
pub mod dns_reply;
pub mod host;
pub mod http;
pub mod jaeger;
pub mod jwt;
pub mod kube;
pub mod mesh;
pub mod plan;
pub mod probe;
pub mod process;
pub mod telemetry;
pub mod testbed;
pub mod waypoint;

pub use agent::Agent;
pub use process::Process;
pub use testbed::{sweep_stale, Node, Pod, Testbed, TestbedSpec};

use std::{path::PathBuf, time::Duration};

/// Everything that can go wrong building or using a testbed. Each variant says what was being
/// done, so a failing privileged test reports why it could not run.
#[derive(thiserror::Error)]
pub enum Error {
    #[error("privileged test cannot run: {0}")]
    Privileges(String),
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("timed out after {after:?} waiting for {what}; last output:\n{output}")]
    Timeout {
        what: String,
        after: Duration,
        output: String,
    },
    #[error("{name} exited ({status}) while waiting for {what}; output:\n{output}")]
    Exited {
        name: String,
        status: String,
        what: String,
        output: String,
    },
    #[error("binary {name} not found (looked at {looked:?}); build it with `cargo build -p {package}` or run `cargo xtask test`")]
    BinaryNotFound {
        name: String,
        package: String,
        looked: Vec<PathBuf>,
    },
    #[error("unexpected output from {what}: {detail}")]
    Output { what: String, detail: String },
    #[error("testbed spec: {0}")]
    Spec(String),
    #[error("a test tool is missing: {0}")]
    ToolMissing(String),
}

/// `Debug` shows the message: tests `expect()` these errors, and the reason a privileged test
/// could not run must read plainly in the failure.
impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Helper for `map_err` on I/O results.
/// The binary `cargo xtask setup` built at `path` (relative to the workspace root) from the Go
/// module `module`, or what to do (`or_else`: another way, if any).
pub(crate) fn built_tool(path: &str, module: &str, or_else: &str) -> Result<PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace");
    let path = root.join(path);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::ToolMissing(format!(
            "{} is missing; run `cargo xtask setup`, which builds it from {module} with Go{or_else}",
            path.display()
        )))
    }
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}
