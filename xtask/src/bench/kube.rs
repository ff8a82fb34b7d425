//! `cargo xtask bench --only kube`: the agent on a real Kubernetes control plane
//! (`mesh_tests::kube::ControlPlane`), the real release `mesh-agent` in a testbed node, with its
//! least RBAC (`deploy/rbac/agent.yaml`) and a token bound to its own Pod.
//!
//! What it reports (issue 14 §5), in one run:
//!
//! 1. **Agent memory** (`VmRSS`, `VmHWM`) with an empty cluster, then with 1,000 and 10,000
//!    pods: each time a freshly started agent after its first list, and the agent that saw the
//!    same pods arrive by watch. The pods are created through the API (concurrently), bound to
//!    simulated nodes that no kubelet runs (their Node objects are registered and kept alive
//!    with heartbeats), their status written as a kubelet writes it, spread over 50 enrolled
//!    namespaces, with a Deployment pod's metadata and containers, one Service per 10 pods.
//!    Beside it: the same pods' size as the API server serves them, and trimmed as the agent
//!    keeps them.
//! 2. **Watch traffic**: every byte between the agent and the API server goes through a
//!    counting TCP forwarder whose listening socket lives in the node's namespace (the agent's
//!    kubeconfig points at it; TLS passes through), so the figures are what a node's network
//!    carries: the first list, an idle period, and steady churn (10 pod status changes per
//!    second across the cluster, a policy change every 10 s).
//! 3. **Capture after labelling**: pods of the agent's node that run before their namespace
//!    joins the mesh (each its own network namespace holding its address, a process in
//!    `kubepods/burstable/pod<uid>` under `--kubepods-cgroup`), the namespace then labelled
//!    `istio.io/dataplane-mode=ambient`; each pod's time from the label's patch to the agent's
//!    `pod enrolled` line (its own timestamp).
//!
//! Results: `kube.md` and `kube.json` under `bench-results/<unix-time>/`.

use std::{
    fmt::Write as _,
    fs, io,
    net::{Ipv4Addr, SocketAddr, TcpListener as StdListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use futures_util::{stream, StreamExt as _, TryStreamExt as _};
use k8s_openapi::{
    api::core::v1::{Namespace, Node as KubeNode, Pod, Service, ServiceAccount},
    jiff::Timestamp,
};
use kube::{
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
        PostParams,
    },
    Api, Client,
};
use mesh_tests::{
    agent::AgentOptions,
    kube::{register_node, ControlPlane, Credentials},
    process, Agent, Testbed, TestbedSpec,
};
use nix::sched::{setns, CloneFlags};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
    task::JoinHandle,
};

use super::{process_ticks, Plan, TICKS_PER_SEC};

/// Namespaces the pods are spread over (all enrolled in the mesh).
const NAMESPACES: usize = 50;
/// Pods per app (a Deployment's replicas); one Service and one service account per app.
const PODS_PER_APP: usize = 10;
/// Simulated nodes the pods are bound to (100 pods each at 10,000).
const SIM_NODES: usize = 100;
/// Creates (and status writes) in flight.
const IN_FLIGHT: usize = 24;
/// Apps created per batch (the creation budget is checked between batches).
const APPS_PER_BATCH: usize = 20;
/// How often the simulated nodes' heartbeat is written (the node lifecycle controller's grace
/// period is 50 s; without it, it would mark every pod not ready and churn all of them).
const HEARTBEAT: Duration = Duration::from_secs(15);
/// The namespace whose running pods are captured once it is labelled.
const CAPTURE_NS: &str = "bench-capture";
/// glibc's variable limiting its malloc arenas (one per thread, up to 8 per core, by default).
const ONE_ARENA: &str = "MALLOC_ARENA_MAX";
const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// The characters of the random suffix of a pod's name (as Kubernetes' `rand.String`).
const ALNUM: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
/// Kinds of app, for realistic names and images.
const APP_KINDS: [&str; 8] = [
    "checkout", "cart", "catalog", "payments", "shipping", "search", "reviews", "frontend",
];

/// How much to create and how long to measure.
#[derive(Clone, Debug)]
struct Scale {
    /// Pods in the cluster at each measured stage.
    stages: Vec<usize>,
    /// Longest a stage beyond the first may spend creating pods.
    create_budget: Duration,
    idle: Duration,
    churn: Duration,
    /// Pod status changes per second during churn.
    churn_rate: u32,
    /// A policy change every this many seconds during churn.
    policy_every: Duration,
    capture_pods: usize,
}

impl Scale {
    fn of(plan: &Plan) -> Self {
        if plan.quick {
            Self {
                stages: vec![1_000],
                create_budget: Duration::from_secs(120),
                idle: Duration::from_secs(10),
                churn: Duration::from_secs(20),
                churn_rate: 10,
                policy_every: Duration::from_secs(10),
                capture_pods: 20,
            }
        } else {
            Self {
                stages: vec![1_000, 10_000],
                create_budget: Duration::from_secs(300),
                idle: Duration::from_secs(30),
                churn: Duration::from_secs(60),
                churn_rate: 10,
                policy_every: Duration::from_secs(10),
                capture_pods: 100,
            }
        }
    }
}

/// Bytes carried by the counting forwarder, all connections together.
#[derive(Debug, Default)]
struct Counter {
    /// API server → agent.
    to_agent: AtomicU64,
    /// Agent → API server.
    from_agent: AtomicU64,
    connections: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Bytes {
    to_agent: u64,
    from_agent: u64,
    connections: u64,
}

impl Counter {
    fn read(&self) -> Bytes {
        Bytes {
            to_agent: self.to_agent.load(Ordering::Relaxed),
            from_agent: self.from_agent.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
        }
    }
}

impl Bytes {
    fn since(self, earlier: Self) -> Self {
        Self {
            to_agent: self.to_agent - earlier.to_agent,
            from_agent: self.from_agent - earlier.from_agent,
            connections: self.connections - earlier.connections,
        }
    }
}

/// `VmRSS` and `VmHWM` of a process, in bytes.
#[derive(Clone, Copy, Debug)]
struct Memory {
    rss: u64,
    hwm: u64,
}

fn memory(pid: u32) -> Result<Memory> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?
            .split_whitespace()
            .next()
            .context("empty field")?
            .parse()?;
        Ok(kib * 1024)
    };
    Ok(Memory {
        rss: field("VmRSS:")?,
        hwm: field("VmHWM:")?,
    })
}

/// The served size of the cluster's pods (an admin's paged list, as a watcher lists).
#[derive(Clone, Copy, Debug, Default)]
struct PodSizes {
    pods: usize,
    /// Each pod's JSON as served (compact), summed.
    json: u64,
    /// The same cut to the fields the agent keeps (`mesh-cluster/src/kube_source/strip.rs`).
    trimmed: u64,
    /// The list responses' bodies, summed.
    list_bodies: u64,
}

/// One measured stage: the cluster with `pods` pods.
#[derive(Clone, Debug, Default)]
struct Stage {
    pods: usize,
    sizes: PodSizes,
    /// Creating this stage's pods (from the previous stage): pods, time.
    created: Option<(usize, Duration)>,
    /// Bytes to the running agent while they were created, and its memory once it saw them.
    watched: Option<(Bytes, Memory)>,
    /// A fresh agent: bytes from start to ready, time to ready, memory after its first list.
    first_list: Option<(Bytes, Duration, Memory, Memory)>,
}

