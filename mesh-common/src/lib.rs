//! Types shared by the kernel programs (`mesh-ebpf`) and the node agent (`mesh-agent`).
//!
//! Every type that crosses the kernel/user boundary is `#[repr(C)]`, built from fixed-width
//! integers only (no `bool`, no enums with niches) and laid out without implicit padding, so the
//! two sides agree byte for byte. The `user` feature adds the `aya::Pod` implementations.
#![no_std]
#![deny(unsafe_code)]

/// Names of the maps and programs in the kernel object, used by the agent to find them and as
/// the file names under the agent's bpffs pin directory.
pub mod names {
    /// Per-cgroup socket counters, keyed by cgroup id (`u64`), value [`super::CgroupCounters`].
    pub const CGROUP_COUNTERS: &str = "MESH_CGROUP_COUNTERS";
    /// `cgroup/connect4` program.
    pub const PROG_CONNECT4: &str = "mesh_connect4";
    /// `cgroup/connect6` program.
    pub const PROG_CONNECT6: &str = "mesh_connect6";
}

/// Maximum number of cgroups (pods) the counter map tracks on one node.
pub const MAX_CGROUPS: u32 = 16_384;

/// Socket-layer counters for one cgroup (one pod), summed by user space across CPUs.
///
/// Only whole `u64` fields: the layout is 8-byte aligned with no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupCounters {
    /// `connect()` calls on IPv4 TCP sockets seen by the `cgroup/connect4` hook.
    pub connect4: u64,
    /// `connect()` calls on IPv6 TCP sockets seen by the `cgroup/connect6` hook.
    pub connect6: u64,
}

impl CgroupCounters {
    /// Adds another CPU's (or another snapshot's) counts to this one.
    #[must_use]
    pub const fn sum(self, other: Self) -> Self {
        Self {
            connect4: self.connect4.wrapping_add(other.connect4),
            connect6: self.connect6.wrapping_add(other.connect6),
        }
    }
}

#[cfg(feature = "user")]
#[allow(unsafe_code)]
// SAFETY: `CgroupCounters` is `repr(C)`, holds only `u64`s, has no padding, and every bit
// pattern is a valid value.
unsafe impl aya::Pod for CgroupCounters {}

#[cfg(test)]
mod tests {
    use super::CgroupCounters;

    #[test]
    fn counters_have_no_padding() {
        assert_eq!(size_of::<CgroupCounters>(), 16);
        assert_eq!(align_of::<CgroupCounters>(), 8);
    }

    #[test]
    fn sum_adds_each_field() {
        let a = CgroupCounters {
            connect4: 2,
            connect6: 1,
        };
        let b = CgroupCounters {
            connect4: 3,
            connect6: 0,
        };
        assert_eq!(
            a.sum(b),
            CgroupCounters {
                connect4: 5,
                connect6: 1
            }
        );
    }
}
