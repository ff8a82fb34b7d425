//! The node's own addresses: those of the agent's network namespace, which is the node's host
//! network (the agent runs there). A plaintext connection into a pod from one of them comes
//! from the node itself (the kubelet's health probes, host-network processes), which the
//! inbound decision exempts ([`mesh_cluster::Origin::Node`]). Read at start and again every
//! few seconds (addresses come and go with the node's interfaces).

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use tracing::{info, warn};

/// How often the addresses are read again.
pub const REFRESH: Duration = Duration::from_secs(2);

/// The node's addresses, as last read.
#[derive(Debug, Default)]
pub struct NodeAddrs {
    addrs: RwLock<Arc<HashSet<IpAddr>>>,
}

impl NodeAddrs {
    /// Reads the addresses of the calling thread's network namespace.
    pub fn discover() -> Result<Self, nix::Error> {
        let this = Self::default();
        this.refresh()?;
        Ok(this)
    }

    /// Whether `ip` is one of the node's addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.addrs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&ip.to_canonical())
    }

    /// Reads the addresses again; whether they changed.
    pub fn refresh(&self) -> Result<bool, nix::Error> {
        let read = local_addresses()?;
        let mut current = self.addrs.write().unwrap_or_else(PoisonError::into_inner);
        if **current == read {
            return Ok(false);
        }
        info!(
            count = read.len(),
            "the node's addresses (exempt from inbound policy as the node's own)"
        );
        *current = Arc::new(read);
        Ok(true)
    }

    /// Keeps the addresses current every [`REFRESH`] (on a thread of the agent's own network
    /// namespace: the runtime's threads never leave it).
    pub fn spawn_refresh(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REFRESH).await;
                if let Err(e) = this.refresh() {
                    warn!(error = %e, "reading the node's addresses failed; keeping the last ones");
                }
            }
        })
    }
}

/// The addresses configured on the interfaces of the calling thread's network namespace
/// (IPv4-mapped IPv6 folded into IPv4, as the cluster model keeps them).
pub fn local_addresses() -> Result<HashSet<IpAddr>, nix::Error> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .map(|ip| ip.to_canonical())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_the_nodes_and_a_documentation_address_is_not() {
        let addrs = NodeAddrs::discover().expect("getifaddrs");
        assert!(addrs.contains("127.0.0.1".parse().unwrap()));
        assert!(
            addrs.contains("::ffff:127.0.0.1".parse().unwrap()),
            "canonical"
        );
        assert!(!addrs.contains("192.0.2.77".parse().unwrap()));
        assert!(!addrs.refresh().expect("again"), "unchanged");
    }
}
