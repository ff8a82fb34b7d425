//! Shared test fixtures: a real network namespace, a scratch directory, the plugin binary run
//! as a runtime runs it, and an agent built from the library's server side.

#![allow(dead_code)] // Each test crate uses a part.

use std::{
    io::Write,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
};

use mesh_cni::handover::{Connection, Reply, Request, Server, ServerError};

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A named network namespace `mtb-cni-<pid>-<n>` holding a veth pair (both ends inside it),
/// deleted on drop, also when the test panics. The root namespace is never touched.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    pub path: PathBuf,
}

/// The interface the namespace holds, to prove a `setns` landed in it.
pub const NETNS_IFACE: &str = "mtbv0";

impl Netns {
    pub fn new() -> Self {
        sweep_stale();
        let name = unique("mtb-cni");
        ip(&["netns", "add", &name]);
        let netns = Netns {
            path: PathBuf::from("/var/run/netns").join(&name),
            name,
        };
        ip(&[
            "-n",
            &netns.name,
            "link",
            "add",
            NETNS_IFACE,
            "type",
            "veth",
            "peer",
            "name",
            "mtbv1",
        ]);
        netns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Deletes namespaces `mtb-cni-<pid>-*` left by test processes that are gone.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("mtb-cni-")
            .and_then(|r| r.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(unique("mesh-cni-test"));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the plugin process did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The stdout as JSON (result or error object).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout not JSON ({e}): {self:?}"))
    }

    /// The CNI error code, asserting the process failed.
    pub fn error_code(&self) -> u64 {
        assert_ne!(self.code, 0, "expected a failure: {self:?}");
        self.json()["code"].as_u64().unwrap()
    }

    pub fn error_msg(&self) -> String {
        self.json()["msg"].as_str().unwrap().to_owned()
    }
}

/// Runs the plugin binary as a container runtime does: a clean environment plus `env`, the
/// configuration on stdin.
pub fn run_plugin(env: &[(&str, &str)], stdin: &str) -> Run {
    run_plugin_as(env, stdin, None)
}

pub fn run_plugin_as(env: &[(&str, &str)], stdin: &str, uid: Option<u32>) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mesh-cni"));
    command
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(uid) = uid {
        std::os::unix::process::CommandExt::uid(&mut command, uid);
    }
    let mut child = command.spawn().expect("spawn mesh-cni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// The environment of a Kubernetes pod's CNI call.
pub fn pod_env<'a>(command: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "3f1e0c9a7b2d"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=client-0;K8S_POD_UID=0d3c5e6f",
        ),
    ]
}

/// The result the bridge plugin returns, as the runtime passes it on as `prevResult`.
pub const PREV_RESULT: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"cni0","mac":"0a:58:0a:58:00:01"},{"name":"veth12ab","mac":"5e:1d:9b:2c:aa:01"},{"name":"eth0","mac":"0a:58:0a:58:00:05","sandbox":"/var/run/netns/x"}],"ips":[{"interface":2,"address":"10.88.0.5/16","gateway":"10.88.0.1"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;

/// The network configuration our entry receives in a chain.
pub fn conf(socket: &Path, timeout_ms: u64, with_prev: bool) -> String {
    let prev = if with_prev {
        format!(r#","prevResult":{PREV_RESULT}"#)
    } else {
        String::new()
    };
    format!(
        r#"{{"cniVersion":"1.0.0","name":"containerd-net","type":"mesh-cni","agent_socket":"{}","timeout_ms":{timeout_ms},"log_level":"debug"{prev}}}"#,
        socket.display()
    )
}

/// An agent made from the library's server side: a thread accepting connections and
/// answering each request with `handler`; accept errors are sent to `errors`.
pub struct TestAgent {
    pub socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub errors: mpsc::Receiver<ServerError>,
}

impl TestAgent {
    pub fn start(
        socket: PathBuf,
        mut handler: impl FnMut(Request) -> Reply + Send + 'static,
    ) -> Self {
        let server = Server::bind(&socket).expect("bind the test agent");
        let stop = Arc::new(AtomicBool::new(false));
        let (error_tx, errors) = mpsc::channel();
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                match server.accept() {
                    Ok(mut conn) => serve(&mut conn, &mut handler),
                    Err(error) => {
                        let _ = error_tx.send(error);
                    }
                }
            }
        });
        TestAgent {
            socket,
            stop,
            thread: Some(thread),
            errors,
        }
    }
}

fn serve(conn: &mut Connection, handler: &mut impl FnMut(Request) -> Reply) {
    while let Ok(Some(request)) = conn.recv() {
        let reply = handler(request);
        if conn.reply(&reply).is_err() {
            return;
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ =
            mesh_cni::handover::Client::connect(&self.socket, std::time::Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `(st_dev, st_ino)` of a descriptor or file: a namespace's identity.
pub fn fd_identity(fd: &OwnedFd) -> (u64, u64) {
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).unwrap();
    (st.st_dev, st.st_ino)
}

pub fn path_identity(path: &Path) -> (u64, u64) {
    let st = nix::sys::stat::stat(path).unwrap();
    (st.st_dev, st.st_ino)
}

/// Enters `netns` on a fresh thread and reports what that thread sees: its namespace's inode
/// and the indexes of `lo` and [`NETNS_IFACE`] there.
pub fn look_inside(netns: &OwnedFd) -> (u64, Option<u32>, Option<u32>) {
    let fd = netns.try_clone().unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let link = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let inode = link
            .to_string_lossy()
            .trim_start_matches("net:[")
            .trim_end_matches(']')
            .parse()
            .unwrap();
        let index = |name: &str| nix::net::if_::if_nametoindex(name).ok();
        (inode, index("lo"), index(NETNS_IFACE))
    })
    .join()
    .unwrap()
}
