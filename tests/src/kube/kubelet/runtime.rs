//! Containers as processes: started through the launcher (`mtb-run run`) into their cgroup,
//! the pod's network namespace and a private mount namespace, their output kept per container
//! (and echoed to stderr like every testbed process's), their exit reported to the pod's worker.
//! Probes: `tcpSocket` and `httpGet` dialled from the node's network namespace as kubelet dials
//! from the host, `exec` run inside the container (`mtb-run exec`).

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use nix::{
    sched::{setns, CloneFlags},
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, BufReader as AsyncBufReader},
    sync::{mpsc, oneshot},
};

/// How many lines of a container's output are kept.
const LOG_LINES: usize = 2000;

/// A container's output so far.
pub type Log = Arc<Mutex<Vec<String>>>;

/// What to start.
#[derive(Clone, Debug)]
pub struct Launch {
    pub launcher: PathBuf,
    /// The node's file system, in which the launcher starts.
    pub view: super::NodeView,
    pub cgroup: PathBuf,
    pub netns: PathBuf,
    /// `(host path, mount path, read-only)`.
    pub binds: Vec<(PathBuf, String, bool)>,
    /// The pod's `/etc/resolv.conf`, if it has one of its own.
    pub resolv_conf: Option<PathBuf>,
    pub uid: Option<i64>,
    pub gid: Option<i64>,
    pub workdir: Option<String>,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Prefix of the echoed output lines.
    pub label: String,
}

/// A container process ended: which slot, which container, how.
#[derive(Clone, Debug)]
pub struct Exit {
    pub slot: usize,
    pub container_id: String,
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// Starts the container; its exit is sent on `exits`. Returns its pid (the launcher execs the
/// program, so it is the program's).
pub fn start(
    launch: &Launch,
    log: &Log,
    slot: usize,
    container_id: &str,
    exits: mpsc::UnboundedSender<Exit>,
) -> std::io::Result<u32> {
    let mut command = tokio::process::Command::new(&launch.launcher);
    command
        .arg("run")
        .args(launch.view.launcher_flags())
        .arg("--cgroup")
        .arg(&launch.cgroup)
        .arg("--netns")
        .arg(&launch.netns);
    for (src, dst, ro) in &launch.binds {
        let ro = if *ro { ":ro" } else { "" };
        command
            .arg("--bind")
            .arg(format!("{}:{dst}{ro}", src.display()));
    }
    if let Some(file) = &launch.resolv_conf {
        command.arg("--resolv-conf").arg(file);
    }
    if let Some(uid) = launch.uid {
        command.arg("--uid").arg(uid.to_string());
    }
    if let Some(gid) = launch.gid {
        command.arg("--gid").arg(gid.to_string());
    }
    if let Some(dir) = &launch.workdir {
        command.arg("--workdir").arg(dir);
    }
    command
        .arg("--")
        .args(&launch.argv)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn()?;
    let pid = child.id().unwrap_or_default();
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| tokio::spawn(collect(stream, Arc::clone(log), launch.label.clone())))
    .collect();
    let container_id = container_id.to_owned();
    tokio::spawn(async move {
        let status = child.wait().await;
        // Let the readers take the last lines before the exit is reported.
        for reader in readers {
            let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
        }
        let (code, signal) = match status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt as _;
                (s.code(), s.signal())
            }
            Err(_) => (None, None),
        };
        let _ = exits.send(Exit {
            slot,
            container_id,
            code,
            signal,
        });
    });
    Ok(pid)
}

async fn collect(stream: Box<dyn AsyncRead + Send + Unpin>, log: Log, label: String) {
    let mut lines = AsyncBufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        super::echo(&label, &line);
        let mut log = log.lock().expect("log lock");
        if log.len() >= LOG_LINES {
            log.remove(0);
        }
        log.push(line);
    }
}

