//! Building and tearing down the simulated cluster. See the crate documentation and
//! [`crate::plan`] for the topology and addresses.

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::{
    host::{self, Host},
    plan,
    process::run,
    Error, Result,
};

/// Prefix of every name a testbed creates: network namespaces `mtb-<pid>-<seq>-…`, and the
/// directories `<cgroup2>/mesh-testbed/mtb-<pid>-<seq>` and `/sys/fs/bpf/mesh-testbed/…`.
pub const PREFIX: &str = "mtb-";
/// Directory, under the cgroup v2 mount and under bpffs, that holds all testbeds.
pub const TESTBED_DIR: &str = "mesh-testbed";
/// Where `ip netns add` creates its namespace files.
const NETNS_DIR: &str = "/run/netns";

static NEXT_SEQ: AtomicU32 = AtomicU32::new(0);

/// Shape of a testbed.
#[derive(Clone, Copy, Debug)]
pub struct TestbedSpec {
    pub nodes: usize,
    pub pods_per_node: usize,
}

/// A simulated cluster. Removed entirely when dropped (also during a panic).
#[derive(Debug)]
pub struct Testbed {
    id: String,
    host: Host,
    link_netns: String,
    nodes: Vec<Node>,
    /// Network namespaces created so far, in creation order (removed in reverse).
    netns: Vec<String>,
    /// `<cgroup2>/mesh-testbed/<id>`: every node and pod cgroup lives below it.
    cgroup_dir: PathBuf,
    /// `/sys/fs/bpf/mesh-testbed/<id>`: the agents' pin directories live below it.
    bpffs_dir: PathBuf,
    /// `$TMPDIR/<id>`: files the tests need (config directories), removed with the testbed.
    scratch_dir: PathBuf,
    torn_down: bool,
}

/// A node: a network namespace that routes for its pods, where the node agent runs.
#[derive(Clone, Debug)]
pub struct Node {
    pub index: usize,
    /// Node name, a DNS label (`n0`, `n1`, …).
    pub name: String,
    pub netns: String,
    /// Address on the inter-node link.
    pub link_ipv4: Ipv4Addr,
    pub link_ipv6: Ipv6Addr,
    /// cgroup v2 directory for processes run on the node (the agent).
    pub cgroup: PathBuf,
    /// bpffs directory for this node's agent pins.
    pub bpffs_dir: PathBuf,
    pub pods: Vec<Pod>,
}

/// A pod: a network namespace with one veth into its node, and a cgroup v2 directory.
#[derive(Clone, Debug)]
pub struct Pod {
    /// `n<node>-p<pod>`.
    pub name: String,
    pub node: usize,
    pub netns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub cgroup: PathBuf,
}

