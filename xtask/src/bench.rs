//! `cargo xtask bench`: the mesh against a direct connection, side by side, in one run.
//!
//! One testbed (two nodes; a client pod and a server pod on node 0, a server pod on node 1) and
//! three modes over the same pods: **direct** (no agent, no programs), **mesh, sockmap off**
//! (`--no-sockmap`), **mesh, sockmap on** (the pods opt into the short-cut) and **mesh,
//! kernel-direct** (sockmap on, and `--kernel-direct`: same-node connections go straight from
//! pod to pod once the agent authorized a first one), plus, with
//! `--compare-agent <binary>`, **mesh, compared agent**: another build of the agent (an earlier
//! commit) with the pods opted in, so two designs are measured in one run. For each mode and each path (same node, across nodes) it measures bulk
//! throughput with iperf3 (1 and 8 streams), request/response latency with `mesh-probe rr`
//! (1 KiB, 1 and 64 connections, at a fixed rate and at saturation), the new-connection rate
//! (`mesh-probe connrate`), CPU per GB moved (the agents' own and the whole machine's: kernel
//! work does not show in a process's time), and, for the mesh modes, the agents' memory per idle
//! connection (`mesh-probe hold`), both agents' resident memory at the start of the round of path
//! measurements, right after it and 10 s later (what they keep after load), and the
//! new-connection rate and latency again with an `AuthorizationPolicy` of 100 rules in force
//! (every connection is checked against it).
//!
//! Release builds only (debug builds are several times slower). Results: a Markdown table with
//! each figure's ratio to direct, the raw samples as JSON, and an SVG chart, under
//! `bench-results/<unix-time>/`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use mesh_tests::{
    agent::{AgentOptions, FastpathStats},
    cluster::{ClusterFiles, SHORTCUT},
    mesh::{NS, PLAIN_NS},
    process, Agent, Pod, Process, Testbed, TestbedSpec,
};
use serde_json::{json, Value};

use crate::{functions, residency};

mod kube;
mod l7;
pub use l7::WAYPOINT_RESIDENT_PREFIX;
mod nginx;

/// How long and how often to measure.
#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    /// Record `perf` profiles of each agent during the 1-stream throughput runs, count both
    /// agents' system calls and context switches per new connection (a second connection run),
    /// list them by name (a third) and record every process's calls in order (a fourth).
    pub profile: bool,
    secs: u64,
    reps: usize,
    idle_conns: usize,
    /// Groups to measure (`throughput`, `latency`, `connrate`, `memory`, `policy`, `kube`);
    /// empty: all but `kube`.
    only: Vec<String>,
    /// Another agent binary, measured as one more mode.
    compare_agent: Option<PathBuf>,
    /// `cargo xtask order`: which pages of the agent binary the agents map, at rest and after
    /// the round.
    residency: Option<Residency>,
}

/// What `cargo xtask order` has the bench record: the binaries are those of `build` (the
/// profiling build's directory), the agents run a copy of its agent from `scratch` (a file
/// system with read-ahead off), and the pages of it they map are written to
/// `resident-<mode>-rest.txt` and `resident-<mode>-round.txt`.
#[derive(Clone, Debug)]
pub struct Residency {
    pub build: PathBuf,
    pub scratch: PathBuf,
}

/// How the residency readings' files begin.
pub const RESIDENT_PREFIX: &str = "resident-";

impl Plan {
    pub fn new(
        quick: bool,
        profile: bool,
        only: Vec<String>,
        compare_agent: Option<PathBuf>,
    ) -> Self {
        let (secs, reps, idle_conns) = if quick { (2, 1, 1_000) } else { (5, 3, 10_000) };
        Self {
            quick,
            profile,
            secs,
            reps,
            idle_conns,
            only,
            compare_agent,
            residency: None,
        }
    }

    pub fn with_residency(mut self, residency: Residency) -> Self {
        self.residency = Some(residency);
        self
    }

    /// Whether `group` is measured: every group but `kube` and `l7` when none is named.
    fn wants(&self, group: &str) -> bool {
        self.only.iter().any(|g| g == group) || self.only.iter().all(|g| only_when_named(g))
    }

    /// `l7-waypoint`: the L7 group's waypoint cases alone (no direct or nginx runs), to
    /// profile the waypoint.
    fn waypoint_only(&self) -> bool {
        self.only.iter().any(|g| g == "l7-waypoint")
    }
}

/// The groups measured only when named.
fn only_when_named(group: &str) -> bool {
    matches!(group, "kube" | "l7" | "l7-waypoint")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Direct,
    MeshNoSockmap,
    MeshSockmap,
    /// Sockmap on, pods opted in, and `--kernel-direct`.
    MeshKernelDirect,
    /// `--compare-agent`: another build, pods opted in.
    MeshCompared,
}

impl Mode {
    const ALL: [Self; 5] = [
        Self::Direct,
        Self::MeshNoSockmap,
        Self::MeshSockmap,
        Self::MeshKernelDirect,
        Self::MeshCompared,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::MeshNoSockmap => "mesh, sockmap off",
            Self::MeshSockmap => "mesh, sockmap on",
            Self::MeshKernelDirect => "mesh, kernel-direct",
            Self::MeshCompared => "mesh, compared agent",
        }
    }

    /// The label as part of a file name.
    fn slug(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::MeshNoSockmap => "sockmap-off",
            Self::MeshSockmap => "sockmap-on",
            Self::MeshKernelDirect => "kernel-direct",
            Self::MeshCompared => "compared",
        }
    }

    /// The modes `plan` measures.
    fn of(plan: &Plan) -> Vec<Self> {
        Self::ALL
            .into_iter()
            .filter(|m| *m != Self::MeshCompared || plan.compare_agent.is_some())
            .collect()
    }
}

/// One figure: its samples (one per repetition), the unit, and whether larger is better.
#[derive(Debug, Default)]
struct Figure {
    samples: Vec<f64>,
    unit: &'static str,
    higher_is_better: bool,
}

/// `(path, metric) -> mode -> figure`.
type Results = BTreeMap<(String, String), BTreeMap<Mode, Figure>>;

