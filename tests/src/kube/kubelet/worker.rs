//! One pod's life on the node, as kubelet's pod worker runs it: volumes, then the sandbox
//! (network namespace, cgroup, CNI ADD through the chain, retried with backoff until it
//! succeeds, the pod's containers never started before), then init containers in order and the
//! app containers, supervised (restart policy with backoff, readiness probes), with the Pod's
//! status written through the status subresource; at the end the containers are stopped
//! (SIGTERM, SIGKILL after the grace period), CNI DEL runs in reverse order, the namespace and
//! cgroups go, and a deleted Pod is removed from the API with grace 0.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{Container, Pod, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
    Api,
};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

use super::{
    cni::{result_ips, CniCall, CniPod, ConfList},
    layout::{self, QosClass},
    runtime::{self, Exit, Launch, Log, ProbeAction},
    volumes::{self, Prepared},
    Ctx, LocalContainer, LocalPod,
};
use crate::kube::now;

/// Why the worker stopped driving the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// `deletionTimestamp` is set: terminate gracefully, clean up, delete the object.
    Deleted,
    /// The object is gone from the API (force-deleted): kill and clean up.
    Gone,
    /// The kubelet stops: kill and clean up, leave the object.
    Stop,
    /// All containers ended for good (Succeeded or Failed): clean up, keep the object.
    Terminal,
}

/// The network half of a sandbox.
struct Sandbox {
    id: String,
    /// `None` for host-network pods.
    netns_name: Option<String>,
    netns_path: PathBuf,
    cgroup: PathBuf,
    /// The conflist of the ADD, for DEL and CHECK.
    conflist: Option<ConfList>,
    /// The ADD's final result once the chain succeeded.
    result: Option<Value>,
    ips: Vec<IpAddr>,
}

#[derive(Clone, Debug)]
enum State {
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        started_at: String,
    },
    Terminated {
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        message: Option<String>,
        started_at: String,
        finished_at: String,
        container_id: String,
    },
}

/// A container slot of the pod (init containers first).
struct Slot {
    spec: Container,
    init: bool,
    state: State,
    last_state: Option<State>,
    restart_count: i32,
    /// The current (or last) container's id, pid and cgroup.
    id: Option<String>,
    pid: Option<u32>,
    cgroup: Option<PathBuf>,
    started_at: Option<Instant>,
    /// When a waiting container may (re)start; `None`: never again.
    start_at: Option<Instant>,
    backoff: Duration,
    ready: bool,
    probe_next: Option<Instant>,
    probe_busy: bool,
    successes: i32,
    failures: i32,
    log: Log,
}

impl Slot {
    fn running(&self) -> bool {
        matches!(self.state, State::Running { .. })
    }
    fn succeeded(&self) -> bool {
        matches!(self.state, State::Terminated { exit_code: 0, .. })
    }
}

/// A probe's outcome, for the container it ran against.
struct ProbeResult {
    slot: usize,
    container_id: String,
    result: Result<(), String>,
}

struct Condition {
    status: bool,
    since: String,
    reason: Option<String>,
    message: Option<String>,
}

pub struct Worker {
    ctx: Arc<Ctx>,
    pod: Pod,
    uid: String,
    namespace: String,
    name: String,
    qos: QosClass,
    host_network: bool,
    sandbox: Option<Sandbox>,
    volumes: BTreeMap<String, Prepared>,
    slots: Vec<Slot>,
    start_time: String,
    conditions: BTreeMap<&'static str, Condition>,
    last_written: Option<Value>,
    events: BTreeMap<(String, String), (String, i32)>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    probes_tx: mpsc::UnboundedSender<ProbeResult>,
}

/// What the worker listens to.
pub struct Inputs {
    pub updates: watch::Receiver<Option<Pod>>,
    pub stop: watch::Receiver<bool>,
    exits: mpsc::UnboundedReceiver<Exit>,
    probes: mpsc::UnboundedReceiver<ProbeResult>,
}

enum Wake {
    Update,
    Stop,
    Exit(Exit),
    Probe(ProbeResult),
    Tick,
}