/// A new unique id, `mtb-<pid>-<seq>`, for a testbed or anything else whose leftovers the sweep
/// must find (the Kubernetes control plane's cgroup and scratch directories use one too).
pub(crate) fn new_id() -> String {
    format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        NEXT_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

impl Testbed {
    /// Builds the testbed. Fails with the reason if the machine cannot host it (not root,
    /// iproute2 or the cgroup2/bpffs mounts missing). Removes leftovers of killed earlier runs
    /// first.
    pub fn new(spec: TestbedSpec) -> Result<Self> {
        if spec.nodes == 0 || spec.nodes > plan::MAX_NODES {
            return Err(Error::Spec(format!(
                "nodes must be 1..={}",
                plan::MAX_NODES
            )));
        }
        if spec.pods_per_node > plan::MAX_PODS_PER_NODE {
            return Err(Error::Spec(format!(
                "pods_per_node must be <= {}",
                plan::MAX_PODS_PER_NODE
            )));
        }
        let host = host::require_privileges()?;
        sweep_stale_in(&host);
        let id = new_id();
        let mut tb = Self {
            link_netns: format!("{id}-link"),
            cgroup_dir: host.cgroup2.join(TESTBED_DIR).join(&id),
            bpffs_dir: host.bpffs.join(TESTBED_DIR).join(&id),
            scratch_dir: std::env::temp_dir().join(&id),
            id,
            host,
            nodes: Vec::new(),
            netns: Vec::new(),
            torn_down: false,
        };
        // On error, `tb` is dropped here and removes whatever was created so far.
        tb.build(spec)?;
        Ok(tb)
    }

    fn build(&mut self, spec: TestbedSpec) -> Result<()> {
        fs::create_dir_all(&self.cgroup_dir).map_err(crate::io_err(format!(
            "creating {}",
            self.cgroup_dir.display()
        )))?;
        fs::create_dir_all(&self.bpffs_dir).map_err(crate::io_err(format!(
            "creating {}",
            self.bpffs_dir.display()
        )))?;

        let link = self.link_netns.clone();
        self.add_netns(&link)?;
        ip_batch(
            &link,
            "link set lo up\nlink add br0 type bridge\nlink set br0 up\n",
        )?;

        for i in 0..spec.nodes {
            let node = self.add_node(i)?;
            self.nodes.push(node);
        }
        for i in 0..spec.nodes {
            for j in 0..spec.pods_per_node {
                let pod = self.add_pod(i, j)?;
                self.nodes[i].pods.push(pod);
            }
        }
        // Routes between nodes: each node's pod subnets via that node's link address.
        for i in 0..spec.nodes {
            let mut script = String::new();
            for k in (0..spec.nodes).filter(|&k| k != i) {
                let _ = writeln!(
                    script,
                    "route add {} via {}\nroute add {} via {}",
                    plan::pod_subnet_v4(k),
                    plan::node_link_v4(k),
                    plan::pod_subnet_v6(k),
                    plan::node_link_v6(k)
                );
            }
            if !script.is_empty() {
                ip_batch(&self.nodes[i].netns, &script)?;
            }
        }
        Ok(())
    }

    fn add_node(&mut self, i: usize) -> Result<Node> {
        let name = format!("n{i}");
        let netns = format!("{}-{name}", self.id);
        self.add_netns(&netns)?;
        // A node routes between its pods and the other nodes.
        run(Command::new("ip")
            .args(["netns", "exec", &netns, "sysctl", "-q", "-w"])
            .args(["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]))?;
        ip_batch(
            &self.link_netns,
            &format!("link add n{i} type veth peer name eth1 netns {netns}\nlink set n{i} master br0 up\n"),
        )?;
        ip_batch(
            &netns,
            &format!(
                "link set lo up\naddr add {}/24 dev eth1\naddr add {}/64 dev eth1 nodad\nlink set eth1 up\n",
                plan::node_link_v4(i),
                plan::node_link_v6(i)
            ),
        )?;
        let cgroup = self.cgroup_dir.join(format!("node-{name}"));
        fs::create_dir(&cgroup).map_err(crate::io_err(format!("creating {}", cgroup.display())))?;
        let bpffs_dir = self.bpffs_dir.join(&name);
        Ok(Node {
            index: i,
            name,
            netns,
            link_ipv4: plan::node_link_v4(i),
            link_ipv6: plan::node_link_v6(i),
            cgroup,
            bpffs_dir,
            pods: Vec::new(),
        })
    }

    fn add_pod(&mut self, i: usize, j: usize) -> Result<Pod> {
        let name = format!("n{i}-p{j}");
        let netns = format!("{}-{name}", self.id);
        let node_netns = self.nodes[i].netns.clone();
        self.add_netns(&netns)?;
        let (ipv4, ipv6) = (plan::pod_v4(i, j), plan::pod_v6(i, j));
        let (gw4, gw6) = (plan::gateway_v4(i), plan::gateway_v6(i));
        ip_batch(
            &netns,
            &format!(
                "link set lo up\n\
                 link add eth0 type veth peer name p{j} netns {node_netns}\n\
                 addr add {ipv4}/32 dev eth0\n\
                 addr add {ipv6}/128 dev eth0 nodad\n\
                 link set eth0 up\n\
                 route add {gw4}/32 dev eth0\n\
                 route add default via {gw4} dev eth0\n\
                 route add {gw6}/128 dev eth0\n\
                 route add default via {gw6} dev eth0\n"
            ),
        )?;
        ip_batch(
            &node_netns,
            &format!(
                "addr add {gw4}/32 dev p{j}\n\
                 addr add {gw6}/128 dev p{j} nodad\n\
                 link set p{j} up\n\
                 route add {ipv4}/32 dev p{j}\n\
                 route add {ipv6}/128 dev p{j}\n"
            ),
        )?;
        let cgroup = self.cgroup_dir.join(format!("pod-{name}"));
        fs::create_dir(&cgroup).map_err(crate::io_err(format!("creating {}", cgroup.display())))?;
        Ok(Pod {
            name,
            node: i,
            netns,
            ipv4,
            ipv6,
            cgroup,
        })
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        self.netns.push(name.to_string());
        Ok(())
    }

    /// Unique id of this testbed; every name it creates starts with it.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Pod `j` of node `i`.
    pub fn pod(&self, i: usize, j: usize) -> &Pod {
        &self.nodes[i].pods[j]
    }

    /// Network namespaces of this testbed (link, nodes and pods).
    pub fn netns_names(&self) -> &[String] {
        &self.netns
    }

    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }

    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// A directory for the test's own files, removed with the testbed.
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch_dir
    }

    /// Removes everything now and reports the first problem (dropping does the same, but can
    /// only print problems).
    pub fn teardown(mut self) -> Result<()> {
        self.torn_down = true;
        remove(
            &self.host,
            &self.id,
            &self.cgroup_dir,
            &self.bpffs_dir,
            &self.all_netns(),
        )
    }

    /// Its own namespaces and any other named after it (a testbed kubelet's pods'), those last
    /// so that they are removed first.
    fn all_netns(&self) -> Vec<String> {
        let mut all = self.netns.clone();
        let others = fs::read_dir(NETNS_DIR)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| testbed_id_of(n) == Some(self.id.as_str()) && !self.netns.contains(n));
        all.extend(others);
        all
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        if let Err(e) = remove(
            &self.host,
            &self.id,
            &self.cgroup_dir,
            &self.bpffs_dir,
            &self.all_netns(),
        ) {
            eprintln!("testbed {}: cleanup failed: {e}", self.id);
        }
    }
}

impl Node {
    /// The file of this node's network namespace (for `setns`, `nsenter --net=`).
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// A command that runs `program` inside this node's network namespace and cgroup.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_netns_and_cgroup(&self.netns, &self.cgroup, program)
    }
}

