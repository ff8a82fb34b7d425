//! The agent's listeners inside each meshed pod's network namespace, and the relay between a
//! captured connection and its upstream.
//!
//! - `outbound` (port 15001 on the pod's loopback addresses): connections the pod's
//!   applications made, redirected by the connect hooks from the pod's own address. The
//!   original destination comes from the kernel.
//! - `inbound` (port 15006): connections for the pod from anywhere else, steered by `sk_lookup`.
//!   The original destination is the accepted socket's local address.
//!
//! Every leg the agent opens is created inside a pod's namespace: toward another node from the
//! source pod's namespace (the packet leaves with the pod's address, like the application's own
//! would), toward an application from inside that application's pod, over its own address.
//! A same-node connection therefore never crosses a veth: both legs are pod-local and the
//! kernel's `sk_msg` short-cut carries them.

mod buffers;
#[cfg(test)]
mod copy_tests;
mod direct;
pub mod hbone;
pub use mesh_hbone::idle;
mod inbound;
mod outbound;
mod read_ahead;
mod relay;
pub mod tracker;
mod tunnel_copy;

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use mesh_common::{SockAddr, SockKey, HBONE_PORT, INBOUND_PORT};
use mesh_identity::{CertManager, CryptoProvider, Identity};

pub use self::buffers::trim_when_idle as trim_copy_buffers;
pub use self::direct::run_events as run_direct_events;
pub use crate::local_pod::{LocalPod, LocalPods};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::JoinHandle,
};

use crate::{
    datapath::ConnMaps,
    netns::{Netns, NetnsError},
    telemetry::{ConnInfo, Direction, Refusal, Telemetry},
};
use mesh_cluster::{AuthzDecision, Service, Verdict, Workload};

use self::tracker::{AuthzSubject, Tracked, Tracker};

/// Backlog of every listener the agent opens in a pod.
const BACKLOG: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{what} {addr}: {source}")]
    Io {
        what: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("registering the peer address of {addr}: {source}")]
    Peer {
        addr: SocketAddr,
        source: crate::datapath::DatapathError,
    },
}

/// Where a captured connection should go.
#[derive(Clone, Debug)]
pub enum Route {
    /// Connect to this address (an endpoint of a service, a pod, or the original destination).
    To {
        addr: SocketAddr,
        /// The service the destination was reached through.
        service: Option<Arc<Service>>,
        /// The destination workload, when the cluster view knows it.
        workload: Option<Arc<Workload>>,
        /// The destination workload's identity when it is meshed (served by an agent): the
        /// connection then goes over HBONE, unless both pods are on this node.
        identity: Option<Identity>,
    },
    /// Through a waypoint.
    Waypoint(WaypointRoute),
    /// Refuse the connection, with the reason for the log.
    Refuse(String),
}

/// A connection through a waypoint: HBONE to the waypoint pod at `addr` (port 15008), which must
/// prove `identity`, with the original destination as `:authority`.
#[derive(Clone, Debug)]
pub struct WaypointRoute {
    pub addr: SocketAddr,
    /// The tunnel's `:authority`: the original destination, or the Service's endpoint chosen
    /// when only that endpoint's pod is behind the waypoint.
    pub authority: SocketAddr,
    /// The service the destination was reached through.
    pub service: Option<Arc<Service>>,
    /// The waypoint's pod.
    pub workload: Arc<Workload>,
    /// The waypoint pod's identity.
    pub identity: Identity,
}

