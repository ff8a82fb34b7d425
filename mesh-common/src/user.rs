//! User-space side: `aya::Pod` for the map types and conversions to and from std addresses.
#![allow(unsafe_code)]

extern crate std;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{
    CgroupCounters, DirectConn, DirectCounters, DirectEvent, DirectPair, DirectPeer, DirectRoute,
    DirectRouteKey, DirectSock, FastpathCounters, MeshConfig, NsSockKey, PodInfo, SockAddr,
    SockKey, AF_INET, AF_INET6,
};

// SAFETY (all fifteen): `repr(C)`, only fixed-width integers and arrays of them, no padding (checked
// by the `shared_types_have_no_padding` test), and every bit pattern is a valid value.
unsafe impl aya::Pod for CgroupCounters {}
unsafe impl aya::Pod for FastpathCounters {}
unsafe impl aya::Pod for SockAddr {}
unsafe impl aya::Pod for SockKey {}
unsafe impl aya::Pod for NsSockKey {}
unsafe impl aya::Pod for PodInfo {}
unsafe impl aya::Pod for MeshConfig {}
unsafe impl aya::Pod for DirectPair {}
unsafe impl aya::Pod for DirectRouteKey {}
unsafe impl aya::Pod for DirectRoute {}
unsafe impl aya::Pod for DirectSock {}
unsafe impl aya::Pod for DirectConn {}
unsafe impl aya::Pod for DirectEvent {}
unsafe impl aya::Pod for DirectCounters {}
unsafe impl aya::Pod for DirectPeer {}

/// The agent's outbound listener in a pod, for connections from the pod's address `ip` (the same
/// family).
pub fn outbound_listener(ip: IpAddr) -> SocketAddr {
    let family = if ip.is_ipv4() { AF_INET } else { AF_INET6 };
    SockAddr::outbound_listener(family)
        .to_std()
        .expect("both families convert")
}

/// Network-order words of an IPv4 address, as the kernel stores them.
pub fn ipv4_word(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Network-order words of an IPv6 address, as the kernel stores them.
pub fn ipv6_words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    core::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

impl From<SocketAddr> for SockAddr {
    fn from(addr: SocketAddr) -> Self {
        match addr.ip() {
            IpAddr::V4(ip) => Self {
                ip: [ipv4_word(ip), 0, 0, 0],
                port: addr.port().into(),
                family: AF_INET,
            },
            IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                // A v4-mapped address is an IPv4 connection on an IPv6 socket: the kernel's
                // IPv4 path handles it, so it is keyed as IPv4.
                Some(v4) => Self::from(SocketAddr::new(IpAddr::V4(v4), addr.port())),
                None => Self {
                    ip: ipv6_words(ip),
                    port: addr.port().into(),
                    family: AF_INET6,
                },
            },
        }
    }
}

impl SockAddr {
    /// The std address, or `None` for an unknown family or a port above 65535.
    pub fn to_std(self) -> Option<SocketAddr> {
        let port = u16::try_from(self.port).ok()?;
        let ip = match self.family {
            AF_INET => IpAddr::V4(Ipv4Addr::from(self.ip[0].to_ne_bytes())),
            AF_INET6 => {
                let mut o = [0u8; 16];
                for (chunk, word) in o.chunks_exact_mut(4).zip(self.ip) {
                    chunk.copy_from_slice(&word.to_ne_bytes());
                }
                IpAddr::V6(Ipv6Addr::from(o))
            }
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    }
}

impl PodInfo {
    /// A pod's entry: its addresses, and whether its mesh legs take the `sk_msg` short-cut.
    pub fn new(ipv4: Option<Ipv4Addr>, ipv6: Option<Ipv6Addr>, shortcut: bool) -> Self {
        Self {
            ipv4: ipv4.map_or(0, ipv4_word),
            ipv6: ipv6.map_or([0; 4], ipv6_words),
            flags: if shortcut { Self::SHORTCUT } else { 0 },
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_in_kernel_layout() {
        for s in ["198.19.0.2:15001", "[fd00:6d65:7368::2]:8080"] {
            let addr: SocketAddr = s.parse().unwrap();
            assert_eq!(SockAddr::from(addr).to_std(), Some(addr));
        }
        // Kernel layout: the first address byte is the first byte in memory.
        let k = SockAddr::from("1.2.3.4:80".parse::<SocketAddr>().unwrap());
        assert_eq!(k.ip[0].to_ne_bytes(), [1, 2, 3, 4]);
        assert_eq!(k.port, 80);
    }

    #[test]
    fn the_outbound_listener_is_on_loopback() {
        for (family, pod, expected) in [
            (AF_INET, "198.19.0.2", "127.0.0.1:15001"),
            (AF_INET6, "fd00::2", "[::1]:15001"),
        ] {
            let addr = SockAddr::outbound_listener(family).to_std();
            assert_eq!(addr, Some(expected.parse().unwrap()));
            assert_eq!(addr, Some(outbound_listener(pod.parse().unwrap())));
            assert!(addr.unwrap().ip().is_loopback());
        }
    }

    #[test]
    fn v4_mapped_is_keyed_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:1.2.3.4]:80".parse().unwrap();
        assert_eq!(
            SockAddr::from(mapped),
            SockAddr::from("1.2.3.4:80".parse::<SocketAddr>().unwrap())
        );
    }
}
