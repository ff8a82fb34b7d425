//! Port 15006 in each meshed pod: connections for the pod from anywhere else (other pods,
//! other nodes, unmeshed clients), steered here by `sk_lookup`. The accepted socket's local
//! address is the original destination; the agent connects to it from inside the pod, and the
//! application sees the original client as its peer.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use mesh_common::{INBOUND_PORT, OUTBOUND_PORT};
use tokio::net::TcpStream;
use tracing::warn;

use super::{
    authorize, dial_app,
    relay::{relay, Conn, Relay},
    LocalPod, ProxyCtx,
};
use crate::telemetry::{ConnInfo, Direction, Refusal};

pub(super) async fn handle(
    down: TcpStream,
    peer: SocketAddr,
    pod: Arc<LocalPod>,
    ctx: Arc<ProxyCtx>,
) -> Option<Relay> {
    let started = Instant::now();
    let dst = match down.local_addr() {
        Ok(a) => SocketAddr::new(a.ip().to_canonical(), a.port()),
        Err(e) => {
            warn!(pod = %pod.name, src = %peer, error = %e, "inbound connection without a local address");
            return None;
        }
    };
    if [OUTBOUND_PORT, INBOUND_PORT].contains(&dst.port()) {
        warn!(pod = %pod.name, src = %peer, %dst, "connection to the agent's own port; closing it");
        return None;
    }
    let mut info = ConnInfo::new(Direction::Inbound, &pod, peer, dst, dst);
    info.src_workload = ctx.resolver.workload(peer.ip());
    info.dst_workload = ctx.resolver.workload(dst.ip());
    let tracked = authorize(&ctx, &mut info, started)?;
    match dial_app(&pod, dst, peer, &ctx.conn).await {
        Ok((up, peer_guard)) => {
            let conn = Conn {
                info,
                started,
                telemetry: Arc::clone(&ctx.telemetry),
                tracked: Some(tracked),
            };
            Some(relay(down, up, conn).holding(peer_guard))
        }
        Err(e) => {
            warn!(pod = %pod.name, src = %peer, %dst, error = %e, "could not reach the application");
            ctx.telemetry
                .refused(&info, started, &Refusal::Connect(e.to_string()));
            None
        }
    }
}