struct Bench {
    plan: Plan,
    /// The release build's directory.
    release: PathBuf,
    /// Where results (and profiles) go.
    out: PathBuf,
    tb: Testbed,
    files: ClusterFiles,
    results: Results,
}

const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 7000;
/// Rules of the policy the `policy` group measures with.
const POLICY_RULES: u16 = 100;
const POLICY_FILE: &str = "authz-bench.yaml";
/// The "path" of figures about the whole round of path measurements.
const ROUND: &str = "whole round";
/// How long the agents are left quiet before their memory is read again.
const SETTLE: Duration = Duration::from_secs(10);

/// An ALLOW policy for every pod of [`NS`] with [`POLICY_RULES`] rules: the first ones name
/// principals and ports that match nothing, the last allows `client` on [`RR_PORT`].
fn hundred_rule_policy(client: &Pod) -> String {
    let mut text = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: bench-{POLICY_RULES}-rules\n  namespace: {NS}\nspec:\n  action: ALLOW\n  rules:\n"
    );
    for i in 1..POLICY_RULES {
        let _ = write!(
            text,
            "  - from:\n    - source:\n        principals: [\"cluster.local/ns/other-{i}/sa/client\"]\n    to:\n    - operation:\n        ports: [\"{}\"]\n",
            RR_PORT + i
        );
    }
    let _ = write!(
        text,
        "  - from:\n    - source:\n        principals: [\"cluster.local/ns/{NS}/sa/sa-{}\"]\n    to:\n    - operation:\n        ports: [\"{RR_PORT}\"]\n",
        client.name
    );
    text
}

/// Runs the plan; returns the directory of its results.
pub fn run(root: &Path, plan: Plan) -> Result<PathBuf> {
    // The measurements use the release binaries (or the profiling build's); the lookups honour
    // these variables.
    let release = plan
        .residency
        .as_ref()
        .map_or_else(|| root.join("target/release"), |r| r.build.clone());
    std::env::set_var("MESH_MESH_AGENT_BIN", release.join("mesh-agent"));
    std::env::set_var("MESH_MESH_WAYPOINT_BIN", release.join("mesh-waypoint"));
    std::env::set_var("MESH_MESH_PROBE_BIN", release.join("mesh-probe"));
    std::env::set_var(process::QUIET_ENV, "1");
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let out = root.join("bench-results").join(stamp.to_string());
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // `kube` runs only when named: it brings its own control plane and testbed.
    if plan.only.iter().any(|g| g == "kube") {
        kube::run(&plan, &out).context("measuring the agent on Kubernetes")?;
        if plan.only.iter().all(|g| g == "kube") {
            return Ok(out);
        }
    }
    // `l7` too: the waypoint against direct HTTP, on a testbed of its own.
    if plan.only.iter().any(|g| g == "l7" || g == "l7-waypoint") {
        l7::run(&plan, &out).context("measuring the waypoint")?;
        if plan.only.iter().all(|g| only_when_named(g)) {
            return Ok(out);
        }
    }
    let tb = Testbed::new(TestbedSpec {
        nodes: 2,
        pods_per_node: 2,
    })
    .context("testbed")?;
    let files = ClusterFiles::new(tb.scratch_dir().join("config"))?;
    if let Some(other) = &plan.compare_agent {
        if !other.is_file() {
            bail!("--compare-agent {}: no such file", other.display());
        }
    }
    let mut bench = Bench {
        plan,
        release: release.clone(),
        out: out.clone(),
        tb,
        files,
        results: Results::new(),
    };
    for mode in Mode::of(&bench.plan) {
        println!("\n== {} ==", mode.label());
        let measured = bench
            .measure_mode(mode)
            .with_context(|| format!("measuring {}", mode.label()));
        // Absent for direct, which runs no agent.
        let _ = fs::remove_file(bench.agent_copy(mode));
        measured?;
    }
    let mut table = bench.markdown();
    if bench.plan.residency.is_none() {
        table.push_str(&hot_functions_found(
            root,
            functions::HOT_FUNCTIONS,
            &release.join("mesh-agent"),
        )?);
    }
    fs::write(out.join("results.md"), &table)?;
    fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&bench.json())?,
    )?;
    fs::write(out.join("throughput.svg"), bench.svg())?;
    println!(
        "\n{table}\nraw samples, table and chart in {}",
        out.display()
    );
    Ok(out)
}

/// A line saying how many of the hot-function list (`cargo xtask order`) the measured build
/// has: a list older than a compiler or dependency upgrade, or than a change to the code it
/// names, misses functions, and the agents' resident memory grows back toward the default
/// layout's. A few suffice: each function outside the list maps pages of its own among the
/// cold code (32 missing names of 4,003 cost 0.7-0.9 MiB at rest in `1796454874`), so the list
/// is called stale beyond 0.5 %.
fn hot_functions_found(root: &Path, list_path: &str, binary: &Path) -> Result<String> {
    let list = root.join(list_path);
    let Ok(text) = fs::read_to_string(&list) else {
        return Ok(format!(
            "\nNo {} (link order by default).\n",
            list.display()
        ));
    };
    let (found, listed) =
        functions::Functions::of(binary)?.count_known(functions::listed_names(&text));
    Ok(format!(
        "\nHot functions placed first (`{list_path}`): {found} of the {listed} listed are in this build{}.\n",
        if found * 200 < listed * 199 {
            "; the list is stale, run `cargo xtask order`"
        } else {
            ""
        }
    ))
}

