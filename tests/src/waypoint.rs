//! A `mesh-agent waypoint` process in a testbed pod (the waypoint's own pod: outside the mesh's
//! capture, it speaks HBONE itself), reading the mesh's config directory and its CA.

use std::time::Duration;

use crate::{agent::binary, agent::AgentOptions, Pod, Process, Result};

/// How long the waypoint may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running waypoint. Its log level is `info,mesh_waypoint=debug`, or `$MESH_WAYPOINT_LOG`.
#[derive(Debug)]
pub struct Waypoint {
    pub process: Process,
}

impl Waypoint {
    /// Starts the waypoint `namespace/name` in `pod` with the agents' config directory and CA,
    /// and waits until it serves HBONE.
    pub fn start(pod: &Pod, options: &AgentOptions, namespace: &str, name: &str) -> Result<Self> {
        Self::start_with(pod, options, namespace, name, &[])
    }

    /// [`Self::start`] with more command-line arguments (`--tracing-endpoint`…).
    pub fn start_with(
        pod: &Pod,
        options: &AgentOptions,
        namespace: &str,
        name: &str,
        extra: &[String],
    ) -> Result<Self> {
        let bin = binary("mesh-waypoint", "mesh-agent")?;
        let mut cmd = pod.command(&bin);
        cmd.args(["--namespace", namespace, "--name", name])
            .arg("--config-dir")
            .arg(&options.config_dir)
            .arg("--ca-dir")
            .arg(options.ca_dir())
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("MESH_WAYPOINT_LOG")
                    .unwrap_or_else(|_| "info,mesh_waypoint=debug".to_owned()),
            )
            .env("NO_COLOR", "1")
            .env("RUST_LIB_BACKTRACE", "0");
        let mut process = Process::spawn(format!("waypoint {namespace}/{name}"), &mut cmd)?;
        process.wait_for_line("the waypoint to serve HBONE", START_TIMEOUT, |l| {
            l.contains("waypoint serving HBONE")
        })?;
        Ok(Self { process })
    }
}
