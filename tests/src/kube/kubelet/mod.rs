//! The testbed kubelet: kubelet and container runtime for the simulated nodes of a
//! [`Testbed`](crate::Testbed), against the real control plane ([`ControlPlane`]).
//!
//! Per node it
//! - registers the `Node` with the node's own client certificate (`system:node:<name>` in
//!   `system:nodes`, so the Node authorizer and `NodeRestriction` judge everything it does),
//!   renews its Lease in `kube-node-lease` and posts the `Ready` heartbeat every
//!   [`KubeletOptions::heartbeat`];
//! - watches the Pods bound to the node (`spec.nodeName=<node>`, kube-rs watcher on a tokio
//!   runtime of its own);
//! - for each pod prepares its volumes (the service-account token by `TokenRequest` bound to
//!   the pod), creates its sandbox: a network namespace `<testbed id>-<node>-pod-<sandbox id>` and
//!   its cgroup in kubelet's cgroupfs layout below the node's kubepods root
//!   `<testbed cgroup>/kubepods-<node>` (`pod<uid>`, `burstable/pod<uid>`, `besteffort/pod<uid>`,
//!   one directory per container id below), and calls the CNI chain as a runtime does: the
//!   testbed's veth plugin (`mtb-cni`), then `mesh-cni` with the node's own agent socket. A
//!   failing ADD is undone (DEL) and retried with backoff, recorded as a
//!   `FailedCreatePodSandBox` Event and in the `PodReadyToStartContainers` condition; no
//!   container starts before ADD succeeds;
//! - runs the containers as processes of this repository's binaries (an image table), inside
//!   the pod's namespace and their container cgroup, in a private mount namespace whose fresh
//!   `/run` holds the volumes (the token at
//!   `/var/run/secrets/kubernetes.io/serviceaccount/token`), as `runAsUser`;
//! - writes the Pod's status as kubelet does, with readiness from `tcpSocket`, `httpGet` and
//!   `exec` probes, restarts by restart policy with backoff, and phases through to
//!   Succeeded/Failed;
//! - on deletion stops the containers (SIGTERM, SIGKILL after the grace period), runs CNI DEL
//!   in reverse order, removes the namespace and cgroups, and deletes the Pod with grace 0.
//!
//! Host-network pods run in the node's namespace without CNI. Dropping the [`Kubelet`] (also
//! during a panic) stops and removes everything it started; what a killed run leaves is named
//! after the testbed and removed with it by the testbed's sweep.

mod cni;
mod layout;
mod node;
mod node_view;
mod runtime;
mod volumes;
mod worker;