impl Bench {
    /// Writes the config for `mode` (pods meshed or not) and starts the agents it needs.
    fn start(&mut self, mode: Mode) -> Result<Vec<Agent>> {
        let ns = if mode == Mode::Direct { PLAIN_NS } else { NS };
        let opted_in = matches!(
            mode,
            Mode::MeshSockmap | Mode::MeshKernelDirect | Mode::MeshCompared
        );
        let annotations: &[(&str, &str)] = if opted_in {
            &[(SHORTCUT, "enabled")]
        } else {
            &[]
        };
        self.files.namespace_with(NS, true, annotations)?;
        self.files.namespace(PLAIN_NS, false)?;
        for node in self.tb.nodes() {
            for pod in &node.pods {
                // Move the pod between namespaces: remove the other namespace's file.
                let other = if ns == NS { PLAIN_NS } else { NS };
                let _ = self.files.remove(&format!("pod-{other}-{}.yaml", pod.name));
                self.files.pod(pod, &node.name, ns, &[])?;
            }
        }
        if mode == Mode::Direct {
            return Ok(Vec::new());
        }
        // The lookup of the agent binary honours this variable (set to the release build).
        let source = match (&self.plan.compare_agent, mode) {
            (Some(other), Mode::MeshCompared) => other.clone(),
            _ => self.release.join("mesh-agent"),
        };
        // Every mode runs a fresh copy of its binary, made the same way: an agent's file-backed
        // RSS depends on how the file's pages sit in the page cache (the kernel maps the cached
        // pages around each one touched), and the same binary read 1.8 MiB more for both agents
        // as a copy than as the build's own output (A/A run `1796432973`).
        let agent_bin = self.agent_copy(mode);
        fs::copy(&source, &agent_bin)
            .with_context(|| format!("copying {} to {}", source.display(), agent_bin.display()))?;
        if self.plan.residency.is_some() {
            residency::drop_cached(&agent_bin)?;
        }
        std::env::set_var("MESH_MESH_AGENT_BIN", agent_bin);
        let options = AgentOptions {
            config_dir: self.files.dir().to_path_buf(),
            kubeconfig: None,
            kubepods_cgroup: None,
            sockmap: mode != Mode::MeshNoSockmap,
            keep_pins: false,
            extra_args: if mode == Mode::MeshKernelDirect {
                vec!["--kernel-direct".to_owned()]
            } else {
                Vec::new()
            },
            // A production agent's level: no per-connection log lines.
            log: "info".into(),
        };
        let mut agents = Vec::new();
        for node in self.tb.nodes() {
            let mut agent = Agent::start(node, &options)?;
            for pod in &node.pods {
                agent.wait_enrolled(&format!("{NS}/{}", pod.name), 0)?;
            }
            agents.push(agent);
        }
        Ok(agents)
    }

    fn measure_mode(&mut self, mode: Mode) -> Result<()> {
        let mut agents = self.start(mode)?;
        let client = self.tb.pod(0, 0).clone();
        let paths = [
            ("same node", self.tb.pod(0, 1).clone()),
            ("cross node", self.tb.pod(1, 0).clone()),
        ];
        let measures_paths = ["throughput", "latency", "connrate"]
            .iter()
            .any(|g| self.plan.wants(g));
        // At rest first: what the start allocated and freed (the kernel's BTF, the first
        // config) has had the time to go back.
        let at_start = if mode != Mode::Direct && measures_paths {
            std::thread::sleep(SETTLE);
            RssParts::of(&agents)?
        } else {
            RssParts::default()
        };
        if measures_paths {
            self.record_residency(mode, "rest", &agents)?;
        }
        for rep in (0..self.plan.reps).filter(|_| measures_paths) {
            for (path, server) in &paths {
                println!("{path}, repetition {}", rep + 1);
                self.measure_path(mode, path, &client, server, &agents)?;
            }
        }
        if mode != Mode::Direct && measures_paths {
            self.record_residency(mode, "round", &agents)?;
            self.record_round_memory(mode, at_start, &agents)?;
        }
        if mode != Mode::Direct && self.plan.wants("policy") {
            self.measure_policy(mode, &client, &paths, &mut agents)?;
        }
        for agent in agents {
            agent.stop()?;
        }
        // Memory last: its tens of thousands of connections leave as many client sockets in
        // TIME_WAIT toward the client pod's own port 15001 for a minute, which slows every
        // connect of that pod meanwhile (BENCHMARKS.md, "a pod's outbound connections share one
        // 4-tuple space").
        if mode != Mode::Direct && self.plan.wants("memory") {
            self.measure_idle_memory(mode, &client, &paths)?;
        }
        Ok(())
    }

    /// Memory per idle connection, each path in freshly started agents: freed buffers the
    /// allocator keeps (after bulk transfers, or the other path's connections) would absorb
    /// the idle connections and hide their cost.
    fn measure_idle_memory(
        &mut self,
        mode: Mode,
        client: &Pod,
        paths: &[(&str, Pod)],
    ) -> Result<()> {
        for (path, server) in paths {
            let agents = self.start(mode)?;
            // Same node, one agent holds both legs of every connection (two descriptors
            // each): half as many keep it under a 20,000 open-files hard limit.
            let n = if server.node == client.node {
                self.plan.idle_conns / 2
            } else {
                self.plan.idle_conns
            };
            let per_agent = Self::idle_memory(client, server, &agents, n)?;
            let largest = per_agent.iter().map(|c| c.total).fold(0.0, f64::max);
            let both: f64 = per_agent.iter().map(|c| c.total).sum();
            let largest_anon = per_agent.iter().map(|c| c.anon).fold(0.0, f64::max);
            for (metric, value) in [
                ("agent memory per idle connection (largest agent)", largest),
                ("agent memory per idle connection (both agents)", both),
                (
                    "agent memory per idle connection, anonymous (largest agent)",
                    largest_anon,
                ),
            ] {
                self.record(path, metric, mode, value, "bytes", false);
            }
            for agent in agents {
                agent.stop()?;
            }
        }
        Ok(())
    }

