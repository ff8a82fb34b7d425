//! HBONE between nodes: the client side (a pool of mutual-TLS HTTP/2 connections, opened from
//! inside the source pod toward port 15008 of the destination pod) and the server side (port
//! 15008 in each meshed pod: TLS with the pod's own identity, then one CONNECT stream per
//! tunnelled connection, relayed to the application from inside the pod).
//!
//! Identities: the client presents the source pod's certificate and accepts only a server that
//! proves the destination workload's identity; the server accepts any client of its trust
//! domain and learns the source identity from the client's certificate.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use mesh_hbone::{Connect, InboundRequest, Pool, Responder};
use mesh_identity::{CertManager, CryptoProvider, Identity};
use mesh_trace::{TraceContext, TRACEPARENT};
use rustls::pki_types::ServerName;
use tokio::{net::TcpStream, sync::watch};
use tokio_rustls::{client::TlsStream, TlsAcceptor, TlsConnector};
use tracing::{debug, warn};

use super::{
    authorize, dial_app, dial_from,
    read_ahead::ReadAhead,
    relay::{relay_inbound_tunnel, relay_tunnel, Conn, Relay, TunnelIn, TunnelOut},
    tunnel_copy::ClientFirst,
    ConnTask, LocalPod, LocalPods, ProxyCtx,
};
use crate::telemetry::{ConnInfo, Direction, Refusal, Security};
use mesh_cluster::Service;

/// How long a connection waits for the first certificate of a brand-new workload.
const CERT_WAIT: Duration = Duration::from_secs(10);
/// How long a peer may take to finish the TLS handshake on port 15008.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long opening a tunnel (connection, handshakes, CONNECT and its answer) may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// What HBONE connections are pooled by: streams share a connection only when they have the
/// same source pod (address and network namespace), source identity, destination identity and
/// destination.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HboneKey {
    /// Address of the source pod: the connection is opened from inside it.
    pub src_ip: IpAddr,
    /// Cookie of the source pod's network namespace. Addresses are reused: a new pod with a
    /// gone pod's address and service account must not get the gone pod's connections, which
    /// live in its (dead) namespace, so the pod incarnation is part of the key.
    pub src_netns: u64,
    pub src: Identity,
    pub dst: Identity,
    /// The destination pod's address and port 15008.
    pub dst_addr: SocketAddr,
}

/// Opens pooled connections: TCP from inside the source pod, then mutual TLS.
pub struct HboneConnector {
    local: watch::Receiver<Arc<LocalPods>>,
    certs: Arc<CertManager>,
    provider: CryptoProvider,
}

impl std::fmt::Debug for HboneConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneConnector")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl HboneConnector {
    pub fn new(
        local: watch::Receiver<Arc<LocalPods>>,
        certs: Arc<CertManager>,
        provider: CryptoProvider,
    ) -> Self {
        Self {
            local,
            certs,
            provider,
        }
    }
}

impl Connect for HboneConnector {
    type Io = TlsStream<ReadAhead<TcpStream>>;
    type Key = HboneKey;

    async fn connect(&self, key: &HboneKey) -> io::Result<Self::Io> {
        let pod = self.local.borrow().get(&key.src_ip).cloned();
        let pod = pod
            .filter(|pod| pod.netns_cookie == key.src_netns)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "source pod {} (network namespace {}) is not served by this agent",
                        key.src_ip, key.src_netns
                    ),
                )
            })?;
        self.certs
            .wait_for(&key.src, CERT_WAIT)
            .await
            .map_err(io::Error::other)?;
        let config = mesh_identity::client_config(
            self.provider,
            self.certs.subscribe(),
            key.src.clone(),
            key.dst.clone(),
        )
        .map_err(io::Error::other)?;
        let tcp = dial_from(&pod.netns, key.dst_addr)
            .await
            .map_err(io::Error::other)?;
        // No SNI is sent; the server is authenticated by its SPIFFE id, not by this name.
        let name = ServerName::try_from("hbone.mesh.invalid").map_err(io::Error::other)?;
        TlsConnector::from(config)
            .connect(name, ReadAhead::new(tcp))
            .await
    }
}

/// The client pool every outbound tunnel goes through.
pub type HbonePool = Pool<HboneConnector>;