pub use cni::{result_ips, CniCall};
pub use layout::{compute_qos, pod_cgroup, QosClass};
pub use node::LEASE_NAMESPACE;
pub use node_view::NodeView;
pub(crate) use volumes::{service_account_of, token_for};

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    pin::pin,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Client,
};
use serde_json::json;
use tokio::{
    runtime::Runtime,
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::{kubeconfig, ControlPlane, Error, Result};
use crate::{agent::binary, Testbed};
use worker::{End, Worker};

/// How a kubelet runs. [`KubeletOptions::default`] is what the tests use.
#[derive(Clone, Debug)]
pub struct KubeletOptions {
    /// Chain `mesh-cni` after the veth plugin (its binary must be built).
    pub mesh_cni: bool,
    /// The agent socket written into the `mesh-cni` entry; default `<node dir>/cni.sock`.
    pub cni_socket: Option<PathBuf>,
    /// `mesh-cni`'s `timeout_ms`.
    pub cni_timeout: Duration,
    /// Image name (without registry, tag or digest) → program. `mesh-probe` (this crate's
    /// binary) and `shell` (`/bin/sh`) are always there unless overridden.
    pub images: BTreeMap<String, PathBuf>,
    /// Lease renewal and `Ready` heartbeat interval (kubelet's: 10 s).
    pub heartbeat: Duration,
    /// The Node's capacity (and allocatable).
    pub cpu: String,
    pub memory: String,
    pub max_pods: u32,
    /// Extra Node labels (besides `kubernetes.io/hostname`, `kubernetes.io/os` and `arch`).
    pub labels: BTreeMap<String, String>,
    /// `NoSchedule` taint keys the Node is registered with (kubelet's
    /// `--register-with-taints <key>:NoSchedule`).
    pub register_with_taints: Vec<String>,
    /// First and largest pause between attempts to set up a sandbox (volumes, CNI ADD).
    pub sandbox_backoff: (Duration, Duration),
    /// First and largest pause before restarting a container that exited.
    pub restart_backoff: (Duration, Duration),
    /// kubelet's `--cluster-dns`: the name server written into the `/etc/resolv.conf` of pods
    /// with `dnsPolicy: ClusterFirst` (the default) off the host network, with the search path
    /// `<namespace>.svc.cluster.local svc.cluster.local cluster.local` and `ndots:5`. `None`:
    /// pods see the node's own file.
    pub cluster_dns: Option<IpAddr>,
}

impl Default for KubeletOptions {
    fn default() -> Self {
        Self {
            mesh_cni: true,
            cni_socket: None,
            cni_timeout: Duration::from_secs(2),
            images: BTreeMap::new(),
            heartbeat: Duration::from_secs(10),
            cpu: "4".into(),
            memory: "8Gi".into(),
            max_pods: 110,
            labels: BTreeMap::new(),
            register_with_taints: Vec::new(),
            sandbox_backoff: (Duration::from_millis(500), Duration::from_secs(4)),
            restart_backoff: (Duration::from_secs(1), Duration::from_secs(20)),
            cluster_dns: None,
        }
    }
}

/// A pod as this kubelet runs it (from [`Kubelet::pods`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `Guaranteed`, `Burstable` or `BestEffort`.
    pub qos_class: String,
    /// The CNI container id of the sandbox.
    pub sandbox_id: String,
    /// The pod's network namespace file (`/run/netns/<name>`); `None` on the host network.
    pub netns: Option<PathBuf>,
    /// The pod's cgroup directory.
    pub cgroup: PathBuf,
    /// Its addresses from the CNI result (IPv4 first), the node's for host-network pods.
    pub ips: Vec<IpAddr>,
    /// CNI ADD succeeded (always for host-network pods).
    pub network_ready: bool,
    pub containers: Vec<LocalContainer>,
}

/// A container slot of a [`LocalPod`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalContainer {
    pub name: String,
    pub init: bool,
    /// The current (or last) container's id, also its cgroup directory's name.
    pub id: Option<String>,
    pub pid: Option<u32>,
    pub cgroup: Option<PathBuf>,
    pub restart_count: i32,
    pub running: bool,
    pub ready: bool,
}

/// What the workers share with the [`Kubelet`].
#[derive(Debug, Default)]
struct Shared {
    pods: BTreeMap<String, LocalPod>,
    /// What CHECK needs of each pod whose ADD succeeded, by uid.
    networks: BTreeMap<String, (cni::ConfList, cni::CniPod, serde_json::Value)>,
    logs: BTreeMap<(String, String, String), runtime::Log>,
    cni_calls: Vec<CniCall>,
}

/// The node-wide context of the pod workers.
struct Ctx {
    node: String,
    node_netns: PathBuf,
    host_ips: Vec<IpAddr>,
    client: Client,
    testbed_id: String,
    kubepods: PathBuf,
    pods_dir: PathBuf,
    cni: cni::Cni,
    launcher: PathBuf,
    images: BTreeMap<String, PathBuf>,
    options: KubeletOptions,
    shared: Arc<Mutex<Shared>>,
    /// The node's own file system (see [`NodeView`]).
    view: NodeView,
    /// Where each running container is described for `exec` ([`Kubelet::exec_dir`]).
    exec_dir: PathBuf,
}

impl Ctx {
    /// The output buffer of a pod's container (kept after the pod is gone).
    fn log_for(&self, namespace: &str, pod: &str, container: &str) -> runtime::Log {
        let key = (namespace.to_owned(), pod.to_owned(), container.to_owned());
        let mut shared = self.shared.lock().expect("kubelet state");
        let log = shared.logs.entry(key).or_default();
        log.lock().expect("log lock").clear();
        Arc::clone(log)
    }
}

/// Prints a line of the kubelet's (or a container's) output on stderr, as every testbed
/// process's output is echoed, unless [`crate::process::QUIET_ENV`] is set.
fn echo(label: &str, line: &str) {
    if std::env::var_os(crate::process::QUIET_ENV).is_none() {
        eprintln!("[{label}] {line}");
    }
}