#[derive(Clone, Debug, Default)]
struct Window {
    what: String,
    secs: f64,
    pod_changes: usize,
    policy_changes: usize,
    failed: usize,
    bytes: Bytes,
    agent_cpu_s: f64,
}

#[derive(Clone, Debug, Default)]
struct Capture {
    pods: usize,
    /// Milliseconds from the label's patch to each pod's `pod enrolled` line, sorted.
    latencies_ms: Vec<f64>,
    /// Pods enrolled but not served (`served=false`).
    unserved: usize,
    /// Milliseconds from the pods' deletion to the last `pod removed from the mesh`.
    release_ms: Option<f64>,
    problems: Vec<String>,
}

#[derive(Debug, Default)]
struct Report {
    stages: Vec<Stage>,
    windows: Vec<Window>,
    capture: Option<Capture>,
    /// A fresh agent's memory with one malloc arena, with this many pods.
    one_arena: Option<(usize, Memory)>,
    notes: Vec<String>,
    total: Duration,
}

struct KubeBench {
    scale: Scale,
    rt: Runtime,
    admin: Client,
    counter: Arc<Counter>,
    options: AgentOptions,
    /// Node n0's name and the simulated nodes' names with their addresses.
    nodes: Vec<(String, Ipv4Addr)>,
    /// Pods created so far (pods `0..created`, whole apps).
    created: usize,
    report: Report,
}

pub(super) fn run(plan: &Plan, out: &Path) -> Result<()> {
    let started = Instant::now();
    let scale = Scale::of(plan);
    println!("\n== Kubernetes: the agent on a real control plane ==");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-kube")
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let cp = ControlPlane::start().context("control plane")?;
    let tb = Testbed::new(TestbedSpec {
        nodes: 1,
        pods_per_node: 0,
    })
    .context("testbed")?;
    let mut bench = KubeBench {
        scale,
        admin: cp.client(),
        rt,
        counter: Arc::new(Counter::default()),
        options: AgentOptions::new(tb.scratch_dir().join("config")),
        nodes: Vec::new(),
        created: 0,
        report: Report::default(),
    };
    let mut leftovers = Leftovers::default();
    let result = bench.measure(&cp, &tb, &mut leftovers);
    // Whatever happened: the capture's processes, namespaces and cgroups, then the agent, the
    // forwarder and heartbeat (with the runtime), the testbed and the control plane.
    let cleanup = leftovers.remove();
    let KubeBench { rt, mut report, .. } = bench;
    rt.shutdown_background();
    let tb_down = tb.teardown();
    let cp_down = cp.teardown();
    report.total = started.elapsed();
    if let Err(e) = &result {
        report.notes.push(format!("the run stopped early: {e:#}"));
    }
    // What was measured is written even when a later step failed.
    let table = report.markdown();
    fs::write(out.join("kube.md"), &table)?;
    fs::write(
        out.join("kube.json"),
        serde_json::to_string_pretty(&report.json())?,
    )?;
    println!("\n{table}\nin {}", out.join("kube.md").display());
    result?;
    cleanup?;
    tb_down.context("removing the testbed")?;
    cp_down.context("removing the control plane")?;
    Ok(())
}

/// What the capture measurement made on the machine, removed at the end whatever happened.
#[derive(Debug, Default)]
struct Leftovers {
    agent: Option<Agent>,
    processes: Vec<Child>,
    netns: Vec<String>,
    cgroups: Vec<PathBuf>,
}

