//! `cgroup/connect4|6`: outbound capture. `cgroup/getpeername4|6`: the original client, shown to
//! the application that the agent connects to, and the original destination, shown to the
//! application whose connection was captured (its socket is connected to the agent's listener).
//! `cgroup/bind4|6`: a meshed pod's own processes may not bind the ports the agent listens on in
//! the pod (the agent's sockets are created from its own cgroup and never meet these hooks).

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr, BPF_ANY},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext as _,
};
use aya_log_ebpf::{debug, info};
use mesh_common::{
    CgroupCounters, SockAddr, SockKey, AF_INET, AF_INET6, OUTBOUND_PORT, RESERVED_PORTS,
};

use crate::{
    addr, direct,
    maps::{MESH_CGROUP_COUNTERS, MESH_ORIG_DST, MESH_PEER_ADDR, MESH_PODS},
    source::{bind4, bind6},
};

/// `SOCK_STREAM`: only TCP is captured (UDP `connect()` runs the same hooks).
const SOCK_STREAM: u32 = 1;
/// Verdict of a `cgroup/sock_addr` program that lets the call proceed.
const ALLOW: i32 = 1;
/// Verdict of a `cgroup/sock_addr` program that refuses the call (`EPERM`).
const DENY: i32 = 0;

/// Why a program could not do its work. Capture failures leave the call as the application
/// made it; the agent sees them as missing map entries.
pub enum Error {
    CounterMapFull,
    OrigDstMapFull,
}

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    let _ = try_connect4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    let _ = try_connect6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(bind4)]
pub fn mesh_bind4(ctx: SockAddrContext) -> i32 {
    bind_verdict(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn mesh_bind6(ctx: SockAddrContext) -> i32 {
    bind_verdict(&ctx)
}

/// Refuses a TCP `bind()` to one of the agent's ports (any address): a pod process that held
/// one would receive the pod's captured connections, or keep the agent from opening its
/// listeners, and so take the pod out of the mesh.
fn bind_verdict(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for the duration of the call.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let port = addr::port_be_low(sa.user_port);
    if !RESERVED_PORTS.contains(&port) {
        return ALLOW;
    }
    // SAFETY: helper without preconditions, available to cgroup sock_addr programs.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    info!(
        ctx,
        "bind refused pid={} cgroup={} port={}",
        bpf_get_current_pid_tgid() >> 32,
        cgroup,
        port
    );
    DENY
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for the duration of the
    // call; getpeername hooks may write `user_ip*`/`user_port`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(orig) = original_peer(&ctx, sa, Family::V4) {
        // A getpeername4 program may only write the IPv4 fields; an IPv6 client cannot be
        // shown through an IPv4 socket, so that case keeps the agent's address.
        if orig.family == AF_INET {
            sa.user_ip4 = orig.ip[0];
            sa.user_port = u32::from(addr::port_host(orig.port).to_be());
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for the duration of the
    // call; getpeername hooks may write `user_ip*`/`user_port`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(orig) = original_peer(&ctx, sa, Family::V6) {
        let ip = if orig.family == AF_INET {
            [orig.ip[0], 0, 0, 0]
        } else {
            orig.ip
        };
        set_user6(sa, orig.family, ip, addr::port_host(orig.port));
    }
    ALLOW
}

fn try_connect4(ctx: &SockAddrContext) -> Result<(), Error> {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for the duration of the
    // call; connect hooks may write `user_ip*`/`user_port`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return Ok(());
    }
    let cgroup = count(Family::V4)?;
    let dst = addr::v4(sa.user_ip4, addr::port_be_low(sa.user_port));
    let target = capture(ctx, dst)?;
    if let Some(Captured { pod, to }) = target {
        bind4(ctx, pod.ipv4);
        // A connect4 program may only write the IPv4 fields.
        let to = to.unwrap_or(SockAddr::outbound_listener(AF_INET));
        sa.user_ip4 = to.ip[0];
        sa.user_port = u32::from(addr::port_host(to.port).to_be());
    }
    let captured = target.is_some();
    debug!(
        ctx,
        "connect4 pid={} cgroup={} dst={:i}:{} captured={}",
        bpf_get_current_pid_tgid() >> 32,
        cgroup,
        u32::from_be(sa_ip4(&dst)),
        addr::port_host(dst.port),
        u8::from(captured)
    );
    Ok(())
}

