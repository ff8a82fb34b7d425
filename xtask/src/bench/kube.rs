//! `cargo xtask bench --only kube`: the agent on a real Kubernetes control plane
//! (`mesh_tests::kube::ControlPlane`), the real release `mesh-agent` in a testbed node, with its
//! least RBAC (the chart's, `deploy/chart/templates/rbac.yaml`) and a token bound to its own Pod.
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
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use futures_util::{stream, StreamExt as _, TryStreamExt as _};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod, ServiceAccount},
    jiff::Timestamp,
};
use kube::{
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    Api, Client,
};
use mesh_tests::{
    agent::AgentOptions,
    kube::{register_node, ControlPlane, Credentials},
    process, Agent, Testbed, TestbedSpec,
};
use serde_json::{json, Value};
use tokio::{net::TcpListener, runtime::Runtime, task::JoinHandle};

use self::{
    forward::{accept_loop, listen_in, Bytes, Counter},
    objects::{
        app_objects, bench_pod, capture_ip, churn_step, create_running_pod, heartbeat,
        namespace_name, pod_name, policy_change, retry, status, trimmed,
    },
    report::{kb, mb, memory, mib, percentile, Capture, Memory, PodSizes, Report, Stage, Window},
};
use super::{process_ticks, Plan, TICKS_PER_SEC};

mod forward;
mod objects;
mod report;

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
/// The namespace whose running pods are captured once it is labelled.
const CAPTURE_NS: &str = "bench-capture";
/// glibc's variable limiting its malloc arenas (one per thread, up to 8 per core, by default).
const ONE_ARENA: &str = "MALLOC_ARENA_MAX";
const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

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

        // The waypoint controller holds the view a waypoint reads (every pod, and the routes
        // and policies besides): what its Deployment's memory limit must allow.
        println!("fresh waypoint controller");
        let controller = self.fresh_controller(cp)?;
        self.report.controller = Some((self.created, controller));
        Ok(())
    }

    /// Starts the release `mesh-agent waypoint-controller` (admin credentials: its RBAC is not
    /// what is measured), waits until its view holds the cluster's workloads, and returns its
    /// memory 2 s later; stopped when it returns.
    fn fresh_controller(&self, cp: &ControlPlane) -> Result<Memory> {
        let binary = mesh_tests::agent::binary("mesh-agent", "mesh-agent")?;
        let mut command = Command::new(binary);
        command
            .args([
                "waypoint-controller",
                "--log-format=text",
                "--waypoint-image=mesh-agent:bench",
                "--ca-address=https://mesh-ca.mesh-system.svc:15012",
                "--ca-root-configmap=mesh-system/mesh-ca-root-cert",
                "--view-address=https://mesh-waypoint-controller.mesh-system.svc:15012",
                "--view-listen=127.0.0.1:0",
                "--namespace=mesh-system",
                "--service-account=mesh-waypoint-controller",
                "--ca-root-cert=/nonexistent/root-cert.pem",
            ])
            .arg("--kubeconfig")
            .arg(cp.kubeconfig_path())
            .env("RUST_LOG", "info");
        let start = Instant::now();
        let mut controller = process::Process::spawn("waypoint-controller", &mut command)
            .context("starting the waypoint controller")?;
        let pods = self.created;
        controller
            .wait_for_line(
                &format!("{pods} workloads in the controller's view"),
                Duration::from_secs(180),
                |l| workloads_in(l).is_some_and(|w| w >= pods),
            )
            .context("the waypoint controller's view")?;
        let ready = start.elapsed();
        thread::sleep(Duration::from_secs(2));
        let settled = memory(controller.pid())?;
        println!(
            "  fresh waypoint controller, {pods} pods: view in {:.2}s, VmRSS {:.1} MiB, VmHWM {:.1} MiB",
            ready.as_secs_f64(),
            mib(settled.rss),
            mib(settled.hwm)
        );
        Ok(settled)
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
            |l| workloads_in(l).is_some_and(|w| w >= n),
        )
        .map(drop)
        .map_err(Into::into)
}

/// The workloads a `cluster state updated` line (text format) counts.
fn workloads_in(line: &str) -> Option<usize> {
    if !line.contains("cluster state updated") {
        return None;
    }
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("workloads="))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests;
