//! Address helpers: the kernel's contexts store addresses in network byte order and ports in
//! several encodings; everything is normalised into `SockAddr` (IPv4-mapped IPv6 as IPv4).

use mesh_common::{SockAddr, SockKey, AF_INET, AF_INET6};

/// A context's `[u32; 4]` IPv6 field, copied word by word: the verifier allows only 4-byte loads
/// of context fields, which a whole-array copy would not be.
macro_rules! ip6_field {
    ($field:expr) => {
        [$field[0], $field[1], $field[2], $field[3]]
    };
}
pub(crate) use ip6_field;

/// One end of a connection as `sockops` and `sk_msg` contexts carry it.
pub struct End {
    pub ip4: u32,
    pub ip6: [u32; 4],
    pub port: u16,
}

/// A socket's own view of its connection from its context's fields: `local_port` is in host
/// order, `remote_port` big-endian in the high 16 bits (decode with [`port_be_high`]).
pub fn conn_key(family: u32, local: &End, remote: &End) -> Option<SockKey> {
    Some(SockKey {
        local: from_parts(family, local.ip4, local.ip6, local.port)?,
        remote: from_parts(family, remote.ip4, remote.ip6, remote.port)?,
    })
}

/// The first byte of a network-order IPv4 word.
pub fn first_octet(ip4: u32) -> u8 {
    ip4.to_ne_bytes()[0]
}

pub fn is_loopback4(ip4: u32) -> bool {
    first_octet(ip4) == 127
}

pub fn is_loopback6(ip6: [u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3].to_ne_bytes() == [0, 0, 0, 1]
}

/// `::ffff:a.b.c.d`: an IPv4 address on an IPv6 socket.
pub fn is_v4_mapped(ip6: [u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2].to_ne_bytes() == [0, 0, 0xff, 0xff]
}

pub fn is_unspecified6(ip6: [u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == 0
}

/// The word that marks an IPv4-mapped IPv6 address (`0000:ffff` in network order).
pub fn v4_mapped_marker() -> u32 {
    u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

pub fn v4(ip4: u32, port: u16) -> SockAddr {
    SockAddr {
        ip: [ip4, 0, 0, 0],
        port: u32::from(port),
        family: AF_INET,
    }
}

/// An address from a context's family and fields, IPv4-mapped folded into IPv4.
pub fn from_parts(family: u32, ip4: u32, ip6: [u32; 4], port: u16) -> Option<SockAddr> {
    match family {
        AF_INET => Some(v4(ip4, port)),
        AF_INET6 if is_v4_mapped(ip6) => Some(v4(ip6[3], port)),
        AF_INET6 => Some(SockAddr {
            ip: ip6,
            port: u32::from(port),
            family: AF_INET6,
        }),
        _ => None,
    }
}

/// A port stored as a big-endian 16-bit value in the low bits of a `u32`.
#[allow(clippy::cast_possible_truncation)] // only the low 16 bits carry the port
pub fn port_be_low(v: u32) -> u16 {
    u16::from_be(v as u16)
}

/// A port stored big-endian in the high 16 bits of a `u32` (`bpf_sock_ops`, `sk_msg_md`
/// `remote_port` on little-endian machines).
#[allow(clippy::cast_possible_truncation)]
pub fn port_be_high(v: u32) -> u16 {
    u16::from_be((v >> 16) as u16)
}

/// A port stored in host order in a `u32`.
#[allow(clippy::cast_possible_truncation)]
pub fn port_host(v: u32) -> u16 {
    v as u16
}
