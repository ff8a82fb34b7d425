//! Runs the real `mesh-agent` binary on a testbed node and reads what it reports.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde::Deserialize;

use crate::{process::run, Error, Node, Process, Result};

/// How long an agent may take to load and attach its programs.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Per-cgroup counters as printed by `mesh-agent stats --json`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct CgroupStats {
    pub cgroup_id: u64,
    pub connect4: u64,
    pub connect6: u64,
}

/// The `sk_msg` fast path's node-wide totals, the `{"fastpath":{...}}` line of
/// `mesh-agent stats --json`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct FastpathStats {
    /// Messages (and their bytes) moved straight into the peer socket's receive queue.
    pub redirected_msgs: u64,
    pub redirected_bytes: u64,
    /// Messages (and their bytes) that took the TCP path: peer not in the SOCKHASH.
    pub passed_msgs: u64,
    pub passed_bytes: u64,
    /// Messages (and their bytes) of short-cut legs held to the TCP path: the peer had its
    /// budget's worth unread, or earlier TCP-path bytes were unread. (Absent from agents built
    /// before the budget: 0.)
    #[serde(default)]
    pub held_msgs: u64,
    #[serde(default)]
    pub held_bytes: u64,
    /// Messages (and their bytes) of same-node connections sent from one application straight
    /// to the other, past both legs. (Absent from agents built before: 0.)
    #[serde(default)]
    pub direct_msgs: u64,
    #[serde(default)]
    pub direct_bytes: u64,
}

impl FastpathStats {
    /// Bytes counted once per pod-local leg crossed: on the same node a byte crosses two legs
    /// (redirected or held on each), or goes direct, standing for both.
    #[must_use]
    pub fn leg_bytes(&self) -> u64 {
        2 * self.direct_bytes + self.redirected_bytes + self.held_bytes
    }

    /// What was counted since `earlier` (a reading of the same map).
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            redirected_msgs: self.redirected_msgs - earlier.redirected_msgs,
            redirected_bytes: self.redirected_bytes - earlier.redirected_bytes,
            passed_msgs: self.passed_msgs - earlier.passed_msgs,
            passed_bytes: self.passed_bytes - earlier.passed_bytes,
            held_msgs: self.held_msgs - earlier.held_msgs,
            held_bytes: self.held_bytes - earlier.held_bytes,
            direct_msgs: self.direct_msgs - earlier.direct_msgs,
            direct_bytes: self.direct_bytes - earlier.direct_bytes,
        }
    }
}

/// One line of `mesh-agent stats --json`.
#[derive(Deserialize)]
#[serde(untagged)]
enum StatsLine {
    Fastpath { fastpath: FastpathStats },
    Cgroup(CgroupStats),
}

/// How to start an agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Directory of Kubernetes-style YAML the agent watches (unless `kubeconfig` is set; the
    /// built-in CA's directory is `ca` beside it either way).
    pub config_dir: PathBuf,
    /// Read the cluster from the Kubernetes API with this kubeconfig instead of `config_dir`.
    /// The agent's CNI hand-over socket is then [`AgentOptions::cni_socket`] for its node.
    pub kubeconfig: Option<PathBuf>,
    /// With `kubeconfig`: the cgroup directory holding the node's `kubepods` tree.
    pub kubepods_cgroup: Option<PathBuf>,
    /// Offer the sockmap short-cut to pods that opt in (`false`: `--no-sockmap`).
    pub sockmap: bool,
    /// Keep pinned maps at exit (for restart tests).
    pub keep_pins: bool,
    /// More command-line arguments for `mesh-agent run` (certificate lifetime, pool limits).
    pub extra_args: Vec<String>,
    /// The agent's `RUST_LOG`.
    pub log: String,
}

/// The tests' log directives: the default `info`, plus the per-connection lines a production
/// agent does not write (the kernel's `connect4`/`connect6` records and "connection closed"),
/// which the tests read.
pub const TEST_LOG: &str =
    "info,mesh_ebpf=debug,mesh_agent::telemetry=debug,mesh_agent::proxy::direct=debug";

impl AgentOptions {
    /// Options for agents serving the pods of `config_dir`. The certificate authority's
    /// directory is `ca` beside it, shared by every agent of the testbed.
    pub fn new(config_dir: impl Into<PathBuf>) -> Self {
        Self {
            config_dir: config_dir.into(),
            kubeconfig: None,
            kubepods_cgroup: None,
            sockmap: true,
            keep_pins: false,
            extra_args: Vec::new(),
            log: TEST_LOG.into(),
        }
    }

