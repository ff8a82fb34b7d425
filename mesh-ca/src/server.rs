//! `mesh-agent ca`: the mesh's CA as a Deployment of its own, serving Istio's certificate API.
//!
//! At start: the root is taken from its Secret, or made and stored there; the trust bundle is
//! published in a `ConfigMap`; only then does the server listen (a TCP readiness probe then
//! means ready). Each request is authenticated with `TokenReview` and authorized as
//! istiod's node authorizer does ([`authorize`]); the CSR is signed by
//! [`mesh_identity::BuiltinCa`] for the verified identity, with the lifetime capped
//! (`--max-cert-lifetime`), and answered with the leaf and the root. SIGTERM or SIGINT stop the
//! server gracefully.

pub mod authorize;
pub mod config;
mod kube_api;
mod root;
mod service;
pub(crate) mod serving;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tonic::transport::Server;
use tracing::info;

use crate::proto::istio_certificate_service_server::IstioCertificateServiceServer;

pub use config::CaServerConfig;
pub use service::{BAD_CSR, REFUSED, SIGNING_FAILED, UNAVAILABLE};

/// Why the CA server cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// No Kubernetes client.
    #[error(transparent)]
    KubeClient(#[from] mesh_cluster::KubeClientError),
    /// The root's Secret cannot be read.
    #[error("reading Secret {secret}: {source}")]
    ReadSecret {
        /// `namespace/name`.
        secret: String,
        /// The cause.
        source: kube::Error,
    },
    /// The root's Secret cannot be created.
    #[error("creating Secret {secret}: {source}")]
    CreateSecret {
        /// `namespace/name`.
        secret: String,
        /// The cause.
        source: kube::Error,
    },
    /// The root's Secret lacks a key.
    #[error("Secret {secret} has no {key:?} (or it is empty)")]
    SecretIncomplete {
        /// `namespace/name`.
        secret: String,
        /// The key missing.
        key: &'static str,
    },
    /// A file of the state directory cannot be written or read.
    #[error("state directory: {path}: {source}")]
    StateDir {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The root cannot be made or loaded.
    #[error("the CA's root ({origin}): {source}")]
    Root {
        /// Where the root came from (`Secret <ns>/<name>`, or a new one).
        origin: String,
        /// The cause.
        source: Box<mesh_identity::CaError>,
    },
    /// The trust bundle's `ConfigMap` cannot be written.
    #[error("publishing the trust bundle in ConfigMap {configmap}: {source}")]
    WriteConfigMap {
        /// `namespace/name`.
        configmap: String,
        /// The cause.
        source: kube::Error,
    },
    /// Others kept changing the `ConfigMap` while it was being written.
    #[error("publishing the trust bundle in ConfigMap {configmap}: it kept changing meanwhile")]
    ConfigMapContended {
        /// `namespace/name`.
        configmap: String,
    },
    /// The serving certificate's key cannot be made.
    #[error("the serving certificate's key: {0}")]
    ServingKey(#[source] mesh_identity::CertError),
    /// The serving certificate cannot be issued.
    #[error("the serving certificate: {0}")]
    ServingCert(#[source] Box<mesh_identity::CaError>),
    /// The TLS configuration cannot be built.
    #[error("TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
    /// The listening address cannot be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A signal handler cannot be installed.
    #[error("installing the {0} handler: {1}")]
    Signal(&'static str, #[source] std::io::Error),
    /// The gRPC server failed.
    #[error("the gRPC server: {0}")]
    Serve(#[source] tonic::transport::Error),
}

/// Runs the CA with a validated `config` until SIGTERM or SIGINT.
pub async fn run(config: CaServerConfig) -> Result<(), ServerError> {
    info!(%config, version = env!("CARGO_PKG_VERSION"), "mesh CA starting");
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| ServerError::Signal("SIGTERM", e))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| ServerError::Signal("SIGINT", e))?;
    // kube's TLS and ours use aws-lc-rs; the workspace also builds ring, so say which.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let client = mesh_cluster::kube_client(config.kubeconfig.as_deref()).await?;
    let ca = Arc::new(root::load(&client, &config).await?);
    let root_pem =
        std::fs::read_to_string(ca.root_cert_path()).map_err(|source| ServerError::StateDir {
            path: ca.root_cert_path().to_owned(),
            source,
        })?;
    root::publish_bundle(&client, &config, &root_pem).await?;
    let tls = serving::tls_config(Arc::clone(&ca), config.serving_names())?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let service = service::CaService {
        ca,
        cluster: kube_api::Cluster { client },
        policy: authorize::Policy {
            trust_domain: config.trust_domain.clone(),
            audience: config.audience.clone(),
            impersonators: config.impersonators.clone(),
        },
        max_lifetime: config.max_cert_lifetime,
        root_pem,
    };
    info!(listen = %config.listen, names = ?config.serving_names(), "serving Istio's certificate API");
    let shutdown = async move {
        let signal = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        info!(signal, "shutting down");
    };
    Server::builder()
        .add_service(IstioCertificateServiceServer::new(service))
        .serve_with_incoming_shutdown(serving::incoming(listener, tls), shutdown)
        .await
        .map_err(ServerError::Serve)?;
    info!("shutdown complete");
    Ok(())
}
