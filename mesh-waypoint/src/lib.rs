//! The mesh's L7 waypoint: one per waypoint `Gateway` (class `istio-waypoint`), running in the
//! waypoint's own pods under the waypoint's own identity, as Istio ambient's waypoints do.
//!
//! # Path
//!
//! 1. A source agent sends a connection for a Service bound to this waypoint (see
//!    [`mesh_cluster::waypoint`]) over HBONE to a waypoint pod's port 15008, with `:authority`
//!    the Service's `VIP:port` and the source workload's certificate.
//! 2. The waypoint ([`listener`]) terminates TLS (mutual, its own certificate, any client of the
//!    trust domain) and HBONE, checks that the authority is a Service (or pod) bound to it, and
//!    serves HTTP on the tunnel: HTTP/1.1 or HTTP/2 (h2c, gRPC), told apart by the HTTP/2
//!    preface.
//! 3. Each request ([`request`]) has its tokens checked (`RequestAuthentication`: 401), then
//!    the `AuthorizationPolicies` (403), then the local rate limits ([`ratelimit`]: 429), and
//!    is routed by the newest cluster view
//!    ([`mesh_cluster::ClusterState::route_http`]): the `HTTPRoute` rule that matches, with its
//!    filters (header modifiers, redirect, URL rewrite, mirror), its weighted backends, its
//!    timeouts and retries; a 404 when routes attach and none matches; the Service itself when
//!    no route attaches.
//! 4. The request goes to an endpoint of the chosen backend ([`upstream`]): over HBONE to the
//!    endpoint's agent (`endpoint_ip:15008`, `:authority` = `endpoint_ip:targetPort`, the
//!    waypoint's certificate, the endpoint's identity required), one CONNECT stream per request
//!    on pooled HTTP/2 connections; in plain TCP to an endpoint outside the mesh.
//!
//! 5. Each request gets a span ([`mesh_trace`]): the child of the request's own `traceparent`,
//!    else of the tunnel's (the source agent's connection), else a new trace; its context goes
//!    on in the request's `traceparent` and in the CONNECT of a new tunnel to the endpoint.
//!
//! The destination agent sees the waypoint's identity (waypoints do not impersonate). Answers
//! the waypoint makes itself: 404 (no rule matches), 500 (a rule without usable backend, an
//! invalid backend's share), 503 (no endpoint, or the endpoint cannot be reached), 504 (a
//! timeout), and the redirects a rule asks for.

mod admin;
mod balance;
mod body;
mod breaker;
mod cors;
mod filters;
mod grpc_reply;
mod jwks;
mod listener;
mod path;
mod protocol;
mod ratelimit;
mod relay;
mod request;
mod telemetry;
mod upgrade;
mod upstream;

use std::{net::SocketAddr, sync::Arc};

use mesh_cluster::ClusterState;
use mesh_identity::{CryptoProvider, Identity};
use tokio::sync::watch;

pub use listener::serve;

/// What a waypoint process is.
#[derive(Clone, Debug)]
pub struct WaypointConfig {
    /// Namespace of the waypoint `Gateway` (and of its pods).
    pub namespace: String,
    /// Name of the waypoint `Gateway`.
    pub name: String,
    /// The waypoint's own identity: its pods' service account.
    pub identity: Identity,
    /// Where HBONE is served: port 15008 of the pod's addresses.
    pub listen: SocketAddr,
    /// Where `/metrics` is served (15020).
    pub metrics: SocketAddr,
    /// Where `/healthz/ready` is served (15021).
    pub readiness: SocketAddr,
    /// TLS crypto provider.
    pub provider: CryptoProvider,
    /// At shutdown, how long in-flight requests may take to finish.
    pub drain_timeout: std::time::Duration,
    /// Where the JSON access log (a line per request) goes.
    pub access_log: mesh_trace::AccessLogTarget,
    /// Most mirrored requests in flight at once; a mirror beyond it is skipped and counted
    /// (`mesh_waypoint_mirrors_skipped_total`), so clients cannot pile up copies of their
    /// requests toward a slow mirror. Each also ends at the route's request timeout, else after
    /// [`MIRROR_TIMEOUT`].
    pub max_mirrors_in_flight: u32,
}

/// How long a mirrored request may take when its route sets no request timeout (Envoy's default
/// route timeout).
pub const MIRROR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// The default of [`WaypointConfig::max_mirrors_in_flight`] (Envoy's default circuit breaker:
/// 1,024 requests per cluster).
pub const DEFAULT_MAX_MIRRORS_IN_FLIGHT: u32 = 1024;

/// Why the waypoint stopped.
#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS configuration for {identity}: {source}")]
    Tls {
        identity: Identity,
        source: mesh_identity::TlsError,
    },
    #[error(transparent)]
    AccessLog(#[from] mesh_trace::AccessLogError),
}

/// What every request of the waypoint shares.
pub(crate) struct Ctx {
    pub(crate) config: WaypointConfig,
    pub(crate) state: watch::Receiver<Arc<ClusterState>>,
    pub(crate) upstream: Arc<upstream::Upstream>,
    pub(crate) hbone: mesh_hbone::ServerConfig,
    pub(crate) reporters: Arc<telemetry::Reporters>,
    pub(crate) drain: listener::Drain,
    pub(crate) balancer: Arc<balance::Balancer>,
    /// Permits for mirrored requests in flight ([`WaypointConfig::max_mirrors_in_flight`]).
    pub(crate) mirrors: Arc<tokio::sync::Semaphore>,
    /// The key sets of `RequestAuthentication` rules with `jwksUri`.
    pub(crate) jwks: Arc<jwks::JwksCache>,
    /// Tokens verified recently ([`mesh_cluster::authn::VerifiedTokens`]).
    pub(crate) verified_tokens: mesh_cluster::authn::VerifiedTokens,
    /// The waypoint's token buckets of local rate limits ([`ratelimit`]).
    pub(crate) buckets: ratelimit::Buckets,
    /// The destinations' circuit breakers (`connectionPool` limits, [`breaker`]).
    pub(crate) breakers: breaker::Breakers,
}
