//! Port 15001 in each meshed pod: connections the pod's applications made, redirected by the
//! connect hooks. Each is resolved (service VIP to endpoint, pod IP to pod, anything else as
//! it was) and connected: to a meshed pod of this node from inside that pod, otherwise from
//! inside the source pod.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use mesh_common::{NsSockKey, SockAddr, SockKey, INBOUND_PORT, OUTBOUND_PORT};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    authorize, dial_app, dial_from, direct, hbone,
    relay::{relay, Conn, Relay},
    LocalPod, ProxyCtx, Route, WaypointRoute,
};
use crate::telemetry::{ConnInfo, Direction, Refusal, Security};

/// Sets a captured connection up; returns the relay this task runs next, or `None` when nothing
/// is left for it: refused, failed, or a tunnel whose relay runs in a task of its own.
pub(super) async fn handle(
    down: TcpStream,
    peer: SocketAddr,
    pod: Arc<LocalPod>,
    ctx: Arc<ProxyCtx>,
) -> Option<Relay> {
    let started = Instant::now();
    // The application's socket: from its address to the outbound listener, in its namespace.
    let app = NsSockKey {
        netns: pod.netns_cookie,
        sock: SockKey {
            local: SockAddr::from(peer),
            remote: SockAddr::outbound_listener(SockAddr::from(peer).family),
        },
    };
    let Some(dst) = ctx.conn.take_orig_dst(app) else {
        // Not captured by the kernel (someone dialled the listener directly): nothing to do.
        warn!(pod = %pod.name, %peer, "no original destination recorded for this connection; closing it");
        return None;
    };
    let peer = client_addr(peer, dst, &pod)?;
    let src_workload = source_workload(&ctx, &pod, peer);
    let (upstream, service, workload, identity) =
        match ctx.resolver.route(src_workload.as_deref(), dst) {
            Route::To {
                addr,
                service,
                workload,
                identity,
            } => (addr, service, workload, identity),
            Route::Waypoint(via) => {
                to_waypoint(
                    down,
                    &app,
                    &pod,
                    &ctx,
                    via,
                    (peer, dst, src_workload),
                    started,
                )
                .await;
                return None;
            }
            Route::Refuse(reason) => {
                warn!(pod = %pod.name, src = %peer, %dst, reason, "connection refused");
                return None;
            }
        };
    let local = ctx.local.borrow().get(&upstream.ip()).cloned();
    let mut info = ConnInfo::new(Direction::Outbound, &pod, peer, dst, upstream);
    info.service = service;
    info.dst_workload = workload;
    info.src_workload = src_workload;
    let conn = |info, tracked| Conn {
        info,
        started,
        telemetry: Arc::clone(&ctx.telemetry),
        tracked,
    };
    match (local, identity) {
        // Same node: straight into the destination pod, over its own address. No TLS: the
        // agent itself knows both pods' identities. This agent is also the destination's, so
        // it authorizes the connection before dialling anything: a refused connection never
        // reaches the destination, through the kernel short-cut or otherwise.
        (Some(target), _) => {
            info.security = Security::SameNode {
                peer: target.identity.clone(),
            };
            let tracked = authorize(&ctx, &mut info, started)?;
            match dial_app(&target, upstream, peer, &ctx.conn).await {
                Ok((up, peer_guard)) => {
                    debug!(%upstream, target = %target.name, "same-node connection");
                    direct::offer_route(&ctx, &pod, info.src_workload.as_deref(), peer, dst);
                    let server = NsSockKey {
                        netns: target.netns_cookie,
                        sock: peer_guard.app_view(),
                    };
                    let relay = relay(down, up, conn(info, Some(tracked))).holding(peer_guard);
                    Some(pair_direct(relay, app, &pod, server, &target, &ctx))
                }
                Err(e) => {
                    warn!(pod = %pod.name, src = %peer, %dst, %upstream, error = %e, "could not reach the destination");
                    ctx.telemetry
                        .refused(&info, started, &Refusal::Connect(e.to_string()));
                    None
                }
            }
        }
        // A meshed workload on another node: HBONE.
        (None, Some(identity)) => {
            leave_shortcut(&app, &pod, &ctx);
            let tunnel =
                hbone::outbound(down, &pod, &ctx, identity, upstream, conn(info, None)).await?;
            // The tunnel's relay goes on in a task of its own size (see `TunnelOut`); this
            // one, sized for a relay between two sockets, ends here.
            tokio::spawn(tracing::Instrument::in_current_span(tunnel));
            None
        }
        // Outside the mesh: plain TCP from inside the source pod.
        (None, None) => {
            leave_shortcut(&app, &pod, &ctx);
            match dial_from(&pod.netns, upstream).await {
                Ok(up) => Some(relay(down, up, conn(info, None))),
                Err(e) => {
                    warn!(pod = %pod.name, src = %peer, %dst, %upstream, error = %e, "could not reach the destination");
                    ctx.telemetry
                        .refused(&info, started, &Refusal::Connect(e.to_string()));
                    None
                }
            }
        }
    }
}