/// A running testbed kubelet for one node. Dropping it stops everything it started.
pub struct Kubelet {
    node: String,
    dir: PathBuf,
    kubepods: PathBuf,
    cni_socket: PathBuf,
    pods_dir: PathBuf,
    kubeconfig: PathBuf,
    netns_prefix: String,
    shared: Arc<Mutex<Shared>>,
    client: Option<Client>,
    cni: cni::Cni,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    runtime: Option<Runtime>,
}

impl std::fmt::Debug for Kubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubelet")
            .field("node", &self.node)
            .field("kubepods", &self.kubepods)
            .field("cni_socket", &self.cni_socket)
            .finish_non_exhaustive()
    }
}

impl Kubelet {
    /// Starts the kubelet of testbed node `index`: registers the Node (Ready, its lease
    /// renewed) and starts watching its pods. Fails with the reason when a binary is missing
    /// (`mtb-cni`, `mtb-run`, `mesh-probe`, and `mesh-cni` unless [`KubeletOptions::mesh_cni`]
    /// is off) or the API server refuses the node.
    pub fn start(
        cp: &ControlPlane,
        tb: &Testbed,
        index: usize,
        options: &KubeletOptions,
    ) -> Result<Self> {
        crate::host::require_privileges()?;
        let node = tb.node(index).clone();
        let Binaries {
            launcher,
            veth_plugin,
            mesh_cni,
            images,
        } = Binaries::find(options)?;

        let dir = tb.scratch_dir().join(format!("kubelet-{}", node.name));
        let (kubepods, view) = node_view(cp, tb, &node, &dir)?;
        let cni_socket = options
            .cni_socket
            .clone()
            .unwrap_or_else(|| dir.join("cni.sock"));
        write_cni_files(
            &node,
            &dir,
            &veth_plugin,
            mesh_cni.as_deref(),
            &cni_socket,
            options.cni_timeout,
        )?;

        let user = format!("system:node:{}", node.name);
        let credentials = cp.issue_client_cert(
            &format!("kubelet-{}-{}", tb.id(), node.name),
            &user,
            Some("system:nodes"),
        )?;
        let kubeconfig = dir.join("kubelet.kubeconfig");
        cp.write_kubeconfig(&kubeconfig, cp.apiserver_addr(), &credentials)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("kubelet-{}", node.name))
            .enable_all()
            .build()
            .map_err(crate::io_err("starting the kubelet's tokio runtime"))?;
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let mut kubelet = Self {
            node: node.name.clone(),
            netns_prefix: format!("{}-{}-pod-", tb.id(), node.name),
            pods_dir: dir.join("pods"),
            cni: cni::Cni {
                bin_dir: dir.join("cni/bin"),
                conf_dir: dir.join("cni/net.d"),
                view,
                launcher: launcher.clone(),
            },
            dir,
            kubepods: kubepods.clone(),
            cni_socket,
            kubeconfig,
            shared: Arc::clone(&shared),
            client: None,
            stop,
            tasks: Vec::new(),
            runtime: Some(runtime),
        };
        // From here on an error drops `kubelet`, which removes what was made.
        let client = kubelet.block_on(kubeconfig::client(&kubelet.kubeconfig))?;
        kubelet.client = Some(client.clone());
        let info = node_info(&node, options);
        let host_ips = info.addresses.clone();
        let registered = kubelet.block_on(async {
            let registered = node::register(&client, &info).await?;
            node::renew_lease(&client, &registered).await?;
            Ok::<_, Error>(registered)
        })?;
        let ctx = Arc::new(Ctx {
            node: node.name.clone(),
            node_netns: node.netns_path(),
            host_ips,
            client: client.clone(),
            testbed_id: tb.id().to_owned(),
            kubepods,
            pods_dir: kubelet.pods_dir.clone(),
            cni: kubelet.cni.clone(),
            launcher,
            images,
            options: options.clone(),
            shared,
            view: kubelet.cni.view.clone(),
            exec_dir: kubelet.exec_dir(),
        });
        std::fs::create_dir_all(&ctx.exec_dir)
            .map_err(crate::io_err("creating the kubelet's exec directory"))?;
        let handle = kubelet.runtime().handle().clone();
        kubelet.tasks.push(handle.spawn(node::heartbeat(
            client,
            info,
            registered,
            options.heartbeat,
        )));
        kubelet
            .tasks
            .push(handle.spawn(dispatch(ctx, kubelet.stop.subscribe())));
        echo(
            &format!("kubelet {}", node.name),
            "registered; watching the node's pods",
        );
        Ok(kubelet)
    }

    /// [`Self::start`] for every node of the testbed.
    pub fn start_all(
        cp: &ControlPlane,
        tb: &Testbed,
        options: &KubeletOptions,
    ) -> Result<Vec<Self>> {
        (0..tb.nodes().len())
            .map(|i| Self::start(cp, tb, i, options))
            .collect()
    }

    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The node's kubepods cgroup root (`<testbed cgroup>/kubepods-<node>`): every pod cgroup
    /// is below it, none inside the node's own cgroup. The agent gets it as a flag.
    pub fn kubepods_root(&self) -> &Path {
        &self.kubepods
    }

    /// The agent socket this node's `mesh-cni` entry names (what the node's agent must serve).
    pub fn cni_socket(&self) -> &Path {
        &self.cni_socket
    }

    /// The node's CNI configuration directory (one `10-mtb.conflist`; `mesh-cni install
    /// --conf-dir` may edit it: the list is read at each sandbox's ADD).
    pub fn cni_conf_dir(&self) -> &Path {
        &self.cni.conf_dir
    }

    /// The node's CNI plugin directory (`CNI_PATH`).
    pub fn cni_bin_dir(&self) -> &Path {
        &self.cni.bin_dir
    }

    /// The kubelet's kubeconfig (its node client certificate, the API server in the root
    /// namespace).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Where the kubelet describes each running container, as a runtime keeps its state: a
    /// file `<namespace>_<pod>_<container>.json` holding `argv`, the command line that enters
    /// the container (the launcher's `exec` mode, as exec probes run, ending in `--`; the
    /// command to run follows), and `env`, its environment as `NAME=value`. Written when the
    /// container starts, removed when it ends. The conformance suite's `pods/exec` runs there.
    pub fn exec_dir(&self) -> PathBuf {
        self.dir.join("exec")
    }

    /// Its directory (pods' volumes, CNI files, address records), removed with it.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A client acting as this node (runs on the kubelet's runtime).
    pub fn client(&self) -> Client {
        self.client.clone().expect("client present once started")
    }

    /// The pods this kubelet runs now (those with a sandbox).
    pub fn pods(&self) -> Vec<LocalPod> {
        self.shared
            .lock()
            .expect("kubelet state")
            .pods
            .values()
            .cloned()
            .collect()
    }

    /// The pod `namespace/name` if this kubelet runs it now.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<LocalPod> {
        self.pods()
            .into_iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// What container `container` of pod `namespace/name` printed (its current or last run;
    /// kept after the pod is gone).
    pub fn logs(&self, namespace: &str, pod: &str, container: &str) -> Vec<String> {
        let key = (namespace.to_owned(), pod.to_owned(), container.to_owned());
        self.shared
            .lock()
            .expect("kubelet state")
            .logs
            .get(&key)
            .map(|l| l.lock().expect("log lock").clone())
            .unwrap_or_default()
    }

    /// Runs CNI CHECK through the chain for pod `namespace/name` (as a runtime does to verify
    /// a sandbox's network), with the ADD's result: `Err` names the failing plugin.
    pub fn cni_check(&self, namespace: &str, name: &str) -> Result<(), String> {
        let pod = self
            .pod(namespace, name)
            .ok_or_else(|| format!("{namespace}/{name} does not run here"))?;
        let network = self
            .shared
            .lock()
            .expect("kubelet state")
            .networks
            .get(&pod.uid)
            .cloned();
        let (list, pod, result) =
            network.ok_or_else(|| format!("{namespace}/{name} has no network"))?;
        let shared = Arc::clone(&self.shared);
        let record = move |call| shared.lock().expect("kubelet state").cni_calls.push(call);
        self.block_on(self.cni.check(&list, &pod, &result, &record))
            .map_err(|e| e.to_string())
    }

    /// Every CNI plugin execution so far, in order.
    pub fn cni_calls(&self) -> Vec<CniCall> {
        self.shared.lock().expect("kubelet state").cni_calls.clone()
    }

    /// Stops the kubelet and reports what could not be removed (dropping does the same but
    /// can only print problems).
    pub fn teardown(mut self) -> Result<()> {
        self.stop_all()
    }

    fn runtime(&self) -> &Runtime {
        self.runtime
            .as_ref()
            .expect("runtime present until stopped")
    }

    fn block_on<F>(&self, future: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        let handle = self.runtime().handle();
        thread::scope(
            |scope| match scope.spawn(move || handle.block_on(future)).join() {
                Ok(output) => output,
                Err(panic) => std::panic::resume_unwind(panic),
            },
        )
    }

    /// Stops the pod workers (each kills its containers and takes down its sandbox, CNI DEL
    /// included), the watch and the heartbeat, then removes whatever is left: processes and
    /// cgroups below the kubepods root, the node's pod namespaces, the directory. Idempotent.
    fn stop_all(&mut self) -> Result<()> {
        if self.runtime.is_none() {
            return Ok(());
        }
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut self.tasks);
        let kubepods = self.kubepods.clone();
        let leftovers = self.block_on(async move {
            let mut tasks = tasks.into_iter();
            let heartbeat = tasks.next();
            if let Some(heartbeat) = &heartbeat {
                heartbeat.abort();
            }
            for task in tasks {
                let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
            }
            runtime::remove_cgroup(&kubepods).await
        });
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        let mut first: Option<String> = leftovers.err();
        let netns: Vec<String> = std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&self.netns_prefix))
            .collect();
        for name in netns {
            if let Err(e) =
                crate::process::run(std::process::Command::new("ip").args(["netns", "del", &name]))
            {
                first.get_or_insert(e.to_string());
            }
        }
        if self.dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                first.get_or_insert(format!("removing {}: {e}", self.dir.display()));
            }
        }
        match first {
            None => Ok(()),
            Some(detail) => Err(Error::Invalid {
                what: format!("stopping the kubelet of {}", self.node),
                detail,
            }),
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if let Err(e) = self.stop_all() {
            eprintln!("kubelet {}: cleanup failed: {e}", self.node);
        }
    }
}