/// Decides where a destination goes and what a pod accepts (the cluster view implements it).
pub trait Resolve: Send + Sync + 'static {
    /// Where a connection from `src` (the source pod, when known) to `dst` goes.
    fn route(&self, src: Option<&Workload>, dst: SocketAddr) -> Route;
    /// The workload that has address `ip`, if the cluster view knows one.
    fn workload(&self, ip: IpAddr) -> Option<Arc<Workload>>;
    /// The workload `namespace/name`, if the cluster view knows it.
    fn workload_named(&self, namespace: &str, name: &str) -> Option<Arc<Workload>>;
    /// The service with hostname `host` (`name.namespace.svc.cluster.local`) of which the
    /// workload at `endpoint_ip` is an endpoint: what a source agent says its client asked for,
    /// believed only when it leads to this endpoint.
    fn service_of(&self, host: &str, endpoint_ip: IpAddr) -> Option<Arc<Service>>;
    /// The destination's decision for a connection (at the destination's agent):
    /// `PeerAuthentication` STRICT refuses plaintext, then `AuthorizationPolicy`.
    fn authorize(&self, subject: &AuthzSubject) -> AuthzDecision;
    /// The endpoints a connection of `client` (a pod of this node, at `client_addr`) to `dst`
    /// may reach kernel-direct (at most `max`), or why not
    /// ([`mesh_cluster::ClusterState::direct_targets`]).
    fn direct_targets(
        &self,
        client: &Workload,
        client_addr: SocketAddr,
        dst: SocketAddr,
        max: usize,
    ) -> Result<Vec<SocketAddr>, mesh_cluster::NotDirect>;
    /// The Service whose VIP and port `dst` is, if any.
    fn service_at(&self, dst: SocketAddr) -> Option<Arc<Service>>;
}

/// Identity and HBONE: certificates, the client pool and the server settings.
pub struct Transport {
    pub certs: Arc<CertManager>,
    pub provider: CryptoProvider,
    pub pool: hbone::HbonePool,
    pub server: mesh_hbone::ServerConfig,
    /// A tunnel that moves no byte either way for the sweep's timeout is closed (`None`:
    /// never).
    pub idle: Option<Arc<idle::IdleSweep>>,
    /// How often a same-node connection sent past the agent adds what the kernel counted to
    /// its metrics ([`DIRECT_COUNT_TICK`]).
    pub direct_tick: Arc<idle::IdleSweep>,
}

/// How often a long same-node connection whose bytes the kernel sends past the agent shows them
/// in its metrics (two map lookups per connection per tick, only for those connections).
pub const DIRECT_COUNT_TICK: std::time::Duration = std::time::Duration::from_secs(5);

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("provider", &self.provider)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// What the proxies share.
pub struct ProxyCtx {
    pub conn: Arc<ConnMaps>,
    pub local: watch::Receiver<Arc<LocalPods>>,
    pub resolver: Arc<dyn Resolve>,
    pub transport: Arc<Transport>,
    pub telemetry: Arc<Telemetry>,
    /// Connections this agent authorized as the destination's, re-checked on policy changes.
    pub tracker: Arc<Tracker>,
    /// The node's own addresses: a plaintext connection from one is the node's
    /// ([`mesh_cluster::Origin::Node`]).
    pub node: Arc<crate::node_addrs::NodeAddrs>,
}

impl std::fmt::Debug for ProxyCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyCtx").finish_non_exhaustive()
    }
}

/// The listeners of one pod; their accept loops stop when this is dropped (the sockets close
/// once the runtime drops the aborted tasks: [`PodListeners::close`] waits for that).
#[derive(Debug)]
pub struct PodListeners {
    tasks: Vec<JoinHandle<()>>,
    /// Inbound listener per pod address, for `sk_lookup` (inserted by the caller).
    pub inbound: Vec<(IpAddr, std::os::fd::OwnedFd)>,
}

impl PodListeners {
    /// Stops the accept loops and returns once their listening sockets are closed, so that the
    /// same addresses can be bound again at once.
    pub async fn close(mut self) {
        self.inbound.clear();
        let tasks = std::mem::take(&mut self.tasks);
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            // Cancelled (or, rarely, finished): either way its future, and so its listener,
            // is dropped when this returns.
            let _ = t.await;
        }
    }
}

