//! `mesh-agent waypoint`: the L7 waypoint ([`mesh_waypoint`]) in a waypoint's pod, under the
//! waypoint's own identity, reading the cluster from a directory of YAML files (the netns
//! testbed's source; the Kubernetes source comes with the waypoint controller).

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
    /// changes.
    #[arg(long, env = "MESH_CONFIG_DIR")]
    config_dir: PathBuf,
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
    /// At SIGTERM, how long in-flight requests may take to finish (readiness says not ready
    /// meanwhile, and no new connection is taken).
    #[arg(long, default_value_t = 5)]
    drain_timeout_secs: u64,
    /// Threads of the async runtime [default: as the agent's, 1 below 4 CPUs, else 2].
    #[arg(long, env = "MESH_WORKER_THREADS")]
    worker_threads: Option<usize>,
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
        namespace: args.namespace,
        name: args.name,
        identity: identity.clone(),
        listen: args.listen,
        metrics: args.metrics_addr,
        readiness: args.readiness_addr,
        provider,
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
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
        config_dir = %args.config_dir.display(),
        listen = %config.listen,
        metrics = %config.metrics,
        readiness = %config.readiness,
        crypto_provider = config.provider.name(),
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
            let (state, _source) =
                mesh_cluster::ConfigDir::with_limits(&args.config_dir, options, limits)?
                    .into_watcher(POLL)?;
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
