//! `mesh-agent ca`: the flags of the mesh's CA server, turned into its validated configuration
//! and handed to [`mesh_ca::server::run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use mesh_ca::server::authorize::ServiceAccountRef;
use mesh_ca::server::config::{
    parse_lifetime, CaServerConfig, DEFAULT_AUDIENCE, DEFAULT_BUNDLE_CONFIGMAP, DEFAULT_LISTEN,
    DEFAULT_MAX_CERT_LIFETIME, DEFAULT_ROOT_SECRET, DEFAULT_SERVICE_NAME, DEFAULT_STATE_DIR,
};

/// The flags of `mesh-agent ca`.
#[derive(Debug, clap::Args)]
pub struct CaArgs {
    /// Where Istio's certificate API listens (gRPC over TLS 1.3).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The CA's namespace: its Secret, config map and Service are there.
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// SPIFFE trust domain, the only one signed for.
    #[arg(long, default_value = mesh_cluster::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// The cluster's DNS domain: the CA's certificate names `<service>.<namespace>.svc.<domain>`.
    #[arg(long, default_value = mesh_cluster::DEFAULT_CLUSTER_DOMAIN)]
    cluster_domain: String,
    /// The Service in front of the CA: its names are in the CA's certificate.
    #[arg(long, default_value = DEFAULT_SERVICE_NAME)]
    service_name: String,
    /// The Secret that keeps the root certificate and key.
    #[arg(long, default_value = DEFAULT_ROOT_SECRET)]
    root_secret: String,
    /// The config map where the root certificate is published (key `root-cert.pem`).
    #[arg(long, default_value = DEFAULT_BUNDLE_CONFIGMAP)]
    bundle_configmap: String,
    /// The audience callers' tokens must be for.
    #[arg(long, default_value = DEFAULT_AUDIENCE)]
    audience: String,
    /// A service account (`<namespace>/<name>`) allowed to ask for the identities of the pods
    /// on its node, repeatable [default: <namespace>/mesh-agent].
    #[arg(long = "impersonator")]
    impersonators: Vec<ServiceAccountRef>,
    /// The longest certificate lifetime issued: seconds, or a duration such as `24h`.
    #[arg(long, default_value = DEFAULT_MAX_CERT_LIFETIME, value_parser = parse_lifetime)]
    max_cert_lifetime: Duration,
    /// Where the root's files are kept while the CA runs.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Kubeconfig of the API server; without it the in-cluster service account, or
    /// `$KUBECONFIG`.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

/// Validates the flags, then serves until SIGTERM or SIGINT.
pub fn run(args: CaArgs) -> anyhow::Result<()> {
    let config = CaServerConfig {
        listen: args.listen,
        namespace: args.namespace,
        trust_domain: args.trust_domain,
        cluster_domain: args.cluster_domain,
        service_name: args.service_name,
        root_secret: args.root_secret,
        bundle_configmap: args.bundle_configmap,
        audience: args.audience,
        impersonators: args.impersonators,
        max_cert_lifetime: args.max_cert_lifetime,
        state_dir: args.state_dir,
        kubeconfig: args.kubeconfig,
    }
    .validate()
    .context("invalid configuration")?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the Tokio runtime")?
        .block_on(mesh_ca::server::run(config))?;
    Ok(())
}
