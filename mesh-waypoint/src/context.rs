//! What the waypoint is given and what its requests share: its configuration, the errors it
//! stops with, and [`Ctx`].

use std::{net::SocketAddr, sync::Arc};

use mesh_cluster::ClusterState;
use mesh_identity::{CryptoProvider, Identity};
use tokio::sync::watch;

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
    /// At shutdown, how long the waypoint serves on, not ready, before it drains: the time the
    /// clients' agents take to learn that its pod is going (a pod being deleted is no longer a
    /// ready waypoint pod to them), so that none sends a new connection to it once it drains.
    pub drain_delay: std::time::Duration,
    /// At shutdown, how long in-flight requests may take to finish.
    pub drain_timeout: std::time::Duration,
    /// Where the JSON access log (a line per request) goes.
    pub access_log: mesh_trace::AccessLogTarget,
    /// Most mirrored requests in flight at once; a mirror beyond it is skipped and counted
    /// (`mesh_waypoint_mirrors_skipped_total`), so clients cannot pile up copies of their
    /// requests toward a slow mirror. Each also ends at the route's request timeout, else after
    /// [`MIRROR_TIMEOUT`].
    pub max_mirrors_in_flight: u32,
    /// The name servers asked for the names of `ServiceEntries` of resolution `DNS`; empty:
    /// the system's (`/etc/resolv.conf`).
    pub dns_servers: Vec<SocketAddr>,
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
    pub(crate) upstream: Arc<crate::upstream::Upstream>,
    pub(crate) hbone: mesh_hbone::ServerConfig,
    pub(crate) reporters: Arc<crate::telemetry::Reporters>,
    pub(crate) drain: crate::drain::Drain,
    pub(crate) balancer: Arc<crate::balance::Balancer>,
    /// Permits for mirrored requests in flight ([`WaypointConfig::max_mirrors_in_flight`]).
    pub(crate) mirrors: Arc<tokio::sync::Semaphore>,
    /// The key sets of `RequestAuthentication` rules with `jwksUri`.
    pub(crate) jwks: Arc<crate::jwks::JwksCache>,
    /// Tokens verified recently ([`mesh_cluster::authn::VerifiedTokens`]).
    pub(crate) verified_tokens: mesh_cluster::authn::VerifiedTokens,
    /// The waypoint's token buckets of local rate limits ([`crate::ratelimit`]).
    pub(crate) buckets: crate::ratelimit::Buckets,
    /// The destinations' circuit breakers (`connectionPool` limits, [`crate::breaker`]).
    pub(crate) breakers: crate::breaker::Breakers,
    /// The resolver of `ServiceEntries` of resolution `DNS`.
    pub(crate) dns: Arc<crate::dns::Dns>,
}
