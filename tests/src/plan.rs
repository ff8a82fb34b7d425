//! The testbed's address plan. Pure functions, so the plan is unit-tested without privileges.
//!
//! IPv4 uses 198.18.0.0/15, the range reserved for network benchmarking (RFC 2544); IPv6 uses the
//! unique-local prefix `fd00:6d65:7368::/48` ("mesh"). None of it is ever routed outside the
//! testbed's own namespaces.
//!
//! | what | IPv4 | IPv6 |
//! |---|---|---|
//! | node `i` on the inter-node link (`eth1`) | 198.18.0.(i+1)/24 | fd00:6d65:7368:ffff::(i+1)/64 |
//! | pod subnet of node `i` | 198.19.i.0/24 | fd00:6d65:7368:i::/64 |
//! | node `i`'s gateway address (on every pod veth) | 198.19.i.1/32 | fd00:6d65:7368:i::1/128 |
//! | pod `j` of node `i` (`eth0`) | 198.19.i.(j+2)/32 | fd00:6d65:7368:i::(j+2)/128 |
//! | service `i`'s virtual IP (not on any interface) | 198.18.128.(i+1) | fd00:6d65:7368:fffe::(i+1) |

use std::net::{Ipv4Addr, Ipv6Addr};

/// Largest node or pod index the plan can address.
pub const MAX_NODES: usize = 250;
pub const MAX_PODS_PER_NODE: usize = 250;

const V6_PREFIX: [u16; 3] = [0xfd00, 0x6d65, 0x7368];
const LINK_SUBNET_V6: u16 = 0xffff;

fn octet(i: usize) -> u8 {
    u8::try_from(i).expect("index within the address plan")
}

fn v6(subnet: u16, host: usize) -> Ipv6Addr {
    let host = u16::try_from(host).expect("index within the address plan");
    let [a, b, c] = V6_PREFIX;
    Ipv6Addr::new(a, b, c, subnet, 0, 0, 0, host)
}

fn node_subnet_v6(node: usize) -> u16 {
    u16::try_from(node).expect("node index within the address plan")
}

pub fn node_link_v4(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, octet(node + 1))
}

pub fn node_link_v6(node: usize) -> Ipv6Addr {
    v6(LINK_SUBNET_V6, node + 1)
}

pub fn gateway_v4(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, octet(node), 1)
}

pub fn gateway_v6(node: usize) -> Ipv6Addr {
    v6(node_subnet_v6(node), 1)
}

pub fn pod_v4(node: usize, pod: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, octet(node), octet(pod + 2))
}

pub fn pod_v6(node: usize, pod: usize) -> Ipv6Addr {
    v6(node_subnet_v6(node), pod + 2)
}

/// Virtual IP of service `i` (never assigned to any interface: only the agents know it).
pub fn service_vip_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 128, octet(i + 1))
}

pub fn service_vip_v6(i: usize) -> Ipv6Addr {
    v6(0xfffe, i + 1)
}

/// Pod subnet of a node, in CIDR notation, IPv4.
pub fn pod_subnet_v4(node: usize) -> String {
    format!("198.19.{node}.0/24")
}

/// Pod subnet of a node, in CIDR notation, IPv6.
pub fn pod_subnet_v6(node: usize) -> String {
    format!("{}/64", v6(node_subnet_v6(node), 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_plan() {
        assert_eq!(node_link_v4(0).to_string(), "198.18.0.1");
        assert_eq!(node_link_v6(1).to_string(), "fd00:6d65:7368:ffff::2");
        assert_eq!(gateway_v4(1).to_string(), "198.19.1.1");
        assert_eq!(gateway_v6(1).to_string(), "fd00:6d65:7368:1::1");
        assert_eq!(pod_v4(1, 0).to_string(), "198.19.1.2");
        assert_eq!(
            pod_v6(0, 3).to_string(),
            "fd00:6d65:7368:0:0:0:0:5"
                .parse::<Ipv6Addr>()
                .unwrap()
                .to_string()
        );
        assert_eq!(pod_subnet_v4(2), "198.19.2.0/24");
        assert_eq!(pod_subnet_v6(2), "fd00:6d65:7368:2::/64");
    }

    #[test]
    fn every_pod_address_is_distinct_and_outside_the_link_subnet() {
        let mut seen = std::collections::HashSet::new();
        for n in 0..4 {
            assert!(seen.insert(node_link_v4(n).to_string()));
            assert!(seen.insert(gateway_v4(n).to_string()));
            for p in 0..4 {
                assert!(seen.insert(pod_v4(n, p).to_string()));
                assert!(seen.insert(pod_v6(n, p).to_string()));
            }
        }
    }

    #[test]
    fn largest_indices_fit() {
        assert_eq!(
            pod_v4(MAX_NODES - 1, MAX_PODS_PER_NODE - 1).to_string(),
            "198.19.249.251"
        );
        assert_eq!(node_link_v4(MAX_NODES - 1).to_string(), "198.18.0.250");
    }
}
