//! Runs `mesh-probe` (this crate's echo server and client) inside pods.

use std::{net::SocketAddr, time::Duration};

use crate::{agent::binary, process::run, Pod, Process, Result};

/// Starts an echo server in `pod` listening on `addr` and waits until it is bound.
pub fn serve(pod: &Pod, addr: SocketAddr) -> Result<Process> {
    serve_mode(pod, addr, "echo")
}

/// Starts a server in `mode` (`echo`, `sink`, `greet`) and waits until it is bound.
pub fn serve_mode(pod: &Pod, addr: SocketAddr, mode: &str) -> Result<Process> {
    let bin = binary("mesh-probe", "mesh-tests")?;
    let mut cmd = pod.command(bin);
    cmd.args(["serve", &addr.to_string(), "--mode", mode]);
    let mut process = Process::spawn(format!("server {}", pod.name), &mut cmd)?;
    process.wait_for_line("the echo server to listen", Duration::from_secs(10), |l| {
        l.starts_with("listening ")
    })?;
    Ok(process)
}

/// What a blocking client does with a spurious `EAGAIN` from a read (which the kernel returns
/// to a blocking reader of a socket in the `sk_msg` short-cut, see `mesh-probe`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eagain {
    /// Fail, as an application written for blocking sockets would: the default mesh must never
    /// cause one.
    Fail,
    /// Retry, as a robust application would: for pods that opted into the short-cut.
    Retry,
}

impl Eagain {
    fn arg(self) -> &'static str {
        match self {
            Self::Fail => "fail",
            Self::Retry => "retry",
        }
    }
}

/// Connects from `pod` to `addr`, sends `message` and checks the echo; a spurious `EAGAIN`
/// fails it. Returns the client's `echo ok <local> -> <peer>` line.
pub fn connect(pod: &Pod, addr: SocketAddr, message: &str) -> Result<String> {
    connect_with(pod, addr, message, Eagain::Fail)
}

/// [`connect`], with a choice of what a spurious `EAGAIN` does.
pub fn connect_with(pod: &Pod, addr: SocketAddr, message: &str, eagain: Eagain) -> Result<String> {
    let bin = binary("mesh-probe", "mesh-tests")?;
    let out = run(pod.command(bin).args([
        "connect",
        &addr.to_string(),
        message,
        "--eagain",
        eagain.arg(),
    ]))?;
    Ok(out.trim().to_string())
}

/// Streams `bytes` pseudo-random bytes from `pod` to a `sink` server and checks count and CRC;
/// a spurious `EAGAIN` fails it.
pub fn send(pod: &Pod, addr: SocketAddr, bytes: u64) -> Result<String> {
    send_with(pod, addr, bytes, Eagain::Fail)
}

/// [`send`], with a choice of what a spurious `EAGAIN` does.
pub fn send_with(pod: &Pod, addr: SocketAddr, bytes: u64, eagain: Eagain) -> Result<String> {
    let bin = binary("mesh-probe", "mesh-tests")?;
    let out = run(pod.command(bin).args([
        "send",
        &addr.to_string(),
        &bytes.to_string(),
        "--eagain",
        eagain.arg(),
    ]))?;
    Ok(out.trim().to_string())
}

/// Over one connection to an `echo` server, sends `bytes` pseudo-random bytes while reading
/// them back, checks the echo, half-closes and expects end-of-file (`parallel --conns 1`).
/// Returns the client's output.
pub fn echo_bytes(pod: &Pod, addr: SocketAddr, bytes: u64) -> Result<String> {
    let bin = binary("mesh-probe", "mesh-tests")?;
    let out = run(pod.command(bin).args([
        "parallel",
        &addr.to_string(),
        "--conns",
        "1",
        "--bytes",
        &bytes.to_string(),
    ]))?;
    Ok(out.trim().to_string())
}

/// Connects to a `greet` server, reads its greeting before sending, then checks the echo.
pub fn greeted(pod: &Pod, addr: SocketAddr, message: &str) -> Result<String> {
    let bin = binary("mesh-probe", "mesh-tests")?;
    let out = run(pod
        .command(bin)
        .args(["greeted", &addr.to_string(), message]))?;
    Ok(out.trim().to_string())
}
