//! Port 15006 in each meshed pod: connections for the pod from anywhere else (other pods,
//! other nodes, unmeshed clients), steered here by `sk_lookup`. The accepted socket's local
//! address is the original destination; the agent connects to it from inside the pod, and the
//! application sees the original client as its peer.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use mesh_common::{INBOUND_PORT, OUTBOUND_PORT};
use tokio::net::TcpStream;
use tracing::warn;

use super::{
    dial_app,
    relay::{relay, ConnInfo, Relay, Security},
    LocalPod, ProxyCtx,
};

pub(super) async fn handle(
    down: TcpStream,
    peer: SocketAddr,
    pod: Arc<LocalPod>,
    ctx: Arc<ProxyCtx>,
) -> Option<Relay> {
    let started = Instant::now();
    down.set_nodelay(true).ok();
    let dst = match down.local_addr() {
        Ok(a) => SocketAddr::new(a.ip().to_canonical(), a.port()),
        Err(e) => {
            warn!(error = %e, "inbound connection without a local address");
            return None;
        }
    };
    if [OUTBOUND_PORT, INBOUND_PORT].contains(&dst.port()) {
        warn!(%dst, "connection to the agent's own port; closing it");
        return None;
    }
    if let Err(reason) = ctx.resolver.accepts_plaintext(dst) {
        warn!(%dst, reason, "plaintext connection refused");
        return None;
    }
    let info = ConnInfo {
        direction: "inbound",
        pod: Arc::clone(&pod),
        src: peer,
        dst,
        upstream: dst,
        service: None,
        security: Security::None,
    };
    match dial_app(&pod, dst, peer, &ctx.conn).await {
        Ok((up, peer_guard)) => Some(relay(down, up, info, started).holding(peer_guard)),
        Err(e) => {
            warn!(%dst, error = %e, "could not reach the application");
            None
        }
    }
}
