//! The Kubernetes API client of the mesh's processes (the agent, the CA): from the kubeconfig
//! named, else the in-cluster service account (or `$KUBECONFIG`), as kubectl would; and the
//! waypoints' client of the waypoint controller's view ([`view_client`]), which serves the
//! same API, read-only and cut down, to accounts that may read nothing of the API server.

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
    /// The view's address is not an `https://<host>:<port>` URL.
    #[error("the waypoint controller's view {url:?}: {reason}")]
    ViewUrl {
        /// The address given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
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

/// A client of the waypoint controller's view at `url` (`https://<host>:<port>`): the
/// Kubernetes API's read-only list and watch of the kinds a waypoint reads, with what the
/// waypoint does not read cut away, served to waypoints only. Over `tls` (the mesh's root, the
/// controller's SPIFFE id: [`mesh_identity::https_client_config`]), with the bearer token in
/// `token_file` (the waypoint's projected service-account token, read again as it is renewed),
/// as istiod's clients authenticate. Must be called within a Tokio runtime.
pub fn view_client(
    url: &str,
    mut tls: rustls::ClientConfig,
    token_file: &Path,
) -> Result<kube::Client, KubeClientError> {
    use kube::client::ConfigExt as _;
    // The connector offers the protocols it speaks (HTTP/1.1) itself, and takes a
    // configuration without any.
    tls.alpn_protocols.clear();
    let uri = view_address(url)?;
    let mut config = kube::Config::new(uri);
    config.auth_info.token_file = Some(token_file.display().to_string());
    let server = url.to_owned();
    let client_error = |source| KubeClientError::Client {
        server: server.clone(),
        source,
    };
    let auth = config.auth_layer().map_err(client_error)?;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(https);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(auth)
        .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
        .service(hyper);
    info!(view = %url, "reading the cluster through the waypoint controller's view");
    Ok(kube::Client::new(service, "default"))
}

/// How long a connection to the view may take to open.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `url` as the view's address: `https://<host>:<port>`.
///
/// # Errors
///
/// When it is not one, saying why.
pub fn view_address(url: &str) -> Result<http::Uri, KubeClientError> {
    let bad = |reason: &str| KubeClientError::ViewUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() || uri.port().is_none() {
        return Err(bad("expected https://<host>:<port>"));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(bad("expected no path"));
    }
    Ok(uri)
}
