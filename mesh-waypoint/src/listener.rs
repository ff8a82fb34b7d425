//! Port 15008 of the waypoint's pod: TLS as the waypoint (any client of the trust domain, whose
//! identity its certificate gives), HBONE, and HTTP on each tunnel.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use mesh_cluster::ClusterState;
use mesh_hbone::{InboundRequest, Responder};
use mesh_identity::{CertManager, Identity};
use mesh_trace::{TraceContext, Tracer};
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use mesh_cluster::AppProtocol;

use crate::{
    admin::{self, Admin},
    context::{Ctx, WaypointConfig, WaypointError},
    drain::Drain,
    protocol::{sniff, Prefixed, Sniffed},
    request::{handle, Source, Target},
    telemetry::Reporters,
    tunnel::pass_through,
    upstream::Upstream,
};

/// How long a client has to send a request's head (HTTP/1.1), from when the connection waits
/// for one: nginx's `client_header_timeout`.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The most an HTTP/1.1 request head may take (its line and headers); a larger one gets 431.
/// Envoy's default limit is 60 KiB (`max_request_headers_kb`); hyper's own 400 KiB.
pub(crate) const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// How long the waypoint waits for its first certificate before it says so.
const CERT_WAIT: Duration = Duration::from_secs(60);

/// Aborts a task when dropped (the admin endpoints end with the waypoint).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long a peer may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HBONE on `config.listen` until `shutdown` completes, routing by the newest view of
/// `state`, with certificates from `certs` (which must want `config.identity`), a span per
/// request to `tracer` (flushed once drained).
pub async fn serve(
    config: WaypointConfig,
    state: watch::Receiver<Arc<ClusterState>>,
    certs: Arc<CertManager>,
    tracer: Tracer,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WaypointError> {
    let tls =
        mesh_identity::server_config(config.provider, certs.subscribe(), config.identity.clone())
            .map_err(|source| WaypointError::Tls {
            identity: config.identity.clone(),
            source,
        })?;
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| WaypointError::Listen {
                addr: config.listen,
                source,
            })?;
    info!(
        waypoint = %format_args!("{}/{}", config.namespace, config.name),
        identity = %config.identity,
        listen = %config.listen,
        "waypoint serving HBONE"
    );
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    let access_log = mesh_trace::AccessLog::start(&config.access_log)?;
    let ready = Arc::new(AtomicBool::new(false));
    let admin_ready = Arc::clone(&ready);
    let admin = Admin {
        metrics: Arc::clone(&metrics),
        ready: Arc::clone(&ready),
    };
    let _metrics_task = AbortOnDrop(admin::listen(config.metrics, admin.clone()).await?);
    let _readiness_task = AbortOnDrop(admin::listen(config.readiness, admin).await?);
    let _ready_task = AbortOnDrop(tokio::spawn({
        let (certs, identity) = (Arc::clone(&certs), config.identity.clone());
        async move {
            match certs.wait_for(&identity, CERT_WAIT).await {
                Ok(_) => {
                    ready.store(true, Ordering::Relaxed);
                    info!("waypoint ready");
                }
                Err(e) => warn!(error = %e, "no certificate for the waypoint's identity"),
            }
        }
    }));
    let upstream = Arc::new(Upstream::new(
        certs,
        config.provider,
        config.identity.clone(),
    ));
    // Kept connections to endpoints no request uses any more are let go on a timer.
    let _sweeper = AbortOnDrop(upstream.sweep_on_a_timer());
    let (drain_delay, drain_timeout) = (config.drain_delay, config.drain_timeout);
    let ctx = Arc::new(Ctx {
        jwks: Arc::new(crate::jwks::JwksCache::default()),
        verified_tokens: mesh_cluster::authn::VerifiedTokens::default(),
        buckets: crate::ratelimit::Buckets::default(),
        breakers: crate::breaker::Breakers::default(),
        dns: Arc::new(crate::dns::Dns::new(&config.dns_servers)),
        mirrors: Arc::new(tokio::sync::Semaphore::new(
            config.max_mirrors_in_flight as usize,
        )),
        config,
        state,
        upstream,
        hbone: mesh_hbone::ServerConfig::default(),
        reporters: Arc::new(Reporters {
            metrics,
            tracer,
            access_log,
            log_budget: Arc::default(),
        }),
        drain: Drain::default(),
        balancer: Arc::default(),
    });
    let _background = background(&ctx);
    let acceptor = TlsAcceptor::from(tls);
    let drain = (drain_delay, drain_timeout);
    accept_until_drained((listener, acceptor), &ctx, (shutdown, &admin_ready), drain).await;
    Ok(())
}

