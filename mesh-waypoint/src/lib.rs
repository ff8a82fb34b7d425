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
mod context;
mod cors;
mod dns;
mod drain;
mod filters;
mod forwarded;
mod grpc_messages;
mod grpc_reply;
mod jwks;
mod listener;
mod path;
mod protocol;
mod ratelimit;
mod relay;
mod request;
mod sni;
mod telemetry;
mod tunnel;
mod upgrade;
mod upstream;

pub use context::{WaypointConfig, WaypointError, DEFAULT_MAX_MIRRORS_IN_FLIGHT, MIRROR_TIMEOUT};
pub use listener::serve;
