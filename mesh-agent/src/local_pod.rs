//! A meshed pod of this node as the proxies and the telemetry see it: its namespace, addresses
//! and identity. The pod manager publishes it; everything that serves the pod reads it.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use mesh_identity::Identity;

use crate::{leg_ports::LegPorts, netns::Netns};

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
    /// Local ports for the agent's connections to the pod's applications.
    pub leg_ports: LegPorts,
    /// Whether the pod has opted into the `sk_msg` short-cut since this view was made: once set,
    /// its sockets may be in the short-cut until they close, so it stays set.
    pub may_shortcut: AtomicBool,
}

impl LocalPod {
    /// Whether sockets of this pod may be in the `sk_msg` short-cut (see `may_shortcut`).
    pub fn may_shortcut(&self) -> bool {
        self.may_shortcut.load(Ordering::Relaxed)
    }

    /// The pod opted into the short-cut (again): its new legs may enter it.
    pub fn opted_into_shortcut(&self) {
        self.may_shortcut.store(true, Ordering::Relaxed);
    }

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
