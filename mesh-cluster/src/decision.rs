//! The whole inbound decision for one connection, as the destination's agent makes it:
//! `PeerAuthentication` first (a plaintext connection to a STRICT port is refused), then
//! `AuthorizationPolicy`. Every data path (the agent's inbound listener, its HBONE server, and
//! later the waypoint) asks [`ClusterState::admit`]; none of them combines the two itself.

use std::{net::SocketAddr, sync::Arc};

use mesh_identity::Identity;

use crate::{
    authz::{AuthzDecision, ConnFacts, DecisionReason, Verdict},
    peer_auth::MtlsMode,
    state::ClusterState,
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
                audited: Vec::new(),
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
                    audited: Vec::new(),
                };
            }
        }
        self.authorize(&ConnFacts {
            src_ip: conn.src.ip().to_canonical(),
            src_identity: conn.src_identity,
            dst_ip,
            dst_port: conn.dst.port(),
            dst,
        })
    }
}

#[cfg(test)]
mod tests;