fn try_connect6(ctx: &SockAddrContext) -> Result<(), Error> {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for the duration of the
    // call; connect hooks may write `user_ip*`/`user_port`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return Ok(());
    }
    let cgroup = count(Family::V6)?;
    let ip6 = addr::ip6_field!(sa.user_ip6);
    let Some(dst) = addr::from_parts(AF_INET6, 0, ip6, addr::port_be_low(sa.user_port)) else {
        return Ok(());
    };
    let target = capture(ctx, dst)?;
    if let Some(Captured { pod, to }) = target {
        let own = if dst.family == AF_INET {
            [pod.ipv4, 0, 0, 0]
        } else {
            pod.ipv6
        };
        bind6(ctx, dst.family, own);
        let to = to.unwrap_or(SockAddr::outbound_listener(dst.family));
        set_user6(sa, dst.family, to.ip, addr::port_host(to.port));
    }
    let captured = target.is_some();
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(ip6) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    debug!(
        ctx,
        "connect6 pid={} cgroup={} dst=[{:i}]:{} captured={}",
        bpf_get_current_pid_tgid() >> 32,
        cgroup,
        bytes,
        addr::port_host(dst.port),
        u8::from(captured)
    );
    Ok(())
}

fn sa_ip4(a: &SockAddr) -> u32 {
    a.ip[0]
}

/// Writes an address into an IPv6 socket's `user_ip6`/`user_port` (only IPv6 programs may):
/// an IPv4 address (`family` [`AF_INET`], in `ip[0]`) goes in IPv4-mapped.
fn set_user6(sa: &mut bpf_sock_addr, family: u32, ip: [u32; 4], port: u16) {
    let words = if family == AF_INET {
        [0, 0, addr::v4_mapped_marker(), ip[0]]
    } else {
        ip
    };
    sa.user_ip6[0] = words[0];
    sa.user_ip6[1] = words[1];
    sa.user_ip6[2] = words[2];
    sa.user_ip6[3] = words[3];
    sa.user_port = u32::from(port.to_be());
}

/// The pod's own addresses, the source of its captured connections.
#[derive(Clone, Copy)]
struct PodAddrs {
    ipv4: u32,
    ipv6: [u32; 4],
}

/// A connection the hook takes: from the pod's own address, to the agent's outbound listener
/// (`to` is `None`) or kernel-direct to an endpoint (`to`).
#[derive(Clone, Copy)]
struct Captured {
    pod: PodAddrs,
    to: Option<SockAddr>,
}

/// Decides whether to capture a connection to `dst` and, if so, where it goes: kernel-direct
/// when a current route of the agent's allows it (`direct::route`), else to the agent, with
/// `dst` recorded under the socket's cookie. The caller binds the socket to the pod's address
/// and rewrites the destination (each program may only write its own family's fields).
fn capture(ctx: &SockAddrContext, dst: SockAddr) -> Result<Option<Captured>, Error> {
    // Local destinations stay local: loopback, and the unspecified address.
    let skip = if dst.family == AF_INET {
        addr::is_loopback4(dst.ip[0]) || dst.ip[0] == 0
    } else {
        addr::is_loopback6(dst.ip) || addr::is_unspecified6(dst.ip)
    };
    if skip {
        return Ok(None);
    }
    // SAFETY: helper available to cgroup/sock_addr programs; the context pointer is valid.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is plain data copied out before any other map call.
    let Some(pod) = (unsafe { MESH_PODS.get(netns) }).copied() else {
        // Programs attached but the pod not (yet, or no longer) registered: leave it alone.
        return Ok(None);
    };
    let v4_path = dst.family == AF_INET;
    if v4_path && pod.ipv4 == 0 || !v4_path && addr::is_unspecified6(pod.ipv6) {
        return Ok(None);
    }
    // A connection to the agent's port on the pod's own address is let through unchanged:
    // nothing listens there (the agent's listener is on loopback, which is never captured), so
    // it is refused; captured, it would loop back into the agent.
    let to_own_port = if v4_path {
        dst.ip[0] == pod.ipv4
    } else {
        dst.ip == pod.ipv6
    };
    if to_own_port && dst.port == u32::from(OUTBOUND_PORT) {
        return Ok(None);
    }
    // SAFETY: helper available to cgroup/sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let addrs = PodAddrs {
        ipv4: pod.ipv4,
        ipv6: pod.ipv6,
    };
    if let Some(target) = direct::route(ctx, netns, &pod, dst, cookie) {
        return Ok(Some(Captured {
            pod: addrs,
            to: Some(target),
        }));
    }
    MESH_ORIG_DST
        .insert(cookie, dst, u64::from(BPF_ANY))
        .map_err(|_| Error::OrigDstMapFull)?;
    Ok(Some(Captured {
        pod: addrs,
        to: None,
    }))
}

