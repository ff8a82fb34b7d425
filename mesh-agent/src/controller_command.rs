//! `mesh-agent waypoint-controller`: the waypoint controller ([`mesh_controller`]) as the
//! chart's `Deployment` runs it, serving the waypoints their cluster view
//! ([`mesh_controller::view`]) under its own identity.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

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
    /// Where the waypoints' cluster view is served.
    #[arg(long, default_value = "0.0.0.0:15012")]
    view_listen: SocketAddr,
    /// The view as the waypoints reach it, `https://<host>:<port>` (the controller's Service).
    #[arg(long)]
    view_address: String,
    /// The controller's namespace: with `--service-account`, its identity (the view's).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// The controller's service account.
    #[arg(long, env = "SERVICE_ACCOUNT")]
    service_account: String,
    /// PEM file of the mesh's roots, which also verify the CA (the controller's own
    /// certificate comes from `--ca-address`).
    #[arg(long)]
    ca_root_cert: PathBuf,
    /// The controller's projected token for the CA (audience `--ca-audience`).
    #[arg(long, default_value = crate::config::DEFAULT_CA_TOKEN_FILE)]
    ca_token_file: PathBuf,
    /// rustls crypto provider: aws-lc-rs or ring.
    #[arg(long, default_value = "aws-lc-rs")]
    crypto_provider: mesh_identity::CryptoProvider,
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
    // The view's identity: the controller's own, which the waypoints expect.
    let identity =
        mesh_identity::Identity::new(&args.trust_domain, &args.namespace, &args.service_account)
            .context("invalid configuration: the controller's identity")?;
    mesh_cluster::view_address(&args.view_address).context("invalid configuration")?;
    let remote_ca = crate::config::RemoteCa {
        address: args.ca_address.clone(),
        root_cert: args.ca_root_cert.clone(),
        token_file: args.ca_token_file.clone(),
    };
    let template = waypoint_template(&args, &identity)?;
    // The cluster view, read as the waypoints read it, for the bound objects' conditions.
    let mut options = mesh_cluster::EnrollmentOptions::new("");
    options.trust_domain.clone_from(&template.trust_domain);
    options.cluster_domain.clone_from(&template.cluster_domain);
    options.validate().context("invalid configuration")?;
    let resync = Duration::from_secs(args.status_resync_secs);
    info!(
        ?template,
        ?resync,
        view_listen = %args.view_listen,
        view = %identity,
        crypto_provider = %args.crypto_provider,
        "waypoint controller configuration"
    );
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
            let listener = tokio::net::TcpListener::bind(args.view_listen)
                .await
                .with_context(|| {
                    format!("binding the view's --view-listen {}", args.view_listen)
                })?;
            // Once the view is built, the first list's pages go back at once, not over
            // jemalloc's decay (`memory.rs`): a fresh controller is measured at its resting size.
            // The controller's own certificate is asked for then: the CA's address resolves
            // through the view.
            let (view_tx, view_rx) = tokio::sync::oneshot::channel();
            let bound = tokio::spawn(mesh_controller::bound_status::run(
                client.clone(),
                options,
                resync,
                move |state| {
                    crate::memory::release_freed();
                    let _ = view_tx.send(state.clone());
                },
            ));
            let view = mesh_controller::view::View::new(client.clone(), args.ca_audience.clone());
            let serving = tokio::spawn(serve_view(
                view_rx,
                ViewIdentity {
                    identity,
                    remote_ca,
                    provider: args.crypto_provider,
                    trust_domain: args.trust_domain.clone(),
                    cluster_domain: args.cluster_domain.clone(),
                },
                listener,
                view,
            ));
            mesh_controller::reconcile::run(client, template, async move {
                let _ = stop_rx.await;
            })
            .await;
            bound.abort();
            serving.abort();
            anyhow::Ok(())
        })
}

/// How the controller makes waypoints, from its flags (validated).
fn waypoint_template(
    args: &ControllerArgs,
    identity: &mesh_identity::Identity,
) -> anyhow::Result<mesh_controller::WaypointTemplate> {
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
        cpu_request: args.waypoint_cpu_request.clone(),
        memory_request: args.waypoint_memory_request.clone(),
        memory_limit: args.waypoint_memory_limit.clone(),
    };
    resources
        .validate()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    Ok(mesh_controller::WaypointTemplate {
        image: args.waypoint_image.clone(),
        pull_policy: args.waypoint_image_pull_policy.clone(),
        ca_address: args.ca_address.clone(),
        ca_root: (root_ns.to_owned(), root_name.to_owned()),
        ca_audience: args.ca_audience.clone(),
        view_address: args.view_address.clone(),
        view_identity: identity.clone(),
        trust_domain: args.trust_domain.clone(),
        cluster_domain: args.cluster_domain.clone(),
        log_level: args.waypoint_log_level.clone(),
        extra_args,
        resources,
    })
}

/// Who the controller is to the waypoints, and where its certificate comes from.
struct ViewIdentity {
    identity: mesh_identity::Identity,
    remote_ca: crate::config::RemoteCa,
    provider: mesh_identity::CryptoProvider,
    trust_domain: String,
    cluster_domain: String,
}

/// Once the cluster view is built: the controller's certificate, then the view served with it.
async fn serve_view(
    state: tokio::sync::oneshot::Receiver<
        tokio::sync::watch::Receiver<Arc<mesh_cluster::ClusterState>>,
    >,
    own: ViewIdentity,
    listener: tokio::net::TcpListener,
    view: mesh_controller::view::View,
) {
    let Ok(state) = state.await else {
        tracing::error!("no cluster view: the waypoints' view is not served");
        return;
    };
    let certs = match crate::agent::remote_certificate_manager(
        &own.remote_ca,
        crate::config::DEFAULT_CERT_LIFETIME,
        &own.trust_domain,
        &own.cluster_domain,
        state,
    ) {
        Ok(certs) => certs,
        Err(e) => {
            tracing::error!(error = %e, "the controller's certificate: the waypoints' view is not served");
            return;
        }
    };
    certs.set_wanted([own.identity.clone()]);
    let tls = match mesh_identity::https_server_config(
        own.provider,
        certs.subscribe(),
        own.identity,
    ) {
        Ok(tls) => tls,
        Err(e) => {
            tracing::error!(error = %e, "the view's TLS configuration: the waypoints' view is not served");
            return;
        }
    };
    mesh_controller::view::serve(listener, tls, view).await;
    drop(certs);
}
