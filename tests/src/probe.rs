//! Runs `mesh-probe` (this crate's echo server and client) inside pods.

use std::{net::SocketAddr, time::Duration};

use crate::{agent::binary, process::run, Node, Pod, Process, Result};

/// Starts `mesh-probe` with `args` (a server: `serve …`, `http-echo …`) in `node`'s own network
/// namespace, outside every pod (a host outside the cluster), and waits until it listens.
pub fn on_node(node: &Node, args: &[&str]) -> Result<Process> {
    let bin = binary("mesh-probe", "mesh-tests")?;
    let mut cmd = node.command(bin);
    cmd.args(args);
    let mut process = Process::spawn(format!("server on {}", node.name), &mut cmd)?;
    process.wait_for_line(
        "the server on the node to listen",
        Duration::from_secs(10),
        |l| l.starts_with("listening "),
    )?;
    Ok(process)
}

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

/// Connects from `pod` to an `rr` server at `addr`, exchanges a request and reply and closes,
/// again and again for `duration` (`connrate`, one connection at a time). Returns its report:
/// `connections`, `errors`, `cps` and the latencies.
pub fn connrate(pod: &Pod, addr: SocketAddr, duration: Duration) -> Result<serde_json::Value> {
    let bin = binary("mesh-probe", "mesh-tests")?;
    let out = run(pod.command(bin).args([
        "connrate",
        &addr.to_string(),
        "--duration-ms",
        &duration.as_millis().to_string(),
    ]))?;
    let last = out.lines().last().unwrap_or_default();
    serde_json::from_str(last).map_err(|e| crate::Error::Output {
        what: "connrate's report".to_owned(),
        detail: format!("{last:?}: {e}"),
    })
}

/// One connection from `pod` to an `echo` server at `addr` that exchanges 1,000 bytes, then
/// stays open for `hold_ms` before the client half-closes it (`parallel --conns 1 --hold-ms`).
/// Returns once the connection is open; the process ends when the client is done.
pub fn hold_one(pod: &Pod, addr: SocketAddr, hold_ms: u64, name: &str) -> Result<Process> {
    let bin = binary("mesh-probe", "mesh-tests")?;
    let mut cmd = pod.command(bin);
    cmd.args([
        "parallel",
        &addr.to_string(),
        "--conns",
        "1",
        "--bytes",
        "1000",
    ])
    .args(["--hold-ms", &hold_ms.to_string()]);
    let mut p = Process::spawn(name, &mut cmd)?;
    p.wait_for_line("the connection to open", Duration::from_secs(10), |l| {
        l.starts_with("open=1 ")
    })?;
    Ok(p)
}

/// Connects to a `greet` server, reads its greeting before sending, then checks the echo.
pub fn greeted(pod: &Pod, addr: SocketAddr, message: &str) -> Result<String> {
    let bin = binary("mesh-probe", "mesh-tests")?;
    let out = run(pod
        .command(bin)
        .args(["greeted", &addr.to_string(), message]))?;
    Ok(out.trim().to_string())
}

/// A `raw` client's options (see `mesh-probe raw`).
#[derive(Clone, Debug)]
pub struct Raw<'a> {
    /// The bytes to send, in hex (empty: send nothing).
    pub send_hex: &'a str,
    /// How long to wait for the peer to close.
    pub wait: Duration,
    /// Send the bytes again at this interval meanwhile.
    pub resend: Option<Duration>,
}

/// Starts a `raw` client in `pod` toward `addr` and waits until it has sent its bytes. It then
/// prints `received <n>` as bytes arrive and ends with a line that [`raw_end`] reads.
pub fn raw(pod: &Pod, addr: SocketAddr, name: &str, options: &Raw<'_>) -> Result<Process> {
    let bin = binary("mesh-probe", "mesh-tests")?;
    let mut cmd = pod.command(bin);
    cmd.args(["raw", &addr.to_string(), "--send-hex", options.send_hex])
        .args(["--wait-close-ms", &options.wait.as_millis().to_string()]);
    if let Some(every) = options.resend {
        cmd.args(["--resend-ms", &every.as_millis().to_string()]);
    }
    let mut process = Process::spawn(format!("raw {name}"), &mut cmd)?;
    process.wait_for_line("the bytes to be sent", Duration::from_secs(10), |l| {
        l.starts_with("sent ")
    })?;
    Ok(process)
}

/// How a `raw` client's connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawEnd {
    /// The peer closed it (or a write failed) after this long; the client's whole line.
    Closed { after: Duration, line: String },
    /// It was still open when the client stopped waiting; the client's whole line.
    StillOpen { line: String },
}

/// Waits up to `timeout` for `raw`'s last line.
pub fn raw_end(process: &mut Process, what: &str, timeout: Duration) -> Result<RawEnd> {
    let line = process.wait_for_line(what, timeout, |l| {
        l.starts_with("closed_after_ms=") || l.starts_with("still_open")
    })?;
    let after = line
        .strip_prefix("closed_after_ms=")
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok());
    Ok(match after {
        Some(ms) => RawEnd::Closed {
            after: Duration::from_millis(ms),
            line,
        },
        None => RawEnd::StillOpen { line },
    })
}