impl Drop for PodListeners {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// At the destination's agent: checks `info`'s connection against `AuthorizationPolicy`. An
/// allowed connection is tracked (registered before the decision, so that a policy published
/// meanwhile is applied by the re-check) and its decision kept in `info`; a denied one is
/// recorded as refused and `None` returned (the caller closes it without dialling anything). A
/// plaintext connection from one of the node's own addresses is the node's
/// ([`mesh_cluster::Origin::Node`]: the kubelet's probes, no bypass of a waypoint).
fn authorize(
    ctx: &ProxyCtx,
    info: &mut ConnInfo,
    started: std::time::Instant,
) -> Option<Arc<Tracked>> {
    match check(ctx, info) {
        Ok(tracked) => Some(tracked),
        Err(decision) => {
            ctx.telemetry
                .refused(info, started, &Refusal::Policy(decision));
            None
        }
    }
}

/// [`authorize`] without recording a refusal: the denying decision instead.
fn check(ctx: &ProxyCtx, info: &mut ConnInfo) -> Result<Arc<Tracked>, AuthzDecision> {
    let src_identity = info.identities().0.cloned();
    let origin = if src_identity.is_none() && ctx.node.contains(info.src.ip()) {
        mesh_cluster::Origin::Node
    } else {
        mesh_cluster::Origin::Network
    };
    let subject = AuthzSubject {
        src: info.src,
        src_identity,
        dst: info.upstream,
        origin,
    };
    let tracked = ctx.tracker.track(subject.clone());
    let decision = ctx.resolver.authorize(&subject);
    match decision.verdict {
        Verdict::Allow => {
            info.authz = Some(decision);
            Ok(tracked)
        }
        Verdict::Deny => Err(decision),
    }
}

/// The pod as the proxies see it now: its identity may change in place (each connection takes
/// the current one when it is accepted).
pub type PodView = watch::Receiver<Arc<LocalPod>>;

/// Accepts connections on a pod's listener forever, handling each in a task of its own with one
/// tracing span per connection.
///
/// The span is at `debug` level: an `info` span costs about 460 bytes for as long as the
/// connection lives (the subscriber's slot, its field map and the formatted fields), a fifth of
/// an idle same-node connection's memory (BENCHMARKS.md, "What an idle connection keeps").
/// At the default level it is disabled and costs nothing; the warnings a connection can log
/// carry its pod and addresses themselves.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    view: PodView,
    ctx: Arc<ProxyCtx>,
    direction: Direction,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<LocalPod>, Arc<ProxyCtx>) -> Fut,
    Fut: Future<Output = Option<relay::Relay>> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let pod = Arc::clone(&view.borrow());
                let span = tracing::debug_span!("conn", direction = direction.as_str(), pod = %pod.name, src = %peer);
                let setup = handle(stream, peer, pod, Arc::clone(&ctx));
                let task = ConnTask::Setup(Box::pin(setup));
                tokio::spawn(tracing::Instrument::instrument(task, span));
            }
            Err(e) => {
                let name = view.borrow().name.clone();
                tracing::warn!(pod = %name, direction = direction.as_str(), error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Accepts HBONE connections on a pod's port 15008, each served in a task of its own (which
/// runs one task per tunnelled stream).
async fn hbone_accept_loop(listener: TcpListener, view: PodView, ctx: Arc<ProxyCtx>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let pod = Arc::clone(&view.borrow());
                let span = tracing::info_span!("hbone", pod = %pod.name, peer = %peer);
                let task = hbone::serve(stream, peer, pod, Arc::clone(&ctx));
                tokio::spawn(tracing::Instrument::instrument(task, span));
            }
            Err(e) => {
                let name = view.borrow().name.clone();
                tracing::warn!(pod = %name, error = %e, "accept failed on the HBONE port");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// A connection's task: its setup (resolution, dialling), then its relay.
///
/// A future's size is that of its largest state, for its whole life. The setup is therefore
/// boxed and freed once the connection is up, and the relay replaces it in place: a long-lived
/// connection's task holds only the relay's state (a few hundred bytes), not the dialling's.
/// `R`: the relay, [`relay::Relay`] for a captured connection (two TCP sockets or a tunnel: it is
/// spawned before it knows which), a smaller one for a tunnel this agent accepted.
// The relay is the state a connection lives in; boxing it would cost one more allocation.
#[allow(clippy::large_enum_variant)]
enum ConnTask<S, R = relay::Relay> {
    Setup(Pin<Box<S>>),
    Relay(R),
    Done,
}

impl<S: Future<Output = Option<R>>, R: Future<Output = ()> + Unpin> Future for ConnTask<S, R> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match this {
                ConnTask::Setup(setup) => match ready!(setup.as_mut().poll(cx)) {
                    Some(relay) => *this = ConnTask::Relay(relay),
                    None => *this = ConnTask::Done,
                },
                ConnTask::Relay(relay) => {
                    ready!(Pin::new(relay).poll(cx));
                    *this = ConnTask::Done;
                }
                ConnTask::Done => return Poll::Ready(()),
            }
        }
    }
}

