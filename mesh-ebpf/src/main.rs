//! Kernel programs of the mesh.
//!
//! Attached by the node agent to the cgroup v2 directory of each meshed pod. For now they observe
//! and count TCP `connect()` calls per pod and log each one through aya-log; the capture issue
//! turns these hooks into the redirect to the agent's listeners.
#![no_std]
#![no_main]
// aya's program macros fix the entry points' signature: the context is passed by value.
#![allow(clippy::needless_pass_by_value)]

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid},
    macros::{cgroup_sock_addr, map},
    maps::PerCpuHashMap,
    programs::SockAddrContext,
};
use aya_log_ebpf::info;
use mesh_common::{CgroupCounters, MAX_CGROUPS};

/// `SOCK_STREAM` from the socket API: only TCP sockets are counted (UDP `connect()` also runs
/// this hook).
const SOCK_STREAM: u32 = 1;
/// Return value of a `cgroup/connect*` program that lets the call proceed.
const ALLOW: i32 = 1;

/// Counters per cgroup id. Per-CPU, so increments need no atomics; user space sums the CPUs.
#[map(name = "MESH_CGROUP_COUNTERS")]
static MESH_CGROUP_COUNTERS: PerCpuHashMap<u64, CgroupCounters> =
    PerCpuHashMap::with_max_entries(MAX_CGROUPS, 0);

/// Which counter a hook increments.
#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

/// Errors inside a program. They never change the outcome of the socket call; they only mean a
/// connection went uncounted, which the agent sees as a map that did not move.
enum ProgError {
    /// The counter map is full (more cgroups than [`MAX_CGROUPS`]).
    CounterMapFull,
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    // The socket call proceeds whatever happens here: a counting failure must not break the
    // application's connect().
    let _ = try_connect4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    let _ = try_connect6(&ctx);
    ALLOW
}

fn try_connect4(ctx: &SockAddrContext) -> Result<(), ProgError> {
    let sa: &bpf_sock_addr = sock_addr(ctx);
    if sa.type_ != SOCK_STREAM {
        return Ok(());
    }
    let cgroup = count(Family::V4)?;
    let ip = u32::from_be(sa.user_ip4);
    let port = port_from_ctx(sa.user_port);
    let pid = bpf_get_current_pid_tgid() >> 32;
    info!(
        ctx,
        "connect4 pid={} cgroup={} dst={:i}:{}", pid, cgroup, ip, port
    );
    Ok(())
}

fn try_connect6(ctx: &SockAddrContext) -> Result<(), ProgError> {
    let sa: &bpf_sock_addr = sock_addr(ctx);
    if sa.type_ != SOCK_STREAM {
        return Ok(());
    }
    let cgroup = count(Family::V6)?;
    // The kernel stores the address in network order; copying the words' native bytes yields
    // the address bytes in order. Each word is read separately (the verifier wants 4-byte
    // loads of user_ip6).
    let mut ip = [0u8; 16];
    let words = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    for (chunk, word) in ip.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let port = port_from_ctx(sa.user_port);
    let pid = bpf_get_current_pid_tgid() >> 32;
    info!(
        ctx,
        "connect6 pid={} cgroup={} dst=[{:i}]:{}", pid, cgroup, ip, port
    );
    Ok(())
}

fn sock_addr(ctx: &SockAddrContext) -> &bpf_sock_addr {
    // SAFETY: the kernel hands a `cgroup/connect*` program a valid `bpf_sock_addr` for the
    // duration of the call.
    unsafe { &*ctx.sock_addr }
}

/// `user_port` holds the port in network byte order in its low 16 bits.
fn port_from_ctx(user_port: u32) -> u16 {
    #[allow(clippy::cast_possible_truncation)] // the high 16 bits are zero by definition
    u16::from_be(user_port as u16)
}

/// Increments the calling task's cgroup counter and returns the cgroup id.
fn count(family: Family) -> Result<u64, ProgError> {
    // SAFETY: helper without preconditions, available to cgroup sock_addr programs.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    if MESH_CGROUP_COUNTERS.get_ptr_mut(cgroup).is_none() {
        // BPF_NOEXIST: if another CPU inserted first, keep its entry and count on ours below.
        let _ = MESH_CGROUP_COUNTERS.insert(cgroup, CgroupCounters::default(), 1);
    }
    let counters = MESH_CGROUP_COUNTERS
        .get_ptr_mut(cgroup)
        .ok_or(ProgError::CounterMapFull)?;
    // SAFETY: per-CPU value of this CPU; programs do not migrate between CPUs while running,
    // so nothing else writes it concurrently.
    let counters = unsafe { &mut *counters };
    match family {
        Family::V4 => counters.connect4 += 1,
        Family::V6 => counters.connect6 += 1,
    }
    Ok(cgroup)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Several helpers used by the capture programs (sockmap redirects) are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
