//! The waypoint controller: what istiod does for Istio ambient's waypoints, for this mesh.
//!
//! It watches `Gateways` of class `istio-waypoint` and makes, for each, the objects that run it
//! ([`desired`]): its `ServiceAccount` (the waypoint's own identity), a `Deployment` of
//! `mesh-agent waypoint` pods, their `Service` and the CA's root in the `Gateway`'s namespace,
//! each patched by the `Gateway`'s own settings ([`parameters`], Istio's customization by a
//! `ConfigMap`); then it writes the `Gateway`'s status ([`reconcile::run`]). It also gives each
//! service account that asks for one (a label on it or on its namespace) a waypoint `Gateway` of
//! its own ([`accounts`]), tells each Service and `ServiceEntry` that asks for a waypoint whether
//! it is bound to one ([`bound_status`]) and each route whether its parent took it
//! ([`route_status`]), and serves the waypoints their cluster view ([`view`]): a waypoint's
//! account reads nothing of the API server itself. It runs as `mesh-agent waypoint-controller`,
//! a `Deployment` of the chart with its own account and RBAC (apart from the CA, which holds the
//! signing key).

pub mod account_loop;
pub mod accounts;
mod apply;
pub mod bound_status;
pub mod desired;
mod error;
pub mod parameters;
pub mod reconcile;
pub mod resources;
pub mod route_status;
pub mod view;

pub use desired::{WaypointGateway, WaypointResources, WaypointTemplate};
pub use error::ControllerError;