    /// The CNI hand-over socket of the agent of `node` (beside the config directory, one per
    /// node: the nodes of a testbed share one machine).
    pub fn cni_socket(&self, node: &str) -> PathBuf {
        self.config_dir.with_file_name(format!("cni-{node}.sock"))
    }

    /// The built-in certificate authority's directory.
    pub fn ca_dir(&self) -> PathBuf {
        self.config_dir.with_file_name("ca")
    }
}

/// A `mesh-agent run` process on a node.
#[derive(Debug)]
pub struct Agent {
    process: Process,
    bpffs_dir: PathBuf,
}

impl Agent {
    /// Starts the agent in `node`'s namespace and cgroup, serving the pods that `options`'
    /// config directory enrolls on this node, and waits until it reports ready.
    pub fn start(node: &Node, options: &AgentOptions) -> Result<Self> {
        let bin = binary("mesh-agent", "mesh-agent")?;
        let mut cmd = node.command(&bin);
        cmd.args(["run", "--node-name", &node.name, "--bpffs-dir"])
            .arg(&node.bpffs_dir);
        match &options.kubeconfig {
            Some(kubeconfig) => {
                cmd.arg("--kubeconfig")
                    .arg(kubeconfig)
                    .arg("--cni-socket")
                    .arg(options.cni_socket(&node.name));
                if let Some(dir) = &options.kubepods_cgroup {
                    cmd.arg("--kubepods-cgroup").arg(dir);
                }
                &mut cmd
            }
            None => cmd.arg("--config-dir").arg(&options.config_dir),
        };
        cmd.arg("--ca-dir")
            .arg(options.ca_dir())
            .args(&options.extra_args)
            .env("RUST_LOG", &options.log)
            .env("NO_COLOR", "1")
            // Errors as one readable line, without anyhow's backtrace.
            .env("RUST_LIB_BACKTRACE", "0");
        if !options.sockmap {
            cmd.arg("--no-sockmap");
        }
        if options.keep_pins {
            cmd.arg("--keep-pins");
        }
        let mut process = Process::spawn(format!("agent {}", node.name), &mut cmd)?;
        process.wait_for_line("the agent to report ready", READY_TIMEOUT, |l| {
            l.contains("agent ready")
        })?;
        Ok(Self {
            process,
            bpffs_dir: node.bpffs_dir.clone(),
        })
    }

    /// `mesh-agent stats` as a table, as an operator sees it.
    pub fn stats_table(&self) -> Result<String> {
        let bin = binary("mesh-agent", "mesh-agent")?;
        run(Command::new(bin)
            .args(["stats", "--bpffs-dir"])
            .arg(&self.bpffs_dir))
    }

