//! Gateway API's `TCPRoute` and `TLSRoute` (`v1`, in the standard channel since Gateway API 1.5;
//! `v1alpha2`, and `v1alpha3` for `TLSRoute`, read from files too): the L4 routes a waypoint
//! applies to the connections it passes on as TCP for the Services they attach to (GAMMA,
//! `parentRefs` of kind `Service`, as Istio's "TCP traffic shifting" task writes them).
//!
//! - A `TCPRoute` splits a Service port's connections by weight among its `backendRefs`.
//! - A `TLSRoute` sends a TLS connection by the server name its client hello asks for
//!   (`hostnames`: exact, or a leading `*.` for any one or more labels), to its `backendRefs` by
//!   weight; the TLS is passed through, never terminated.
//!
//! How a connection is routed, and which route wins where several attach, is in
//! [`crate::http_route`]. Checked when parsed, so an error names the field and the line: unknown
//! fields are refused (a misspelt `backendRef` must not send traffic elsewhere); at most 32
//! `parentRefs`; exactly one rule (Gateway API `v1`: a rule has no matches, so a second rule could
//! never be chosen); 1-16 `backendRefs` without `filters`, weights 0-1,000,000, a Service's
//! `port` given; `hostnames` DNS names with at most a leading `*.`, no IP address, at most 1,024.

use serde::Deserialize;

use super::{BackendRef, ParentRef};
use crate::meta::ObjectMeta;

/// `apiVersion`s of `TCPRoute` read.
pub const TCP_ROUTE_VERSIONS: [&str; 2] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1alpha2",
];

/// `apiVersion`s of `TLSRoute` read.
pub const TLS_ROUTE_VERSIONS: [&str; 3] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1alpha3",
    "gateway.networking.k8s.io/v1alpha2",
];

/// A `TCPRoute`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct TcpRoute {
    /// Name, namespace and creation time (the older route wins a tie).
    pub metadata: ObjectMeta,
    /// `spec`.
    pub spec: TcpRouteSpec,
}

/// `spec` of a `TCPRoute`.
#[derive(Clone, Debug, PartialEq)]
pub struct TcpRouteSpec {
    /// `parentRefs`: the Services (GAMMA) or Gateways it attaches to.
    pub parent_refs: Vec<ParentRef>,
    /// Its one rule.
    pub rule: L4Rule,
}

/// A `TLSRoute`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct TlsRoute {
    /// Its version: `hostnames` may be empty only at `v1alpha2`.
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    /// Name, namespace and creation time (the older route wins a tie).
    pub metadata: ObjectMeta,
    /// `spec`.
    pub spec: TlsRouteSpec,
}

/// `spec` of a `TLSRoute`.
#[derive(Clone, Debug, PartialEq)]
pub struct TlsRouteSpec {
    /// `parentRefs`: the Services (GAMMA) or Gateways it attaches to.
    pub parent_refs: Vec<ParentRef>,
    /// `hostnames`: the server names it takes (`*.` a wildcard label); empty (`v1alpha2` only):
    /// every server name.
    pub hostnames: Vec<String>,
    /// Its one rule.
    pub rule: L4Rule,
}

/// The rule of a `TCPRoute` or `TLSRoute`.
#[derive(Clone, Debug, PartialEq)]
pub struct L4Rule {
    /// `name`.
    pub name: Option<String>,
    /// `backendRefs`, with their weights.
    pub backend_refs: Vec<BackendRef>,
}