/// The programs a kubelet runs.
struct Binaries {
    launcher: PathBuf,
    veth_plugin: PathBuf,
    mesh_cni: Option<PathBuf>,
    images: BTreeMap<String, PathBuf>,
}

impl Binaries {
    fn find(options: &KubeletOptions) -> Result<Self> {
        let mut images = BTreeMap::from([
            ("mesh-probe".to_owned(), binary("mesh-probe", "mesh-tests")?),
            ("shell".to_owned(), PathBuf::from("/bin/sh")),
        ]);
        images.extend(options.images.clone());
        Ok(Self {
            launcher: binary("mtb-run", "mesh-tests")?,
            veth_plugin: binary("mtb-cni", "mesh-tests")?,
            mesh_cni: if options.mesh_cni {
                Some(binary("mesh-cni", "mesh-cni")?)
            } else {
                None
            },
            images,
        })
    }
}

/// The kubelet's directories, the node's CNI plugin directory (links to the binaries) and its
/// conflist: `mtb-cni`, then
/// `mesh-cni` naming `cni_socket` when there is one.
fn write_cni_files(
    node: &crate::Node,
    dir: &Path,
    veth_plugin: &Path,
    mesh_cni: Option<&Path>,
    cni_socket: &Path,
    timeout: Duration,
) -> Result<()> {
    for d in ["cni/bin", "cni/net.d", "pods"] {
        let d = dir.join(d);
        std::fs::create_dir_all(&d).map_err(crate::io_err(format!("creating {}", d.display())))?;
    }
    let plugins = [("mtb-cni", Some(veth_plugin)), ("mesh-cni", mesh_cni)];
    for (name, target) in plugins {
        if let Some(target) = target {
            let link = dir.join("cni/bin").join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(target, &link)
                .map_err(crate::io_err(format!("linking {}", link.display())))?;
        }
    }
    let veth = json!({
        "type": "mtb-cni",
        "node_netns": node.netns_path(),
        "node_index": node.index,
        "first_pod_index": node.pods.len(),
        "ipam_dir": dir.join("ipam"),
    });
    let list = cni::conflist(
        &format!("mtb-{}", node.name),
        &veth,
        mesh_cni.map(|_| (cni_socket, timeout)),
    );
    let conf_file = dir.join("cni/net.d/10-mtb.conflist");
    std::fs::write(
        &conf_file,
        serde_json::to_string_pretty(&list).expect("JSON"),
    )
    .map_err(crate::io_err(format!("writing {}", conf_file.display())))?;
    Ok(())
}

