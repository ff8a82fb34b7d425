//! The Kubernetes API client of the mesh's processes (the agent, the CA): from the kubeconfig
//! named, else the in-cluster service account (or `$KUBECONFIG`), as kubectl would.

use std::path::{Path, PathBuf};

use tracing::info;

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
pub enum KubeClientError {
    /// The kubeconfig named cannot be read or used.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The kubeconfig file.
        path: PathBuf,
        /// The cause.
        source: kube::config::KubeconfigError,
    },
    /// Neither the in-cluster configuration nor `$KUBECONFIG` is usable.
    #[error("no Kubernetes configuration (in-cluster service account, or $KUBECONFIG): {0}")]
    Infer(#[source] kube::config::InferConfigError),
    /// The configuration does not make a client.
    #[error("building the Kubernetes client for {server}: {source}")]
    Client {
        /// The API server's URL.
        server: String,
        /// The cause.
        source: kube::Error,
    },
}

/// A client for the kubeconfig at `kubeconfig`, else the in-cluster configuration (or
/// `$KUBECONFIG`). Must be called within a Tokio runtime (the client's connections run on it).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, KubeClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let named = |source| KubeClientError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(named)?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(named)?
        }
        None => kube::Config::infer()
            .await
            .map_err(KubeClientError::Infer)?,
    };
    let server = config.cluster_url.to_string();
    info!(%server, "connecting to the Kubernetes API");
    kube::Client::try_from(config).map_err(|source| KubeClientError::Client { server, source })
}