impl Worker {
    pub fn new(
        ctx: Arc<Ctx>,
        pod: Pod,
        updates: watch::Receiver<Option<Pod>>,
        stop: watch::Receiver<bool>,
    ) -> (Self, Inputs) {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        let (probes_tx, probes) = mpsc::unbounded_channel();
        let spec = pod.spec.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let slot = |spec: &Container, init: bool| Slot {
            log: ctx.log_for(&namespace, &name, &spec.name),
            spec: spec.clone(),
            init,
            state: State::Waiting {
                reason: if init {
                    "PodInitializing"
                } else {
                    "ContainerCreating"
                }
                .into(),
                message: String::new(),
            },
            last_state: None,
            restart_count: 0,
            id: None,
            pid: None,
            cgroup: None,
            started_at: None,
            start_at: Some(Instant::now()),
            backoff: ctx.options.restart_backoff.0,
            ready: false,
            probe_next: None,
            probe_busy: false,
            successes: 0,
            failures: 0,
        };
        let slots = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| slot(c, true))
            .chain(spec.containers.iter().map(|c| slot(c, false)))
            .collect();
        let worker = Self {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            qos: layout::qos_of(&pod),
            host_network: spec.host_network == Some(true),
            namespace,
            name,
            ctx,
            pod,
            sandbox: None,
            volumes: BTreeMap::new(),
            slots,
            start_time: now(),
            conditions: BTreeMap::new(),
            last_written: None,
            events: BTreeMap::new(),
            exits_tx,
            probes_tx,
        };
        let inputs = Inputs {
            updates,
            stop,
            exits,
            probes,
        };
        (worker, inputs)
    }

    /// Runs the pod to its end and cleans up; returns how it ended.
    pub async fn run(mut self, mut inputs: Inputs) -> End {
        let end = self.drive(&mut inputs).await;
        self.finish(end, &mut inputs).await;
        end
    }

    fn label(&self) -> String {
        format!("kubelet {} {}/{}", self.ctx.node, self.namespace, self.name)
    }

    fn deletion_requested(&self) -> bool {
        self.pod.metadata.deletion_timestamp.is_some()
    }

    async fn drive(&mut self, inputs: &mut Inputs) -> End {
        if self.deletion_requested() {
            return End::Deleted;
        }
        self.set_condition("PodReadyToStartContainers", false, None, None);
        self.set_condition(
            "Initialized",
            !self.slots.iter().any(|s| s.init),
            None,
            None,
        );
        self.flush_status().await;
        let (first, cap) = self.ctx.options.sandbox_backoff;
        let mut backoff = first;
        loop {
            let volumes_dir = self.ctx.pods_dir.join(&self.uid).join("volumes");
            match volumes::prepare(&self.ctx.client, &self.pod, &volumes_dir, &self.ctx.view).await
            {
                Ok(prepared) => {
                    self.volumes = prepared;
                    break;
                }
                Err(message) => self.record_event("Warning", "FailedMount", &message).await,
            }
            if let Some(end) = self.pause(inputs, backoff).await {
                return end;
            }
            backoff = (backoff * 2).min(cap);
        }
        backoff = first;
        loop {
            match self.create_sandbox().await {
                Ok(()) => break,
                Err(message) => {
                    let message = format!("Failed to create pod sandbox: {message}");
                    self.set_condition(
                        "PodReadyToStartContainers",
                        false,
                        Some("SandboxCreationFailed"),
                        Some(&message),
                    );
                    self.record_event("Warning", "FailedCreatePodSandBox", &message)
                        .await;
                    self.flush_status().await;
                }
            }
            if let Some(end) = self.pause(inputs, backoff).await {
                return end;
            }
            backoff = (backoff * 2).min(cap);
        }
        self.set_condition("PodReadyToStartContainers", true, None, None);
        self.supervise(inputs).await
    }

    /// Waits `delay` unless the pod is deleted or the kubelet stops first.
    async fn pause(&mut self, inputs: &mut Inputs, delay: Duration) -> Option<End> {
        let deadline = Instant::now() + delay;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return None,
                changed = inputs.updates.changed() => {
                    if let Some(end) = self.take_update(changed.is_ok(), inputs) {
                        return Some(end);
                    }
                }
                _ = inputs.stop.changed() => return Some(End::Stop),
            }
        }
    }

    /// Takes the latest object; says how to end when it is deleted or gone.
    fn take_update(&mut self, alive: bool, inputs: &mut Inputs) -> Option<End> {
        let latest = inputs.updates.borrow_and_update().clone();
        match (alive, latest) {
            (true, Some(pod)) => {
                self.pod = pod;
                self.deletion_requested().then_some(End::Deleted)
            }
            _ => Some(End::Gone),
        }
    }

    async fn create_sandbox(&mut self) -> Result<(), String> {
        if self.sandbox.is_none() {
            let id = layout::new_id();
            let cgroup = layout::pod_cgroup(&self.ctx.kubepods, self.qos, &self.uid);
            std::fs::create_dir_all(&cgroup)
                .map_err(|e| format!("creating cgroup {}: {e}", cgroup.display()))?;
            let (netns_name, netns_path) = if self.host_network {
                (None, self.ctx.node_netns.clone())
            } else {
                let name = format!("{}-{}-pod-{}", self.ctx.testbed_id, self.ctx.node, &id[..8]);
                crate::process::run(std::process::Command::new("ip").args(["netns", "add", &name]))
                    .map_err(|e| format!("creating network namespace {name}: {e}"))?;
                let path = PathBuf::from("/run/netns").join(&name);
                (Some(name), path)
            };
            self.sandbox = Some(Sandbox {
                id,
                netns_name,
                netns_path,
                cgroup,
                conflist: None,
                result: None,
                ips: Vec::new(),
            });
            self.publish();
        }
        if self.host_network {
            let sandbox = self.sandbox.as_mut().expect("sandbox");
            sandbox.ips.clone_from(&self.ctx.host_ips);
            self.publish();
            return Ok(());
        }
        let list = ConfList::load(&self.ctx.cni.conf_dir)?;
        let pod = self.cni_pod();
        let sandbox_id = pod.sandbox_id.clone();
        let record = self.recorder();
        self.sandbox.as_mut().expect("sandbox").conflist = Some(list.clone());
        match self.ctx.cni.add(&list, &pod, &record).await {
            Ok(result) => {
                self.ctx
                    .shared
                    .lock()
                    .expect("kubelet state")
                    .networks
                    .insert(
                        self.uid.clone(),
                        (list.clone(), pod.clone(), result.clone()),
                    );
                let sandbox = self.sandbox.as_mut().expect("sandbox");
                sandbox.ips = result_ips(&result);
                sandbox.result = Some(result);
                self.publish();
                Ok(())
            }
            Err(failure) => {
                // As runtimes do: undo what the chain did before retrying.
                let _ = self.ctx.cni.del(&list, &pod, None, &record).await;
                Err(format!(
                    "failed to setup network for sandbox {sandbox_id:?}: {failure}"
                ))
            }
        }
    }

    fn cni_pod(&self) -> CniPod {
        let sandbox = self.sandbox.as_ref().expect("sandbox");
        CniPod {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            sandbox_id: sandbox.id.clone(),
            netns: sandbox.netns_path.clone(),
        }
    }

    fn recorder(&self) -> impl Fn(CniCall) + Sync {
        let shared = Arc::clone(&self.ctx.shared);
        move |call| shared.lock().expect("kubelet state").cni_calls.push(call)
    }

    /// Starts what is due, handles exits, probes and updates, and writes the status, until the
    /// pod ends.
    async fn supervise(&mut self, inputs: &mut Inputs) -> End {
        loop {
            self.start_due().await;
            self.update_conditions();
            self.publish();
            self.flush_status().await;
            let phase = self.phase();
            if phase == "Succeeded" || phase == "Failed" {
                return End::Terminal;
            }
            let wake = self.next_wake();
            let sleep = async move {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                changed = inputs.updates.changed() => if changed.is_ok() { Wake::Update } else { Wake::Stop },
                _ = inputs.stop.changed() => Wake::Stop,
                Some(exit) = inputs.exits.recv() => Wake::Exit(exit),
                Some(result) = inputs.probes.recv() => Wake::Probe(result),
                () = sleep => Wake::Tick,
            };
            match event {
                Wake::Update => {
                    if let Some(end) = self.take_update(true, inputs) {
                        return end;
                    }
                }
                Wake::Stop => {
                    return if *inputs.stop.borrow() {
                        End::Stop
                    } else {
                        End::Gone
                    };
                }
                Wake::Exit(exit) => self.on_exit(&exit, true).await,
                Wake::Probe(result) => self.on_probe(result).await,
                Wake::Tick => self.run_due_probes(),
            }
        }
    }

    /// The next due start (of the next init container while one is pending, else of the app
    /// containers) or probe.
    fn next_wake(&self) -> Option<Instant> {
        let next_init = self.slots.iter().position(|s| s.init && !s.succeeded());
        self.slots
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                let may_start = match next_init {
                    Some(next) => i == next,
                    None => !s.init,
                };
                let start = (may_start && !s.running()).then_some(s.start_at).flatten();
                let probe = (s.running() && !s.probe_busy)
                    .then_some(s.probe_next)
                    .flatten();
                [start, probe]
            })
            .flatten()
            .min()
    }

    /// Starts the next init container, or every app container, whose start is due.
    async fn start_due(&mut self) {
        let now = Instant::now();
        let due = |s: &Slot| !s.running() && s.start_at.is_some_and(|t| t <= now);
        let next_init = self.slots.iter().position(|s| s.init && !s.succeeded());
        let candidates: Vec<usize> = match next_init {
            Some(i) => vec![i]
                .into_iter()
                .filter(|&i| due(&self.slots[i]))
                .collect(),
            None => (0..self.slots.len())
                .filter(|&i| !self.slots[i].init && due(&self.slots[i]))
                .collect(),
        };
        for i in candidates {
            if let Err((reason, message)) = self.start_container(i) {
                self.record_event("Warning", "Failed", &message).await;
                let slot = &mut self.slots[i];
                slot.state = State::Waiting { reason, message };
                slot.start_at = Some(Instant::now() + slot.backoff);
                slot.backoff = (slot.backoff * 2).min(self.ctx.options.restart_backoff.1);
            } else {
                let message = format!("Started container {}", self.slots[i].spec.name);
                self.record_event("Normal", "Started", &message).await;
            }
        }
    }

    fn start_container(&mut self, i: usize) -> Result<(), (String, String)> {
        let launch = self.launch_for(i)?;
        let id = layout::new_id();
        let sandbox = self.sandbox.as_ref().expect("sandbox");
        let cgroup = sandbox.cgroup.join(&id);
        std::fs::create_dir_all(&cgroup).map_err(|e| {
            (
                "StartError".to_owned(),
                format!("creating cgroup {}: {e}", cgroup.display()),
            )
        })?;
        let launch = Launch {
            cgroup: cgroup.clone(),
            ..launch
        };
        let slot = &mut self.slots[i];
        let pid =
            runtime::start(&launch, &slot.log, i, &id, self.exits_tx.clone()).map_err(|e| {
                (
                    "StartError".to_owned(),
                    format!("starting {:?}: {e}", launch.argv),
                )
            })?;
        if slot.id.is_some() {
            slot.restart_count += 1;
        }
        slot.id = Some(id);
        slot.pid = Some(pid);
        slot.cgroup = Some(cgroup);
        slot.state = State::Running { started_at: now() };
        slot.started_at = Some(Instant::now());
        slot.start_at = None;
        slot.ready = false;
        slot.successes = 0;
        slot.failures = 0;
        slot.probe_busy = false;
        slot.probe_next =
            readiness(&slot.spec).map(|p| Instant::now() + secs(p.initial_delay_seconds, 0));
        self.publish_exec(i, &launch, pid);
        Ok(())
    }

    /// Describes the container just started in slot `i` for `exec`: how to enter it, and its
    /// environment. A failure is only echoed: the container runs on, without `exec`.
    fn publish_exec(&self, i: usize, launch: &Launch, pid: u32) {
        let mut argv = vec![launch.launcher.display().to_string()];
        argv.extend(runtime::exec_args(
            pid,
            &launch.cgroup,
            launch.uid,
            launch.gid,
        ));
        let env: Vec<String> = launch.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let file = exec_file(
            &self.ctx.exec_dir,
            &self.namespace,
            &self.name,
            &self.slots[i].spec.name,
        );
        let body = json!({"argv": argv, "env": env}).to_string();
        if let Err(e) = std::fs::write(&file, body) {
            super::echo(
                &launch.label,
                &format!(
                    "cannot describe the container for exec in {}: {e}",
                    file.display()
                ),
            );
        }
    }

    /// The container's command line, environment, mounts and user.
    fn launch_for(&self, i: usize) -> Result<Launch, (String, String)> {
        let spec = &self.slots[i].spec;
        let config_error = |message: String| ("CreateContainerConfigError".to_owned(), message);
        let image = spec.image.clone().unwrap_or_default();
        let program = self.ctx.images.get(layout::image_name(&image)).ok_or_else(|| {
            let known: Vec<&String> = self.ctx.images.keys().collect();
            (
                "ErrImagePull".to_owned(),
                format!("image {image:?} is not in the testbed kubelet's image table (it knows {known:?})"),
            )
        })?;
        let sandbox = self.sandbox.as_ref().expect("sandbox");
        let env = self.env_for(spec, program).map_err(config_error)?;
        let vars: BTreeMap<String, String> = env.iter().cloned().collect();
        let expand = |list: &Option<Vec<String>>| -> Vec<String> {
            list.iter()
                .flatten()
                .map(|a| layout::expand(a, &vars))
                .collect()
        };
        let mut argv = match &spec.command {
            Some(command) if !command.is_empty() => expand(&spec.command),
            _ => vec![program.display().to_string()],
        };
        argv.extend(expand(&spec.args));
        let mut binds = Vec::new();
        for mount in spec.volume_mounts.iter().flatten() {
            let volume = self
                .volumes
                .get(&mount.name)
                .ok_or_else(|| config_error(format!("volume {:?} is not prepared", mount.name)))?;
            let mut source = volume.path.clone();
            if let Some(sub) = mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
                source = source.join(sub);
            }
            // A host path mounted where it already is needs nothing: containers see the host's
            // file system outside /run.
            let private =
                mount.mount_path.starts_with("/run") || mount.mount_path.starts_with("/var/run");
            if !private && source.as_path() == std::path::Path::new(&mount.mount_path) {
                continue;
            }
            if !private {
                return Err(config_error(format!(
                    "the testbed kubelet mounts volumes only below /run or /var/run (the container's private part), not at {}",
                    mount.mount_path
                )));
            }
            binds.push((
                source,
                mount.mount_path.clone(),
                volume.read_only || mount.read_only == Some(true),
            ));
        }
        let pod_context = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref());
        let context = spec.security_context.as_ref();
        let uid = context
            .and_then(|c| c.run_as_user)
            .or_else(|| pod_context.and_then(|c| c.run_as_user));
        let gid = context
            .and_then(|c| c.run_as_group)
            .or_else(|| pod_context.and_then(|c| c.run_as_group));
        let resolv_conf = self.resolv_conf().map_err(config_error)?;
        Ok(Launch {
            launcher: self.ctx.launcher.clone(),
            view: self.ctx.view.clone(),
            cgroup: sandbox.cgroup.clone(),
            netns: sandbox.netns_path.clone(),
            binds,
            resolv_conf,
            uid,
            gid: gid.or(uid.map(|_| 0)),
            workdir: spec.working_dir.clone(),
            argv,
            env,
            label: format!("{}/{}/{}", self.ctx.node, self.name, spec.name),
        })
    }

    /// The pod's `/etc/resolv.conf` as kubelet writes it with `--cluster-dns` (see
    /// [`super::KubeletOptions::cluster_dns`]), for `dnsPolicy: ClusterFirst` off the host
    /// network; `None` where the pod keeps the node's file.
    fn resolv_conf(&self) -> Result<Option<PathBuf>, String> {
        let Some(server) = self.ctx.options.cluster_dns else {
            return Ok(None);
        };
        let policy = self.pod.spec.as_ref().and_then(|s| s.dns_policy.as_deref());
        if self.host_network || !matches!(policy, None | Some("ClusterFirst")) {
            return Ok(None);
        }
        let file = self.ctx.pods_dir.join(&self.uid).join("resolv.conf");
        let ns = &self.namespace;
        let body = format!(
            "search {ns}.svc.cluster.local svc.cluster.local cluster.local\nnameserver {server}\noptions ndots:5\n"
        );
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        std::fs::write(&file, body).map_err(|e| format!("writing {}: {e}", file.display()))?;
        Ok(Some(file))
    }

    /// `PATH` (with the image binaries' directory first), `HOSTNAME`, then the container's
    /// `env` in order, each value expanded with the variables before it.
    fn env_for(
        &self,
        spec: &Container,
        program: &std::path::Path,
    ) -> Result<Vec<(String, String)>, String> {
        let dir = program
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                format!("{dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
            ),
            ("HOSTNAME".into(), self.name.clone()),
            // The `kubernetes` Service, as kubelet always sets it (the node forwards it to the
            // API server: `ControlPlane::expose_service_on`).
            (
                "KUBERNETES_SERVICE_HOST".into(),
                super::super::KUBERNETES_SERVICE_IP.to_string(),
            ),
            ("KUBERNETES_SERVICE_PORT".into(), "443".into()),
            ("KUBERNETES_SERVICE_PORT_HTTPS".into(), "443".into()),
        ];
        if spec.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
            return Err("envFrom is not supported by the testbed kubelet".into());
        }
        let ips = self
            .sandbox
            .as_ref()
            .map(|s| s.ips.clone())
            .unwrap_or_default();
        for var in spec.env.iter().flatten() {
            let vars: BTreeMap<String, String> = env.iter().cloned().collect();
            let value = match (&var.value, &var.value_from) {
                (_, Some(from)) => {
                    let field = from.field_ref.as_ref().ok_or_else(|| {
                        format!(
                            "env {}: only valueFrom.fieldRef is supported by the testbed kubelet",
                            var.name
                        )
                    })?;
                    volumes::field_value(&self.pod, field, &ips, &self.ctx.host_ips)?
                }
                (Some(value), None) => layout::expand(value, &vars),
                (None, None) => String::new(),
            };
            env.retain(|(k, _)| *k != var.name);
            env.push((var.name.clone(), value));
        }
        Ok(env)
    }

    /// A container ended: record it, and schedule its restart as the restart policy says.
    async fn on_exit(&mut self, exit: &Exit, may_restart: bool) {
        let policy = self.restart_policy();
        let cap = self.ctx.options.restart_backoff.1;
        let pod_label = format!("{}_{}({})", self.name, self.namespace, self.uid);
        let Some(slot) = self.slots.get_mut(exit.slot) else {
            return;
        };
        if slot.id.as_deref() != Some(exit.container_id.as_str()) || !slot.running() {
            return;
        }
        let code = exit.code.unwrap_or_else(|| 128 + exit.signal.unwrap_or(0));
        let started_at = match &slot.state {
            State::Running { started_at } => started_at.clone(),
            _ => String::new(),
        };
        let last_line = slot.log.lock().expect("log lock").last().cloned();
        let reason = match (code, &last_line) {
            (0, _) => "Completed",
            (128, Some(line)) if line.starts_with("mtb-run:") => "StartError",
            _ => "Error",
        };
        let message = (reason == "StartError").then(|| last_line.clone().unwrap_or_default());
        slot.state = State::Terminated {
            exit_code: code,
            signal: exit.signal,
            reason: reason.into(),
            message,
            started_at,
            finished_at: now(),
            container_id: exit.container_id.clone(),
        };
        slot.pid = None;
        slot.ready = false;
        slot.probe_next = None;
        let _ = std::fs::remove_file(exec_file(
            &self.ctx.exec_dir,
            &self.namespace,
            &self.name,
            &slot.spec.name,
        ));
        if let Some(cgroup) = slot.cgroup.take() {
            let _ = runtime::remove_cgroup(&cgroup).await;
        }
        // A container that ran long enough starts its backoff afresh, as kubelet's does.
        if slot.started_at.is_some_and(|t| t.elapsed() > cap * 2) {
            slot.backoff = self.ctx.options.restart_backoff.0;
        }
        let restart = may_restart
            && match policy.as_str() {
                "Never" => false,
                "OnFailure" => code != 0,
                _ => !(slot.init && code == 0),
            };
        if restart {
            let delay = slot.backoff;
            slot.backoff = (slot.backoff * 2).min(cap);
            slot.last_state = Some(slot.state.clone());
            let message = format!(
                "back-off {}s restarting failed container={} pod={pod_label}",
                delay.as_secs(),
                slot.spec.name
            );
            slot.state = State::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: message.clone(),
            };
            slot.start_at = Some(Instant::now() + delay);
            self.record_event("Warning", "BackOff", &message).await;
        } else {
            slot.start_at = None;
        }
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    fn run_due_probes(&mut self) {
        let now = Instant::now();
        let netns = self.ctx.node_netns.clone();
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if !slot.running() || slot.probe_busy || slot.probe_next.is_none_or(|t| t > now) {
                continue;
            }
            let Some(probe) = readiness(&slot.spec).cloned() else {
                continue;
            };
            let action = match self.probe_action(i, &probe) {
                Ok(action) => action,
                Err(message) => {
                    let slot = &mut self.slots[i];
                    slot.probe_next = Some(now + secs(probe.period_seconds, 10));
                    let _ = self.probes_tx.send(ProbeResult {
                        slot: i,
                        container_id: slot.id.clone().unwrap_or_default(),
                        result: Err(message),
                    });
                    continue;
                }
            };
            let slot = &mut self.slots[i];
            slot.probe_busy = true;
            slot.probe_next = Some(now + secs(probe.period_seconds, 10));
            let tx = self.probes_tx.clone();
            let container_id = slot.id.clone().unwrap_or_default();
            let timeout = secs(probe.timeout_seconds, 1);
            let netns = netns.clone();
            tokio::spawn(async move {
                let result = runtime::probe(action, netns, timeout).await;
                let _ = tx.send(ProbeResult {
                    slot: i,
                    container_id,
                    result,
                });
            });
        }
    }

    fn probe_action(&self, i: usize, probe: &Probe) -> Result<ProbeAction, String> {
        let slot = &self.slots[i];
        let pod_ip = self
            .sandbox
            .as_ref()
            .and_then(|s| s.ips.first().copied())
            .ok_or("the pod has no address")?;
        let port = |port: &IntOrString| -> Result<u16, String> {
            match port {
                IntOrString::Int(n) => {
                    u16::try_from(*n).map_err(|_| format!("port {n} is out of range"))
                }
                IntOrString::String(name) => slot
                    .spec
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name))
                    .and_then(|p| u16::try_from(p.container_port).ok())
                    .ok_or_else(|| format!("named port {name:?} is not a port of the container")),
            }
        };
        if let Some(tcp) = &probe.tcp_socket {
            let host = tcp
                .host
                .as_deref()
                .and_then(|h| h.parse().ok())
                .unwrap_or(pod_ip);
            return Ok(ProbeAction::Tcp(SocketAddr::new(host, port(&tcp.port)?)));
        }
        if let Some(http) = &probe.http_get {
            let host = http
                .host
                .as_deref()
                .and_then(|h| h.parse().ok())
                .unwrap_or(pod_ip);
            let addr = SocketAddr::new(host, port(&http.port)?);
            return Ok(ProbeAction::Http {
                addr,
                host: addr.to_string(),
                path: http.path.clone().unwrap_or_else(|| "/".into()),
            });
        }
        if let Some(exec) = &probe.exec {
            let launch = self.launch_for(i).map_err(|(_, m)| m)?;
            return Ok(ProbeAction::Exec {
                launcher: self.ctx.launcher.clone(),
                pid: slot.pid.ok_or("the container is not running")?,
                cgroup: slot.cgroup.clone().ok_or("the container has no cgroup")?,
                uid: launch.uid,
                gid: launch.gid,
                argv: exec.command.clone().unwrap_or_default(),
                env: launch.env,
            });
        }
        Err("probe type not supported by the testbed kubelet (tcpSocket, httpGet, exec are)".into())
    }

    async fn on_probe(&mut self, result: ProbeResult) {
        let Some(slot) = self.slots.get_mut(result.slot) else {
            return;
        };
        slot.probe_busy = false;
        if slot.id.as_deref() != Some(result.container_id.as_str()) || !slot.running() {
            return;
        }
        let Some(probe) = readiness(&slot.spec) else {
            return;
        };
        let name = slot.spec.name.clone();
        match result.result {
            Ok(()) => {
                slot.failures = 0;
                slot.successes += 1;
                if slot.successes >= probe.success_threshold.unwrap_or(1) {
                    slot.ready = true;
                }
            }
            Err(message) => {
                slot.successes = 0;
                slot.failures += 1;
                if slot.failures >= probe.failure_threshold.unwrap_or(3) {
                    slot.ready = false;
                }
                let was_ready = slot.ready;
                if was_ready || slot.failures == 1 {
                    let message = format!("Readiness probe failed for container {name}: {message}");
                    self.record_event("Warning", "Unhealthy", &message).await;
                }
            }
        }
    }

    fn update_conditions(&mut self) {
        let init_done = self.slots.iter().filter(|s| s.init).all(Slot::succeeded);
        let mut apps = self.slots.iter().filter(|s| !s.init);
        let ready = init_done
            && apps.clone().count() > 0
            && apps.all(|s| s.running() && (s.ready || readiness(&s.spec).is_none()));
        // Containers without a readiness probe are ready while they run.
        for slot in self.slots.iter_mut().filter(|s| !s.init) {
            if slot.running() && readiness(&slot.spec).is_none() {
                slot.ready = true;
            }
        }
        let not_ready = |slots: &[Slot]| -> String {
            let names: Vec<&str> = slots
                .iter()
                .filter(|s| !s.init && !s.ready)
                .map(|s| s.spec.name.as_str())
                .collect();
            format!("containers with unready status: [{}]", names.join(" "))
        };
        self.set_condition("Initialized", init_done, None, None);
        let message = (!ready).then(|| not_ready(&self.slots));
        let reason = (!ready).then_some("ContainersNotReady");
        self.set_condition("ContainersReady", ready, reason, message.as_deref());
        self.set_condition("Ready", ready, reason, message.as_deref());
    }

    fn set_condition(
        &mut self,
        kind: &'static str,
        status: bool,
        reason: Option<&str>,
        message: Option<&str>,
    ) {
        let entry = self.conditions.entry(kind).or_insert_with(|| Condition {
            status,
            since: now(),
            reason: None,
            message: None,
        });
        if entry.status != status {
            entry.status = status;
            entry.since = now();
        }
        entry.reason = reason.map(str::to_owned);
        entry.message = message.map(str::to_owned);
    }

    /// kubelet's `getPhase`.
    fn phase(&self) -> &'static str {
        let policy = self.restart_policy();
        if let Some(init) = self.slots.iter().find(|s| s.init && !s.succeeded()) {
            let failed_for_good =
                matches!(init.state, State::Terminated { .. }) && init.start_at.is_none();
            return if failed_for_good { "Failed" } else { "Pending" };
        }
        let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
        for slot in self.slots.iter().filter(|s| !s.init) {
            match &slot.state {
                State::Running { .. } => running += 1,
                State::Terminated { exit_code, .. } => {
                    stopped += 1;
                    if *exit_code == 0 {
                        succeeded += 1;
                    }
                }
                State::Waiting { .. } if slot.last_state.is_some() => stopped += 1,
                State::Waiting { .. } => waiting += 1,
            }
        }
        if waiting > 0 {
            "Pending"
        } else if running > 0 {
            "Running"
        } else if stopped > 0 {
            if policy == "Always" {
                "Running"
            } else if stopped == succeeded {
                "Succeeded"
            } else if policy == "Never" {
                "Failed"
            } else {
                "Running"
            }
        } else {
            "Pending"
        }
    }

    fn status_json(&self) -> Value {
        let host_ips: Vec<Value> = self
            .ctx
            .host_ips
            .iter()
            .map(|ip| json!({"ip": ip.to_string()}))
            .collect();
        let mut status = json!({
            "phase": self.phase(),
            "hostIP": self.ctx.host_ips.first().map(ToString::to_string),
            "hostIPs": host_ips,
            "startTime": self.start_time,
            "conditions": self.conditions.iter().map(|(kind, c)| json!({
                "type": kind,
                "status": if c.status { "True" } else { "False" },
                "lastProbeTime": null,
                "lastTransitionTime": c.since,
                "reason": c.reason,
                "message": c.message,
            })).collect::<Vec<_>>(),
            "initContainerStatuses": self.slots.iter().filter(|s| s.init).map(container_status).collect::<Vec<_>>(),
            "containerStatuses": self.slots.iter().filter(|s| !s.init).map(container_status).collect::<Vec<_>>(),
        });
        if let Some(ip) = self.sandbox.as_ref().and_then(|s| s.ips.first()) {
            status["podIP"] = json!(ip.to_string());
            status["podIPs"] = json!(self
                .sandbox
                .iter()
                .flat_map(|s| s.ips.iter())
                .map(|ip| json!({"ip": ip.to_string()}))
                .collect::<Vec<_>>());
        }
        status
    }

    /// Writes the status if it changed since the last write (a strategic merge through the
    /// status subresource: conditions merge by type, so the scheduler's stay).
    async fn flush_status(&mut self) {
        let status = self.status_json();
        if self.last_written.as_ref() == Some(&status) {
            return;
        }
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let patch = json!({"metadata": {"uid": self.uid}, "status": status});
        match pods
            .patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
        {
            Ok(pod) => {
                self.last_written = Some(status);
                if pod.metadata.uid.as_deref() == Some(self.uid.as_str()) {
                    self.pod.metadata.deletion_timestamp = pod.metadata.deletion_timestamp;
                }
            }
            Err(e) => super::echo(
                &self.label(),
                &format!("writing the pod's status failed: {e}"),
            ),
        }
    }

    /// Records an Event about the pod (a repeat raises the first one's count).
    async fn record_event(&mut self, kind: &str, reason: &str, message: &str) {
        let events: Api<k8s_openapi::api::core::v1::Event> =
            Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let key = (reason.to_owned(), message.to_owned());
        let now = now();
        if let Some((name, count)) = self.events.get_mut(&key) {
            *count += 1;
            let patch = json!({"count": *count, "lastTimestamp": now});
            let _ = events
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            return;
        }
        let name = format!("{}.{}", self.name, &layout::new_id()[..16]);
        let event = json!({
            "metadata": {"name": name, "namespace": self.namespace},
            "involvedObject": {"kind": "Pod", "apiVersion": "v1", "namespace": self.namespace,
                               "name": self.name, "uid": self.uid},
            "reason": reason, "message": message, "type": kind,
            "source": {"component": "kubelet", "host": self.ctx.node},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "reportingComponent": "kubelet", "reportingInstance": self.ctx.node,
        });
        super::echo(&self.label(), &format!("event {reason}: {message}"));
        let event = serde_json::from_value(event).expect("an Event");
        match events.create(&PostParams::default(), &event).await {
            Ok(_) => {
                self.events.insert(key, (name, 1));
            }
            Err(e) => super::echo(
                &self.label(),
                &format!("recording event {reason} failed: {e}"),
            ),
        }
    }

    /// Stops the containers: SIGTERM, then SIGKILL (`cgroup.kill`, which also reaches what they
    /// started) after `grace`; a zero grace kills at once.
    async fn kill_containers(&mut self, grace: Duration, inputs: &mut Inputs) {
        if !self.slots.iter().any(Slot::running) {
            return;
        }
        if !grace.is_zero() {
            for slot in self.slots.iter().filter(|s| s.running()) {
                if let Some(pid) = slot.pid {
                    runtime::signal(pid, Signal::SIGTERM);
                }
            }
            let message = format!("Stopping containers of pod {}", self.name);
            self.record_event("Normal", "Killing", &message).await;
            self.wait_exits(Instant::now() + grace, inputs).await;
        }
        for slot in self.slots.iter().filter(|s| s.running()) {
            if let Some(cgroup) = &slot.cgroup {
                runtime::kill_cgroup(cgroup);
            }
        }
        self.wait_exits(Instant::now() + Duration::from_secs(10), inputs)
            .await;
    }

    async fn wait_exits(&mut self, deadline: Instant, inputs: &mut Inputs) {
        while self.slots.iter().any(Slot::running) {
            match tokio::time::timeout_at(deadline, inputs.exits.recv()).await {
                Ok(Some(exit)) => self.on_exit(&exit, false).await,
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// Everything after the pod's run: stop its containers, take down the sandbox (CNI DEL in
    /// reverse order, namespace, cgroups, volumes), and as the end demands write the final
    /// status and delete the object.
    async fn finish(&mut self, end: End, inputs: &mut Inputs) {
        let grace = match end {
            End::Deleted => Duration::from_secs(
                self.pod
                    .metadata
                    .deletion_grace_period_seconds
                    .or_else(|| {
                        self.pod
                            .spec
                            .as_ref()
                            .and_then(|s| s.termination_grace_period_seconds)
                    })
                    .and_then(|s| u64::try_from(s).ok())
                    .unwrap_or(30),
            ),
            End::Gone | End::Stop | End::Terminal => Duration::ZERO,
        };
        self.kill_containers(grace, inputs).await;
        if let Err(e) = self.teardown_sandbox().await {
            super::echo(&self.label(), &format!("tearing down the sandbox: {e}"));
        }
        match end {
            End::Deleted => {
                self.set_condition("Ready", false, Some("PodCompleted"), None);
                self.set_condition("ContainersReady", false, Some("PodCompleted"), None);
                self.set_condition("PodReadyToStartContainers", false, None, None);
                self.flush_status().await;
                let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
                let params = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(self.uid.clone()),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                match pods.delete(&self.name, &params).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                    Err(e) => super::echo(&self.label(), &format!("deleting the pod failed: {e}")),
                }
            }
            End::Terminal => {
                self.set_condition("PodReadyToStartContainers", false, None, None);
                self.flush_status().await;
            }
            End::Gone | End::Stop => {}
        }
        let mut shared = self.ctx.shared.lock().expect("kubelet state");
        shared.pods.remove(&self.uid);
        shared.networks.remove(&self.uid);
    }

    async fn teardown_sandbox(&mut self) -> Result<(), String> {
        let Some(sandbox) = self.sandbox.as_ref() else {
            return Ok(());
        };
        let mut first: Option<String> = None;
        if let (Some(list), false) = (&sandbox.conflist, self.host_network) {
            let pod = self.cni_pod();
            let record = self.recorder();
            if let Err(e) = self
                .ctx
                .cni
                .del(list, &pod, sandbox.result.as_ref(), &record)
                .await
            {
                first.get_or_insert(format!("CNI DEL: {e}"));
            }
        }
        if let Some(name) = &sandbox.netns_name {
            if let Err(e) =
                crate::process::run(std::process::Command::new("ip").args(["netns", "del", name]))
            {
                first.get_or_insert(format!("deleting network namespace {name}: {e}"));
            }
        }
        if let Err(e) = runtime::remove_cgroup(&sandbox.cgroup).await {
            first.get_or_insert(e);
        }
        let dir = self.ctx.pods_dir.join(&self.uid);
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                first.get_or_insert(format!("removing {}: {e}", dir.display()));
            }
        }
        self.sandbox = None;
        first.map_or(Ok(()), Err)
    }

    /// Publishes what runs where for [`super::Kubelet::pods`].
    fn publish(&self) {
        let Some(sandbox) = &self.sandbox else { return };
        let local = LocalPod {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            qos_class: self.qos.as_str().to_owned(),
            sandbox_id: sandbox.id.clone(),
            netns: sandbox
                .netns_name
                .as_ref()
                .map(|_| sandbox.netns_path.clone()),
            cgroup: sandbox.cgroup.clone(),
            ips: sandbox.ips.clone(),
            network_ready: sandbox.result.is_some() || self.host_network,
            containers: self
                .slots
                .iter()
                .map(|s| LocalContainer {
                    name: s.spec.name.clone(),
                    init: s.init,
                    id: s.id.clone(),
                    pid: s.pid,
                    cgroup: s.cgroup.clone(),
                    restart_count: s.restart_count,
                    running: s.running(),
                    ready: s.ready,
                })
                .collect(),
        };
        self.ctx
            .shared
            .lock()
            .expect("kubelet state")
            .pods
            .insert(self.uid.clone(), local);
    }
}