/// What the Node says about itself: both link addresses, labels, capacity.
fn node_info(node: &crate::Node, options: &KubeletOptions) -> node::NodeInfo {
    let mut labels = json!({
        "kubernetes.io/hostname": node.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": if cfg!(target_arch = "aarch64") { "arm64" } else { "amd64" },
    });
    for (k, v) in &options.labels {
        labels[k] = json!(v);
    }
    node::NodeInfo {
        name: node.name.clone(),
        addresses: vec![node.link_ipv4.into(), node.link_ipv6.into()],
        capacity: json!({"cpu": options.cpu, "memory": options.memory, "pods": options.max_pods.to_string()}),
        labels,
        taints: options
            .register_with_taints
            .iter()
            .map(|key| json!({"key": key, "effect": "NoSchedule"}))
            .collect(),
        ready_since: super::now(),
    }
}

/// The node's kubepods cgroup (`<testbed cgroup>/kubepods-<node>`, with its `QoS` directories),
/// its own file system ([`NodeView`]), and the API server at the `kubernetes` Service's address
/// on the node: in-cluster clients of its pods find it there, as kubelet tells them
/// (`KUBERNETES_SERVICE_HOST`).
fn node_view(
    cp: &ControlPlane,
    tb: &Testbed,
    node: &crate::Node,
    dir: &Path,
) -> Result<(PathBuf, NodeView)> {
    let kubepods = tb.cgroup_dir().join(format!("kubepods-{}", node.name));
    for d in [&kubepods.join("burstable"), &kubepods.join("besteffort")] {
        std::fs::create_dir_all(d).map_err(crate::io_err(format!("creating {}", d.display())))?;
    }
    cp.expose_service_on(node)?;
    let view = NodeView::new(tb.scratch_dir(), dir, &kubepods).map_err(|e| {
        crate::io_err(format!("preparing the file system view of {}", node.name))(e)
    })?;
    Ok((kubepods, view))
}