/// Opens the outbound and inbound listeners of the pod `view` shows inside its namespace and
/// starts their accept loops. On an error, the listeners already opened are closed when the
/// partial result is dropped.
pub fn start_pod(view: &PodView, ctx: &Arc<ProxyCtx>) -> Result<PodListeners, ProxyError> {
    let pod = Arc::clone(&view.borrow());
    let mut listeners = PodListeners {
        tasks: Vec::new(),
        inbound: Vec::new(),
    };
    let (tasks, inbound) = (&mut listeners.tasks, &mut listeners.inbound);
    for &ip in &pod.ips {
        let out = listen(&pod.netns, mesh_common::outbound_listener(ip))?;
        tasks.push(tokio::spawn(accept_loop(
            out,
            view.clone(),
            Arc::clone(ctx),
            Direction::Outbound,
            outbound::handle,
        )));
        let addr = SocketAddr::new(ip, INBOUND_PORT);
        let inb = listen(&pod.netns, addr)?;
        let fd = std::os::fd::AsFd::as_fd(&inb)
            .try_clone_to_owned()
            .map_err(|source| ProxyError::Io {
                what: "duplicating listener",
                addr,
                source,
            })?;
        inbound.push((ip, fd));
        tasks.push(tokio::spawn(accept_loop(
            inb,
            view.clone(),
            Arc::clone(ctx),
            Direction::Inbound,
            inbound::handle,
        )));
        let hbone = listen(&pod.netns, SocketAddr::new(ip, HBONE_PORT))?;
        tasks.push(tokio::spawn(hbone_accept_loop(
            hbone,
            view.clone(),
            Arc::clone(ctx),
        )));
    }
    Ok(listeners)
}

/// A listener inside `netns`. `TCP_NODELAY` is set on it once: the sockets it accepts inherit
/// it (Linux copies the listener's options), which spares a system call per connection.
fn listen(netns: &Netns, addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    netns
        .run(|| {
            let socket = new_socket(addr)?;
            socket.set_reuseaddr(true)?;
            socket.set_nodelay(true)?;
            socket.bind(addr)?;
            socket.listen(BACKLOG)
        })
        .map_err(|e| match e {
            NetnsError::Io { source, .. } => ProxyError::Io {
                what: "listening on",
                addr,
                source,
            },
            other => ProxyError::Netns(other),
        })
}

fn new_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}

/// Connects from inside `netns` to `target`, from the namespace's own address for that family.
async fn dial_from(netns: &Netns, target: SocketAddr) -> Result<TcpStream, ProxyError> {
    connect(netns.run(|| new_socket(target))?, target).await
}

async fn connect(socket: TcpSocket, target: SocketAddr) -> Result<TcpStream, ProxyError> {
    socket.set_nodelay(true).ok();
    socket
        .connect(target)
        .await
        .map_err(|source| ProxyError::Io {
            what: "connecting to",
            addr: target,
            source,
        })
}

