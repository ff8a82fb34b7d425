//! `mesh-agent waypoint`: the L7 waypoint ([`mesh_waypoint`]) in a waypoint's pod, under the
//! waypoint's own identity, reading the cluster through the waypoint controller's view
//! (`--view-address`, as the controller runs its waypoints: their account may read nothing of
//! the API server), from the Kubernetes API (in-cluster, or `--kubeconfig`, for a waypoint run
//! by hand with an account bound to the chart's `mesh-waypoint` role) or from a directory of
//! YAML files (`--config-dir`, the netns testbed's source).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use mesh_cluster::{EnrollmentOptions, FileLimits};
use mesh_identity::Identity;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use crate::config::TransportConfig;

/// How often the config directory is checked for changes.
const POLL: Duration = Duration::from_millis(250);

/// The flags of `mesh-agent waypoint`.
#[derive(Debug, clap::Args)]
pub struct WaypointArgs {
    /// Namespace of the waypoint `Gateway` (and of this pod).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// Name of the waypoint `Gateway` (class `istio-waypoint`).
    #[arg(long, env = "WAYPOINT_NAME")]
    name: String,
    /// Directory of Kubernetes-style YAML (Services, Pods, Gateways, `HTTPRoutes`), watched for
    /// changes, instead of the Kubernetes API.
    #[arg(long, env = "MESH_CONFIG_DIR", conflicts_with = "kubeconfig")]
    config_dir: Option<PathBuf>,
    /// Kubeconfig for the Kubernetes API [default: in-cluster].
    #[arg(long, env = "KUBECONFIG", conflicts_with = "view_address")]
    kubeconfig: Option<PathBuf>,
    /// The waypoint controller's view of the cluster, `https://<host>:<port>`, instead of the
    /// Kubernetes API: authenticated with `--ca-token-file`, its certificate verified with
    /// `--ca-root-cert` and `--view-identity`.
    #[arg(long, conflicts_with = "config_dir", requires_all = ["view_identity", "ca_root_cert"])]
    view_address: Option<String>,
    /// The SPIFFE id of the view's certificate (the controller's).
    #[arg(long, requires = "view_address")]
    view_identity: Option<Identity>,
    /// Largest config file read, in bytes.
    #[arg(long, default_value_t = mesh_cluster::limits::DEFAULT_MAX_FILE_BYTES)]
    config_max_file_bytes: u64,
    /// Deepest nesting in a config file.
    #[arg(long, default_value_t = mesh_cluster::limits::DEFAULT_MAX_DEPTH)]
    config_max_depth: usize,
    /// Where HBONE is served.
    #[arg(long, default_value = "0.0.0.0:15008")]
    listen: SocketAddr,
    /// Prometheus endpoint (`/metrics`).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Readiness endpoint (`/healthz/ready`).
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// SPIFFE trust domain.
    #[arg(long, default_value = mesh_cluster::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// The cluster's DNS domain.
    #[arg(long, default_value = mesh_cluster::DEFAULT_CLUSTER_DOMAIN)]
    cluster_domain: String,
    #[command(flatten)]
    identity_flags: crate::identity_flags::IdentityFlags,
    #[command(flatten)]
    tracing_flags: crate::tracing_flags::TracingFlags,
    /// At SIGTERM, how long the waypoint serves on, not ready, before it drains: the time the
    /// clients' agents take to learn that its pod is going and, for a single replica, its
    /// replacement's readiness (Istio's `terminationDrainDuration` is 5 s too).
    #[arg(long, default_value_t = 5)]
    drain_delay_secs: u64,
    /// Then, how long in-flight requests may take to finish (no new connection is taken).
    #[arg(long, default_value_t = 5)]
    drain_timeout_secs: u64,
    /// Where the JSON access log (a line per request) goes: `-` (standard output), `off`, or a
    /// file.
    #[arg(long, env = "MESH_ACCESS_LOG", default_value = "-")]
    access_log: mesh_trace::AccessLogTarget,
    /// Most mirrored requests in flight at once (`RequestMirror`, `VirtualService` `mirror`);
    /// beyond it a mirror is skipped and counted.
    #[arg(long, default_value_t = mesh_waypoint::DEFAULT_MAX_MIRRORS_IN_FLIGHT, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_mirrors_in_flight: u32,
    /// A name server for the names of `ServiceEntries` of resolution DNS (`IP` or `IP:port`;
    /// repeat for more) [default: the system's, `/etc/resolv.conf`].
    #[arg(long = "dns-server", value_parser = parse_name_server)]
    dns_servers: Vec<SocketAddr>,
    /// Threads of the async runtime [default: as the agent's, 1 below 4 CPUs, else 2].
    #[arg(long, env = "MESH_WORKER_THREADS")]
    worker_threads: Option<usize>,
}

/// Where the cluster view comes from, for the configuration's log line.
fn source_description(args: &WaypointArgs) -> String {
    match (&args.config_dir, &args.view_address, &args.kubeconfig) {
        (Some(dir), _, _) => format!("files {}", dir.display()),
        (None, Some(view), _) => format!(
            "the waypoint controller's view {view} ({})",
            args.view_identity
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default()
        ),
        (None, None, Some(path)) => format!("kubernetes {}", path.display()),
        (None, None, None) => "kubernetes in-cluster".to_owned(),
    }
}

/// A name server: `IP:port`, or an IP (port 53).
fn parse_name_server(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| {
            text.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("{text:?} is neither an IP address nor IP:port"))
}