/// Watches the node's pods and runs a worker per pod; on stop, waits for every worker to
/// finish its cleanup.
async fn dispatch(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let label = format!("kubelet {}", ctx.node);
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node));
    let mut events = pin!(watcher(api, config).default_backoff());
    let mut workers: HashMap<String, (watch::Sender<Option<Pod>>, JoinHandle<()>)> = HashMap::new();
    // Pods whose worker ended (terminal or deleted): not run again until the API forgets them.
    let mut finished: HashSet<String> = HashSet::new();
    let mut listing: Option<HashSet<String>> = None;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, End)>();
    let started = Instant::now();
    loop {
        let event = tokio::select! {
            _ = stop.changed() => break,
            Some((uid, end)) = done_rx.recv() => {
                workers.remove(&uid);
                if end != End::Stop {
                    finished.insert(uid);
                }
                continue;
            }
            event = events.next() => event,
        };
        let event = match event {
            None => break,
            Some(Err(e)) => {
                echo(&label, &format!("watching pods: {e}"));
                continue;
            }
            Some(Ok(event)) => event,
        };
        let mut apply = |pod: Pod| {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if let Some(seen) = listing.as_mut() {
                seen.insert(uid.clone());
            }
            if let Some((tx, _)) = workers.get(&uid) {
                tx.send_replace(Some(pod));
                return;
            }
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if finished.contains(&uid) || matches!(phase, Some("Succeeded" | "Failed")) {
                return;
            }
            echo(
                &label,
                &format!(
                    "pod {}/{} bound here ({:.1}s after start)",
                    pod.metadata.namespace.as_deref().unwrap_or_default(),
                    pod.metadata.name.as_deref().unwrap_or_default(),
                    started.elapsed().as_secs_f64()
                ),
            );
            let (tx, rx) = watch::channel(Some(pod.clone()));
            let (worker, inputs) = Worker::new(Arc::clone(&ctx), pod, rx, stop.clone());
            let done = done_tx.clone();
            let key = uid.clone();
            let task = tokio::spawn(async move {
                let end = worker.run(inputs).await;
                let _ = done.send((key, end));
            });
            workers.insert(uid, (tx, task));
        };
        match event {
            watcher::Event::Init => listing = Some(HashSet::new()),
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => apply(pod),
            watcher::Event::InitDone => {
                if let Some(seen) = listing.take() {
                    for (uid, (tx, _)) in &workers {
                        if !seen.contains(uid) {
                            tx.send_replace(None);
                        }
                    }
                    finished.retain(|uid| seen.contains(uid));
                }
            }
            watcher::Event::Delete(pod) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                if let Some((tx, _)) = workers.get(&uid) {
                    tx.send_replace(None);
                }
                finished.remove(&uid);
            }
        }
    }
    for (_, (_, task)) in workers {
        let _ = task.await;
    }
}
