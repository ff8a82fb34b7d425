//! Addresses and CIDR blocks, as `AuthorizationPolicy` writes them and matches them.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Serialize, Serializer};

/// Why a string is not an [`IpBlock`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IpBlockError {
    #[error("empty value not allowed")]
    Empty,
    #[error("{0:?} is not an IP address or CIDR (IPv4 or IPv6, prefix length in range)")]
    Invalid(String),
}

/// An address or a CIDR block (`10.0.0.1`, `10.0.0.0/8`, `fd00::/8`); host bits after the prefix
/// are ignored, as in Istio (`10.1.2.3/8` is `10.0.0.0/8`). Displayed and serialized as
/// `address/length`, or the address alone for a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpBlock {
    /// The network address (host bits cleared).
    network: IpAddr,
    /// The prefix length: at most 32 for IPv4, 128 for IPv6.
    prefix: u8,
}

impl IpBlock {
    /// The block of `addr` with prefix length `prefix`, `None` if too long for its family.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let network = match addr {
            IpAddr::V4(v4) if prefix <= 32 => {
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & v4_mask(prefix)))
            }
            IpAddr::V6(v6) if prefix <= 128 => {
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & v6_mask(prefix)))
            }
            _ => return None,
        };
        Some(Self { network, prefix })
    }

    /// Whether `ip` is in the block. An address of the other family never is (IPv4-mapped IPv6
    /// addresses are not converted here).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                u32::from(ip) & v4_mask(self.prefix) == u32::from(network)
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                u128::from(ip) & v6_mask(self.prefix) == u128::from(network)
            }
            _ => false,
        }
    }
}

fn v4_mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn v6_mask(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for IpBlock {
    type Err = IpBlockError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.is_empty() {
            return Err(IpBlockError::Empty);
        }
        let invalid = || IpBlockError::Invalid(value.to_owned());
        let (addr, prefix) = match value.split_once('/') {
            None => {
                let addr: IpAddr = value.parse().map_err(|_| invalid())?;
                (addr, if addr.is_ipv4() { 32 } else { 128 })
            }
            Some((addr, prefix)) => {
                if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid());
                }
                let addr = addr.parse().map_err(|_| invalid())?;
                (addr, prefix.parse().map_err(|_| invalid())?)
            }
        };
        Self::new(addr, prefix).ok_or_else(invalid)
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = if self.network.is_ipv4() { 32 } else { 128 };
        if self.prefix == full {
            write!(f, "{}", self.network)
        } else {
            write!(f, "{}/{}", self.network, self.prefix)
        }
    }
}

impl Serialize for IpBlock {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}