    /// With an `AuthorizationPolicy` of [`POLICY_RULES`] rules on every pod (the client's rule
    /// last, so each connection is checked against all of them): new connections per second
    /// and the 1-connection latency at saturation, per path.
    fn measure_policy(
        &mut self,
        mode: Mode,
        client: &Pod,
        paths: &[(&str, Pod)],
        agents: &mut [Agent],
    ) -> Result<()> {
        let from: Vec<usize> = agents.iter().map(Agent::log_len).collect();
        self.files
            .write(POLICY_FILE, &hundred_rule_policy(client))?;
        for (agent, from) in agents.iter_mut().zip(from) {
            agent.wait_for_log_from(from, "the policy", Duration::from_secs(10), |l| {
                l.contains("cluster state updated") && l.contains("authorization_policies=1")
            })?;
        }
        for rep in 0..self.plan.reps {
            for (path, server) in paths {
                println!("{path}, {POLICY_RULES}-rule policy, repetition {}", rep + 1);
                let _srv = serve_rr(server)?;
                let dst = SocketAddr::new(IpAddr::V4(server.ipv4), RR_PORT);
                let v = self.connrate(client, dst)?;
                let metric = format!("new connections/s, {POLICY_RULES}-rule policy");
                self.record(path, &metric, mode, f(&v, "cps")?, "conn/s", true);
                let v = self.rr(client, dst, 1, None)?;
                let metric =
                    format!("latency p50 (1 conn, saturation), {POLICY_RULES}-rule policy");
                self.record(path, &metric, mode, f(&v, "p50_us")?, "µs", false);
            }
        }
        self.files.remove(POLICY_FILE)?;
        Ok(())
    }

    fn measure_path(
        &mut self,
        mode: Mode,
        path: &str,
        client: &Pod,
        server: &Pod,
        agents: &[Agent],
    ) -> Result<()> {
        let streams_cases: &[u32] = if self.plan.wants("throughput") {
            &[1, 8]
        } else {
            &[]
        };
        for &streams in streams_cases {
            let fast_before = fastpath_total(agents);
            let (gbps, cpu) = self.iperf(client, server, streams, agents)?;
            let tput = format!("throughput, {streams} stream(s)");
            self.record(path, &tput, mode, gbps, "Gbit/s", true);
            if let (Some(before), Some(after)) = (fast_before, fastpath_total(agents)) {
                let d = after.since(&before);
                let shortcut = d.redirected_bytes + d.held_bytes + d.direct_bytes;
                if shortcut > 0 {
                    #[allow(clippy::cast_precision_loss)] // byte counts far below 2^52
                    let share = |bytes: u64| 100.0 * bytes as f64 / shortcut as f64;
                    let metric = format!("short-cut bytes held to TCP, {streams} stream(s)");
                    self.record(path, &metric, mode, share(d.held_bytes), "%", false);
                    let metric = format!("short-cut bytes sent direct, {streams} stream(s)");
                    self.record(path, &metric, mode, share(d.direct_bytes), "%", true);
                }
            }
            if let Some(agent_s) = cpu.agent_s_per_gb {
                let metric = format!("agent CPU per GB, {streams} stream(s)");
                self.record(path, &metric, mode, agent_s, "s/GB", false);
            }
            let metric = format!("machine CPU per GB, {streams} stream(s)");
            self.record(path, &metric, mode, cpu.machine_s_per_gb, "s/GB", false);
        }
        if !self.plan.wants("latency") && !self.plan.wants("connrate") {
            return Ok(());
        }
        let _srv = serve_rr(server)?;
        let dst = SocketAddr::new(IpAddr::V4(server.ipv4), RR_PORT);
        let rr_cases = [(1, Some(1_000)), (1, None), (64, Some(10_000)), (64, None)];
        let rr_cases = if self.plan.wants("latency") {
            &rr_cases[..]
        } else {
            &[]
        };
        for &(conns, rate) in rr_cases {
            let label = match rate {
                Some(r) => format!("{conns} conn, {r} req/s"),
                None => format!("{conns} conn, saturation"),
            };
            let v = self.rr(client, dst, conns, rate)?;
            for (key, name) in [("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")] {
                let metric = format!("latency {name} ({label})");
                self.record(path, &metric, mode, f(&v, key)?, "µs", false);
            }
            if rate.is_none() {
                let metric = format!("requests/s ({label})");
                self.record(path, &metric, mode, f(&v, "rps")?, "req/s", true);
            }
        }
        if !self.plan.wants("connrate") {
            return Ok(());
        }
        let v = self.connrate(client, dst)?;
        self.record(
            path,
            "new connections/s",
            mode,
            f(&v, "cps")?,
            "conn/s",
            true,
        );
        if self.plan.profile && !agents.is_empty() {
            self.count_per_connection(mode, path, client, server, dst, agents)?;
        }
        Ok(())
    }

    /// With a residency plan: the pages of the agent binary the agents map now
    /// (`resident-<mode>-<when>.txt`).
    fn record_residency(&self, mode: Mode, when: &str, agents: &[Agent]) -> Result<()> {
        if self.plan.residency.is_none() || agents.is_empty() {
            return Ok(());
        }
        let pids: Vec<u32> = agents.iter().map(Agent::pid).collect();
        let pages = residency::file_pages(&self.agent_copy(mode), &pids)?;
        let file = self
            .out
            .join(format!("{RESIDENT_PREFIX}{}-{when}.txt", mode.slug()));
        residency::write_pages(&file, &pages)
    }

    /// Both agents' resident memory at the start of the round (at rest), right after it, and
    /// once they have been quiet for [`SETTLE`]: what the agents hold on to after load.
    fn record_round_memory(
        &mut self,
        mode: Mode,
        at_start: RssParts,
        agents: &[Agent],
    ) -> Result<()> {
        let after = agents_rss(agents)?;
        std::thread::sleep(SETTLE);
        let settled = RssParts::of(agents)?;
        #[allow(clippy::cast_precision_loss)] // memory sizes far below 2^52
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        // Each reading at rest also split into the heap and stacks, and the binary's pages (code
        // the load ran stays mapped: that part grows with what was exercised, not with leaks).
        for (metric, value) in [
            ("both agents' RSS at rest before the round", at_start.total),
            (
                "both agents' RSS at rest before the round: anonymous",
                at_start.anon,
            ),
            (
                "both agents' RSS at rest before the round: file-backed",
                at_start.file,
            ),
            ("both agents' RSS after the round", after),
            ("both agents' RSS 10 s after the round", settled.total),
            (
                "both agents' RSS 10 s after the round: anonymous",
                settled.anon,
            ),
            (
                "both agents' RSS 10 s after the round: file-backed",
                settled.file,
            ),
        ] {
            self.record(ROUND, metric, mode, mib(value), "MiB", false);
        }
        if self.plan.profile {
            // Where it is, mapping by mapping (`smaps`), for the first agent.
            if let Some(agent) = agents.first() {
                let smaps = fs::read_to_string(format!("/proc/{}/smaps", agent.pid()))?;
                let file = self.out_file_tagged("smaps", mode.slug(), "txt");
                fs::write(&file, smaps).with_context(|| format!("writing {}", file.display()))?;
            }
        }
        Ok(())
    }

