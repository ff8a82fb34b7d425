//! The serving loop: ties the cluster view, the pod manager and the proxies together, and
//! shuts down cleanly on SIGTERM or SIGINT.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use mesh_identity::{BuiltinCa, BuiltinCaOptions, CertManager, Identity, ManagerOptions};
use mesh_trace::Tracer;

use crate::node_addrs::NodeAddrs;

use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};
use tracing::{debug, info, warn};

use crate::{
    admin::{self, AdminConfig},
    config::{AgentConfig, ClusterSource, OnExit},
    datapath::{Datapath, DatapathError, Shortcut},
    departure,
    handles::HandleStore,
    logging::LogControl,
    netns::NetnsRef,
    pods::{checks::Host, DesiredPod, PodManager, ProxyParts},
    proxy::{
        tracker::{AuthzSubject, Tracker},
        Resolve, Route, WaypointRoute,
    },
    readiness::{BlockReady, Readiness},
    status::AgentStatus,
    telemetry::{AccessLog, Telemetry},
};
use mesh_cluster::{
    ApiStatus, AuthzDecision, ClusterState, KubeOptions, KubeSource, KubeWatcher, Resolution,
    Service, Verdict, Workload,
};

/// How often the config directory is polled for changes.
const POLL: Duration = Duration::from_millis(250);
/// How often pods that could not be captured are tried again.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cluster view: {0}")]
    Cluster(#[from] mesh_cluster::FilesError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("installing the {0} handler: {1}")]
    Signal(&'static str, std::io::Error),
    #[error("certificate authority: {0}")]
    Ca(#[from] mesh_identity::CaError),
    #[error("remote certificate authority: {0}")]
    CaClient(#[from] mesh_ca::client::ClientError),
    #[error("certificate manager: {0}")]
    Certs(#[from] mesh_identity::ManagerError),
    #[error(transparent)]
    AccessLog(#[from] crate::telemetry::AccessLogError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("the agent's own place on the node: {0}")]
    Host(#[from] crate::pods::checks::Refusal),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("Kubernetes client: {0}")]
    KubeClient(String),
    #[error("CNI hand-over socket: {0}")]
    Handover(String),
    #[error(transparent)]
    Kube(#[from] mesh_cluster::KubeSourceError),
    #[error(transparent)]
    Tracing(#[from] mesh_trace::ExportError),
    #[error("reading the node's addresses: {0}")]
    NodeAddrs(nix::Error),
}

/// Resolves destinations with the newest cluster view, for the agent of `node`.
struct ClusterResolver {
    state: watch::Receiver<Arc<ClusterState>>,
    node: String,
}

impl Resolve for ClusterResolver {
    fn route(&self, src: Option<&Workload>, dst: SocketAddr) -> Route {
        let state = Arc::clone(&self.state.borrow());
        match state.resolve_from(src, dst) {
            Resolution::Service {
                service,
                endpoint,
                workload,
            } => Route::To {
                addr: endpoint,
                service: Some(service),
                identity: workload.as_deref().and_then(|w| self.remote_identity(w)),
                workload,
            },
            Resolution::NoEndpoint { service } if service.dns_first_answer().is_some() => {
                Route::Refuse(format!(
                    "ServiceEntry {service} is resolved by DNS, which only a waypoint does: \
                     bind it to one (istio.io/use-waypoint)"
                ))
            }
            Resolution::NoEndpoint { service } => {
                Route::Refuse(format!("service {service} has no ready endpoint for {dst}"))
            }
            Resolution::Workload { workload } => Route::To {
                addr: dst,
                service: None,
                identity: self.remote_identity(&workload),
                workload: Some(workload),
            },
            Resolution::Passthrough => Route::To {
                addr: dst,
                service: None,
                identity: None,
                workload: None,
            },
            Resolution::Waypoint {
                service,
                pod,
                addr,
                authority,
                ..
            } => Route::Waypoint(WaypointRoute {
                addr,
                authority,
                service,
                identity: pod.identity.clone(),
                workload: pod,
            }),
            Resolution::WaypointUnavailable { service, reason } => Route::Refuse(match service {
                Some(service) => {
                    format!("service {service} uses a waypoint that cannot take it: {reason}")
                }
                None => format!("{dst} uses a waypoint that cannot take it: {reason}"),
            }),
        }
    }

    fn workload(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.state.borrow().workload_by_ip(ip).cloned()
    }

    fn workload_named(&self, namespace: &str, name: &str) -> Option<Arc<Workload>> {
        self.state
            .borrow()
            .workload_by_name(namespace, name)
            .cloned()
    }

    fn service_of(&self, host: &str, endpoint_ip: IpAddr) -> Option<Arc<Service>> {
        let state = Arc::clone(&self.state.borrow());
        let service = state.service_by_hostname(host)?;
        let endpoint_ip = endpoint_ip.to_canonical();
        service
            .ports
            .iter()
            .flat_map(|p| &p.endpoints)
            .any(|e| e.addr.ip() == endpoint_ip)
            .then(|| Arc::clone(service))
    }

    fn authorize(&self, subject: &AuthzSubject) -> AuthzDecision {
        self.state.borrow().admit(&subject.as_inbound())
    }

    fn direct_targets(
        &self,
        client: &Workload,
        client_addr: SocketAddr,
        dst: SocketAddr,
        max: usize,
    ) -> Result<Vec<SocketAddr>, mesh_cluster::NotDirect> {
        let state = Arc::clone(&self.state.borrow());
        state.direct_targets(client, client_addr, dst, &self.node, max)
    }

    fn service_at(&self, dst: SocketAddr) -> Option<Arc<Service>> {
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        self.state
            .borrow()
            .service_by_addr(dst)
            .map(|(service, _)| Arc::clone(service))
    }
}

impl ClusterResolver {
    /// The identity to tunnel to when `workload` is served by another node's agent.
    fn remote_identity(&self, workload: &Workload) -> Option<Identity> {
        workload.tunnel_identity(&self.node).cloned()
    }
}

/// The pods of this node the cluster view enrolls, with what the agent needs to capture them:
/// from the stand-in annotations (the file source; the view refuses an enrolled pod of this
/// node without them), or from the hand-over store on Kubernetes (`handles`).
fn desired_pods(
    state: &ClusterState,
    node: &str,
    handles: Option<&HandleStore>,
) -> Vec<DesiredPod> {
    state
        .workloads_on_node(node)
        .filter(|w| w.enrolled && !w.host_network)
        .filter_map(|w| {
            if let Some(store) = handles {
                return Some(store.desired(w));
            }
            let (Some(netns), Some(cgroup)) = (w.netns.clone(), w.cgroup.clone()) else {
                warn!(pod = %w, "enrolled pod without runtime annotations; not captured");
                return None;
            };
            Some(DesiredPod {
                name: w.to_string(),
                netns: NetnsRef::Path(netns),
                cgroup,
                ips: w.ips.clone(),
                identity: w.identity.clone(),
                shortcut: w.shortcut,
            })
        })
        .collect()
}

/// The short-cut's settings for this kernel, or `None` (with the reason logged) when the kernel
/// does not expose what bounds it: then every leg takes the TCP path.
fn shortcut(budget: u32) -> Option<Shortcut> {
    match Shortcut::for_running_kernel(budget) {
        Ok(s) => {
            info!(budget = s.budget, offsets = ?s.offsets, "sockmap short-cut available to pods that opt in");
            Some(s)
        }
        Err(e) => {
            warn!(error = %e, "sockmap short-cut unavailable on this kernel; every leg takes the TCP path");
            None
        }
    }
}

/// The running cluster source: its snapshots, and what keeps it running (dropped at exit).
struct Source {
    state: watch::Receiver<Arc<ClusterState>>,
    api: Option<watch::Receiver<ApiStatus>>,
    /// Where pods live (Kubernetes only; the CNI hand-over fills it).
    handles: Option<Arc<HandleStore>>,
    /// The API client (Kubernetes only), for the pods' capture events.
    client: Option<kube::Client>,
    _running: SourceTasks,
}

/// Held only to be dropped at exit (which stops the source).
enum SourceTasks {
    Files(#[allow(dead_code)] tokio::task::JoinHandle<()>),
    Kubernetes(
        #[allow(dead_code)] KubeWatcher,
        #[allow(dead_code)] tokio::task::JoinHandle<()>,
    ),
}

/// Starts the configured source and returns once its first complete view is in: at once for
/// files, after the first full list of every kind for Kubernetes (readiness says so meanwhile).
async fn start_source(config: &AgentConfig, readiness: &Readiness) -> Result<Source, AgentError> {
    let options = config.enrollment();
    match &config.source {
        ClusterSource::Files { dir, limits } => {
            let (state, task) =
                mesh_cluster::ConfigDir::with_limits(dir, options, *limits)?.into_watcher(POLL)?;
            Ok(Source {
                state,
                api: None,
                handles: None,
                client: None,
                _running: SourceTasks::Files(task),
            })
        }
        ClusterSource::Kubernetes {
            kubeconfig,
            kubepods_cgroup,
            ..
        } => {
            let client = kube_client(kubeconfig.as_deref()).await?;
            let listing = readiness.block("first list from the Kubernetes API");
            let watcher = KubeSource::new(client.clone(), options, KubeOptions::default())?
                .start()
                .await?;
            drop(listing);
            let api = watcher.status.clone();
            let note = tokio::spawn(report_api_status(api.clone(), readiness.clone()));
            Ok(Source {
                state: watcher.state.clone(),
                api: Some(api),
                handles: Some(HandleStore::new(kubepods_cgroup.clone())),
                client: Some(client),
                _running: SourceTasks::Kubernetes(watcher, note),
            })
        }
    }
}

/// On Kubernetes, serves `mesh-cni`'s hand-over socket (pods then reach the store).
fn spawn_handover(
    config: &AgentConfig,
    source: &Source,
    pods: &PodManager,
    readiness: &Readiness,
) -> Result<(), AgentError> {
    let (Some(store), ClusterSource::Kubernetes { cni_socket, .. }) =
        (&source.handles, &config.source)
    else {
        return Ok(());
    };
    if let Some(client) = &source.client {
        tokio::spawn(crate::capture_events::run(
            client.clone(),
            config.node_name.clone(),
            source.state.clone(),
            pods.ctx().local.clone(),
            pods.uncaptured(),
        ));
    }
    crate::handles::cni::spawn(
        cni_socket.clone(),
        crate::handles::cni::AgentView {
            state: source.state.clone(),
            store: Arc::clone(store),
            local: pods.ctx().local.clone(),
            uncaptured: pods.uncaptured(),
            readiness: readiness.clone(),
        },
    )
    .map_err(|e| AgentError::Handover(e.to_string()))
}

/// A client for the kubeconfig at `path`, else in-cluster configuration (or `$KUBECONFIG`).
async fn kube_client(path: Option<&std::path::Path>) -> Result<kube::Client, AgentError> {
    mesh_cluster::kube_client(path)
        .await
        .map_err(|e| AgentError::KubeClient(e.to_string()))
}

/// Keeps readiness's note on the API server current: while its watches fail, the agent stays
/// ready (it serves its last view, as ztunnel does while istiod is away) and says since when.
async fn report_api_status(mut status: watch::Receiver<ApiStatus>, readiness: Readiness) {
    let mut note = None;
    let mut noted = None;
    loop {
        let since = status.borrow_and_update().unreachable_since;
        if since != noted {
            // The old note goes before the new one is logged.
            drop(note.take());
            note = since.map(|since| {
                readiness.degraded(&format!(
                    "Kubernetes API unreachable since {}; serving the last view",
                    mesh_trace::rfc3339(since)
                ))
            });
            noted = since;
        }
        if status.changed().await.is_err() {
            drop(note);
            return;
        }
    }
}

/// The access log and the tracer, as configured (within the runtime: the span exporter's
/// channel runs on it).
fn telemetry(config: &AgentConfig) -> Result<Arc<Telemetry>, AgentError> {
    let tracer = Tracer::new(&config.telemetry.tracing.trace_config(
        "mesh-agent",
        vec![("k8s.node.name", config.node_name.clone())],
    ))?;
    Ok(Arc::new(Telemetry::new(
        AccessLog::start(&config.telemetry.access_log)?,
        tracer,
    )))
}

/// What the pods' proxies share: the resolver, the HBONE pool's settings, telemetry, the
/// tracker, and the node's addresses (kept current by a task that runs as long as the agent).
fn proxy_parts(
    config: &AgentConfig,
    state: watch::Receiver<Arc<ClusterState>>,
    certs: Arc<CertManager>,
    telemetry: Arc<Telemetry>,
    tracker: Arc<Tracker>,
) -> Result<ProxyParts, AgentError> {
    let t = &config.transport;
    let node = Arc::new(NodeAddrs::discover().map_err(AgentError::NodeAddrs)?);
    drop(node.spawn_refresh());
    Ok(ProxyParts {
        resolver: Arc::new(ClusterResolver {
            state,
            node: config.node_name.clone(),
        }),
        certs,
        provider: t.crypto_provider,
        pool: mesh_hbone::PoolConfig {
            max_streams_per_connection: t.max_streams_per_connection as usize,
            idle_timeout: t.pool_idle_timeout,
            ..mesh_hbone::PoolConfig::default()
        },
        stream_idle_timeout: t.stream_idle_timeout,
        telemetry,
        tracker,
        node,
    })
}

/// Runs the agent until SIGTERM or SIGINT; `log` changes the log level at run time (admin
/// endpoint `/logging`).
pub async fn run(config: AgentConfig, log: LogControl) -> Result<(), AgentError> {
    info!(%config, version = env!("CARGO_PKG_VERSION"), "mesh-agent starting");
    let started = std::time::SystemTime::now();
    let readiness = Readiness::new();
    let config_ready = readiness.block("config");
    let certs_ready = readiness.block("certificates");
    // Declared after the blockers, so dropped before them: however `run` ends (a clean
    // shutdown or a fatal error), readiness never claims ready on the way down.
    let _going_down = readiness.not_ready_once_dropped();
    raise_open_files_limit();
    let signals = Signals::install()?;
    let source = start_source(&config, &readiness).await?;
    let mut state_rx = source.state.clone();
    let shortcut = config
        .sockmap
        .then(|| shortcut(config.shortcut_budget))
        .flatten();
    let datapath = Datapath::load(
        &config.bpffs_dir,
        config.on_exit == OnExit::Keep,
        shortcut,
        config.kernel_direct,
        &config.agent_cgroup,
    )?;
    let certs = certificate_manager(&config, state_rx.clone())?;
    let telemetry = telemetry(&config)?;
    let tracker = Arc::new(Tracker::default());
    let host = Host::discover(&config.agent_cgroup, &crate::config::cgroup2_root()?)?;
    let parts = proxy_parts(
        &config,
        state_rx.clone(),
        Arc::clone(&certs),
        Arc::clone(&telemetry),
        Arc::clone(&tracker),
    )?;
    let mut pods = PodManager::new(datapath, parts, host, readiness.clone());
    let status = AgentStatus {
        config: config.clone(),
        state: state_rx.clone(),
        certs: Arc::clone(&certs),
        ctx: Arc::clone(pods.ctx()),
        uncaptured: pods.uncaptured(),
        api: source.api.clone(),
        started,
    };
    let _admin = serve_admin(status, readiness.clone(), log).await?;
    // Watched from the start: at shutdown it tells an uninstall from a restart.
    let owner = match (&config.on_exit, &source.client) {
        (OnExit::AskOwner(owner), Some(client)) => {
            Some(departure::OwnerWatch::start(client.clone(), owner.clone()))
        }
        _ => None,
    };
    spawn_handover(&config, &source, &pods, &readiness)?;
    let state = Arc::clone(&state_rx.borrow_and_update());
    let desired = desired_pods(&state, &config.node_name, source.handles.as_deref());
    certs.set_wanted(desired.iter().map(|d| d.identity.clone()));
    // Attaches this instance's links, then detaches an earlier instance's (for the pods it
    // captured itself): no moment without capture.
    pods.reconcile(&desired).await;
    // The start-up's transients (the kernel's BTF above all) go back now, not over seconds.
    crate::memory::release_freed();
    // Once the copies go quiet, what a burst freed goes back at once too (`memory.rs`).
    let on_quiet = crate::memory::release_freed;
    tokio::spawn(crate::proxy::trim_copy_buffers(on_quiet));
    tokio::spawn(crate::proxy::run_direct_events(Arc::clone(pods.ctx())));
    // A flood of per-connection warnings held back is said even when no warning follows it.
    tokio::spawn(Arc::clone(&pods.ctx().telemetry.log_budget).report_held(Duration::from_secs(10)));
    tokio::spawn(become_ready(
        state_rx.clone(),
        config.node_name.clone(),
        Arc::clone(&certs),
        config_ready,
        certs_ready,
    ));
    info!(
        pods = pods.enrolled().count(),
        generation = state.generation(),
        "agent ready"
    );
    let signal = Serving {
        handles_rx: source.handles.as_ref().map(|h| h.subscribe()),
        handles: source.handles.clone(),
        node: &config.node_name,
        state_rx,
        certs: &certs,
        tracker: &tracker,
    }
    .until(signals, &mut pods)
    .await;
    info!(signal, "shutting down");
    let keep = keep_captured(&config.on_exit, owner.as_ref()).await;
    let mut datapath = pods.shutdown(keep).await;
    datapath.set_keep_pins(keep);
    drop(datapath);
    // The last spans and access log lines out; both block, so not on a runtime worker.
    let last = Arc::clone(&telemetry);
    let _ = tokio::task::spawn_blocking(move || {
        last.tracer.shutdown();
        last.access_log.close();
    })
    .await;
    info!("shutdown complete");
    Ok(())
}

/// SIGTERM and SIGINT, installed at start.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, AgentError> {
        Ok(Self {
            terminate: signal(SignalKind::terminate())
                .map_err(|e| AgentError::Signal("SIGTERM", e))?,
            interrupt: signal(SignalKind::interrupt())
                .map_err(|e| AgentError::Signal("SIGINT", e))?,
        })
    }
}

/// Resolves when the hand-over store changed (`true`); never without a store.
async fn wait_handles(rx: Option<&mut watch::Receiver<u64>>) -> bool {
    match rx {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// The serving loop's inputs.
struct Serving<'a> {
    /// Where pods live, on Kubernetes (the CNI hand-over); `None` with the file source.
    handles: Option<Arc<HandleStore>>,
    handles_rx: Option<watch::Receiver<u64>>,
    node: &'a str,
    state_rx: watch::Receiver<Arc<ClusterState>>,
    certs: &'a CertManager,
    tracker: &'a Tracker,
}

impl Serving<'_> {
    /// Applies each new cluster view to the pods (and open connections' policies), retries
    /// pods that could not be captured, until a signal; returns the signal's name.
    async fn until(mut self, mut signals: Signals, pods: &mut PodManager) -> &'static str {
        // Pods that could not be captured are retried while any is left.
        let mut retry = tokio::time::interval(RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                changed = self.state_rx.changed() => {
                    if changed.is_err() {
                        warn!("cluster view watcher stopped; keeping the last state");
                        std::future::pending::<()>().await;
                    }
                    let state = Arc::clone(&self.state_rx.borrow_and_update());
                    // The cluster module logs each new state (generation, counts, errors).
                    debug!(generation = state.generation(), "reconciling pods");
                    let desired = desired_pods(&state, self.node, self.handles.as_deref());
                    self.certs.set_wanted(desired.iter().map(|d| d.identity.clone()));
                    pods.reconcile(&desired).await;
                    new_direct_generation(pods);
                    recheck(self.tracker, &state);
                }
                changed = wait_handles(self.handles_rx.as_mut()) => {
                    if changed {
                        let state = Arc::clone(&self.state_rx.borrow());
                        let desired = desired_pods(&state, self.node, self.handles.as_deref());
                        self.certs.set_wanted(desired.iter().map(|d| d.identity.clone()));
                        pods.reconcile(&desired).await;
                        new_direct_generation(pods);
                    }
                }
                _ = retry.tick(), if pods.has_failures() => {
                    let state = Arc::clone(&self.state_rx.borrow());
                    pods.reconcile(&desired_pods(&state, self.node, self.handles.as_deref())).await;
                }
                _ = signals.terminate.recv() => return "SIGTERM",
                _ = signals.interrupt.recv() => return "SIGINT",
            }
        }
    }
}

/// Whether a clean shutdown leaves the node's pods captured (and the pins in place) for the
/// next agent ([`OnExit`]); without an API to ask (files), the safe side.
async fn keep_captured(on_exit: &OnExit, owner: Option<&departure::OwnerWatch>) -> bool {
    match (on_exit, owner) {
        (OnExit::Release, _) => false,
        (OnExit::AskOwner(_), Some(owner)) => {
            owner.departure().await == departure::Departure::Restart
        }
        (OnExit::Keep | OnExit::AskOwner(_), _) => true,
    }
}

/// The certificate manager, asking the CA the configuration names: the remote one
/// (`--ca-address`, Istio's certificate API; its host resolved through the cluster view, then
/// DNS), or the built-in one (created in `--ca-dir` on first use).
fn certificate_manager(
    config: &AgentConfig,
    state: watch::Receiver<Arc<ClusterState>>,
) -> Result<Arc<CertManager>, AgentError> {
    certificate_manager_for(
        &config.transport,
        &config.trust_domain,
        &config.cluster_domain,
        state,
    )
}

/// The certificate manager for `transport`'s CA, in `trust_domain`; the CA's host is resolved
/// through `state`'s services of `cluster_domain`, then DNS. Shared with `mesh-agent waypoint`.
pub fn certificate_manager_for(
    t: &crate::config::TransportConfig,
    trust_domain: &str,
    cluster_domain: &str,
    state: watch::Receiver<Arc<ClusterState>>,
) -> Result<Arc<CertManager>, AgentError> {
    if let Some(remote) = &t.remote_ca {
        return remote_certificate_manager(
            remote,
            t.cert_lifetime,
            trust_domain,
            cluster_domain,
            state,
        );
    }
    let ca = BuiltinCa::load_or_create(&t.ca_dir, trust_domain, BuiltinCaOptions::default())?;
    info!(ca_dir = %t.ca_dir.display(), trust_domain, "certificates come from the built-in CA");
    manager_of(Arc::new(ca), t.cert_lifetime)
}

/// The certificate manager for the `remote` CA (Istio's certificate API), certificates of
/// `lifetime` in `trust_domain`; the CA's host is resolved through `state`'s services of
/// `cluster_domain`, then DNS. Shared with `mesh-agent waypoint-controller`, which needs no
/// transport of its own.
pub fn remote_certificate_manager(
    remote: &crate::config::RemoteCa,
    lifetime: Duration,
    trust_domain: &str,
    cluster_domain: &str,
    state: watch::Receiver<Arc<ClusterState>>,
) -> Result<Arc<CertManager>, AgentError> {
    let options = mesh_ca::IstioCaOptions::new(
        remote.address.clone(),
        remote.root_cert.clone(),
        remote.token_file.clone(),
        trust_domain.to_owned(),
    );
    let resolver = crate::ca_resolver::ClusterCaResolver::new(state, cluster_domain);
    let client = mesh_ca::IstioCaClient::new(options, Arc::new(resolver))?;
    info!(
        ca = %remote.address,
        root_cert = %remote.root_cert.display(),
        token_file = %remote.token_file.display(),
        trust_domain,
        "certificates come from a remote CA (Istio's certificate API)"
    );
    manager_of(Arc::new(client), lifetime)
}

/// A manager of certificates of `lifetime` from `ca`.
fn manager_of(
    ca: Arc<dyn mesh_identity::CertificateAuthority>,
    lifetime: Duration,
) -> Result<Arc<CertManager>, AgentError> {
    Ok(Arc::new(CertManager::new(
        ca,
        ManagerOptions {
            lifetime: Some(lifetime),
            ..ManagerOptions::default()
        },
    )?))
}

/// Starts the admin (15000), metrics (15020) and readiness (15021) servers.
async fn serve_admin(
    status: AgentStatus,
    readiness: Readiness,
    log: LogControl,
) -> Result<admin::AdminServers, AgentError> {
    let t = &status.config.telemetry;
    let config = AdminConfig {
        admin: t.admin_addr,
        metrics: t.metrics_addr,
        readiness: t.readiness_addr,
    };
    Ok(admin::start(&config, Arc::new(status), readiness, log).await?)
}

/// Drops the readiness blockers: `config` once the cluster view has been read in full (a
/// snapshot without source errors: every file parsed and applied at least once), then
/// `certificates` once every identity of this node's enrolled pods at that moment has its
/// certificate.
async fn become_ready(
    mut state_rx: watch::Receiver<Arc<ClusterState>>,
    node: String,
    certs: Arc<CertManager>,
    config_ready: BlockReady,
    certs_ready: BlockReady,
) {
    let state = loop {
        let state = Arc::clone(&state_rx.borrow_and_update());
        if state.errors().is_empty() {
            break state;
        }
        info!(
            errors = state.errors().len(),
            "not ready: the config has errors (see above); waiting for a clean one"
        );
        if state_rx.changed().await.is_err() {
            return;
        }
    };
    drop(config_ready);
    let identities: BTreeSet<Identity> = state
        .workloads_on_node(&node)
        .filter(|w| w.enrolled && !w.host_network)
        .map(|w| w.identity.clone())
        .collect();
    for identity in identities {
        while let Err(e) = certs.wait_for(&identity, Duration::from_secs(30)).await {
            warn!(%identity, error = %e, "not ready: still waiting for a certificate");
        }
    }
    drop(certs_ready);
    crate::memory::release_freed();
}

/// The cluster view or the node's pods changed: no kernel-direct route decided before may be used
/// again (the agent offers new ones as connections come through it).
fn new_direct_generation(pods: &PodManager) {
    let direct = pods.ctx().conn.direct();
    if !direct.enabled() {
        return;
    }
    match direct.next_generation() {
        Ok(generation) => {
            let stale = direct.clear_routes();
            debug!(generation, stale, "kernel-direct routes renewed");
        }
        // The routes of the old generation would stay current: refuse them all instead.
        Err(error) => {
            let stale = direct.clear_routes();
            warn!(%error, stale, "could not move kernel-direct routes to a new generation; removed them");
        }
    }
}

/// Checks every connection this agent authorized against `state`'s policies and closes those
/// no longer allowed.
fn recheck(tracker: &Tracker, state: &ClusterState) {
    if tracker.is_empty() {
        return;
    }
    let revoked = tracker.recheck(|subject| {
        let decision = state.admit(&subject.as_inbound());
        (decision.verdict == Verdict::Deny).then_some(decision)
    });
    if revoked > 0 {
        info!(
            revoked,
            generation = state.generation(),
            "closing connections the new policy no longer allows"
        );
    }
}

/// Every relayed connection holds two or more descriptors: raise the limit on open files (as
/// ztunnel does), so that thousands of connections do not fail with `EMFILE`. The agent runs
/// privileged, so it may go past the hard limit up to the kernel's `fs.nr_open` (at most 2^20);
/// otherwise the soft limit goes up to the hard one.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    const MAX: u64 = 1 << 20;
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            warn!(error = %e, "could not read the open files limit");
            return;
        }
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let want = nr_open.clamp(hard, MAX.max(hard));
    for target in [want, hard] {
        if target <= soft {
            break;
        }
        match setrlimit(Resource::RLIMIT_NOFILE, target, target.max(hard)) {
            Ok(()) => {
                info!(from = soft, to = target, "raised the open files limit");
                return;
            }
            Err(e) => warn!(soft, target, error = %e, "could not raise the open files limit"),
        }
    }
    info!(limit = soft, "open files limit");
}