/// Takes HBONE connections until `shutdown`; then, not ready, for `drain_delay` more, the time
/// the clients' agents take to learn that this pod is going; then drains (within
/// `drain_timeout`).
async fn accept_until_drained(
    (listener, acceptor): (TcpListener, TlsAcceptor),
    ctx: &Arc<Ctx>,
    (shutdown, ready): (impl Future<Output = ()>, &AtomicBool),
    (drain_delay, drain_timeout): (Duration, Duration),
) {
    tokio::pin!(shutdown);
    // Set at shutdown: until then the waypoint serves on, not ready.
    let mut drain_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = &mut shutdown, if drain_at.is_none() => {
                ready.store(false, Ordering::Relaxed);
                info!(
                    delay_s = drain_delay.as_secs_f64(),
                    "shutting down: not ready, serving on while the clients' agents learn it, then draining"
                );
                drain_at = Some(tokio::time::Instant::now() + drain_delay);
            }
            () = tokio::time::sleep_until(drain_at.unwrap_or_else(tokio::time::Instant::now)),
                if drain_at.is_some() =>
            {
                drop(listener);
                shut_down(ctx, drain_timeout).await;
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let span = tracing::debug_span!("hbone", %peer);
                    let task = connection(tcp, peer, acceptor.clone(), Arc::clone(ctx));
                    tokio::spawn(task.instrument(span));
                }
                Err(e) => {
                    // Out of descriptors or memory: wait instead of spinning.
                    warn!(error = %e, "accept on the HBONE port failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// The tasks that keep the waypoint's state current while it serves: the JWT keys its
/// `RequestAuthentication`s name fetched, what is gone let go (connections kept under changed
/// `connectionPool` settings at each new view), and the held-back warnings counted.
fn background(ctx: &Arc<Ctx>) -> [AbortOnDrop; 4] {
    let jwks = tokio::spawn(crate::jwks::keep_fetched(
        Arc::clone(&ctx.jwks),
        (ctx.config.namespace.clone(), ctx.config.name.clone()),
        ctx.state.clone(),
    ));
    let forget = tokio::spawn(forget_gone(Arc::clone(ctx)));
    let held = tokio::spawn(Arc::clone(&ctx.reporters.log_budget).report_held(HELD_REPORT_EVERY));
    let retire = tokio::spawn(retire_changed_settings(Arc::clone(ctx)));
    [
        AbortOnDrop(jwks),
        AbortOnDrop(forget),
        AbortOnDrop(held),
        AbortOnDrop(retire),
    ]
}

/// At each new view, lets go of the connections kept under `connectionPool` settings it no
/// longer gives (a `DestinationRule` changed).
async fn retire_changed_settings(ctx: Arc<Ctx>) {
    let mut state = ctx.state.clone();
    while state.changed().await.is_ok() {
        let view = Arc::clone(&state.borrow_and_update());
        ctx.upstream.retire_changed_settings(&view);
    }
}

/// How often the warnings held back by the log budget are counted in a line, when no later
/// warning has said so.
const HELD_REPORT_EVERY: Duration = Duration::from_secs(10);

/// How often the balancers and breakers let go of backends, endpoints and destinations that
/// are gone or idle.
const FORGET_EVERY: Duration = Duration::from_secs(30);

/// Keeps what the balancers and breakers remember to what the newest view has and what is in
/// use, for as long as the waypoint runs.
async fn forget_gone(ctx: Arc<Ctx>) {
    let mut every = tokio::time::interval(FORGET_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let state = Arc::clone(&ctx.state.borrow());
        ctx.balancer.forget_gone(&state, std::time::Instant::now());
        ctx.breakers.forget_idle();
    }
}

/// Lets the requests in flight finish (within `drain_timeout`), then sends the last spans and
/// access log lines out (both block, so not on a runtime worker).
async fn shut_down(ctx: &Ctx, drain_timeout: Duration) {
    ctx.drain.run(drain_timeout).await;
    let reporters = Arc::clone(&ctx.reporters);
    let _ = tokio::task::spawn_blocking(move || {
        reporters.tracer.shutdown();
        reporters.access_log.close();
    })
    .await;
}

/// One HBONE connection: TLS, then a task per CONNECT stream.
async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    ctx: Arc<Ctx>,
) {
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            if ctx.reporters.log_budget.may_warn(peer.ip()) {
                warn!(%peer, error = %e, "TLS handshake on the HBONE port failed");
            }
            return;
        }
        Err(_) => {
            if ctx.reporters.log_budget.may_warn(peer.ip()) {
                warn!(%peer, "TLS handshake on the HBONE port timed out");
            }
            return;
        }
    };
    // The waypoint's own address on this connection: which of its pods it is, and so where it
    // runs (a Service's `trafficDistribution` prefers the endpoints closest to it).
    let local = tls
        .get_ref()
        .0
        .local_addr()
        .ok()
        .map(|a| a.ip().to_canonical());
    let Some(src) = mesh_identity::peer_identity(tls.get_ref().1) else {
        if ctx.reporters.log_budget.may_warn(peer.ip()) {
            warn!(%peer, "HBONE peer without a SPIFFE identity; closing");
        }
        return;
    };
    debug!(%src, "HBONE connection established");
    let handler = {
        let ctx = Arc::clone(&ctx);
        move |request: InboundRequest, responder: Responder| {
            let addrs = (peer, local);
            tunnel(request, responder, addrs, src.clone(), Arc::clone(&ctx)).in_current_span()
        }
    };
    if let Err(e) = mesh_hbone::serve_connection(tls, &ctx.hbone, handler).await {
        debug!(error = %e, "HBONE connection ended");
    }
}

