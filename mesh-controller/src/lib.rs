//! The waypoint controller: what istiod does for Istio ambient's waypoints, for this mesh.
//!
//! It watches `Gateways` of class `istio-waypoint` and makes, for each, the objects that run it
//! ([`desired`]): its `ServiceAccount` (the waypoint's own identity), a `Deployment` of
//! `mesh-agent waypoint` pods, their `Service`, the CA's root in the `Gateway`'s namespace, and
//! a binding to the read-only waypoint role, each patched by the `Gateway`'s own settings
//! ([`parameters`], Istio's customization by a `ConfigMap`); then it writes the `Gateway`'s status
//! ([`reconcile`]). It also gives each service account that asks for one (a label on it or on
//! its namespace) a waypoint `Gateway` of its own ([`accounts`]), and tells each Service and
//! `ServiceEntry` that asks for a waypoint whether it is bound to one ([`bound_status`]). It runs as `mesh-agent waypoint-controller`, a `Deployment` of the chart
//! with its own account and RBAC (apart from the CA, which holds the signing key).

pub mod account_loop;
pub mod accounts;
mod apply;
pub mod bound_status;
pub mod desired;
pub mod parameters;
pub mod reconcile;
pub mod resources;
pub mod route_status;
pub mod view;

pub use desired::{WaypointGateway, WaypointResources, WaypointTemplate};
pub use reconcile::run;

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