/// Sends `signal` to `pid` (gone already is fine).
pub fn signal(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// Kills every process in the cgroup `dir` and below (`cgroup.kill`).
pub fn kill_cgroup(dir: &Path) {
    if dir.exists() {
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    }
}

/// Whether the cgroup `dir` (and below) holds no process.
pub fn cgroup_empty(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map_or(true, |e| e.lines().any(|l| l == "populated 0"))
}

/// Kills what is left in the cgroup tree `dir`, waits for it to empty (up to 5 s) and removes
/// the directories, deepest first.
pub async fn remove_cgroup(dir: &Path) -> Result<(), String> {
    for _ in 0..250 {
        if !dir.exists() {
            return Ok(());
        }
        kill_cgroup(dir);
        if cgroup_empty(dir) && remove_dirs(dir).is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    remove_dirs(dir).map_err(|e| format!("removing cgroup {}: {e}", dir.display()))
}

fn remove_dirs(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_dirs(&entry.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// What a probe checks.
#[derive(Clone, Debug)]
pub enum ProbeAction {
    Tcp(SocketAddr),
    Http {
        addr: SocketAddr,
        host: String,
        path: String,
    },
    Exec {
        launcher: PathBuf,
        pid: u32,
        cgroup: PathBuf,
        uid: Option<i64>,
        gid: Option<i64>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
    },
}

/// The launcher's arguments that run a command inside a running container (process `pid`, its
/// cgroup `cgroup`) as `uid`/`gid`, ending in `--`: the command follows.
pub fn exec_args(pid: u32, cgroup: &Path, uid: Option<i64>, gid: Option<i64>) -> Vec<String> {
    let mut args = vec![
        "exec".to_owned(),
        "--pid".to_owned(),
        pid.to_string(),
        "--cgroup".to_owned(),
        cgroup.display().to_string(),
    ];
    if let Some(uid) = uid {
        args.extend(["--uid".to_owned(), uid.to_string()]);
    }
    if let Some(gid) = gid {
        args.extend(["--gid".to_owned(), gid.to_string()]);
    }
    args.push("--".to_owned());
    args
}

/// Runs one probe: `Ok` on success, else why it failed. Network probes dial from the network
/// namespace at `node_netns`.
pub async fn probe(
    action: ProbeAction,
    node_netns: PathBuf,
    timeout: Duration,
) -> Result<(), String> {
    match action {
        ProbeAction::Tcp(addr) => {
            in_netns(node_netns, move || {
                TcpStream::connect_timeout(&addr, timeout)
                    .map(drop)
                    .map_err(|e| format!("dial tcp {addr}: {e}"))
            })
            .await
        }
        ProbeAction::Http { addr, host, path } => {
            in_netns(node_netns, move || http_get(addr, &host, &path, timeout)).await
        }
        ProbeAction::Exec {
            launcher,
            pid,
            cgroup,
            uid,
            gid,
            argv,
            env,
        } => {
            let mut command = tokio::process::Command::new(launcher);
            command
                .args(exec_args(pid, &cgroup, uid, gid))
                .args(&argv)
                .env_clear()
                .envs(env)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            let child = command.spawn().map_err(|e| format!("exec probe: {e}"))?;
            match tokio::time::timeout(timeout, child.wait_with_output()).await {
                Err(_) => Err(format!("command {argv:?} timed out after {timeout:?}")),
                Ok(Err(e)) => Err(format!("exec probe: {e}")),
                Ok(Ok(out)) if out.status.success() => Ok(()),
                Ok(Ok(out)) => Err(format!(
                    "command {argv:?} exited with {}: {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
            }
        }
    }
}

/// Runs `f` on a thread of its own that entered the network namespace at `netns` (a thread
/// that `setns`es is never returned to a pool).
async fn in_netns<F>(netns: PathBuf, f: F) -> Result<(), String>
where
    F: FnOnce() -> Result<(), String> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let spawned = thread::Builder::new()
        .name("kubelet-probe".into())
        .spawn(move || {
            let result = File::open(&netns)
                .map_err(|e| format!("opening {}: {e}", netns.display()))
                .and_then(|ns| {
                    setns(&ns, CloneFlags::CLONE_NEWNET)
                        .map_err(|e| format!("entering {}: {e}", netns.display()))
                })
                .and_then(|()| f());
            let _ = tx.send(result);
        });
    if let Err(e) = spawned {
        return Err(format!("starting a probe thread: {e}"));
    }
    rx.await
        .unwrap_or_else(|_| Err("the probe thread panicked".into()))
}

/// `GET path` with `Connection: close`; success is a status from 200 to 399, as kubelet's.
fn http_get(addr: SocketAddr, host: &str, path: &str, timeout: Duration) -> Result<(), String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("dial tcp {addr}: {e}"))?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kube-probe/1.37\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("writing to {addr}: {e}"))?;
    let mut line = String::new();
    BufReader::new(&mut stream)
        .read_line(&mut line)
        .map_err(|e| format!("reading from {addr}: {e}"))?;
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status line from {addr}: {line:?}"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {code}"))
    }
}
