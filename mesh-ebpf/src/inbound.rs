//! `sk_lookup`, attached to each meshed pod's network namespace: every TCP connection that
//! arrives for the pod's address from elsewhere is given to the agent's inbound listener, so
//! nothing reaches the application without passing the agent. The HBONE port is the exception:
//! the agent's own HBONE listener is bound to it in the pod, and the normal lookup finds it;
//! so are the kernel-direct connections the agent authorized (`direct`).

use aya_ebpf::{
    bindings::{bpf_sk_lookup, sk_action},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use mesh_common::{SockAddr, SockKey, AF_INET, HBONE_PORT};

use crate::{addr, direct, maps::MESH_LISTENERS};

const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx)
}

fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
    // SAFETY: the kernel passes a valid `bpf_sk_lookup` for the duration of the call.
    let lk: &bpf_sk_lookup = unsafe { &*ctx.lookup };
    if lk.protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    let local_ip6 = addr::ip6_field!(lk.local_ip6);
    let remote_ip6 = addr::ip6_field!(lk.remote_ip6);
    let (Some(local), Some(remote)) = (
        addr::from_parts(
            lk.family,
            lk.local_ip4,
            local_ip6,
            addr::port_host(lk.local_port),
        ),
        addr::from_parts(
            lk.family,
            lk.remote_ip4,
            remote_ip6,
            u16::from_be(lk.remote_port),
        ),
    ) else {
        return sk_action::SK_PASS;
    };
    // Connections from inside the pod take the normal path: from loopback; to the agent's
    // outbound listener (the application's leg to the agent, from the pod's address); or the
    // pod's address to itself (the agent's leg to the application). Only the listener's port is
    // exempt among loopback destinations: should the pod route loopback from outside
    // (`route_localnet`), such a connection still meets the inbound listener's checks.
    let from_inside = if remote.family == AF_INET {
        addr::is_loopback4(remote.ip[0])
    } else {
        addr::is_loopback6(remote.ip)
    };
    if from_inside
        || local == SockAddr::outbound_listener(local.family)
        || remote.ip == local.ip
        || local.port == u32::from(HBONE_PORT)
    {
        return sk_action::SK_PASS;
    }
    // A kernel-direct connection: its client's connect hook had a current route of the agent's
    // for it (the agent authorized exactly this client pod for this endpoint), and `sockops`
    // recorded this exact 4-tuple from the client's own socket as its SYN went out.
    if direct::admitted(SockKey {
        local: remote,
        remote: local,
    }) {
        return sk_action::SK_PASS;
    }
    let key = local.without_port();
    match MESH_LISTENERS.redirect_sk_lookup(ctx, key, 0) {
        Ok(()) => sk_action::SK_PASS,
        // No listener: the agent is not serving this pod right now. Refuse rather than let the
        // connection reach the application unmeshed: on SK_DROP the kernel finds no socket and
        // answers the SYN with a reset, so the client sees "connection refused" at once.
        Err(_) => sk_action::SK_DROP,
    }
}