/// Validates the flags, then serves until SIGTERM or SIGINT.
pub fn run(args: WaypointArgs) -> anyhow::Result<()> {
    // A waypoint's pods run under the service account named after its Gateway (the model
    // takes no other pod for the waypoint's).
    let identity = Identity::new(&args.trust_domain, &args.namespace, &args.name)
        .context("invalid configuration: the waypoint's identity")?;
    let mut options = EnrollmentOptions::new("");
    options.trust_domain.clone_from(&args.trust_domain);
    options.cluster_domain.clone_from(&args.cluster_domain);
    options.validate().context("invalid configuration")?;
    let flags = &args.identity_flags;
    let provider = flags.crypto_provider;
    let transport = TransportConfig {
        remote_ca: flags.remote_ca(),
        cert_lifetime: flags.cert_lifetime(),
        crypto_provider: provider,
        ca_dir: flags.ca_dir.clone(),
        max_streams_per_connection: mesh_hbone::DEFAULT_MAX_STREAMS,
        pool_idle_timeout: Duration::from_secs(300),
        stream_idle_timeout: None,
    };
    let config = mesh_waypoint::WaypointConfig {
        namespace: args.namespace.clone(),
        name: args.name.clone(),
        identity: identity.clone(),
        listen: args.listen,
        metrics: args.metrics_addr,
        readiness: args.readiness_addr,
        provider,
        drain_delay: Duration::from_secs(args.drain_delay_secs),
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        access_log: args.access_log.clone(),
        max_mirrors_in_flight: args.max_mirrors_in_flight,
        dns_servers: args.dns_servers.clone(),
    };
    let tracing = args
        .tracing_flags
        .settings()
        .context("invalid configuration")?;
    let limits = FileLimits {
        max_file_bytes: args.config_max_file_bytes,
        max_depth: args.config_max_depth,
    };
    info!(
        waypoint = %format_args!("{}/{}", config.namespace, config.name),
        %identity,
        source = %source_description(&args),
        listen = %config.listen,
        metrics = %config.metrics,
        readiness = %config.readiness,
        crypto_provider = config.provider.name(),
        access_log = %config.access_log,
        max_mirrors_in_flight = config.max_mirrors_in_flight,
        drain_delay_s = config.drain_delay.as_secs(),
        drain_timeout_s = config.drain_timeout.as_secs(),
        dns_servers = %if config.dns_servers.is_empty() {
            "the system's".to_owned()
        } else {
            format!("{:?}", config.dns_servers)
        },
        %tracing,
        "waypoint configuration"
    );
    let threads = args
        .worker_threads
        .unwrap_or_else(crate::config::default_worker_threads);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("starting the Tokio runtime")?
        .block_on(async move {
            let (state, _source) = cluster_source(&args, options, limits).await?;
            let certs = crate::agent::certificate_manager_for(
                &transport,
                &args.trust_domain,
                &args.cluster_domain,
                state.clone(),
            )?;
            certs.set_wanted([identity]);
            let tracer = mesh_trace::Tracer::new(&tracing.trace_config(
                "mesh-waypoint",
                vec![
                    ("k8s.namespace.name", config.namespace.clone()),
                    ("mesh.waypoint", config.name.clone()),
                ],
            ))?;
            let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
            let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
            let shutdown = async move {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
            };
            mesh_waypoint::serve(config, state, certs, tracer, shutdown).await?;
            info!("waypoint stopped");
            anyhow::Ok(())
        })
}

/// What keeps the cluster view current; held only to be dropped when the waypoint stops.
enum SourceTasks {
    /// The directory's poll task (it ends once the view has no receiver).
    Files(#[allow(dead_code)] tokio::task::JoinHandle<()>),
    /// The watches (aborted on drop).
    Kubernetes(#[allow(dead_code)] mesh_cluster::KubeWatcher),
}

/// The cluster view: watched files, or the Kubernetes API with the routes a waypoint reads.
async fn cluster_source(
    args: &WaypointArgs,
    options: EnrollmentOptions,
    limits: FileLimits,
) -> anyhow::Result<(
    tokio::sync::watch::Receiver<std::sync::Arc<mesh_cluster::ClusterState>>,
    SourceTasks,
)> {
    if let Some(dir) = &args.config_dir {
        let (state, task) =
            mesh_cluster::ConfigDir::with_limits(dir, options, limits)?.into_watcher(POLL)?;
        return Ok((state, SourceTasks::Files(task)));
    }
    let client = match (&args.view_address, &args.view_identity) {
        (Some(view), Some(expected)) => {
            let flags = &args.identity_flags;
            // `--view-address` requires `--ca-root-cert` (clap checks it).
            let root = flags
                .ca_root_cert
                .as_deref()
                .context("invalid configuration: --view-address needs --ca-root-cert")?;
            let roots = mesh_ca::read_roots(root).context("the view's roots (--ca-root-cert)")?;
            let tls =
                mesh_identity::https_client_config(flags.crypto_provider, roots, expected.clone())
                    .context("the view's TLS configuration")?;
            mesh_cluster::view_client(view, tls, &flags.ca_token_file)
                .context("the waypoint controller's view")?
        }
        _ => mesh_cluster::kube_client(args.kubeconfig.as_deref())
            .await
            .context("Kubernetes client")?,
    };
    let kube = mesh_cluster::KubeOptions {
        routes: true,
        ..mesh_cluster::KubeOptions::default()
    };
    info!("listing the cluster from the Kubernetes API");
    let watcher = mesh_cluster::KubeSource::new(client, options, kube)?
        .start()
        .await?;
    // The first list's transients (as large as the view) go back now, not over seconds.
    crate::memory::release_freed();
    Ok((watcher.state.clone(), SourceTasks::Kubernetes(watcher)))
}