/// The client as the rest of the mesh sees it (policy, telemetry, the server's view): the pod's
/// address. A socket the application bound to a wildcard or loopback address before connecting
/// reaches the loopback listener from a loopback address, which every pod has; taken as the
/// source, it would slip past rules on the pod's address. `None` (close it) for a connection to
/// the agent's own ports.
fn client_addr(peer: SocketAddr, dst: SocketAddr, pod: &LocalPod) -> Option<SocketAddr> {
    let peer = if peer.ip().is_loopback() {
        let Some(own) = pod.address_like(peer.ip()) else {
            warn!(pod = %pod.name, %peer, "no pod address of the client's family; closing it");
            return None;
        };
        SocketAddr::new(own, peer.port())
    } else {
        peer
    };
    if dst.ip() == peer.ip() && [OUTBOUND_PORT, INBOUND_PORT].contains(&dst.port()) {
        warn!(pod = %pod.name, src = %peer, %dst, "connection to the agent's own port; closing it");
        return None;
    }
    Some(peer)
}

/// The source workload: this pod. A pod's first connections may come before its address reached
/// the API (it is captured from the runtime's hand-over), so by name when not by address.
fn source_workload(
    ctx: &ProxyCtx,
    pod: &LocalPod,
    peer: SocketAddr,
) -> Option<Arc<mesh_cluster::Workload>> {
    ctx.resolver.workload(peer.ip()).or_else(|| {
        let (namespace, name) = pod.name.split_once('/')?;
        ctx.resolver.workload_named(namespace, name)
    })
}

/// A connection for a destination bound to a waypoint: always HBONE to the waypoint's pod
/// (`info.upstream`), also on this node (the waypoint speaks nothing else), with the original
/// destination (or the endpoint behind the waypoint) as `:authority`. The tunnel's relay runs in a task of its own.
async fn to_waypoint(
    down: TcpStream,
    app: &NsSockKey,
    pod: &Arc<LocalPod>,
    ctx: &Arc<ProxyCtx>,
    via: WaypointRoute,
    (src, dst, src_workload): (SocketAddr, SocketAddr, Option<Arc<mesh_cluster::Workload>>),
    started: Instant,
) {
    leave_shortcut(app, pod, ctx);
    let mut info = ConnInfo::new(Direction::Outbound, pod, src, dst, via.addr);
    info.service = via.service;
    info.dst_workload = Some(via.workload);
    info.src_workload = src_workload;
    let (identity, authority) = (via.identity, via.authority);
    let conn = Conn {
        info,
        started,
        telemetry: Arc::clone(&ctx.telemetry),
        tracked: None,
    };
    if let Some(tunnel) = hbone::outbound(down, pod, ctx, identity, authority, conn).await {
        tokio::spawn(tracing::Instrument::in_current_span(tunnel));
    }
}

/// A same-node connection between two pods in the short-cut: the applications talk straight to
/// each other while they can (see `Relay::paired`). `client` and `server` are the applications'
/// sockets.
fn pair_direct(
    relay: Relay,
    client: NsSockKey,
    client_pod: &LocalPod,
    server: NsSockKey,
    server_pod: &LocalPod,
    ctx: &ProxyCtx,
) -> Relay {
    let both_in =
        ctx.conn.shortcut_available() && client_pod.may_shortcut() && server_pod.may_shortcut();
    match both_in
        .then(|| ctx.conn.pair_direct(client, server))
        .flatten()
    {
        Some(paired) => relay.paired(paired, &ctx.transport.direct_tick),
        None => relay,
    }
}

/// Toward another node the path is slower than the pod-local leg, and only TCP's own window
/// holds a fast sender back: the application's socket `app` leaves the `sk_msg` short-cut before
/// the agent sends it anything (see `ConnMaps::leave_shortcut`). Two map calls, spared when the
/// socket cannot be in the short-cut (off on this node, or the pod never opted in).
fn leave_shortcut(app: &NsSockKey, pod: &LocalPod, ctx: &ProxyCtx) {
    if ctx.conn.shortcut_available() && pod.may_shortcut() {
        ctx.conn.leave_shortcut(app);
    }
}
