//! Runs `mesh-probe` (this crate's echo server and client) inside pods.

use std::{net::SocketAddr, time::Duration};

use crate::{agent::binary, process::run, Pod, Process, Result};

/// Starts an echo server in `pod` listening on `addr` and waits until it is bound.
pub fn serve(pod: &Pod, addr: SocketAddr) -> Result<Process> {
    let bin = binary("mesh-probe", "mesh-tests")?;
    let mut cmd = pod.command(bin);
    cmd.args(["serve", &addr.to_string()]);
    let mut process = Process::spawn(format!("server {}", pod.name), &mut cmd)?;
    process.wait_for_line("the echo server to listen", Duration::from_secs(10), |l| {
        l.starts_with("listening ")
    })?;
    Ok(process)
}

/// Connects from `pod` to `addr`, sends `message` and checks the echo. Returns the client's
/// `echo ok <local> -> <peer>` line.
pub fn connect(pod: &Pod, addr: SocketAddr, message: &str) -> Result<String> {
    let bin = binary("mesh-probe", "mesh-tests")?;
    let out = run(pod
        .command(bin)
        .args(["connect", &addr.to_string(), message]))?;
    Ok(out.trim().to_string())
}