impl Pod {
    /// A command that runs `program` inside this pod's network namespace and cgroup, as a
    /// container of the pod would run.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_netns_and_cgroup(&self.netns, &self.cgroup, program)
    }

    /// The pod's cgroup id as the kernel reports it (`bpf_get_current_cgroup_id`): the inode
    /// number of its cgroup v2 directory.
    pub fn cgroup_id(&self) -> Result<u64> {
        fs::metadata(&self.cgroup)
            .map(|m| m.ino())
            .map_err(crate::io_err(format!("reading {}", self.cgroup.display())))
    }
}

/// The shell moves itself into the cgroup, then `nsenter` enters the network namespace and execs
/// the program, so the program (and all it starts) runs in both, under the same pid.
///
/// `nsenter --net` rather than `ip netns exec`: the latter also remounts `/sys` in a new mount
/// namespace, which hides the bpffs and cgroup2 mounts below it from the program.
fn in_netns_and_cgroup(
    netns: &str,
    cgroup: &Path,
    program: impl AsRef<std::ffi::OsStr>,
) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"echo $$ > "$0" && ns=$1 && shift && exec nsenter --net="$ns" -- "$@""#)
        .arg(cgroup.join("cgroup.procs"))
        .arg(Path::new(NETNS_DIR).join(netns))
        .arg(program);
    cmd
}