impl Leftovers {
    fn remove(&mut self) -> Result<()> {
        let mut first: Option<anyhow::Error> = None;
        for mut child in self.processes.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(agent) = self.agent.take() {
            if let Err(e) = agent.stop() {
                first.get_or_insert(anyhow::Error::from(e).context("stopping the agent"));
            }
        }
        for ns in self.netns.drain(..) {
            if let Err(e) = process::run(Command::new("ip").args(["netns", "del", &ns])) {
                first.get_or_insert(anyhow::Error::from(e));
            }
        }
        // Deepest first: pod<uid>, then the kubepods tree.
        for dir in self.cgroups.drain(..).rev() {
            if dir.exists() {
                if let Err(e) = fs::remove_dir(&dir) {
                    first.get_or_insert(anyhow::anyhow!("removing {}: {e}", dir.display()));
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl KubeBench {
    #[allow(clippy::cast_precision_loss)] // counts far below 2^52
    fn measure(&mut self, cp: &ControlPlane, tb: &Testbed, left: &mut Leftovers) -> Result<()> {
        let node = tb.node(0);
        self.setup(cp, tb)?;

        // An empty cluster: no namespace, pod or service of the bench yet.
        println!("empty cluster: starting the agent");
        let empty = self.fresh_agent(node, left, 0, None)?;
        self.report.stages.push(Stage {
            pods: 0,
            sizes: self.pod_sizes()?,
            first_list: Some(empty),
            ..Stage::default()
        });
        self.create_namespaces()?;

        let stages = self.scale.stages.clone();
        for (i, &target) in stages.iter().enumerate() {
            let budget = (i > 0).then_some(self.scale.create_budget);
            let before = self.counter.read();
            let start = Instant::now();
            let from = self.created;
            self.create_pods(target, budget)?;
            let took = start.elapsed();
            let made = self.created - from;
            println!(
                "created {made} pods in {:.1}s ({:.0}/s); {} in the cluster",
                took.as_secs_f64(),
                made as f64 / took.as_secs_f64().max(1e-9),
                self.created
            );
            if self.created < target {
                self.report.notes.push(format!(
                    "{target} pods were not reached within the {} s creation budget: stopped at {}",
                    self.scale.create_budget.as_secs(),
                    self.created
                ));
            }
            let agent = left.agent.as_mut().context("agent running")?;
            wait_workloads(agent, self.created, Duration::from_secs(180))?;
            let watched_bytes = self.counter.read().since(before);
            thread::sleep(Duration::from_secs(2));
            let watched_mem = memory(agent.pid())?;
            println!(
                "  running agent saw them: {:.1} MB received, VmRSS {:.1} MiB",
                mb(watched_bytes.to_agent),
                mib(watched_mem.rss)
            );
            let sizes = self.pod_sizes()?;
            let first_list = self.fresh_agent(node, left, self.created, None)?;
            self.report.stages.push(Stage {
                pods: self.created,
                sizes,
                created: Some((made, took)),
                watched: Some((watched_bytes, watched_mem)),
                first_list: Some(first_list),
            });
        }

        self.churn(left)?;
        let capture = self.capture(tb, left)?;
        self.report.capture = Some(capture);

        // How much of a fresh agent's memory is the allocator keeping what the first list's
        // pages used: the same start with one glibc malloc arena.
        println!("fresh agent with {ONE_ARENA}=1");
        let (_, _, _, one_arena) =
            self.fresh_agent(node, left, self.created, Some((ONE_ARENA, "1")))?;
        self.report.one_arena = Some((self.created, one_arena));
        Ok(())
    }

    /// The agent's RBAC and token, the nodes (with heartbeats), the counting forwarder in the
    /// node's namespace, and the agent's kubeconfig pointing at it.
    fn setup(&mut self, cp: &ControlPlane, tb: &Testbed) -> Result<()> {
        let node = tb.node(0);
        let admin = self.admin.clone();
        self.nodes.push((node.name.clone(), node.link_ipv4));
        for k in 0..SIM_NODES {
            let k8 = u8::try_from(k).context("simulated node index")?;
            self.nodes
                .push((format!("sim-{k:03}"), Ipv4Addr::new(10, 255, 0, k8 + 1)));
        }
        let nodes = self.nodes.clone();
        self.rt.block_on(async {
            stream::iter(nodes.iter().map(|(name, ip)| {
                let admin = admin.clone();
                async move {
                    register_node(&admin, name, (*ip).into())
                        .await
                        .with_context(|| format!("registering node {name}"))
                }
            }))
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await
        })?;
        let token = cp
            .agent_token(&node.name)
            .context("the agent's RBAC and bound token")?;
        self.rt.spawn(heartbeat(admin, nodes));
        let addr = {
            let listener = listen_in(&node.netns_path())?;
            let _entered = self.rt.enter();
            let listener = TcpListener::from_std(listener)?;
            let addr = listener.local_addr()?;
            self.rt.spawn(accept_loop(
                listener,
                cp.apiserver_addr(),
                Arc::clone(&self.counter),
            ));
            addr
        };
        fs::create_dir_all(tb.scratch_dir())?;
        let kubeconfig = tb.scratch_dir().join("agent.kubeconfig");
        cp.write_kubeconfig(&kubeconfig, addr, &Credentials::Token(token))?;
        let kubepods = tb.cgroup_dir().join(format!("kubelet-{}", node.name));
        fs::create_dir_all(&kubepods)?;
        self.options.kubeconfig = Some(kubeconfig);
        self.options.kubepods_cgroup = Some(kubepods);
        Ok(())
    }

    /// Stops the running agent, starts a fresh one and returns the bytes it received until
    /// ready (its first list), how long that took, and its memory 2 s later and once it has
    /// seen `pods` workloads.
    fn fresh_agent(
        &mut self,
        node: &mesh_tests::Node,
        left: &mut Leftovers,
        pods: usize,
        env: Option<(&str, &str)>,
    ) -> Result<(Bytes, Duration, Memory, Memory)> {
        if let Some(agent) = left.agent.take() {
            agent.stop().context("stopping the agent")?;
        }
        let before = self.counter.read();
        let start = Instant::now();
        // The agent inherits this process's environment.
        if let Some((name, value)) = env {
            std::env::set_var(name, value);
        }
        let agent = Agent::start(node, &self.options);
        if let Some((name, _)) = env {
            std::env::remove_var(name);
        }
        let mut agent = agent.context("starting the agent")?;
        let ready = start.elapsed();
        let bytes = self.counter.read().since(before);
        wait_workloads(&mut agent, pods, Duration::from_secs(60))?;
        let at_ready = memory(agent.pid())?;
        thread::sleep(Duration::from_secs(2));
        let settled = memory(agent.pid())?;
        println!(
            "  fresh agent, {pods} pods: ready in {:.2}s, first list {:.2} MB over {} connections, VmRSS {:.1} MiB, VmHWM {:.1} MiB",
            ready.as_secs_f64(),
            mb(bytes.to_agent),
            bytes.connections,
            mib(settled.rss),
            mib(settled.hwm)
        );
        left.agent = Some(agent);
        Ok((bytes, ready, at_ready, settled))
    }

    fn create_namespaces(&self) -> Result<()> {
        let admin = self.admin.clone();
        self.rt.block_on(async {
            stream::iter((0..NAMESPACES).map(|n| {
                let api: Api<Namespace> = Api::all(admin.clone());
                async move {
                    let ns: Namespace = serde_json::from_value(json!({"metadata": {
                        "name": namespace_name(n),
                        "labels": {DATAPLANE_MODE: "ambient", "team": format!("team-{}", n % 7),
                                   "environment": "production"}
                    }}))?;
                    let pp = PostParams::default();
                    retry(|| api.create(&pp, &ns))
                        .await
                        .with_context(|| format!("creating namespace {}", namespace_name(n)))
                }
            }))
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await
            .map(drop)
        })
    }

    /// Creates whole apps (service account, Service, pods with their status) until `target`
    /// pods exist, or `budget` runs out (checked between batches).
    fn create_pods(&mut self, target: usize, budget: Option<Duration>) -> Result<()> {
        let start = Instant::now();
        while self.created < target {
            if budget.is_some_and(|b| start.elapsed() >= b) {
                return Ok(());
            }
            let first_app = self.created / PODS_PER_APP;
            let apps = first_app..(first_app + APPS_PER_BATCH).min(target.div_ceil(PODS_PER_APP));
            let admin = self.admin.clone();
            let nodes = self.nodes.clone();
            self.rt.block_on(async {
                stream::iter(apps.clone().map(|a| app_objects(&admin, a)))
                    .buffer_unordered(IN_FLIGHT)
                    .try_collect::<Vec<_>>()
                    .await?;
                let pods = apps.start * PODS_PER_APP..apps.end * PODS_PER_APP;
                stream::iter(pods.map(|i| {
                    let admin = admin.clone();
                    let node = &nodes[1 + i % SIM_NODES];
                    async move {
                        create_running_pod(
                            &admin,
                            &bench_pod(i, &node.0),
                            &status(i, node.1, true, 0),
                        )
                        .await
                    }
                }))
                .buffer_unordered(IN_FLIGHT)
                .try_collect::<Vec<_>>()
                .await
                .map(drop)
            })?;
            self.created = apps.end * PODS_PER_APP;
        }
        Ok(())
    }

    /// Every pod's size as the API server serves it, from an admin's paged list.
    fn pod_sizes(&self) -> Result<PodSizes> {
        let admin = self.admin.clone();
        self.rt.block_on(async move {
            let mut sizes = PodSizes::default();
            let mut token: Option<String> = None;
            loop {
                let mut lp = ListParams::default().limit(500);
                if let Some(t) = &token {
                    lp = lp.continue_token(t);
                }
                let request = kube::core::Request::new("/api/v1/pods").list(&lp)?;
                let body = admin.request_text(request).await.context("listing pods")?;
                sizes.list_bodies += body.len() as u64;
                let list: Value = serde_json::from_str(&body)?;
                let bench_pods = list["items"].as_array().into_iter().flatten().filter(|p| {
                    p["metadata"]["namespace"]
                        .as_str()
                        .is_some_and(|ns| ns.starts_with("bench-") && ns != CAPTURE_NS)
                });
                for item in bench_pods {
                    sizes.pods += 1;
                    sizes.json += serde_json::to_vec(item)?.len() as u64;
                    sizes.trimmed += serde_json::to_vec(&trimmed(item))?.len() as u64;
                }
                token = list["metadata"]["continue"]
                    .as_str()
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned);
                if token.is_none() {
                    return Ok(sizes);
                }
            }
        })
    }

    /// An idle window, then steady churn: `churn_rate` pod status changes per second (a pod's
    /// readiness flaps: not ready, then ready again with one more restart), a policy created,
    /// changed or deleted every `policy_every`.
    fn churn(&mut self, left: &mut Leftovers) -> Result<()> {
        let pid = left.agent.as_ref().context("agent running")?.pid();
        println!("idle for {} s", self.scale.idle.as_secs());
        let before = (self.counter.read(), process_ticks(pid)?, Instant::now());
        thread::sleep(self.scale.idle);
        let idle = self.window("idle", before, pid, (0, 0, 0))?;
        self.report.windows.push(idle);

        println!(
            "churn for {} s: {} pod status changes/s, a policy change every {} s",
            self.scale.churn.as_secs(),
            self.scale.churn_rate,
            self.scale.policy_every.as_secs()
        );
        let before = (self.counter.read(), process_ticks(pid)?, Instant::now());
        let admin = self.admin.clone();
        let nodes = self.nodes.clone();
        let pods = self.created;
        let scale = self.scale.clone();
        let counts = self.rt.block_on(async move {
            let period = Duration::from_secs(1) / scale.churn_rate;
            let ticks = u32::try_from(scale.churn.as_millis() / period.as_millis())?;
            let policy_ticks = u32::try_from(scale.policy_every.as_millis() / period.as_millis())?;
            let mut interval = tokio::time::interval(period);
            let mut tasks: Vec<JoinHandle<(bool, bool)>> = Vec::new();
            for k in 0..ticks {
                interval.tick().await;
                let (pod, ready, restarts) = churn_step(k as usize, pods);
                let node_ip = nodes[1 + pod % SIM_NODES].1;
                let pod_admin = admin.clone();
                tasks.push(tokio::spawn(async move {
                    let (ns, name) = pod_name(pod);
                    let api: Api<Pod> = Api::namespaced(pod_admin, &ns);
                    let patch =
                        Patch::Merge(json!({ "status": status(pod, node_ip, ready, restarts) }));
                    let params = PatchParams::default();
                    let ok = retry(|| api.patch_status(&name, &params, &patch))
                        .await
                        .is_ok();
                    (false, ok)
                }));
                if k % policy_ticks == 0 {
                    let admin = admin.clone();
                    let step = k / policy_ticks;
                    tasks.push(tokio::spawn(async move {
                        (true, policy_change(&admin, step).await.is_ok())
                    }));
                }
            }
            let (mut pod_changes, mut policy_changes, mut failed) = (0, 0, 0);
            for task in tasks {
                match task.await? {
                    (_, false) => failed += 1,
                    (true, true) => policy_changes += 1,
                    (false, true) => pod_changes += 1,
                }
            }
            // Let the last events reach the agent.
            tokio::time::sleep(Duration::from_millis(500)).await;
            anyhow::Ok((pod_changes, policy_changes, failed))
        })?;
        let churn = self.window("churn", before, pid, counts)?;
        self.report.windows.push(churn);
        Ok(())
    }

    fn window(
        &self,
        what: &str,
        (bytes, ticks, start): (Bytes, u64, Instant),
        pid: u32,
        (pod_changes, policy_changes, failed): (usize, usize, usize),
    ) -> Result<Window> {
        #[allow(clippy::cast_precision_loss)] // tick counts far below 2^52
        let agent_cpu_s = process_ticks(pid)?.saturating_sub(ticks) as f64 / TICKS_PER_SEC;
        let w = Window {
            what: what.to_owned(),
            secs: start.elapsed().as_secs_f64(),
            pod_changes,
            policy_changes,
            failed,
            bytes: self.counter.read().since(bytes),
            agent_cpu_s,
        };
        println!(
            "  {what}: {:.1} s, {} pod and {} policy changes ({} failed), {:.1} kB to the agent ({:.1} kB/min), agent CPU {:.2} s",
            w.secs,
            w.pod_changes,
            w.policy_changes,
            w.failed,
            kb(w.bytes.to_agent),
            kb(w.bytes.to_agent) * 60.0 / w.secs,
            w.agent_cpu_s
        );
        Ok(w)
    }

    /// Pods of the agent's node, running before their namespace is enrolled, then the label:
    /// how long until each is captured. Everything is removed afterwards.
    fn capture(&mut self, tb: &Testbed, left: &mut Leftovers) -> Result<Capture> {
        let n = self.scale.capture_pods;
        let node = tb.node(0);
        println!("capture: {n} running pods on {}, then the label", node.name);
        let uids = self.capture_pods(node)?;
        self.sandboxes(tb, &uids, left)?;
        let agent = left.agent.as_mut().context("agent running")?;
        wait_workloads(agent, self.created + n, Duration::from_secs(60))?;
        thread::sleep(Duration::from_secs(1));
        let mut capture = self.label_and_wait(agent)?;
        capture.release_ms = self.release(agent, capture.latencies_ms.len())?;
        // The processes, namespaces and cgroups go in `Leftovers::remove`.
        Ok(capture)
    }

    /// The capture's pods through the API, running on `node`; returns their UIDs.
    fn capture_pods(&self, node: &mesh_tests::Node) -> Result<Vec<String>> {
        let n = self.scale.capture_pods;
        let admin = self.admin.clone();
        let node_name = node.name.clone();
        let node_ip = node.link_ipv4;
        self.rt.block_on(async {
            let ns: Namespace =
                serde_json::from_value(json!({"metadata": {"name": CAPTURE_NS}}))?;
            Api::<Namespace>::all(admin.clone())
                .create(&PostParams::default(), &ns)
                .await
                .context("creating the capture namespace")?;
            let sa: ServiceAccount = serde_json::from_value(
                json!({"metadata": {"name": "local", "namespace": CAPTURE_NS}}),
            )?;
            Api::<ServiceAccount>::namespaced(admin.clone(), CAPTURE_NS)
                .create(&PostParams::default(), &sa)
                .await
                .context("creating the capture service account")?;
            stream::iter((0..n).map(|i| {
                let admin = admin.clone();
                let node_name = node_name.clone();
                async move {
                    let pod = json!({
                        "metadata": {"name": format!("local-{i:03}"), "namespace": CAPTURE_NS,
                                     "labels": {"app": "local"}},
                        "spec": {"nodeName": node_name, "serviceAccountName": "local",
                                 "containers": [{"name": "app", "image": "registry.example.com/local:1",
                                                 "ports": [{"name": "http", "containerPort": 8080}]}]}
                    });
                    let ip = capture_ip(i);
                    let status = json!({
                        "phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
                        "hostIP": node_ip.to_string(), "hostIPs": [{"ip": node_ip.to_string()}],
                        "conditions": [{"type": "Ready", "status": "True"}]
                    });
                    create_running_pod(&admin, &pod, &status).await
                }
            }))
            .buffered(IN_FLIGHT)
            .try_collect()
            .await
        })
    }

    /// Each pod's sandbox: a network namespace holding its address, a process in it and in the
    /// pod's cgroup in the kubelet's layout.
    fn sandboxes(&self, tb: &Testbed, uids: &[String], left: &mut Leftovers) -> Result<()> {
        let kubepods = self
            .options
            .kubepods_cgroup
            .clone()
            .context("kubepods root")?;
        let burstable = kubepods.join("kubepods/burstable");
        fs::create_dir_all(&burstable)?;
        left.cgroups.extend([
            kubepods.clone(),
            kubepods.join("kubepods"),
            burstable.clone(),
        ]);
        for (i, uid) in uids.iter().enumerate() {
            let ns = format!("{}-cap{i}", tb.id());
            process::run(Command::new("ip").args(["netns", "add", &ns]))?;
            left.netns.push(ns.clone());
            mesh_tests::testbed::ip_batch(
                &ns,
                &format!(
                    "link set lo up\nlink add eth0 type veth peer name eth1\naddr add {}/32 dev eth0\nlink set eth1 up\nlink set eth0 up\n",
                    capture_ip(i)
                ),
            )?;
            let cgroup = burstable.join(format!("pod{uid}"));
            fs::create_dir(&cgroup)?;
            left.cgroups.push(cgroup.clone());
            // Into the namespace first, then the cgroup: the agent never finds the process in
            // the pod's cgroup but still in the node's namespace.
            let child = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{ns}"))
                .args(["--", "sh", "-c", r#"echo $$ > "$0" && exec sleep 100000"#])
                .arg(cgroup.join("cgroup.procs"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting a pod's process")?;
            left.processes.push(child);
        }
        for (i, uid) in uids.iter().enumerate() {
            let procs = burstable.join(format!("pod{uid}/cgroup.procs"));
            let deadline = Instant::now() + Duration::from_secs(10);
            while fs::read_to_string(&procs)?.trim().is_empty() {
                if Instant::now() > deadline {
                    bail!("pod {i}'s process never joined {}", procs.display());
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// Labels the capture namespace and waits for every pod's `pod enrolled` line: each one's
    /// time from the patch.
    fn label_and_wait(&self, agent: &Agent) -> Result<Capture> {
        let n = self.scale.capture_pods;
        let from = agent.log_len();
        let namespaces: Api<Namespace> = Api::all(self.admin.clone());
        let label = |value: Value| {
            let patch = json!({"metadata": {"labels": {DATAPLANE_MODE: value}}});
            let namespaces = namespaces.clone();
            self.rt.block_on(async move {
                namespaces
                    .patch(CAPTURE_NS, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .context("labelling the capture namespace")
            })
        };
        let t0 = Timestamp::now();
        let seen0 = Instant::now();
        label(json!("ambient"))?;
        let mut capture = Capture {
            pods: n,
            ..Capture::default()
        };
        let needle = format!("pod={CAPTURE_NS}/");
        let deadline = Instant::now() + Duration::from_secs(120);
        // When each line was first seen: the fallback for a line whose timestamp does not parse.
        let mut seen: Vec<(String, Duration)> = Vec::new();
        loop {
            let lines = agent.logs();
            for line in lines.iter().skip(from + seen.len()) {
                seen.push((line.clone(), seen0.elapsed()));
            }
            let enrolled = seen
                .iter()
                .filter(|(l, _)| l.contains("pod enrolled") && l.contains(&needle))
                .count();
            if enrolled >= n || Instant::now() > deadline {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        for (line, at) in &seen {
            if !(line.contains("pod enrolled") && line.contains(&needle)) {
                if line.contains(&needle) && (line.contains("WARN") || line.contains("ERROR")) {
                    capture.problems.push(line.clone());
                }
                continue;
            }
            if line.contains("served=false") {
                capture.unserved += 1;
            }
            let ms = line
                .split_whitespace()
                .next()
                .and_then(|t| t.parse::<Timestamp>().ok())
                .map_or(at.as_secs_f64() * 1000.0, |t| {
                    #[allow(clippy::cast_precision_loss)] // microseconds of a few minutes
                    let us = (t.as_microsecond() - t0.as_microsecond()) as f64;
                    us / 1000.0
                });
            capture.latencies_ms.push(ms);
        }
        capture.latencies_ms.sort_by(f64::total_cmp);
        println!(
            "  captured {} of {n}: p50 {:.0} ms, max {:.0} ms",
            capture.latencies_ms.len(),
            percentile(&capture.latencies_ms, 0.5),
            capture.latencies_ms.last().copied().unwrap_or(f64::NAN)
        );
        capture.problems.truncate(5);
        Ok(capture)
    }

    /// Removes the capture's pods through the API (no kubelet confirms: grace period 0) and
    /// its namespace; returns how long until the agent released the `captured` pods.
    fn release(&self, agent: &Agent, captured: usize) -> Result<Option<f64>> {
        let n = self.scale.capture_pods;
        let needle = format!("pod={CAPTURE_NS}/");
        let from = agent.log_len();
        let start = Instant::now();
        let admin = self.admin.clone();
        self.rt.block_on(async {
            let api: Api<Pod> = Api::namespaced(admin.clone(), CAPTURE_NS);
            stream::iter((0..n).map(|i| {
                let api = api.clone();
                async move {
                    let (name, params) = (
                        format!("local-{i:03}"),
                        DeleteParams::default().grace_period(0),
                    );
                    retry(|| api.delete(&name, &params))
                        .await
                        .map(drop)
                        .context("deleting a capture pod")
                }
            }))
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await?;
            Api::<Namespace>::all(admin)
                .delete(CAPTURE_NS, &DeleteParams::default())
                .await
                .context("deleting the capture namespace")
                .map(drop)
        })?;
        let released = |agent: &Agent| {
            agent
                .logs()
                .iter()
                .skip(from)
                .filter(|l| l.contains("pod removed from the mesh") && l.contains(&needle))
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while released(agent) < captured && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        Ok((released(agent) >= captured).then(|| start.elapsed().as_secs_f64() * 1000.0))
    }
}

/// Waits until the agent's view holds at least `n` workloads (its `cluster state updated`
/// lines).
fn wait_workloads(agent: &mut Agent, n: usize, timeout: Duration) -> Result<()> {
    agent
        .wait_for_log_from(
            0,
            &format!("{n} workloads in the agent's view"),
            timeout,
            |l| {
                l.contains("cluster state updated")
                    && l.split_whitespace()
                        .find_map(|f| f.strip_prefix("workloads="))
                        .and_then(|v| v.parse::<usize>().ok())
                        .is_some_and(|w| w >= n)
            },
        )
        .map(drop)
        .map_err(Into::into)
}

/// Retries a request that failed for a reason a busy API server gives (429, 5xx, a timeout
/// or a broken connection) up to three times.
async fn retry<T, F, Fut>(mut request: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut attempt = 0;
    loop {
        match request().await {
            Err(kube::Error::Api(s)) if attempt < 3 && (s.code == 429 || s.code >= 500) => {}
            Err(kube::Error::HyperError(_) | kube::Error::Service(_)) if attempt < 3 => {}
            other => return other,
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
    }
}

/// Creates a pod and writes its status (the API server resets the status on create).
/// Returns its UID.
async fn create_running_pod(admin: &Client, pod: &Value, status: &Value) -> Result<String> {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let typed: Pod = serde_json::from_value(pod.clone())?;
    let (pp, patch_params) = (PostParams::default(), PatchParams::default());
    let created = retry(|| api.create(&pp, &typed))
        .await
        .with_context(|| format!("creating pod {ns}/{name}"))?;
    let patch = Patch::Merge(json!({ "status": status }));
    retry(|| api.patch_status(name, &patch_params, &patch))
        .await
        .with_context(|| format!("writing the status of pod {ns}/{name}"))?;
    created.metadata.uid.context("a created pod has a UID")
}

/// An app's service account and Service.
async fn app_objects(admin: &Client, a: usize) -> Result<()> {
    let (ns, app) = (namespace_name(a % NAMESPACES), app_name(a));
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {
        "name": app, "namespace": ns, "labels": {"app": app}
    }}))?;
    let pp = PostParams::default();
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), &ns);
    retry(|| accounts.create(&pp, &sa))
        .await
        .with_context(|| format!("creating service account {ns}/{app}"))?;
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": app, "namespace": ns,
                     "labels": {"app": app, "app.kubernetes.io/part-of": "shop"}},
        "spec": {"selector": {"app": app},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                           {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]}
    }))?;
    let services: Api<Service> = Api::namespaced(admin.clone(), &ns);
    retry(|| services.create(&pp, &svc))
        .await
        .with_context(|| format!("creating service {ns}/{app}"))?;
    Ok(())
}

fn namespace_name(n: usize) -> String {
    format!("bench-{n:02}")
}

fn app_name(a: usize) -> String {
    format!("{}-{a:03}", APP_KINDS[a % APP_KINDS.len()])
}

/// A deterministic 64-bit mix (`SplitMix64`), for hashes and ids that look random.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Pod `i`'s namespace and name: `<app>-<pod-template-hash>-<5 characters>`, as a
/// Deployment's `ReplicaSet` names them.
fn pod_name(i: usize) -> (String, String) {
    let a = i / PODS_PER_APP;
    let suffix: String = (0..5)
        .map(|k| {
            char::from(ALNUM[usize::from(mix(i as u64 * 8 + k).to_le_bytes()[0]) % ALNUM.len()])
        })
        .collect();
    (
        namespace_name(a % NAMESPACES),
        format!("{}-{}-{suffix}", app_name(a), template_hash(a)),
    )
}

fn template_hash(a: usize) -> String {
    format!("{:010x}", mix(a as u64) & 0xff_ffff_ffff)
}

/// Pod `i`'s address: 10.64.0.0/10 (neither the testbed's 198.18.0.0/15 nor the Service range).
fn pod_ip(i: usize) -> Ipv4Addr {
    let n = u32::try_from(i).unwrap_or(0) + 256;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + n)
}

/// Address of capture pod `i` (only inside its own namespace).
fn capture_ip(i: usize) -> Ipv4Addr {
    let n = u32::try_from(i).unwrap_or(0) + 1;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + n)
}

/// Pod `i` as its Deployment's `ReplicaSet` would create it: labels, a few annotations (every
/// fifth app also `kubectl.kubernetes.io/last-applied-configuration`, about 2 KB), an app
/// container with arguments, environment, ports, resources, probes, volume mounts and a
/// security context, and on every third app a log-shipping sidecar. (No `ownerReferences`:
/// the garbage collector would delete pods whose owner does not exist.)
fn bench_pod(i: usize, node: &str) -> Value {
    let a = i / PODS_PER_APP;
    let (ns, name) = pod_name(i);
    let app = app_name(a);
    let kind = APP_KINDS[a % APP_KINDS.len()];
    let hash = template_hash(a);
    let image = format!("registry.example.com/shop/{kind}:1.{}.{}", a % 20, a % 7);
    let labels = json!({
        "app": app, "version": "v1", "pod-template-hash": hash,
        "app.kubernetes.io/name": kind, "app.kubernetes.io/instance": app,
        "app.kubernetes.io/part-of": "shop", "app.kubernetes.io/version": format!("1.{}.{}", a % 20, a % 7),
        "team": format!("team-{}", a % 7),
    });
    let field = |path: &str| json!({"fieldRef": {"apiVersion": "v1", "fieldPath": path}});
    let mut containers = vec![json!({
        "name": "app", "image": image, "imagePullPolicy": "IfNotPresent",
        "args": ["--port=8080", "--metrics-port=9090", "--log-level=info", "--config=/etc/app/config.yaml"],
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
        "env": [
            {"name": "POD_NAME", "valueFrom": field("metadata.name")},
            {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
            {"name": "POD_IP", "valueFrom": field("status.podIP")},
            {"name": "LOG_FORMAT", "value": "json"},
            {"name": "DATABASE_URL", "value": format!("postgres://{kind}@db.{ns}.svc.cluster.local:5432/{kind}")},
            {"name": "CACHE_TTL_SECONDS", "value": "300"},
            {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector.observability.svc:4317"},
            {"name": "GOMAXPROCS", "valueFrom": {"resourceFieldRef": {"containerName": "app", "resource": "limits.cpu", "divisor": "1"}}},
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                      "limits": {"cpu": "500m", "memory": "512Mi"}},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/app", "readOnly": true},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http", "scheme": "HTTP"},
                           "periodSeconds": 5, "timeoutSeconds": 1, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTP"},
                          "initialDelaySeconds": 10, "periodSeconds": 10, "timeoutSeconds": 1},
        "securityContext": {"runAsNonRoot": true, "runAsUser": 10001, "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
    })];
    if a.is_multiple_of(3) {
        containers.push(json!({
            "name": "log-shipper", "image": "registry.example.com/infra/fluent-bit:3.1.4",
            "args": ["--config=/fluent-bit/etc/fluent-bit.yaml"],
            "resources": {"requests": {"cpu": "20m", "memory": "32Mi"},
                          "limits": {"cpu": "100m", "memory": "64Mi"}},
            "volumeMounts": [{"name": "tmp", "mountPath": "/var/log/app", "readOnly": true}],
        }));
    }
    let spec = json!({
        "nodeName": node, "serviceAccountName": app,
        "containers": containers,
        "volumes": [{"name": "config", "configMap": {"name": format!("{app}-config"), "defaultMode": 420}},
                    {"name": "tmp", "emptyDir": {}}],
        "terminationGracePeriodSeconds": 30,
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": {"app": app}}}],
    });
    let mut annotations = json!({
        "prometheus.io/scrape": "true", "prometheus.io/port": "9090", "prometheus.io/path": "/metrics",
        "kubectl.kubernetes.io/restartedAt": "2026-11-02T09:14:31Z",
    });
    if a.is_multiple_of(5) {
        let applied = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090"},
                         "labels": labels, "name": app, "namespace": ns},
            "spec": {"containers": spec["containers"], "volumes": spec["volumes"],
                     "serviceAccountName": app},
        });
        annotations["kubectl.kubernetes.io/last-applied-configuration"] =
            Value::from(format!("{applied}\n"));
    }
    json!({
        "metadata": {"name": name, "namespace": ns, "generateName": format!("{app}-{hash}-"),
                     "labels": labels, "annotations": annotations},
        "spec": spec,
    })
}

/// Pod `i`'s status as its kubelet writes it: running (or not ready), its addresses, the five
/// conditions and each container's status.
fn status(i: usize, node_ip: Ipv4Addr, ready: bool, restarts: u32) -> Value {
    let a = i / PODS_PER_APP;
    let kind = APP_KINDS[a % APP_KINDS.len()];
    let started = "2026-12-01T08:00:00Z";
    let now = mesh_tests::kube::now();
    let (ip, host) = (pod_ip(i).to_string(), node_ip.to_string());
    let ready_s = if ready { "True" } else { "False" };
    let transition = if restarts == 0 && ready {
        started
    } else {
        now.as_str()
    };
    let condition = |t: &str, s: &str, at: &str| json!({"type": t, "status": s, "lastProbeTime": null, "lastTransitionTime": at});
    let id = |k: u64| {
        format!(
            "{:016x}{:016x}{:016x}{:016x}",
            mix(k),
            mix(k + 1),
            mix(k + 2),
            mix(k + 3)
        )
    };
    let mut containers = vec![json!({
        "name": "app", "ready": ready, "started": true, "restartCount": restarts,
        "image": format!("registry.example.com/shop/{kind}:1.{}.{}", a % 20, a % 7),
        "imageID": format!("registry.example.com/shop/{kind}@sha256:{}", id(a as u64 * 4)),
        "containerID": format!("containerd://{}", id(i as u64 * 16 + u64::from(restarts))),
        "state": {"running": {"startedAt": if restarts == 0 { started } else { now.as_str() }}},
    })];
    if restarts > 0 {
        containers[0]["lastState"] = json!({"terminated": {"exitCode": 137, "reason": "Error",
            "startedAt": started, "finishedAt": now, "containerID": format!("containerd://{}", id(i as u64 * 16))}});
    }
    if a.is_multiple_of(3) {
        containers.push(json!({
            "name": "log-shipper", "ready": true, "started": true, "restartCount": 0,
            "image": "registry.example.com/infra/fluent-bit:3.1.4",
            "imageID": format!("registry.example.com/infra/fluent-bit@sha256:{}", id(7)),
            "containerID": format!("containerd://{}", id(i as u64 * 16 + 8)),
            "state": {"running": {"startedAt": started}},
        }));
    }
    json!({
        "phase": "Running", "hostIP": host, "hostIPs": [{"ip": host}],
        "podIP": ip, "podIPs": [{"ip": ip}], "startTime": started,
        "conditions": [
            condition("PodReadyToStartContainers", "True", started),
            condition("Initialized", "True", started),
            condition("Ready", ready_s, transition),
            condition("ContainersReady", ready_s, transition),
            condition("PodScheduled", "True", started),
        ],
        "containerStatuses": containers,
    })
}

/// The churn's `k`-th change: which pod, whether it is now ready, and its restarts. Each pod
/// changed goes not ready, then ready again with one more restart.
fn churn_step(k: usize, pods: usize) -> (usize, bool, u32) {
    let pod = (k / 2).wrapping_mul(7_919) % pods.max(1);
    let ready = k % 2 == 1;
    (pod, ready, u32::from(ready))
}

/// The policy change number `step`: created, changed, deleted, in turn.
async fn policy_change(admin: &Client, step: u32) -> Result<()> {
    let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "authorizationpolicies");
    let ns = namespace_name(0);
    let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &ns, &resource);
    let name = "bench-churn";
    let policy = |principal: &str| -> Result<DynamicObject> {
        Ok(serde_json::from_value(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": app_name(0)}}, "action": "ALLOW",
                     "rules": [{"from": [{"source": {"principals": [principal]}}],
                                "to": [{"operation": {"ports": ["8080"]}}]}]}
        }))?)
    };
    match step % 3 {
        0 => drop(
            api.create(
                &PostParams::default(),
                &policy("cluster.local/ns/bench-01/sa/cart-001")?,
            )
            .await?,
        ),
        1 => {
            let patch = json!({"spec": {"rules": [{"from": [{"source": {"principals":
                ["cluster.local/ns/bench-01/sa/cart-001", "cluster.local/ns/bench-02/sa/catalog-002"]}}],
                "to": [{"operation": {"ports": ["8080"]}}]}]}});
            drop(
                api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?,
            );
        }
        _ => drop(api.delete(name, &DeleteParams::default()).await?),
    }
    Ok(())
}