    /// The sockets in the agent's short-cut now (`mesh-agent stats --sockets`): one
    /// `(netns cookie, local, remote)` per socket.
    pub fn shortcut_sockets(&self) -> Result<Vec<(u64, SocketAddr, SocketAddr)>> {
        let bin = binary("mesh-agent", "mesh-agent")?;
        let out = run(Command::new(bin)
            .args(["stats", "--sockets", "--bpffs-dir"])
            .arg(&self.bpffs_dir))?;
        let bad = |l: &str| Error::Output {
            what: "mesh-agent stats --sockets".into(),
            detail: l.to_owned(),
        };
        out.lines()
            .filter_map(|l| l.strip_prefix("shortcut socket netns="))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f.as_slice() {
                    [netns, local, "->", remote] => Ok((
                        netns.parse().map_err(|_| bad(l))?,
                        local.parse().map_err(|_| bad(l))?,
                        remote.parse().map_err(|_| bad(l))?,
                    )),
                    _ => Err(bad(l)),
                }
            })
            .collect()
    }

    /// Every line of `mesh-agent stats --json`, parsed.
    fn stats_lines(&self) -> Result<Vec<StatsLine>> {
        let bin = binary("mesh-agent", "mesh-agent")?;
        let out = run(Command::new(bin)
            .args(["stats", "--json", "--bpffs-dir"])
            .arg(&self.bpffs_dir))?;
        out.lines()
            .map(|l| {
                serde_json::from_str(l).map_err(|e| Error::Output {
                    what: "mesh-agent stats --json".into(),
                    detail: format!("{e}: {l}"),
                })
            })
            .collect()
    }

    /// Per-cgroup kernel counters, read from the agent's pinned map with `mesh-agent stats`.
    pub fn stats(&self) -> Result<Vec<CgroupStats>> {
        Ok(self
            .stats_lines()?
            .into_iter()
            .filter_map(|l| match l {
                StatsLine::Cgroup(c) => Some(c),
                StatsLine::Fastpath { .. } => None,
            })
            .collect())
    }

    /// The `sk_msg` fast path's totals, read from the agent's pinned map with `mesh-agent stats`.
    pub fn fastpath(&self) -> Result<FastpathStats> {
        let mut found = self.stats_lines()?.into_iter().filter_map(|l| match l {
            StatsLine::Fastpath { fastpath } => Some(fastpath),
            StatsLine::Cgroup(_) => None,
        });
        match (found.next(), found.next()) {
            (Some(f), None) => Ok(f),
            (first, _) => Err(Error::Output {
                what: "mesh-agent stats --json".into(),
                detail: format!(
                    "expected exactly one fastpath line, found {}",
                    if first.is_some() { "several" } else { "none" }
                ),
            }),
        }
    }

    /// Counters of one cgroup; zero when the programs never counted anything for it.
    pub fn stats_for(&self, cgroup_id: u64) -> Result<CgroupStats> {
        Ok(self
            .stats()?
            .into_iter()
            .find(|s| s.cgroup_id == cgroup_id)
            .unwrap_or(CgroupStats {
                cgroup_id,
                connect4: 0,
                connect6: 0,
            }))
    }

    /// Number of log lines so far: a starting point for [`Self::wait_for_log_from`].
    pub fn log_len(&self) -> usize {
        self.process.line_count()
    }

    /// Waits until the agent reports pod `namespace/name` enrolled, in lines from `from` on.
    pub fn wait_enrolled(&mut self, pod: &str, from: usize) -> Result<()> {
        let needle = format!("pod={pod} ");
        self.process
            .wait_for_line_from(from, &format!("{pod} to be enrolled"), READY_TIMEOUT, |l| {
                l.contains("pod enrolled") && l.contains(&needle)
            })
            .map(drop)
    }

    /// Waits for a log line satisfying `pred`, among lines from index `from` on.
    pub fn wait_for_log_from(
        &mut self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        self.process.wait_for_line_from(from, what, timeout, pred)
    }

    /// Waits for a log line of the agent that satisfies `pred`.
    pub fn wait_for_log(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        self.process.wait_for_line(what, timeout, pred)
    }

    /// Every line the agent logged so far.
    pub fn logs(&self) -> Vec<String> {
        self.process.lines()
    }

    /// The agent's bpffs pin directory.
    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// SIGTERM, then checks that the agent exited cleanly.
    pub fn stop(mut self) -> Result<Vec<String>> {
        let status = self.process.terminate(Duration::from_secs(10))?;
        if !status.success() {
            return Err(Error::Exited {
                name: self.process.name().to_string(),
                status: status.to_string(),
                what: "a clean shutdown".into(),
                output: self.process.tail(),
            });
        }
        Ok(self.process.lines())
    }

    /// SIGKILL, as a crash or an OOM kill ends it: no cleanup runs, pins and links stay.
    /// Returns every line it logged, once it has exited.
    pub fn kill(mut self) -> Result<Vec<String>> {
        self.process.signal(nix::sys::signal::Signal::SIGKILL)?;
        self.process.wait(Duration::from_secs(10))?;
        Ok(self.process.lines())
    }

    /// Process id of the agent (for CPU and memory accounting).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Stops the agent (SIGSTOP), as a starved or stalled agent would be: its sockets and the
    /// kernel's programs stay, nothing of it runs. It continues (SIGCONT) when the guard drops.
    pub fn pause(&self) -> Result<Paused<'_>> {
        self.process.signal(nix::sys::signal::Signal::SIGSTOP)?;
        Ok(Paused { agent: self })
    }
}

/// A stopped agent ([`Agent::pause`]); dropping it lets the agent continue.
#[derive(Debug)]
#[must_use = "the agent continues when this is dropped"]
pub struct Paused<'a> {
    agent: &'a Agent,
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        if let Err(error) = self.agent.process.signal(nix::sys::signal::Signal::SIGCONT) {
            eprintln!("continuing the agent: {error}");
        }
    }
}

/// Path of a binary built from this workspace: `$MESH_<NAME>_BIN` if set, otherwise next to the
/// running executable (tests run from `target/<profile>/deps`, xtask from `target/<profile>`).
pub fn binary(name: &str, package: &str) -> Result<PathBuf> {
    let var = format!("MESH_{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&var) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(crate::io_err("locating the running executable"))?;
    let looked: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(name))
        .collect();
    looked
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| Error::BinaryNotFound {
            name: name.into(),
            package: package.into(),
            looked,
        })
}
