//! The controller's loops' error: why one reconcile failed (each loop retries with backoff).

/// Why a reconcile failed (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// A request to the API server failed.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The CA's root `ConfigMap` is missing or holds no `root-cert.pem` (the CA has not
    /// published it yet).
    #[error("the CA's root ConfigMap {0} is missing or has no root-cert.pem")]
    CaRoot(String),
    /// The `Gateway` could not be read.
    #[error("the Gateway: {0}")]
    Gateway(String),
}