/// A pod's JSON cut to what `mesh-cluster/src/kube_source/strip.rs` keeps (an estimate of what
/// the agent holds, before its own model).
fn trimmed(pod: &Value) -> Value {
    let m = &pod["metadata"];
    let keep = [
        "mesh.local/netns",
        "mesh.local/cgroup",
        "mesh.local/sockmap-shortcut",
    ];
    let annotations: serde_json::Map<String, Value> = m["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| keep.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let containers: Vec<Value> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| json!({"name": c["name"], "ports": c["ports"]}))
        .collect();
    let ready: Vec<Value> = pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["type"] == "Ready")
        .map(|c| json!({"type": c["type"], "status": c["status"]}))
        .collect();
    json!({
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
                     "labels": m["labels"], "annotations": annotations,
                     "creationTimestamp": m["creationTimestamp"]},
        "spec": {"nodeName": pod["spec"]["nodeName"], "serviceAccountName": pod["spec"]["serviceAccountName"],
                 "containers": containers},
        "status": {"phase": pod["status"]["phase"], "podIP": pod["status"]["podIP"],
                   "podIPs": pod["status"]["podIPs"], "conditions": ready},
    })
}

/// Keeps every node's `Ready` heartbeat fresh, as a kubelet does.
async fn heartbeat(admin: Client, nodes: Vec<(String, Ipv4Addr)>) {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        let now = mesh_tests::kube::now();
        let api: Api<KubeNode> = Api::all(admin.clone());
        stream::iter(nodes.clone().into_iter().map(|(name, _)| {
            let api = api.clone();
            let patch = json!({"status": {"conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "lastHeartbeatTime": now, "lastTransitionTime": now,
            }]}});
            async move {
                let _ = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
            }
        }))
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    }
}