/// Connects to the application at `target` inside `pod`, from the pod's own address, so the
/// kernel short-cuts the leg; the application sees `client` as its peer.
async fn dial_app(
    pod: &LocalPod,
    target: SocketAddr,
    client: SocketAddr,
    conn: &Arc<ConnMaps>,
) -> Result<(TcpStream, PeerGuard), ProxyError> {
    let Some(own) = pod.address_like(target.ip()) else {
        return Err(ProxyError::Io {
            what: "no pod address of the family of",
            addr: target,
            source: io::ErrorKind::AddrNotAvailable.into(),
        });
    };
    // A port whose 4-tuple another connection of the agent uses (its peer entry exists), or any
    // other live socket does (the connect is refused), is skipped for the next one.
    let mut tries = 0;
    loop {
        tries += 1;
        let (socket, local) = bind_leg(pod, own, target)?;
        // The application's socket will see (local: target, remote: our address).
        let key = SockKey {
            local: SockAddr::from(target),
            remote: SockAddr::from(local),
        };
        let claimed = conn
            .claim_peer(key, client)
            .map_err(|source| ProxyError::Peer {
                addr: target,
                source,
            })?;
        if !claimed {
            if tries < LEG_CONNECT_TRIES {
                continue;
            }
            return Err(ProxyError::Io {
                what: "finding a free port (every one tried is in use) toward",
                addr: target,
                source: io::ErrorKind::AddrInUse.into(),
            });
        }
        let guard = PeerGuard {
            key,
            conn: Arc::clone(conn),
        };
        socket.set_nodelay(true).ok();
        match socket.connect(target).await {
            Ok(stream) => return Ok((stream, guard)),
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable && tries < LEG_CONNECT_TRIES => {}
            Err(source) => {
                return Err(ProxyError::Io {
                    what: "connecting to",
                    addr: target,
                    source,
                })
            }
        }
    }
}

/// How many ports a connection to an application tries when each one's 4-tuple is in use.
const LEG_CONNECT_TRIES: u32 = 8;

/// A socket inside `pod` bound to its address `own` and the next free port of its range (see
/// `leg_ports`), for a connection to `target`.
fn bind_leg(
    pod: &LocalPod,
    own: IpAddr,
    target: SocketAddr,
) -> Result<(TcpSocket, SocketAddr), ProxyError> {
    let socket = pod.netns.run(|| {
        let s = new_socket(target)?;
        s.set_reuseaddr(true)?;
        Ok(s)
    })?;
    let err = |source| ProxyError::Io {
        what: "binding a leg to",
        addr: target,
        source,
    };
    let mut last = io::ErrorKind::AddrInUse.into();
    for _ in 0..pod.leg_ports.count() {
        let local = SocketAddr::new(own, pod.leg_ports.next());
        match socket.bind(local) {
            Ok(()) => return Ok((socket, local)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = e,
            Err(e) => return Err(err(e)),
        }
    }
    Err(err(last))
}

/// Removes a peer-address entry when the connection ends.
pub(super) struct PeerGuard {
    key: SockKey,
    conn: Arc<ConnMaps>,
}

impl std::fmt::Debug for PeerGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerGuard")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl PeerGuard {
    /// The application's socket of the leg, its own view.
    pub(super) const fn app_view(&self) -> SockKey {
        self.key
    }
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        self.conn.clear_peer(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::Path};

    use super::*;

    /// A connection's task as spawned, with the relay `R`.
    type Task<R> = tracing::instrument::Instrumented<ConnTask<std::future::Pending<Option<R>>, R>>;

    #[test]
    fn a_tunnels_task_is_smaller_than_a_captured_connections() {
        // Tokio adds about 112 bytes (header, scheduler handle, id, trailer) and rounds a
        // task's cell up to 128 bytes: a captured connection's task takes 384 (see relay's
        // size test), a tunnel's, at either end, must stay within 256.
        let captured = size_of::<Task<relay::Relay>>();
        assert!(
            captured <= 256,
            "a captured connection's task is {captured} bytes"
        );
        let inbound = size_of::<Task<relay::Relay<relay::TunnelIn>>>();
        assert!(
            inbound <= 128,
            "an accepted tunnel's task is {inbound} bytes"
        );
        // The source's tunnel runs in a task spawned for it alone.
        let outbound =
            size_of::<tracing::instrument::Instrumented<relay::Relay<relay::TunnelOut>>>();
        assert!(
            outbound <= 128,
            "an opened tunnel's task is {outbound} bytes"
        );
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_nodelay() {
        let netns = Netns::open(Path::new("/proc/self/ns/net")).expect("own namespace");
        let listener =
            listen(&netns, SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0)).expect("listen");
        let addr = listener.local_addr().expect("address");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert!(
            accepted.nodelay().expect("getsockopt"),
            "accepted without TCP_NODELAY"
        );
        assert!(
            !client.nodelay().expect("getsockopt"),
            "the client's own is its own"
        );
    }
}
