//! The agent's cluster view: which pods (workloads) and services exist, which pods are enrolled
//! in the mesh, where a connection to an address goes, which inbound mTLS mode applies to a
//! workload's port, and whether `AuthorizationPolicies` let a connection in.
//!
//! - [`k8s`]: the Kubernetes objects read (Namespace, Pod, Service, and Istio's
//!   `PeerAuthentication` and `AuthorizationPolicy`) and their YAML parser.
//! - [`peer_auth`]: `PeerAuthentication` scopes, precedence and conflicts, evaluated by
//!   [`ClusterState::peer_authentication`].
//! - [`authz`]: `AuthorizationPolicy` scopes and L4 rules, evaluated per connection by
//!   [`ClusterState::authorize`], and at the waypoints per request with every HTTP field
//!   ([`ClusterState::authorize_at_waypoint`]).
//! - [`authn`]: `RequestAuthentication` at the waypoints: which JWT rules apply, and whether a
//!   request's tokens are valid.
//! - [`service_entry`]: Istio's `ServiceEntry`: services outside the cluster's (or picked by
//!   labels) with addresses the mesh captures, reached directly or through a waypoint.
//! - [`ratelimit`]: the local rate limits of Istio's `EnvoyFilter` at the waypoints.
//! - [`ClusterState::build`]: the one translation from objects to the agent's immutable,
//!   indexed state; every source (files today, a Kubernetes watch later) goes through it.
//! - [`spawn_watcher`] / [`ConfigDir`]: the objects read from a directory of YAML files, reloaded
//!   when they change, published as `Arc<ClusterState>` snapshots on a `tokio::sync::watch`
//!   channel.
//! - [`limits`]: the size and nesting depth limits of each file ([`FileLimits`]), checked
//!   before its text reaches the YAML parser.
//!
//! Enrollment follows Istio ambient: a pod is enrolled when its namespace has the label
//! `istio.io/dataplane-mode=ambient` (key configurable), unless the pod has `…=none`; a pod
//! label `…=ambient` enrolls it in any namespace. Host-network pods are never enrolled.
//!
//! `PeerAuthentication` follows Istio: without selector, mesh-wide in the root namespace
//! ([`EnrollmentOptions::root_namespace`], default [`DEFAULT_ROOT_NAMESPACE`]) and
//! namespace-wide elsewhere; with `matchLabels`, for the matching workloads of its namespace. The
//! workload policy (its `portLevelMtls` entry for the port first) overrides the namespace's, which
//! overrides the mesh's; `UNSET` inherits; PERMISSIVE applies when nothing sets a mode; the
//! oldest of competing policies wins. As in ztunnel, the result is STRICT or PERMISSIVE only:
//! `DISABLE` is enforced as PERMISSIVE ([`MtlsMode`]).
//!
//! `AuthorizationPolicy` follows ztunnel (L4): scoped like `PeerAuthentication`, except that a
//! selector in the root namespace selects workloads of every namespace; a matching DENY policy
//! denies, then an ALLOW policy must match if any applies, else the connection is allowed; AUDIT
//! policies are only reported. Rules match on identity (principals, namespaces, service
//! accounts), addresses and the destination port; HTTP fields make an ALLOW or AUDIT rule match
//! nothing, and are dropped from a DENY rule (a warning says so). `CUSTOM` is refused when
//! parsed, and policies with `targetRef(s)`, for waypoints, are skipped with a warning. The spec
//! is checked when parsed: a file with an invalid policy keeps its previous objects, so the
//! previous policy stays in force.
//!
//! The local stand-in for the container runtime tells the agent where a pod lives through two
//! annotations, [`NETNS_ANNOTATION`] and [`CGROUP_ANNOTATION`]; enrolled pods on the agent's node
//! must carry both.

mod address;
mod assemble;
pub mod authn;
pub mod authz;
mod by_kind;
pub mod cors;
mod decision;
mod direct;
mod endpoints;
mod error;
mod files;
mod gateway_api;
pub mod http_route;
pub mod ip_block;
mod istio;
mod istio_authn;
mod istio_authz;
mod istio_envoy_filter;
mod istio_traffic;
pub mod jwks;
pub mod k8s;
mod kube_client;
mod kube_source;
pub mod label_selector;
pub mod limits;
pub mod locality;
pub mod meta;
mod model;
mod names;
mod options;
pub mod path_pattern;
pub mod peer_auth;
mod policy_target;
pub mod ratelimit;
mod reference_grant;
pub mod route_status;
mod schema;
pub mod service_entry;
mod state;
pub mod string_match;
mod translate;
pub mod waypoint;
pub mod waypoint_bound;

pub use authn::{Authenticated, JwtRefusal, TokenSource, VerifiedJwt};
pub use authz::{
    AuthMatch, AuthzDecision, AuthzMatch, AuthzPolicy, AuthzRule, AuthzScope, ConnFacts,
    DecisionReason, HeaderMatch, HttpFacts, IpBlock, PathPattern, PolicyTarget,
    ServiceAccountMatch, StringMatch, Verdict, WaypointFacts,
};
pub use decision::{Inbound, Origin};
pub use direct::NotDirect;
pub use endpoints::SERVICE_NAME_LABEL;
pub use error::{ErrorObject, ReadPart, SourceError, StateError};
pub use files::{spawn_watcher, ConfigDir, FilesError, Watcher};
pub use gateway_api::ParentRef;
pub use http_route::{
    AttachedRoute, Backend, EndpointPolicy, InvalidBackend, RequestFacts, ResolvedBackend,
    ResolvedRule, RouteDecision,
};
pub use kube_client::{client as kube_client, view_address, view_client, KubeClientError};
pub use kube_source::{
    for_view as view_object, ApiStatus, KubeOptions, KubeSource, KubeSourceError, KubeWatcher,
};
pub use limits::{FileLimits, LimitError};
pub use model::{
    AppProtocol, DnsName, Endpoint, EntryFacts, EntryResolution, EntryScope, MeshLocation,
    Protocol, Readiness, Resolution, Service, ServiceKind, ServicePort, Shortcut, TargetPort,
    Workload, ISTIO_NETWORKING_GROUP,
};
pub use options::{
    EndpointsFrom, EnrollmentOptions, RuntimeHandles, AMBIENT, CGROUP_ANNOTATION,
    DEFAULT_CLUSTER_DOMAIN, DEFAULT_LABEL_KEY, DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN,
    NETNS_ANNOTATION, OPT_OUT, SHORTCUT_ANNOTATION,
};
pub use peer_auth::{MtlsMode, PeerAuthDecision, PeerAuthPolicy, PeerAuthScope};
pub use route_status::{
    ParentStatus, RouteCondition, RouteKind, RouteObject, RouteReason, ROUTE_CONTROLLER,
};
pub use state::ClusterState;
pub use waypoint::{Guard, Unavailable, Waypoint, WaypointBinding, WaypointFor};
pub use waypoint_bound::{
    BoundCondition, BoundKind, BoundObject, BoundReason, WAYPOINT_ACCEPTED, WAYPOINT_BOUND,
    ZTUNNEL_ACCEPTED,
};

#[cfg(test)]
mod tests;