/// Opens a tunnel for `down` (a captured connection from `pod`) to port 15008 of `conn`'s
/// upstream, which must prove identity `dst` (a meshed workload on another node, or a waypoint's
/// pod), asking for `authority` (the endpoint itself, or for a waypoint the original
/// destination); returns the relay to run.
pub(super) async fn outbound(
    down: TcpStream,
    pod: &Arc<LocalPod>,
    ctx: &ProxyCtx,
    dst: Identity,
    authority: SocketAddr,
    mut conn: Conn,
) -> Option<Relay<TunnelOut>> {
    let info = &mut conn.info;
    let key = HboneKey {
        src_ip: info.src.ip(),
        src_netns: pod.netns_cookie,
        src: pod.identity.clone(),
        dst: dst.clone(),
        dst_addr: SocketAddr::new(info.upstream.ip(), HBONE_PORT),
    };
    info.security = Security::MutualTls { peer: dst };
    // The connection's span starts a trace; the waypoint or the destination's agent continues
    // it from the CONNECT's `traceparent`.
    let trace = TraceContext::root(ctx.telemetry.tracer.sampler());
    info.set_trace(trace, None, &ctx.telemetry.tracer);
    let mut request = mesh_hbone::OutboundRequest::new(authority)
        .with_forwarded_for(info.src)
        .with_baggage(baggage(pod, info.service.as_deref()))
        .with_header(TRACEPARENT, trace.header_value());
    if let Some(service) = info.service.as_deref() {
        request = request.with_forwarded_host(service.hostname.clone());
    }
    // The client's first bytes go right behind the request (`mesh_hbone::EarlyData`).
    let mut first = ClientFirst::default();
    let mut reader = first.reader(&down);
    let open = ctx.transport.pool.open_early(&key, request, &mut reader);
    let opened = tokio::time::timeout(OPEN_TIMEOUT, open).await;
    match opened.unwrap_or(Err(mesh_hbone::HboneError::ConnectTimeout(OPEN_TIMEOUT))) {
        Ok((stream, early)) => Some(relay_tunnel(
            down,
            stream,
            ClientFirst {
                sent: early as u64,
                ..first
            },
            conn,
            ctx.transport.idle.as_ref(),
        )),
        Err(e) => {
            warn!(
                pod = %pod.name, src = %info.src, dst = %info.dst, upstream = %info.upstream,
                peer = %key.dst, error = %e, "could not open the HBONE tunnel"
            );
            // 401: the destination's agent denied it by policy.
            let refusal = match e {
                mesh_hbone::HboneError::Status(http::StatusCode::UNAUTHORIZED) => {
                    Refusal::PeerDenied(e.to_string())
                }
                e => Refusal::Connect(e.to_string()),
            };
            ctx.telemetry.refused(info, conn.started, &refusal);
            None
        }
    }
}

/// `baggage` of an outbound tunnel, as ztunnel sends it.
fn baggage(pod: &LocalPod, service: Option<&Service>) -> String {
    let (namespace, name) = pod.name.split_once('/').unwrap_or(("", &pod.name));
    let mut b = format!("k8s.namespace.name={namespace},k8s.pod.name={name}");
    if let Some(service) = service {
        b.push_str(",service.name=");
        b.push_str(&service.name);
    }
    b
}

/// Serves one TCP connection accepted on port 15008 of `pod`: TLS as the pod's identity, then
/// HTTP/2 CONNECT streams until the peer goes away. Garbage, a failed handshake or a peer that
/// never finishes it ends this connection only.
pub(super) async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    pod: Arc<LocalPod>,
    ctx: Arc<ProxyCtx>,
) {
    let config = match mesh_identity::server_config(
        ctx.transport.provider,
        ctx.transport.certs.subscribe(),
        pod.identity.clone(),
    ) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "no TLS configuration for the pod's identity; closing");
            return;
        }
    };
    if let Err(e) = ctx.transport.certs.wait_for(&pod.identity, CERT_WAIT).await {
        warn!(error = %e, "no certificate for the pod's identity; closing");
        return;
    }
    let accept = TlsAcceptor::from(config).accept(ReadAhead::new(tcp));
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            warn!(error = %e, "TLS handshake on the HBONE port failed");
            return;
        }
        Err(_) => {
            warn!(
                timeout_s = TLS_HANDSHAKE_TIMEOUT.as_secs(),
                "TLS handshake on the HBONE port timed out"
            );
            return;
        }
    };
    let Some(src) = mesh_identity::peer_identity(tls.get_ref().1) else {
        // The verifier requires a SPIFFE id, so this cannot happen with a verified peer.
        warn!("HBONE peer without a SPIFFE identity; closing");
        return;
    };
    debug!(%src, "HBONE connection established");
    // Each stream's task, as for a captured connection: the setup boxed and freed once the
    // relay runs, so an open tunnel holds its relay and nothing of its request.
    let handler = {
        let (pod, ctx, src) = (Arc::clone(&pod), Arc::clone(&ctx), src.clone());
        move |request: InboundRequest, responder: Responder| {
            let (pod, ctx, src) = (Arc::clone(&pod), Arc::clone(&ctx), src.clone());
            // One span per tunnelled connection, at `debug` as for captured ones (see
            // `accept_loop`); its parent is the HBONE connection's.
            let span =
                tracing::debug_span!("conn", direction = Direction::Inbound.as_str(), src = %peer);
            let setup = tunnel(request, responder, peer, pod, ctx, src);
            tracing::Instrument::instrument(ConnTask::Setup(Box::pin(setup)), span)
        }
    };
    if let Err(e) = mesh_hbone::serve_connection(tls, &ctx.transport.server, handler).await {
        debug!(%src, error = %e, "HBONE connection ended");
    }
}