fn readiness(spec: &Container) -> Option<&Probe> {
    spec.readiness_probe.as_ref()
}

fn secs(value: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(value.and_then(|v| u64::try_from(v).ok()).unwrap_or(default))
}

fn state_json(state: &State) -> Value {
    match state {
        State::Waiting { reason, message } => {
            json!({"waiting": {"reason": reason, "message": (!message.is_empty()).then_some(message)}})
        }
        State::Running { started_at } => json!({"running": {"startedAt": started_at}}),
        State::Terminated {
            exit_code,
            signal,
            reason,
            message,
            started_at,
            finished_at,
            container_id,
        } => json!({"terminated": {
            "exitCode": exit_code, "signal": signal, "reason": reason, "message": message,
            "startedAt": (!started_at.is_empty()).then_some(started_at), "finishedAt": finished_at,
            "containerID": format!("mtb://{container_id}"),
        }}),
    }
}

fn container_status(slot: &Slot) -> Value {
    let image = slot.spec.image.clone().unwrap_or_default();
    json!({
        "name": slot.spec.name,
        "image": image,
        "imageID": format!("mtb-image://{}", layout::image_name(&image)),
        "containerID": slot.id.as_ref().map(|id| format!("mtb://{id}")),
        "ready": slot.ready,
        "started": slot.running(),
        "restartCount": slot.restart_count,
        "state": state_json(&slot.state),
        "lastState": slot.last_state.as_ref().map_or_else(|| json!({}), state_json),
    })
}

/// The file of [`super::Kubelet::exec_dir`] that describes a container.
fn exec_file(dir: &std::path::Path, namespace: &str, pod: &str, container: &str) -> PathBuf {
    dir.join(format!("{namespace}_{pod}_{container}.json"))
}