    fn record(
        &mut self,
        path: &str,
        metric: &str,
        mode: Mode,
        value: f64,
        unit: &'static str,
        higher: bool,
    ) {
        println!("  {metric}: {value:.2} {unit}");
        let fig = self
            .results
            .entry((path.to_string(), metric.to_string()))
            .or_default()
            .entry(mode)
            .or_default();
        fig.samples.push(value);
        fig.unit = unit;
        fig.higher_is_better = higher;
    }

    fn iperf(
        &self,
        client: &Pod,
        server: &Pod,
        streams: u32,
        agents: &[Agent],
    ) -> Result<(f64, Cpu)> {
        let mut srv = Process::spawn(
            "iperf3 server",
            server.command("iperf3").args([
                "-s",
                "-1",
                "--forceflush",
                "-p",
                &IPERF_PORT.to_string(),
            ]),
        )?;
        srv.wait_for_line("iperf3 to listen", Duration::from_secs(10), |l| {
            l.contains("Server listening")
        })?;
        let profilers = if self.plan.profile && streams == 1 {
            self.start_profiles(agents, server)?
        } else {
            Vec::new()
        };
        let before = CpuSample::take(agents)?;
        let out = process::run(client.command("iperf3").args([
            "-c",
            &server.ipv4.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &self.plan.secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ]))?;
        let after = CpuSample::take(agents)?;
        srv.wait(Duration::from_secs(10))?;
        finish_profiles(profilers)?;
        let v: Value = serde_json::from_str(&out).context("iperf3 JSON")?;
        if let Some(error) = v["error"].as_str() {
            bail!(
                "iperf3 to {} with {streams} stream(s): {error}",
                server.ipv4
            );
        }
        let received = &v["end"]["sum_received"];
        let bits_per_second = received["bits_per_second"]
            .as_f64()
            .context("iperf3: no bits_per_second")?;
        let bytes = received["bytes"].as_f64().context("iperf3: no bytes")?;
        Ok((bits_per_second / 1e9, before.per_gb(&after, bytes)))
    }

    /// `--profile`: the new-connection run again, with both agents' system calls and context
    /// switches counted (`perf stat`) and each agent profiled (`perf record`): what a connection
    /// costs the agents besides CPU time (each context switch is a wake-up on the way); then once
    /// more under `perf trace`, for the calls by name, and once more for a timeline.
    fn count_per_connection(
        &mut self,
        mode: Mode,
        path: &str,
        client: &Pod,
        server: &Pod,
        dst: SocketAddr,
        agents: &[Agent],
    ) -> Result<()> {
        let pids: Vec<String> = agents.iter().map(|a| a.pid().to_string()).collect();
        let counts = self.out_file(server, "perf-stat", "txt");
        // A second longer than the run, so that it covers all of it.
        let secs = (self.plan.secs + 1).to_string();
        let mut stat = perf_stat(
            "raw_syscalls:sys_enter,context-switches",
            &pids.join(","),
            &counts,
            &secs,
        )?;
        let profilers = self.start_profiles(agents, server)?;
        let v = self.connrate(client, dst)?;
        stat.wait_success(Duration::from_secs(30))?;
        finish_profiles(profilers)?;
        let conns = f(&v, "connections")?.max(1.0);
        let text = fs::read_to_string(&counts)?;
        for (event, metric) in [
            (
                "raw_syscalls:sys_enter",
                "agent system calls per new connection",
            ),
            (
                "context-switches",
                "agent context switches per new connection",
            ),
        ] {
            let count = perf_stat_count(&text, event)
                .with_context(|| format!("no {event} in {}", counts.display()))?;
            self.record(path, metric, mode, count / conns, "per conn", false);
        }
        // Which calls, per thread: a third run under `perf trace` (slower: not counted above).
        let calls = self.out_file(server, "perf-trace", "txt");
        let mut trace = std::process::Command::new("perf");
        trace
            .args(["trace", "-s", "-p", &pids.join(","), "-o"])
            .arg(&calls)
            .args(["--", "sleep", &secs]);
        let mut trace = Process::spawn("perf trace", &mut trace)?;
        let traced = self.connrate(client, dst)?;
        trace.wait_success(Duration::from_secs(30))?;
        println!(
            "  system calls of {} connections by name: {}",
            f(&traced, "connections")?,
            calls.display()
        );
        // The order of events: every process's system calls with their times (client, agents,
        // server), for 0.3 s a second into a fourth run (started by then): which wake-up waits
        // for which.
        let timeline = self.out_file(server, "perf-timeline", "txt");
        let mut all = std::process::Command::new("sh");
        all.arg("-c")
            .arg("sleep 1 && exec perf trace -a -o \"$0\" -- sleep 0.3")
            .arg(&timeline);
        let mut all = Process::spawn("perf trace -a", &mut all)?;
        let connrate = self.connrate(client, dst);
        all.wait_success(Duration::from_secs(30))?;
        connrate?;
        println!(
            "  timeline of every process's calls: {}",
            timeline.display()
        );
        Ok(())
    }

    /// A new file in the results directory, named after the path `server` is on.
    fn out_file(&self, server: &Pod, what: &str, ext: &str) -> PathBuf {
        self.out_file_tagged(what, path_tag(server), ext)
    }

    /// Where `mode` runs its copy of the agent binary (removed once the mode is measured).
    fn agent_copy(&self, mode: Mode) -> PathBuf {
        let dir = self
            .plan
            .residency
            .as_ref()
            .map_or(&self.out, |r| &r.scratch);
        dir.join(format!("mesh-agent-{}", mode.slug()))
    }

    /// A new file in the results directory: `<what>-<sequence>-<tag>.<ext>`.
    fn out_file_tagged(&self, what: &str, tag: &str, ext: &str) -> PathBuf {
        let n = fs::read_dir(&self.out).map_or(0, Iterator::count);
        self.out.join(format!("{what}-{n}-{tag}.{ext}"))
    }

