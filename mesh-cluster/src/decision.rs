//! The whole inbound decision for one connection, as the destination's agent makes it:
//! `PeerAuthentication` first (a plaintext connection to a STRICT port is refused), then
//! `AuthorizationPolicy`, then the waypoint rule: a pod behind a waypoint takes only connections
//! from that waypoint, unless an ALLOW policy matched the connection (an explicit allow). Every data path (the agent's inbound listener, its HBONE server, and
//! later the waypoint) asks [`ClusterState::admit`]; none of them combines the two itself.

use std::{net::SocketAddr, sync::Arc};

use mesh_identity::Identity;

use crate::{
    authz::{AuthzDecision, ConnFacts, DecisionReason, Verdict},
    peer_auth::MtlsMode,
    state::ClusterState,
    waypoint::Guard,
};

/// A connection arriving at a workload.
#[derive(Clone, Copy, Debug)]
pub struct Inbound<'a> {
    /// The source address as the destination sees it (the original client's).
    pub src: SocketAddr,
    /// The destination workload address and port (the pod's own, after service resolution).
    pub dst: SocketAddr,
    /// The source's identity, proven by mutual TLS; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    /// Where the connection comes from, as the destination's agent saw it.
    pub origin: Origin,
}

/// Where an inbound connection comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// The network: another pod, another node, anything else. Every rule applies.
    Network,
    /// The destination's own node: a plaintext connection from an address of the node's host
    /// network namespace (the kubelet's health probes, host-network processes). Another pod
    /// cannot open one: a spoofed node address gets its replies delivered to the node, never
    /// to the spoofer, so the TCP handshake does not complete. Only the waypoint rule lets it
    /// through ([`crate::DecisionReason::NodeLocal`]): traffic from outside the cluster that
    /// a node masquerades (a `NodePort`) carries the node's address too, so STRICT mTLS and
    /// `AuthorizationPolicy` hold for it as for any plaintext source.
    Node,
}

impl ClusterState {
    /// Whether `conn` may reach its destination, and why. A destination the model does not know
    /// as a workload is refused ([`DecisionReason::UnknownDestination`]): its policies cannot
    /// be known (the caller decides only for pods it captured).
    pub fn admit(&self, conn: &Inbound<'_>) -> AuthzDecision {
        let dst_ip = conn.dst.ip().to_canonical();
        let Some(dst) = self.workload_by_ip(dst_ip) else {
            return AuthzDecision {
                verdict: Verdict::Deny,
                reason: DecisionReason::UnknownDestination,
                policy: None,
                audited: Box::default(),
            };
        };
        if conn.src_identity.is_none() {
            let mtls = self.peer_authentication(dst, conn.dst.port());
            if mtls.mode == MtlsMode::Strict {
                return AuthzDecision {
                    verdict: Verdict::Deny,
                    reason: DecisionReason::MtlsRequired,
                    policy: mtls
                        .policy
                        .map(|p| Arc::from(format!("PeerAuthentication {p}"))),
                    audited: Box::default(),
                };
            }
        }
        let decision = self.authorize(&ConnFacts {
            src_ip: conn.src.ip().to_canonical(),
            src_identity: conn.src_identity,
            dst_ip,
            dst_port: conn.dst.port(),
            dst,
        });
        if decision.verdict == Verdict::Deny || decision.reason == DecisionReason::AllowMatched {
            return decision;
        }
        match self.waypoint_guard(dst, conn.src.ip(), conn.src_identity) {
            Guard::Open | Guard::ThroughWaypoint => decision,
            // The node's own connection (its kubelet's probe) is no bypass: the pod stays
            // probe-able behind its waypoint. Only the waypoint rule gives way: STRICT mTLS and
            // the policies above hold for it as for any plaintext source.
            Guard::Bypassed(_) if conn.origin == Origin::Node && conn.src_identity.is_none() => {
                AuthzDecision {
                    reason: DecisionReason::NodeLocal,
                    ..decision
                }
            }
            Guard::Bypassed(waypoints) => AuthzDecision {
                verdict: Verdict::Deny,
                reason: DecisionReason::WaypointBypass,
                policy: Some(Arc::from(format!("waypoint {waypoints}"))),
                audited: decision.audited,
            },
        }
    }
}

#[cfg(test)]
mod tests;
