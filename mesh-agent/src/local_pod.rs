//! A meshed pod of this node as the proxies and the telemetry see it: its namespace, addresses
//! and identity. The pod manager publishes it; everything that serves the pod reads it.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use mesh_identity::Identity;

use crate::netns::Netns;

/// A meshed pod on this node, as the proxies see it.
#[derive(Debug)]
pub struct LocalPod {
    /// `namespace/name`, for logs.
    pub name: String,
    pub netns: Netns,
    /// The namespace's cookie: it qualifies the pod's keys in the kernel's maps.
    pub netns_cookie: u64,
    pub ips: Vec<IpAddr>,
    /// The pod's SPIFFE identity (from its namespace and service account).
    pub identity: Identity,
}

impl LocalPod {
    /// The pod's address of the same family as `ip`.
    pub(crate) fn address_like(&self, ip: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == ip.is_ipv4())
    }
}

/// Meshed pods of this node by address: the same-node short path.
pub type LocalPods = HashMap<IpAddr, Arc<LocalPod>>;