    /// Starts `perf record` (software clock, call graphs) on each agent for the next run, one
    /// profile per agent (`perf-<n>-<path>-agent<i>.data`; agent 0 is the source's).
    fn start_profiles(&self, agents: &[Agent], server: &Pod) -> Result<Vec<(Process, PathBuf)>> {
        let path = path_tag(server);
        agents
            .iter()
            .enumerate()
            .map(|(i, agent)| {
                let data = self.out_file_tagged("perf", &format!("{path}-agent{i}"), "data");
                self.start_profile(agent, data)
            })
            .collect()
    }

    fn start_profile(&self, agent: &Agent, data: PathBuf) -> Result<(Process, PathBuf)> {
        let (pid, secs) = (agent.pid().to_string(), self.plan.secs.to_string());
        let mut cmd = std::process::Command::new("perf");
        cmd.args([
            "record",
            "-e",
            "cpu-clock",
            "-F",
            "499",
            "-g",
            "-p",
            &pid,
            "-o",
        ])
        .arg(&data)
        .args(["--", "sleep", &secs]);
        Ok((Process::spawn("perf", &mut cmd)?, data))
    }

    fn rr(&self, client: &Pod, dst: SocketAddr, conns: u32, rate: Option<u32>) -> Result<Value> {
        let duration_ms = (self.plan.secs * 1000).to_string();
        let mut args = vec![
            "rr".to_string(),
            dst.to_string(),
            "--conns".into(),
            conns.to_string(),
            "--duration-ms".into(),
            duration_ms,
        ];
        if let Some(r) = rate {
            args.extend(["--rate".into(), r.to_string()]);
        }
        probe_json(client, &args)
    }

    fn connrate(&self, client: &Pod, dst: SocketAddr) -> Result<Value> {
        let duration_ms = (self.plan.secs * 1000).to_string();
        probe_json(
            client,
            &[
                "connrate".into(),
                dst.to_string(),
                "--duration-ms".into(),
                duration_ms,
            ],
        )
    }

    /// Opens `idle_conns` connections through the mesh, keeps them idle, and returns how much
    /// each agent's resident memory grew per connection, read once the agents have been quiet
    /// for [`SETTLE`]: what the connections' set-up freed (dialling, handshakes, requests) has
    /// gone back by then, and what is left is what an idle connection keeps.
    ///
    /// The cost of one more connection: a tenth as many are opened first and held, and the
    /// reading before is taken with them open. What an agent's first connections cost once
    /// (the code they run mapped in, pools and tables set up) is counted in its RSS after the
    /// round, not spread over these.
    fn idle_memory(
        client: &Pod,
        server: &Pod,
        agents: &[Agent],
        n: usize,
    ) -> Result<Vec<IdleCost>> {
        let _srv = serve_rr(server)?;
        let rss = || -> Result<Vec<RssParts>> {
            agents.iter().map(|a| RssParts::of_pid(a.pid())).collect()
        };
        let bin = mesh_tests::agent::binary("mesh-probe", "mesh-tests")?;
        let dst = SocketAddr::new(IpAddr::V4(server.ipv4), RR_PORT);
        let hold = |name: &str, conns: usize, secs: u64| -> Result<Process> {
            let mut p = Process::spawn(
                name,
                client.command(&bin).args([
                    "hold",
                    &dst.to_string(),
                    "--conns",
                    &conns.to_string(),
                    "--hold-ms",
                    &(secs * 1000).to_string(),
                ]),
            )?;
            p.wait_for_line(
                "the connections to be open",
                Duration::from_secs(120),
                |l| l.starts_with("holding "),
            )?;
            Ok(p)
        };
        let settle = SETTLE.as_secs();
        // Closed when dropped, after the reading below.
        let _first = hold("hold-first", (n / 10).max(1), 3 * settle + 150)?;
        // Both readings at rest: start-up and opening connections also free memory (the
        // kernel's BTF, handshakes), which goes back within the same time.
        std::thread::sleep(SETTLE);
        let before = rss()?;
        let mut hold = hold("hold", n, settle + 3)?;
        std::thread::sleep(SETTLE);
        let during = rss()?;
        hold.wait_success(Duration::from_secs(60))?;
        #[allow(clippy::cast_precision_loss)] // memory sizes far below 2^52
        let per_conn = |d: u64, b: u64| d.saturating_sub(b) as f64 / n as f64;
        Ok(during
            .iter()
            .zip(&before)
            .map(|(d, b)| IdleCost {
                total: per_conn(d.total, b.total),
                anon: per_conn(d.anon, b.anon),
            })
            .collect())
    }

    fn markdown(&self) -> String {
        let modes = Mode::of(&self.plan);
        let mut t = String::from("| path | metric |");
        for mode in &modes {
            let _ = write!(t, " {} |", mode.label());
        }
        t.push_str("\n|---|---|");
        t.push_str(&"---|".repeat(modes.len()));
        t.push('\n');
        for ((path, metric), by_mode) in &self.results {
            let direct = by_mode.get(&Mode::Direct).map(|fig| median(&fig.samples));
            let mut row = format!("| {path} | {metric} |");
            for &mode in &modes {
                match by_mode.get(&mode) {
                    Some(fig) => {
                        let m = median(&fig.samples);
                        let spread = spread(&fig.samples);
                        let _ = write!(row, " {m:.2} {}", fig.unit);
                        if self.plan.reps > 1 {
                            let _ = write!(row, " ±{spread:.0}%");
                        }
                        if let (Some(d), false) = (direct, mode == Mode::Direct) {
                            if d > 0.0 {
                                let _ = write!(row, " ({:.2}×)", m / d);
                            }
                        }
                        row.push_str(" |");
                    }
                    None => row.push_str(" – |"),
                }
            }
            let _ = writeln!(t, "{row}");
        }
        let _ = writeln!(
            t,
            "\n{} run: {} s per measurement, {} repetition(s), median (± half the max–min range, as % of the median); (×) is the ratio to direct.",
            if self.plan.quick { "Quick" } else { "Full" },
            self.plan.secs,
            self.plan.reps
        );
        t
    }

    fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .results
            .iter()
            .flat_map(|((path, metric), by_mode)| {
                by_mode.iter().map(move |(mode, fig)| {
                    json!({"path": path, "metric": metric, "mode": mode.label(), "unit": fig.unit,
                           "samples": fig.samples, "median": median(&fig.samples)})
                })
            })
            .collect();
        json!({"quick": self.plan.quick, "seconds": self.plan.secs, "repetitions": self.plan.reps, "results": rows})
    }

    /// A grouped bar chart of the throughput figures.
    fn svg(&self) -> String {
        let bars: Vec<(String, Vec<(Mode, f64)>)> = self
            .results
            .iter()
            .filter(|((_, metric), _)| metric.starts_with("throughput"))
            .map(|((path, metric), by_mode)| {
                (
                    format!("{path}, {}", metric.trim_start_matches("throughput, ")),
                    by_mode
                        .iter()
                        .map(|(m, fig)| (*m, median(&fig.samples)))
                        .collect(),
                )
            })
            .collect();
        let max = bars
            .iter()
            .flat_map(|(_, v)| v.iter().map(|(_, x)| *x))
            .fold(0.0_f64, f64::max)
            .max(0.1);
        let (group_w, bar_w, height, top, left) = (190.0, 50.0, 300.0, 40.0, 50.0);
        #[allow(clippy::cast_precision_loss)]
        let width = left + group_w * bars.len() as f64 + 20.0;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"{left}\" y=\"20\" font-size=\"15\">Throughput, Gbit/s (median)</text>\n",
            top + height + 90.0
        );
        let colors = ["#888888", "#4c78a8", "#f58518", "#e45756", "#54a24b"];
        for (g, (label, values)) in bars.iter().enumerate() {
            #[allow(clippy::cast_precision_loss)]
            let x0 = left + group_w * g as f64;
            for (i, (mode, v)) in values.iter().enumerate() {
                let h = v / max * height;
                #[allow(clippy::cast_precision_loss)]
                let x = x0 + bar_w * i as f64;
                let color = colors[Mode::ALL.iter().position(|m| m == mode).unwrap_or(0)];
                let _ = writeln!(
                    s,
                    "<rect x=\"{x}\" y=\"{}\" width=\"{}\" height=\"{h}\" fill=\"{color}\"/>",
                    top + height - h,
                    bar_w - 6.0
                );
                let _ = writeln!(
                    s,
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{v:.1}</text>",
                    x + (bar_w - 6.0) / 2.0,
                    top + height - h - 4.0
                );
            }
            let _ = writeln!(
                s,
                "<text x=\"{x0}\" y=\"{}\">{label}</text>",
                top + height + 18.0
            );
        }
        for (i, mode) in Mode::of(&self.plan).iter().enumerate() {
            #[allow(clippy::cast_precision_loss)]
            let x = left + 170.0 * i as f64;
            let y = top + height + 50.0;
            let _ = writeln!(s, "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{y}\">{}</text>", y - 10.0, colors[Mode::ALL.iter().position(|m| m == mode).unwrap_or(0)], x + 16.0, mode.label());
        }
        s.push_str("</svg>\n");
        s
    }
}

/// The fast-path counters of all `agents` together, if every one can be read.
fn fastpath_total(agents: &[Agent]) -> Option<FastpathStats> {
    let mut total = FastpathStats::default();
    for agent in agents {
        let f = agent.fastpath().ok()?;
        total.redirected_bytes += f.redirected_bytes;
        total.passed_bytes += f.passed_bytes;
        total.held_bytes += f.held_bytes;
        total.direct_bytes += f.direct_bytes;
    }
    (!agents.is_empty()).then_some(total)
}

/// `perf stat` counting `events` of processes `pids` (comma-separated) for `secs` seconds, its
/// counts in CSV to `out` (read with [`perf_stat_count`]).
fn perf_stat(events: &str, pids: &str, out: &Path, secs: &str) -> Result<Process> {
    let mut stat = std::process::Command::new("perf");
    stat.args(["stat", "-x", ",", "-e", events, "-p", pids, "-o"])
        .arg(out)
        .args(["--", "sleep", secs]);
    Ok(Process::spawn("perf stat", &mut stat)?)
}

/// The count of `event` in `perf stat -x ,` output (`value,unit,event,...` lines).
pub(super) fn perf_stat_count(text: &str, event: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let mut fields = line.split(',');
        let value = fields.next()?;
        let _unit = fields.next()?;
        (fields.next()? == event).then(|| value.parse().ok())?
    })
}

/// The path `server` is on, as results files name it.
fn path_tag(server: &Pod) -> &'static str {
    if server.node == 0 {
        "same-node"
    } else {
        "cross-node"
    }
}

/// Waits for the profilers and writes each profile's top symbols next to it.
fn finish_profiles(profilers: Vec<(Process, PathBuf)>) -> Result<()> {
    for (mut perf, data) in profilers {
        perf.wait(Duration::from_secs(30))?;
        report_profile(&data)?;
    }
    Ok(())
}

/// Writes the profile's top symbols next to it (`<data>.txt`).
pub(super) fn report_profile(data: &Path) -> Result<()> {
    let report = process::run(
        std::process::Command::new("perf")
            .args(["report", "--stdio", "--no-children", "--sort", "dso,symbol"])
            .args(["--percent-limit", "1.5", "-g", "none", "-i"])
            .arg(data),
    )?;
    let text = data.with_extension("txt");
    fs::write(&text, report)?;
    println!("  agent profile: {}", text.display());
    Ok(())
}

fn f(v: &Value, key: &str) -> Result<f64> {
    v[key].as_f64().with_context(|| format!("no {key} in {v}"))
}

fn serve_rr(server: &Pod) -> Result<Process> {
    let addr: SocketAddr = format!("[::]:{RR_PORT}").parse()?;
    Ok(mesh_tests::probe::serve_mode(server, addr, "rr")?)
}

fn probe_json(pod: &Pod, args: &[String]) -> Result<Value> {
    let bin = mesh_tests::agent::binary("mesh-probe", "mesh-tests")?;
    let out = process::run(pod.command(bin).args(args))?;
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no JSON from mesh-probe {args:?}: {out}"))?;
    serde_json::from_str(line).with_context(|| format!("parsing {line}"))
}