/// One CONNECT stream: checks the target, dials the application from inside the pod, answers
/// 200 and returns the relay to run; 400 for a target that is not this pod's, 503 when it
/// cannot be reached.
async fn tunnel(
    request: InboundRequest,
    responder: Responder,
    peer: SocketAddr,
    pod: Arc<LocalPod>,
    ctx: Arc<ProxyCtx>,
    src: Identity,
) -> Option<Relay<TunnelIn>> {
    let started = Instant::now();
    // The tunnel's span: the child of the CONNECT's context (the source agent's connection, or
    // the waypoint's request), else a new trace.
    let parent = TraceContext::from_headers(&request.headers);
    let trace = TraceContext::child_or_root(parent.as_ref(), ctx.telemetry.tracer.sampler());
    // What the tunnel needs of its request; the headers are dropped here.
    let InboundRequest {
        authority: target,
        forwarded_for,
        forwarded_host,
        ..
    } = request;
    let reserved = [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT].contains(&target.port());
    if !pod.ips.contains(&target.ip()) || reserved {
        warn!(pod = %pod.name, %peer, %src, %target, "HBONE request for a target that is not this pod's application");
        let _ = responder.reject(http::StatusCode::BAD_REQUEST);
        return None;
    }
    // The original client, as the source agent saw it; believed only for the address the
    // tunnel comes from (the source pod's).
    let client = forwarded_for
        .filter(|f| f.ip().to_canonical() == peer.ip().to_canonical())
        .unwrap_or(peer);
    let mut info = ConnInfo::new(Direction::Inbound, &pod, client, target, target);
    info.security = Security::MutualTls { peer: src.clone() };
    info.set_trace(trace, parent.map(|p| p.span_id), &ctx.telemetry.tracer);
    info.src_workload = ctx.resolver.workload(client.ip());
    info.dst_workload = ctx.resolver.workload(target.ip());
    info.service = forwarded_host
        .as_deref()
        .and_then(|host| ctx.resolver.service_of(host, target.ip()));
    // Authorized before anything is dialled; 401 as ztunnel answers a denied tunnel.
    let Some(tracked) = authorize(&ctx, &mut info, started) else {
        let _ = responder.reject(http::StatusCode::UNAUTHORIZED);
        return None;
    };
    let (app, peer_guard) = match dial_app(&pod, target, client, &ctx.conn).await {
        Ok(leg) => leg,
        Err(e) => {
            warn!(pod = %pod.name, %peer, %src, %target, error = %e, "could not reach the application");
            let _ = responder.reject(http::StatusCode::SERVICE_UNAVAILABLE);
            ctx.telemetry
                .refused(&info, started, &Refusal::Connect(e.to_string()));
            return None;
        }
    };
    let stream = match responder.accept() {
        Ok(s) => s,
        Err(e) => {
            warn!(pod = %pod.name, %peer, %src, %target, error = %e, "could not answer the HBONE request");
            return None;
        }
    };
    let conn = Conn {
        info,
        started,
        telemetry: Arc::clone(&ctx.telemetry),
        tracked: Some(tracked),
    };
    Some(relay_inbound_tunnel(stream, app, conn, ctx.transport.idle.as_ref()).holding(peer_guard))
}
