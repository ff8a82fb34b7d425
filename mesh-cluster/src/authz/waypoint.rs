//! `AuthorizationPolicy` at a waypoint: the policies with `targetRef`/`targetRefs`, enforced on
//! each HTTP request with every field, as Istio's waypoints do
//! ([`super::super::ClusterState::authorize_at_waypoint`]).
//!
//! **Targets** (each in the policy's namespace; a `namespace` other than it is refused, as
//! Istio refuses it):
//! - `Gateway` (`gateway.networking.k8s.io`): every request and connection through that
//!   waypoint;
//! - `Service` (core): those addressed to that Service (its VIP and port), at whichever waypoint
//!   serves it; and, stricter than Istio, those a waypoint takes to the address of a pod of
//!   its namespace that the Service serves (a workload waypoint), so that dialling the pods
//!   does not dodge the Service's policy (a Service of another namespace whose
//!   `EndpointSlice` lists the pod cannot add its own);
//! - `GatewayClass` `istio-waypoint` (`gateway.networking.k8s.io`), only from the root
//!   namespace: every waypoint.
//!
//! Any other target (a `ServiceEntry`, which this mesh does not model, another kind, another
//! class) applies to nothing, with a warning; so do a Service that no waypoint serves and a
//! `Gateway` that is no waypoint (the state's warnings: nothing enforces such a policy). A policy with a selector is not a waypoint's: the
//! destination's node agent enforces it, and there the source is the waypoint's identity.
//!
//! **Verdict**: as at L4 (DENY, then ALLOW, AUDIT listed), among the policies that target the
//! waypoint's class, the waypoint, or the Service a request is addressed to. A denied request
//! gets 403 (`RBAC: access denied`, as Envoy answers; gRPC's `PERMISSION_DENIED`) before any
//! route, redirect or fault.
//!
//! **What a request's attributes are here**: the source's identity is the one its certificate
//! proved (the source workload's, which its agent presents); its address (`source.ip`,
//! `ipBlocks`) is what its agent gave in `Forwarded`; `remote.ip` (`remoteIpBlocks`) is the
//! same, as no `X-Forwarded-For` hop is trusted. The destination (`destination.ip`,
//! `destination.port`, `ports`) is the address the client dialled: the Service's VIP and port,
//! or the pod's address and port. `hosts` match the request's authority (`:authority`, else
//! `Host`) ignoring case, with or without its port. `paths` match the path as the waypoint
//! normalized it (and sends it on), without the query. `methods` match exactly. A header
//! condition reads the header's values joined by `,`. `requestPrincipals` (`iss/sub`) and
//! `request.auth.*` read the request's verified JWT ([`crate::authn`]); a request without one has
//! none: a value asked of them never matches, a `not…` always passes, so `DENY` with
//! `notRequestPrincipals: ["*"]` requires a token. `connection.sni` is always absent (the HTTP
//! in a tunnel is plain). `experimental.envoy.filters.*` cannot be evaluated: an ALLOW or
//! AUDIT rule with one matches nothing, a DENY rule holds without it.
//!
//! **TCP passed through** (a port that does not carry HTTP): the rules as the node agent would
//! enforce them (an ALLOW rule with HTTP fields matches nothing, a DENY rule keeps its L4 part),
//! so no HTTP-only rule lets a connection through.

use std::{
    borrow::Cow,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::HeaderMap;
use mesh_identity::Identity;

use super::{AuthzAction, AuthzPolicy, Conn, Group, StringMatch};
use crate::authn::VerifiedJwt;
use crate::policy_target::ByTarget;
pub use crate::policy_target::PolicyTarget;

/// What a waypoint knows of a request, or of a connection it passes through as TCP.
#[derive(Clone, Copy, Debug)]
pub struct WaypointFacts<'a> {
    /// The client's address, as its agent gave it.
    pub src_ip: IpAddr,
    /// The client's identity, from its certificate.
    pub src_identity: &'a Identity,
    /// The address the client dialled: a Service's VIP and port, or a pod's address and port.
    pub dst: SocketAddr,
    /// The request; `None` for TCP passed through.
    pub http: Option<HttpFacts<'a>>,
}

impl<'a> WaypointFacts<'a> {
    pub(super) fn conn(&self) -> Conn<'a> {
        Conn::of(
            self.src_ip,
            Some(self.src_identity),
            (self.dst.ip(), self.dst.port()),
            self.http,
        )
    }
}

/// An HTTP request, as a waypoint's policy reads it.
#[derive(Clone, Copy, Debug)]
pub struct HttpFacts<'a> {
    /// `:method`.
    pub method: &'a str,
    /// `:authority` (or `Host`), as sent.
    pub authority: &'a str,
    /// The path, normalized, without the query.
    pub path: &'a str,
    /// The path with its query (`:path`).
    pub path_and_query: &'a str,
    /// The request's headers.
    pub headers: &'a HeaderMap,
    /// Its verified JWT (`RequestAuthentication`), if it carried one.
    pub jwt: Option<&'a VerifiedJwt>,
}

impl HttpFacts<'_> {
    /// Whether `pattern` (lower case) matches the authority, with or without its port,
    /// ignoring case.
    pub(super) fn host_matches(&self, pattern: &StringMatch) -> bool {
        let authority = self.authority.to_ascii_lowercase();
        let host = match authority.rsplit_once(':') {
            // Not the colons of an IPv6 address without a port (`[::1]`).
            Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                Some(host)
            }
            _ => None,
        };
        pattern.matches(&authority) || host.is_some_and(|h| pattern.matches(h))
    }

    /// A header's values joined by `,` (pseudo-headers included); `None` when absent.
    pub(super) fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        match name {
            ":authority" => return Some(Cow::Borrowed(self.authority)),
            ":method" => return Some(Cow::Borrowed(self.method)),
            ":path" => return Some(Cow::Borrowed(self.path_and_query)),
            ":scheme" => return Some(Cow::Borrowed("http")),
            _ => {}
        }
        let mut values = self.headers.get_all(name).iter();
        let first = values.next()?;
        let mut joined = String::from_utf8_lossy(first.as_bytes());
        for value in values {
            let joined = joined.to_mut();
            joined.push(',');
            joined.push_str(&String::from_utf8_lossy(value.as_bytes()));
        }
        Some(joined)
    }
}

/// The waypoints' policies, by target.
#[derive(Debug, Default)]
pub(super) struct WaypointPolicies(ByTarget<Group>);

impl WaypointPolicies {
    pub(super) fn push(&mut self, policy: &Arc<AuthzPolicy>) {
        for target in &policy.targets {
            self.0.entry(&policy.namespace, target).push(policy);
        }
    }

    /// The groups that apply to `waypoint` and to `services`.
    pub(super) fn groups<'a>(
        &'a self,
        waypoint: (&'a str, &'a str),
        services: &'a [crate::policy_target::Addressed<'a>],
    ) -> impl Iterator<Item = &'a Group> + Clone + 'a {
        self.0.applying(waypoint, services)
    }
}

/// The warning for a rule of a waypoint's policy with fields nothing evaluates.
pub(super) fn unevaluated_warning(policy: &str, action: AuthzAction, fields: &[String]) -> String {
    let effect = if action == AuthzAction::Deny {
        "this DENY rule holds without them, so it denies more".to_owned()
    } else {
        format!("this {action} rule matches nothing")
    };
    format!(
        "AuthorizationPolicy {policy}: {} cannot be evaluated by the waypoint: {effect}",
        fields.join(", ")
    )
}

#[cfg(test)]
mod tests;