/// A listener on `127.0.0.1:<free port>` inside the network namespace at `netns`, made by a
/// thread of its own that enters it (a socket keeps the namespace it was made in).
fn listen_in(netns: &Path) -> Result<StdListener> {
    let path = netns.to_path_buf();
    let listener = thread::spawn(move || -> io::Result<StdListener> {
        setns(fs::File::open(&path)?, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread binding in {} panicked", netns.display()))?;
    listener.with_context(|| format!("listening inside {}", netns.display()))
}

/// Carries each accepted connection to `upstream` (the API server in the root namespace),
/// counting the bytes each way.
async fn accept_loop(listener: TcpListener, upstream: SocketAddr, counter: Arc<Counter>) {
    loop {
        let Ok((downstream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        counter.connections.fetch_add(1, Ordering::Relaxed);
        let counter = Arc::clone(&counter);
        tokio::spawn(async move {
            let Ok(upstream) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = downstream.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (down_r, down_w) = downstream.into_split();
            let (up_r, up_w) = upstream.into_split();
            let to_agent = pump(up_r, down_w, Arc::clone(&counter), true);
            let from_agent = pump(down_r, up_w, counter, false);
            tokio::join!(to_agent, from_agent);
        });
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counter: Arc<Counter>,
    to_agent: bool,
) {
    let mut buf = vec![0_u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let field = if to_agent {
            &counter.to_agent
        } else {
            &counter.from_agent
        };
        field.fetch_add(n as u64, Ordering::Relaxed);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// The value at fraction `q` of sorted `v` (nearest rank).
fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[allow(clippy::cast_precision_loss)]
fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

#[allow(clippy::cast_precision_loss)]
fn kb(bytes: u64) -> f64 {
    bytes as f64 / 1e3
}

#[allow(clippy::cast_precision_loss)]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

impl Report {
    #[allow(clippy::cast_precision_loss, clippy::too_many_lines)]
    fn markdown(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "### Agent memory and first list\n\n| pods in the cluster | pods' JSON as served (per pod) | trimmed as the agent keeps them (per pod) | fresh agent: start → ready | bytes received until ready (first list) | VmRSS / VmHWM after the first list | VmRSS / VmHWM, same pods arrived by watch |\n|---|---|---|---|---|---|---|"
        );
        for s in &self.stages {
            let per = |total: u64| {
                if s.sizes.pods == 0 {
                    "–".to_owned()
                } else {
                    format!(
                        "{:.1} MB ({:.0} B)",
                        mb(total),
                        total as f64 / s.sizes.pods as f64
                    )
                }
            };
            let (first, ready, mem) = s.first_list.as_ref().map_or(
                ("–".to_owned(), "–".to_owned(), "–".to_owned()),
                |(b, d, _, m)| {
                    (
                        format!("{:.2} MB ({} connections)", mb(b.to_agent), b.connections),
                        format!("{:.2} s", d.as_secs_f64()),
                        format!("{:.1} / {:.1} MiB", mib(m.rss), mib(m.hwm)),
                    )
                },
            );
            let watched = s.watched.as_ref().map_or("–".to_owned(), |(_, m)| {
                format!("{:.1} / {:.1} MiB", mib(m.rss), mib(m.hwm))
            });
            let _ = writeln!(
                t,
                "| {} | {} | {} | {ready} | {first} | {mem} | {watched} |",
                s.pods,
                per(s.sizes.json),
                per(s.sizes.trimmed)
            );
        }
        if let Some((pods, m)) = &self.one_arena {
            let _ = writeln!(
                t,
                "\nA fresh agent with `{ONE_ARENA}=1` (one glibc malloc arena), {pods} pods: VmRSS {:.1} / VmHWM {:.1} MiB.",
                mib(m.rss),
                mib(m.hwm)
            );
        }
        if let Some(empty) = self.stages.first().and_then(|s| s.first_list.as_ref()) {
            let _ = writeln!(t);
            for s in self.stages.iter().skip(1) {
                if let Some((b, _, _, m)) = &s.first_list {
                    let pods = s.pods as f64;
                    let _ = writeln!(
                        t,
                        "- {} pods: {:.1} kB VmRSS per pod over the empty cluster ({:.1} kB VmHWM); first list {:.0} B per pod received ({:.2}× the pods' JSON)",
                        s.pods,
                        (m.rss as f64 - empty.3.rss as f64) / pods / 1e3,
                        (m.hwm as f64 - empty.3.hwm as f64) / pods / 1e3,
                        (b.to_agent as f64 - empty.0.to_agent as f64) / pods,
                        (b.to_agent as f64 - empty.0.to_agent as f64) / s.sizes.json.max(1) as f64
                    );
                }
            }
        }
        let _ = writeln!(
            t,
            "\n### Creating the pods through the API ({IN_FLIGHT} requests in flight; create, then status)\n\n| stage | pods created | time | pods/s | bytes to the running agent meanwhile (per pod) |\n|---|---|---|---|---|"
        );
        for s in &self.stages {
            if let (Some((n, d)), Some((b, _))) = (s.created, s.watched.as_ref()) {
                let _ = writeln!(
                    t,
                    "| to {} | {n} | {:.1} s | {:.0} | {:.1} MB ({:.0} B) |",
                    s.pods,
                    d.as_secs_f64(),
                    n as f64 / d.as_secs_f64().max(1e-9),
                    mb(b.to_agent),
                    b.to_agent as f64 / n.max(1) as f64
                );
            }
        }
        let pods = self.stages.last().map_or(0, |s| s.pods);
        let _ = writeln!(
            t,
            "\n### Watch traffic with {pods} pods (bytes the agent receives, TLS included)\n\n| window | length | pod status changes | policy changes | failed requests | received | per minute | per change (over idle) | agent CPU |\n|---|---|---|---|---|---|---|---|---|"
        );
        let idle_rate = self
            .windows
            .iter()
            .find(|w| w.what == "idle")
            .map_or(0.0, |w| w.bytes.to_agent as f64 / w.secs);
        for w in &self.windows {
            let changes = w.pod_changes + w.policy_changes;
            let per_change = if changes == 0 {
                "–".to_owned()
            } else {
                format!(
                    "{:.0} B",
                    (w.bytes.to_agent as f64 - idle_rate * w.secs) / changes as f64
                )
            };
            let _ = writeln!(
                t,
                "| {} | {:.1} s | {} | {} | {} | {:.1} kB | {:.1} kB | {per_change} | {:.2} s ({:.1} % of a core) |",
                w.what,
                w.secs,
                w.pod_changes,
                w.policy_changes,
                w.failed,
                kb(w.bytes.to_agent),
                kb(w.bytes.to_agent) * 60.0 / w.secs,
                w.agent_cpu_s,
                w.agent_cpu_s / w.secs * 100.0
            );
        }
        if let Some(c) = &self.capture {
            let _ = writeln!(
                t,
                "\n### Labelling a namespace: its running pods captured ({} pods on the agent's node, {pods} in the cluster)\n\n| captured | p50 | p90 | max | first | enrolled but not served | all released after deletion |\n|---|---|---|---|---|---|---|",
                c.pods
            );
            let _ = writeln!(
                t,
                "| {} of {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {} | {} |",
                c.latencies_ms.len(),
                c.pods,
                percentile(&c.latencies_ms, 0.5),
                percentile(&c.latencies_ms, 0.9),
                c.latencies_ms.last().copied().unwrap_or(f64::NAN),
                c.latencies_ms.first().copied().unwrap_or(f64::NAN),
                c.unserved,
                c.release_ms
                    .map_or("not within 60 s".to_owned(), |ms| format!("{ms:.0} ms"))
            );
            for p in &c.problems {
                let _ = writeln!(t, "\n    {p}");
            }
        }
        for note in &self.notes {
            let _ = writeln!(t, "\nNote: {note}");
        }
        let _ = writeln!(
            t,
            "\nWhole run: {:.0} s, from the control plane's start to its teardown.",
            self.total.as_secs_f64()
        );
        t
    }

    fn json(&self) -> Value {
        let mem = |m: &Memory| json!({"vm_rss": m.rss, "vm_hwm": m.hwm});
        let bytes = |b: &Bytes| json!({"to_agent": b.to_agent, "from_agent": b.from_agent, "connections": b.connections});
        json!({
            "stages": self.stages.iter().map(|s| json!({
                "pods": s.pods,
                "served_json_bytes": s.sizes.json,
                "trimmed_json_bytes": s.sizes.trimmed,
                "list_body_bytes": s.sizes.list_bodies,
                "created": s.created.map(|(n, d)| json!({"pods": n, "seconds": d.as_secs_f64()})),
                "watched": s.watched.as_ref().map(|(b, m)| json!({"bytes": bytes(b), "memory": mem(m)})),
                "first_list": s.first_list.as_ref().map(|(b, d, at_ready, settled)| json!({
                    "bytes": bytes(b), "ready_seconds": d.as_secs_f64(),
                    "memory_at_ready": mem(at_ready), "memory": mem(settled)})),
            })).collect::<Vec<_>>(),
            "windows": self.windows.iter().map(|w| json!({
                "what": w.what, "seconds": w.secs, "pod_changes": w.pod_changes,
                "policy_changes": w.policy_changes, "failed": w.failed, "bytes": bytes(&w.bytes),
                "agent_cpu_seconds": w.agent_cpu_s,
            })).collect::<Vec<_>>(),
            "capture": self.capture.as_ref().map(|c| json!({
                "pods": c.pods, "latencies_ms": c.latencies_ms, "unserved": c.unserved,
                "release_ms": c.release_ms, "problems": c.problems,
            })),
            "one_arena": self.one_arena.as_ref().map(|(pods, m)| json!({"pods": pods, "memory": mem(m)})),
            "notes": self.notes,
            "seconds": self.total.as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_look_like_a_deployments_and_stay_apart() {
        let (ns, name) = pod_name(123);
        assert_eq!(ns, "bench-12");
        assert!(name.starts_with("shipping-012-"), "{name}");
        assert_eq!(pod_ip(0), Ipv4Addr::new(10, 64, 1, 0));
        assert_eq!(pod_ip(9_999), Ipv4Addr::new(10, 64, 40, 15));
        assert_ne!(pod_name(1).1, pod_name(2).1);
        let pod = bench_pod(0, "sim-000");
        let applied = pod["metadata"]["annotations"]
            ["kubectl.kubernetes.io/last-applied-configuration"]
            .as_str()
            .unwrap();
        assert!((1_500..3_500).contains(&applied.len()), "{}", applied.len());
        let _: Pod = serde_json::from_value(pod).unwrap();
    }

    #[test]
    fn churn_flaps_each_pod_and_ends_ready() {
        assert_eq!(churn_step(0, 1000).0, churn_step(1, 1000).0);
        assert!(!churn_step(0, 1000).1 && churn_step(1, 1000).1);
        assert!((percentile(&[1.0, 2.0, 3.0, 4.0], 0.5) - 2.0).abs() < 1e-9);
        assert!((percentile(&[1.0, 2.0, 3.0, 4.0], 1.0) - 4.0).abs() < 1e-9);
    }
}