/// One CONNECT stream: checks that its authority is for this waypoint, answers 200 and serves
/// HTTP/1.1 or HTTP/2 on it; 400 for an authority that is not.
async fn tunnel(
    request: InboundRequest,
    responder: Responder,
    (peer, local): (SocketAddr, Option<std::net::IpAddr>),
    src: Identity,
    ctx: Arc<Ctx>,
) {
    let (target, own) = {
        let state = ctx.state.borrow();
        let ours = (ctx.config.namespace.as_str(), ctx.config.name.as_str());
        let own = local.and_then(|ip| state.workload_by_ip(ip)).cloned();
        (
            Target::of(&state, ours, (src.namespace(), request.authority)),
            own,
        )
    };
    let target = match target {
        Ok(target) => target,
        Err(why) => {
            let client = request.forwarded_for.unwrap_or(peer);
            if ctx.reporters.log_budget.may_warn(client.ip()) {
                warn!(%src, %client, authority = %request.authority, %why, "HBONE request refused");
            }
            let _ = responder.reject(http::StatusCode::BAD_REQUEST);
            return;
        }
    };
    // The client's address as its agent gives it (authenticated as the source's identity).
    let source = Source {
        identity: src,
        addr: request.forwarded_for.unwrap_or(peer),
        trace: TraceContext::from_headers(&request.headers),
        buckets: Arc::default(),
        own,
        dialled: target.dialled().ip(),
    };
    let stream = match responder.accept() {
        Ok(stream) => stream,
        Err(e) => {
            debug!(error = %e, "could not answer the HBONE request");
            return;
        }
    };
    // HTTP when the port says so; TCP when it says something else; otherwise sniffed.
    let protocol = match &target {
        Target::Service { protocol, .. } => *protocol,
        Target::Workload { .. } => AppProtocol::Unknown,
    };
    let mut stream = stream;
    let (sniffed, first) = match protocol {
        p if p.is_http() => (Sniffed::Http, Vec::new()),
        AppProtocol::Opaque => (Sniffed::Tcp, Vec::new()),
        _ => match sniff(&mut stream).await {
            Ok(found) => found,
            Err(e) => {
                debug!(error = %e, "tunnel closed while sniffing");
                return;
            }
        },
    };
    let io = Prefixed::new(first, stream);
    if sniffed == Sniffed::Tcp {
        pass_through(&ctx, &target, &source, io).await;
        return;
    }
    // Watched for the drain: at shutdown, the connection finishes its requests and closes.
    let Some(watcher) = ctx.drain.watcher() else {
        debug!("draining: HTTP on a new tunnel refused");
        return;
    };
    let service = hyper::service::service_fn({
        let ctx = Arc::clone(&ctx);
        move |request| handle(request, Arc::clone(&ctx), target.clone(), source.clone())
    });
    let connection = http_server()
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .into_owned();
    let served = watcher.watch(connection).await;
    if let Err(e) = served {
        debug!(error = %e, "HTTP on the tunnel ended");
    }
}

/// How the waypoint serves HTTP on a tunnel: HTTP/1.1 or HTTP/2 (by the preface). A request
/// head must come whole within [`HEADER_READ_TIMEOUT`] and fit [`MAX_REQUEST_HEAD`]: a client
/// that sends a head slowly, or never ends it, holds the tunnel and its buffer that long, no
/// longer (hyper's header timeout needs a timer, without which it is silently off). The timeout
/// also ends a kept-alive connection idle that long, as servers do.
fn http_server() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_REQUEST_HEAD);
    builder
}

#[cfg(test)]
mod tests;
