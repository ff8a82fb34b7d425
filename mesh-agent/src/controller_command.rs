//! `mesh-agent waypoint-controller`: the waypoint controller ([`mesh_controller`]) as the
//! chart's `Deployment` runs it.

use std::path::PathBuf;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

/// The flags of `mesh-agent waypoint-controller`.
#[derive(Debug, clap::Args)]
pub struct ControllerArgs {
    /// Kubeconfig for the Kubernetes API [default: in-cluster].
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The image the waypoints run (the mesh's, holding `mesh-agent`).
    #[arg(long)]
    waypoint_image: String,
    /// The waypoints' `imagePullPolicy`.
    #[arg(long, default_value = "IfNotPresent")]
    waypoint_image_pull_policy: String,
    /// `RUST_LOG` of the waypoints.
    #[arg(long, default_value = "info")]
    waypoint_log_level: String,
    /// The mesh's CA, `https://<host>:<port>`, where waypoints get their certificates.
    #[arg(long)]
    ca_address: String,
    /// The `ConfigMap` holding the CA's root (`root-cert.pem`), `<namespace>/<name>`; copied
    /// into each waypoint's namespace.
    #[arg(long)]
    ca_root_configmap: String,
    /// The audience of the waypoints' tokens for the CA.
    #[arg(long, default_value = "istio-ca")]
    ca_audience: String,
    /// The `ClusterRole` that lets a waypoint read its cluster view (the chart's).
    #[arg(long)]
    waypoint_cluster_role: String,
    /// SPIFFE trust domain.
    #[arg(long, default_value = mesh_cluster::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// The cluster's DNS domain.
    #[arg(long, default_value = mesh_cluster::DEFAULT_CLUSTER_DOMAIN)]
    cluster_domain: String,
    /// Where the waypoints export their spans (`--tracing-endpoint` of each).
    #[arg(long)]
    waypoint_tracing_endpoint: Option<String>,
    /// The waypoints' sampling percentage (`--tracing-sampling` of each).
    #[arg(long, default_value_t = 1.0)]
    waypoint_tracing_sampling: f64,
    /// How often, in seconds, the waypoint conditions on the objects are read again, so that
    /// one someone else changed is put right.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    status_resync_secs: u64,
    /// The CPU each waypoint requests (a Kubernetes quantity).
    #[arg(long, default_value = "100m")]
    waypoint_cpu_request: String,
    /// The memory each waypoint requests.
    #[arg(long, default_value = "128Mi")]
    waypoint_memory_request: String,
    /// The memory each waypoint may use at most.
    #[arg(long, default_value = "1Gi")]
    waypoint_memory_limit: String,
}

/// Validates the flags, then runs until SIGTERM or SIGINT.
pub fn run(args: ControllerArgs) -> anyhow::Result<()> {
    let (root_ns, root_name) = args
        .ca_root_configmap
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .context("invalid configuration: --ca-root-configmap must be <namespace>/<name>")?;
    mesh_trace::Sampler::percent(args.waypoint_tracing_sampling)
        .context("invalid configuration: --waypoint-tracing-sampling")?;
    let mut extra_args = Vec::new();
    if let Some(endpoint) = &args.waypoint_tracing_endpoint {
        extra_args.push(format!("--tracing-endpoint={endpoint}"));
        extra_args.push(format!(
            "--tracing-sampling={}",
            args.waypoint_tracing_sampling
        ));
    }
    let resources = mesh_controller::WaypointResources {
        cpu_request: args.waypoint_cpu_request,
        memory_request: args.waypoint_memory_request,
        memory_limit: args.waypoint_memory_limit,
    };
    resources
        .validate()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    let template = mesh_controller::WaypointTemplate {
        image: args.waypoint_image,
        pull_policy: args.waypoint_image_pull_policy,
        ca_address: args.ca_address,
        ca_root: (root_ns.to_owned(), root_name.to_owned()),
        ca_audience: args.ca_audience,
        cluster_role: args.waypoint_cluster_role,
        trust_domain: args.trust_domain,
        cluster_domain: args.cluster_domain,
        log_level: args.waypoint_log_level,
        extra_args,
        resources,
    };
    // The cluster view, read as the waypoints read it, for the bound objects' conditions.
    let mut options = mesh_cluster::EnrollmentOptions::new("");
    options.trust_domain.clone_from(&template.trust_domain);
    options.cluster_domain.clone_from(&template.cluster_domain);
    options.validate().context("invalid configuration")?;
    let resync = std::time::Duration::from_secs(args.status_resync_secs);
    info!(?template, ?resync, "waypoint controller configuration");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the Tokio runtime")?
        .block_on(async move {
            let client = mesh_cluster::kube_client(args.kubeconfig.as_deref())
                .await
                .context("Kubernetes client")?;
            let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
            let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(async move {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
                let _ = stop_tx.send(());
            });
            // Once the view is built, the first list's pages go back at once, not over
            // jemalloc's decay (`memory.rs`): a fresh controller is measured at its resting size.
            let bound = tokio::spawn(mesh_controller::bound_status::run(
                client.clone(),
                options,
                resync,
                crate::memory::release_freed,
            ));
            mesh_controller::run(client, template, async move {
                let _ = stop_rx.await;
            })
            .await;
            bound.abort();
            anyhow::Ok(())
        })
}