/// The peer this socket's application should see, if not the one the kernel has: the original
/// client the agent registered for the socket it connected (`MESH_PEER_ADDR`), or, for an
/// application's captured connection (connected to the agent's outbound listener), the
/// destination the application asked for (`MESH_ORIG_DST`, kept until the socket closes), as
/// a `REDIRECT` rule's connection tracking would show it, or for a kernel-direct connection the
/// destination it asked for (a Service VIP, as a load balancer's connection tracking would
/// show it). Reads only: the caller writes the
/// address fields its program type may write.
fn original_peer(ctx: &SockAddrContext, sa: &bpf_sock_addr, family: Family) -> Option<SockAddr> {
    // SAFETY: reading the union's pointer member; checked for null before use.
    let sk: *mut bpf_sock = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: non-null socket pointer provided by the kernel for this call.
    let sk = unsafe { &*sk };
    let (local, remote) = match family {
        Family::V4 => (
            addr::v4(sk.src_ip4, addr::port_host(sk.src_port)),
            addr::v4(sa.user_ip4, addr::port_be_low(sa.user_port)),
        ),
        Family::V6 => {
            let src = addr::ip6_field!(sk.src_ip6);
            let peer = addr::ip6_field!(sa.user_ip6);
            (
                addr::from_parts(AF_INET6, 0, src, addr::port_host(sk.src_port))?,
                addr::from_parts(AF_INET6, 0, peer, addr::port_be_low(sa.user_port))?,
            )
        }
    };
    // SAFETY: plain data copied out at once.
    if let Some(client) = unsafe { MESH_PEER_ADDR.get(SockKey { local, remote }) }.copied() {
        return Some(client);
    }
    // SAFETY: helper available to cgroup/sock_addr programs; the context pointer is valid.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if remote != SockAddr::outbound_listener(remote.family) {
        // A kernel-direct connection shows what it asked for, as a captured one does.
        return direct::orig_dst(cookie);
    }
    // SAFETY: plain data copied out at once.
    unsafe { MESH_ORIG_DST.get(cookie) }.copied()
}

/// Increments the calling task's cgroup counter and returns the cgroup id.
fn count(family: Family) -> Result<u64, Error> {
    // SAFETY: helper without preconditions, available to cgroup sock_addr programs.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    if MESH_CGROUP_COUNTERS.get_ptr_mut(cgroup).is_none() {
        // BPF_NOEXIST: if another CPU inserted first, keep its entry and count on ours below.
        let _ = MESH_CGROUP_COUNTERS.insert(cgroup, CgroupCounters::default(), 1);
    }
    let counters = MESH_CGROUP_COUNTERS
        .get_ptr_mut(cgroup)
        .ok_or(Error::CounterMapFull)?;
    // SAFETY: per-CPU value of this CPU; programs do not migrate between CPUs while running.
    let counters = unsafe { &mut *counters };
    match family {
        Family::V4 => counters.connect4 += 1,
        Family::V6 => counters.connect6 += 1,
    }
    Ok(cgroup)
}