fn median(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

/// Half the max-min range as a percentage of the median.
fn spread(samples: &[f64]) -> f64 {
    let (min, max) = samples
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let m = median(samples);
    if m == 0.0 || samples.len() < 2 {
        0.0
    } else {
        (max - min) / 2.0 / m * 100.0
    }
}

/// CPU time of the agents and of the whole machine at one moment.
struct CpuSample {
    agent_ticks: Option<u64>,
    machine_busy_ticks: u64,
}

struct Cpu {
    agent_s_per_gb: Option<f64>,
    machine_s_per_gb: f64,
}

/// Linux's `USER_HZ` (`/proc` reports CPU time in these ticks).
const TICKS_PER_SEC: f64 = 100.0;

impl CpuSample {
    fn take(agents: &[Agent]) -> Result<Self> {
        let agent_ticks = if agents.is_empty() {
            None
        } else {
            Some(
                agents
                    .iter()
                    .map(|a| process_ticks(a.pid()))
                    .sum::<Result<u64>>()?,
            )
        };
        let stat = fs::read_to_string("/proc/stat")?;
        let cpu: Vec<u64> = stat
            .lines()
            .next()
            .context("empty /proc/stat")?
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
        let busy = cpu.iter().take(8).sum::<u64>()
            - cpu.get(3).copied().unwrap_or(0)
            - cpu.get(4).copied().unwrap_or(0);
        Ok(Self {
            agent_ticks,
            machine_busy_ticks: busy,
        })
    }

    #[allow(clippy::cast_precision_loss)] // tick counts far below 2^52
    fn per_gb(&self, after: &Self, bytes: f64) -> Cpu {
        let gb = (bytes / 1e9).max(1e-9);
        Cpu {
            agent_s_per_gb: self
                .agent_ticks
                .zip(after.agent_ticks)
                .map(|(a, b)| (b.saturating_sub(a)) as f64 / TICKS_PER_SEC / gb),
            machine_s_per_gb: (after
                .machine_busy_ticks
                .saturating_sub(self.machine_busy_ticks)) as f64
                / TICKS_PER_SEC
                / gb,
        }
    }
}

/// utime + stime of a process, in ticks (`/proc/<pid>/stat` fields 14 and 15).
fn process_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces; fields after it start past the last ')'.
    let rest = stat.rsplit_once(')').context("malformed /proc/pid/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// What each idle connection added to an agent's resident memory, in bytes: in all, and of it
/// anonymous (the heap: what the connection keeps; the rest is file-backed, pages of code or
/// data a connection's path ran into for the first time, near zero once the first tenth of the
/// connections is open before the reading they are measured from).
#[derive(Clone, Copy, Debug)]
struct IdleCost {
    total: f64,
    anon: f64,
}

/// The agents' resident memory, summed, and its anonymous and file-backed parts.
#[derive(Clone, Copy, Debug, Default)]
struct RssParts {
    total: u64,
    anon: u64,
    file: u64,
}

impl RssParts {
    fn of(agents: &[Agent]) -> Result<Self> {
        let mut sum = Self::default();
        for agent in agents {
            let one = Self::of_pid(agent.pid())?;
            sum.total += one.total;
            sum.anon += one.anon;
            sum.file += one.file;
        }
        Ok(sum)
    }

    /// One reading of a process's status, so the parts add up to its total.
    fn of_pid(pid: u32) -> Result<Self> {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        Ok(Self {
            total: status_kib(&status, "VmRSS:")? * 1024,
            anon: status_kib(&status, "RssAnon:")? * 1024,
            file: status_kib(&status, "RssFile:")? * 1024,
        })
    }
}

/// The agents' resident memory, summed.
fn agents_rss(agents: &[Agent]) -> Result<u64> {
    agents.iter().map(|a| rss_bytes(a.pid())).sum()
}

fn rss_bytes(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status_kib(&status, "VmRSS:")? * 1024)
}

/// A size field of a `/proc/<pid>/status` text (`VmRSS:`, `RssAnon:`, …), in KiB.
fn status_kib(status: &str, field: &str) -> Result<u64> {
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .with_context(|| format!("no {field} in /proc/<pid>/status"))?
        .split_whitespace()
        .next()
        .with_context(|| format!("empty {field}"))?
        .parse()?;
    Ok(kib)
}

/// The benchmarks need iperf3 in the pods' namespaces; setup installs it.
pub fn check_tools() -> Result<()> {
    if !PathBuf::from("/usr/bin/iperf3").exists() {
        bail!("iperf3 is not installed; run `cargo xtask setup`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_stat_counts_are_read_by_event() {
        let text = "# started on Fri Dec  4 12:00:00 2026\n\n\
                    81234,,raw_syscalls:sys_enter,5001234567,100.00,,\n\
                    4321,,context-switches,5001234567,100.00,,\n";
        assert_eq!(
            perf_stat_count(text, "raw_syscalls:sys_enter"),
            Some(81234.0)
        );
        assert_eq!(perf_stat_count(text, "context-switches"), Some(4321.0));
        assert_eq!(perf_stat_count(text, "cpu-migrations"), None);
        assert_eq!(
            perf_stat_count(
                "<not counted>,,context-switches,0,0.00,,",
                "context-switches"
            ),
            None
        );
    }

    #[test]
    fn median_and_spread() {
        assert!((median(&[3.0, 1.0, 2.0]) - 2.0).abs() < 1e-9);
        assert!((median(&[4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < 1e-9);
        assert!((spread(&[9.0, 10.0, 11.0]) - 10.0).abs() < 1e-9);
        assert!(spread(&[5.0]).abs() < 1e-9);
    }

    #[test]
    fn process_ticks_of_self_parse() {
        assert!(process_ticks(std::process::id()).is_ok());
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
        let status = fs::read_to_string("/proc/self/status").unwrap();
        assert!(status_kib(&status, "RssAnon:").unwrap() > 0);
        assert!(status_kib(&status, "NoSuchField:").is_err());
    }
}
