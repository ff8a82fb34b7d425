//! Addresses as the kernel programs store them, the agent's ports in every meshed pod, and the
//! keys that name a socket.

/// Port of the agent's outbound listener in each meshed pod (Istio's 15001).
pub const OUTBOUND_PORT: u16 = 15001;
/// Where the agent's outbound listener is in each meshed pod, IPv4: the pod's loopback address.
/// The connect hooks send captured connections here from the pod's own address. A loopback
/// destination keeps the application's address as it was and lets `connect()` reuse a
/// `TIME_WAIT` port (`tcp_tw_reuse` = 2, the default, is for loopback), so connections the
/// application closes first do not use up the pod's ports (see ARCHITECTURE.md, "Outbound").
pub const OUTBOUND_IPV4: [u8; 4] = [127, 0, 0, 1];
/// The same for IPv6: `::1`.
pub const OUTBOUND_IPV6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// Port of the agent's inbound plaintext listener in each meshed pod (Istio's 15006).
pub const INBOUND_PORT: u16 = 15006;
/// Port of the agent's HBONE (HTTP/2 CONNECT over mutual TLS) listener in each meshed pod
/// (Istio's 15008). Reserved: an application of a meshed pod must not listen on it.
pub const HBONE_PORT: u16 = 15008;
/// The ports the agent listens on inside every meshed pod. A meshed pod's own processes may not
/// bind them (TCP, any address): the `cgroup/bind` hooks refuse with `EPERM`.
pub const RESERVED_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT];

/// `AF_INET` and `AF_INET6` as the kernel numbers them.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// An IP address and port as the kernel programs store them: the address in network byte order,
/// IPv4 in `ip[0]` (rest zero), the port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr {
    pub ip: [u32; 4],
    pub port: u32,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u32,
}

impl SockAddr {
    /// The agent's outbound listener ([`OUTBOUND_IPV4`] or [`OUTBOUND_IPV6`], [`OUTBOUND_PORT`])
    /// for connections of `family`.
    #[must_use]
    #[allow(clippy::cast_lossless)] // `u32::from` is not `const`
    pub const fn outbound_listener(family: u32) -> Self {
        let ip = if family == AF_INET {
            [u32::from_ne_bytes(OUTBOUND_IPV4), 0, 0, 0]
        } else {
            let b = OUTBOUND_IPV6;
            [
                u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
                u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
                u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
                u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
            ]
        };
        Self {
            ip,
            port: OUTBOUND_PORT as u32,
            family,
        }
    }

    /// The address with port 0: the key of [`names::LISTENERS`].
    #[must_use]
    pub const fn without_port(self) -> Self {
        Self {
            ip: self.ip,
            port: 0,
            family: self.family,
        }
    }
}

/// Both ends of a TCP socket, from that socket's point of view.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub local: SockAddr,
    pub remote: SockAddr,
}

impl SockKey {
    /// The same connection seen from the other socket.
    #[must_use]
    pub const fn reversed(self) -> Self {
        Self {
            local: self.remote,
            remote: self.local,
        }
    }
}

/// A socket's [`SockKey`] qualified by its network namespace's cookie: addresses (even a pod's
/// own, and always loopback) repeat across namespaces, so a key without the namespace could
/// name another pod's socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NsSockKey {
    /// Cookie of the socket's network namespace (`bpf_get_netns_cookie`, `SO_NETNS_COOKIE`).
    pub netns: u64,
    pub sock: SockKey,
}

impl NsSockKey {
    /// The other socket of the same connection (same namespace).
    #[must_use]
    pub const fn peer(self) -> Self {
        Self {
            netns: self.netns,
            sock: self.sock.reversed(),
        }
    }
}