/// Runs `ip -n <netns> -batch -` with `script` on stdin; stops at the first failing line.
pub fn ip_batch(netns: &str, script: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(crate::io_err("starting ip -batch"))?;
    child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(script.as_bytes())
        .map_err(crate::io_err("writing to ip -batch"))?;
    let out = child
        .wait_with_output()
        .map_err(crate::io_err("waiting for ip -batch"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command: format!("ip -n {netns} -batch - <<EOF\n{script}EOF"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Kills every process in the testbed's cgroups, deletes its namespaces, cgroups and bpffs
/// directory. Keeps going after a failure and returns the first one.
pub(crate) fn remove(
    host: &Host,
    id: &str,
    cgroup_dir: &Path,
    bpffs_dir: &Path,
    netns: &[String],
) -> Result<()> {
    let mut first: Option<Error> = None;
    let mut note = |r: Result<()>| {
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    };
    // Processes first: a namespace held by a process would outlive `ip netns del`.
    note(kill_cgroup_tree(cgroup_dir));
    for ns in netns.iter().rev() {
        note(run(Command::new("ip").args(["netns", "del", ns])).map(drop));
    }
    note(remove_cgroup_tree(cgroup_dir));
    // The agents' pins (maps and links) and the scratch directory.
    for dir in [bpffs_dir.to_path_buf(), std::env::temp_dir().join(id)] {
        if dir.exists() {
            note(
                fs::remove_dir_all(&dir)
                    .map_err(crate::io_err(format!("removing {}", dir.display()))),
            );
        }
    }
    // The shared parents go when the last testbed goes (another may be using them: ignore).
    let _ = fs::remove_dir(host.cgroup2.join(TESTBED_DIR));
    let _ = fs::remove_dir(host.bpffs.join(TESTBED_DIR));
    match first {
        None => Ok(()),
        Some(e) => Err(Error::Output {
            what: format!("tearing down testbed {id}"),
            detail: e.to_string(),
        }),
    }
}

/// Kills all processes below `dir` (cgroup.kill) and waits until the cgroup is empty.
fn kill_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    fs::write(dir.join("cgroup.kill"), "1").map_err(crate::io_err(format!(
        "writing {}/cgroup.kill",
        dir.display()
    )))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = fs::read_to_string(dir.join("cgroup.events")).map_err(crate::io_err(
            format!("reading {}/cgroup.events", dir.display()),
        ))?;
        if events.lines().any(|l| l == "populated 0") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("processes in {} to exit", dir.display()),
                after: Duration::from_secs(10),
                output: events,
            });
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Removes a cgroup directory and its children, deepest first (cgroup directories are removed
/// with rmdir; their control files go with them). A process that was still joining when the
/// tree was killed makes rmdir fail with EBUSY: kill again and retry, for a bounded time.
fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match remove_cgroup_dirs(dir) {
            Err(Error::Io { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
            {
                kill_cgroup_tree(dir)?;
                thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn remove_cgroup_dirs(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let entries = fs::read_dir(dir).map_err(crate::io_err(format!("listing {}", dir.display())))?;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_dirs(&entry.path())?;
        }
    }
    fs::remove_dir(dir).map_err(crate::io_err(format!("removing cgroup {}", dir.display())))
}

/// Removes what testbeds of processes that no longer exist left behind (a test killed with
/// SIGKILL runs no destructor). Called by [`Testbed::new`]; returns the ids removed.
pub fn sweep_stale() -> Result<Vec<String>> {
    let host = host::require_privileges()?;
    Ok(sweep_stale_in(&host))
}

fn sweep_stale_in(host: &Host) -> Vec<String> {
    let mut stale: Vec<String> = Vec::new();
    let mut consider = |name: &str| {
        if let Some(id) = testbed_id_of(name) {
            if !owner_alive(id) && !stale.iter().any(|s| s == id) {
                stale.push(id.to_string());
            }
        }
    };
    for dir in [
        Path::new(NETNS_DIR),
        &host.cgroup2.join(TESTBED_DIR),
        &host.bpffs.join(TESTBED_DIR),
        &std::env::temp_dir(),
    ] {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                consider(&e.file_name().to_string_lossy());
            }
        }
    }
    for id in &stale {
        let netns: Vec<String> = fs::read_dir(NETNS_DIR)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| testbed_id_of(n) == Some(id.as_str()))
            .collect();
        let cgroup_dir = host.cgroup2.join(TESTBED_DIR).join(id);
        let bpffs_dir = host.bpffs.join(TESTBED_DIR).join(id);
        match remove(host, id, &cgroup_dir, &bpffs_dir, &netns) {
            Ok(()) => eprintln!("testbed: removed leftovers of {id} (its process is gone)"),
            Err(e) => eprintln!("testbed: could not remove leftovers of {id}: {e}"),
        }
    }
    stale
}

/// `mtb-<pid>-<seq>` from a namespace or directory name (`mtb-<pid>-<seq>[-suffix]`).
fn testbed_id_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?;
    let seq = parts.next()?;
    if pid.is_empty()
        || seq.is_empty()
        || !pid.bytes().all(|b| b.is_ascii_digit())
        || !seq.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some(&name[..PREFIX.len() + pid.len() + 1 + seq.len()])
}

fn owner_alive(id: &str) -> bool {
    let pid = id[PREFIX.len()..].split('-').next().unwrap_or_default();
    Path::new("/proc").join(pid).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn testbed_ids_are_recognised_with_and_without_suffix() {
        assert_eq!(testbed_id_of("mtb-123-0"), Some("mtb-123-0"));
        assert_eq!(testbed_id_of("mtb-123-4-n0-p1"), Some("mtb-123-4"));
        assert_eq!(testbed_id_of("mtb-123-4-link"), Some("mtb-123-4"));
        assert_eq!(testbed_id_of("mtb-x-4"), None);
        assert_eq!(testbed_id_of("mtb-12"), None);
        assert_eq!(testbed_id_of("other-12-3"), None);
    }

    #[test]
    fn own_process_counts_as_alive() {
        assert!(owner_alive(&format!("mtb-{}-0", std::process::id())));
        // Pids are below 2^22 on Linux.
        assert!(!owner_alive("mtb-99999999-0"));
    }
}
