//! Kernel-direct connections (`--kernel-direct`; ARCHITECTURE.md, "Kernel-direct"): after the
//! agent authorized a same-node connection, it offers the kernel a route for the client pod and
//! destination ([`offer_route`]); the pod's next connections there go straight to an endpoint,
//! and [`run_events`] learns of each from the kernel's ring: it authorizes it again (so a
//! connection made under a route the view has since left behind is closed), counts it in Istio's
//! metrics, tracks it for policy changes and writes its access-log line when it closes.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use mesh_common::{DirectConn, DirectEvent, SockKey, MAX_DIRECT_TARGETS};
use tokio::{io::unix::AsyncFd, task::JoinHandle};
use tracing::{debug, info, warn};

use mesh_cluster::AuthzDecision;

use super::{check, tracker::Tracked, LocalPod, ProxyCtx};
use crate::telemetry::{ConnInfo, Counters, Direction, Refusal, Security};

/// How often the agent reads the ring when no event woke it (the kernel wakes it only when a
/// quarter of the ring is unread, so connections cost it no wake-up each).
const READ_EVERY: Duration = Duration::from_millis(100);

/// After authorizing a same-node connection of `pod` (from `client_addr`) to `dst` through
/// itself, lets the kernel send the pod's next connections there kernel-direct, if the model
/// allows it for every endpoint.
pub(super) fn offer_route(
    ctx: &ProxyCtx,
    pod: &LocalPod,
    client: Option<&mesh_cluster::Workload>,
    client_addr: SocketAddr,
    dst: SocketAddr,
) {
    let direct = ctx.conn.direct();
    let Some(client) = client.filter(|_| direct.enabled()) else {
        return;
    };
    // Before the view is read: see `DirectMaps::generation`.
    let generation = direct.generation();
    match ctx
        .resolver
        .direct_targets(client, client_addr, dst, MAX_DIRECT_TARGETS)
    {
        Ok(targets) => match direct.set_route(pod.netns_cookie, dst, &targets, generation) {
            Ok(()) => debug!(pod = %pod.name, %dst, ?targets, generation, "kernel-direct route"),
            Err(error) => warn!(pod = %pod.name, %dst, %error, "writing a kernel-direct route"),
        },
        Err(why) => debug!(pod = %pod.name, %dst, ?why, "not kernel-direct"),
    }
}

/// A kernel-direct connection the agent counts, until the kernel reports its close.
struct Open {
    info: ConnInfo,
    counters: Counters,
    started: Instant,
    policy: Policy,
}

/// What the policy does to an open kernel-direct connection.
enum Policy {
    /// Allowed: tracked, and closed by `watcher` when a policy change revokes it.
    Tracked {
        tracked: Arc<Tracked>,
        watcher: JoinHandle<()>,
    },
    /// Already revoked when the agent first read of it (`decision`): closed, its close awaited.
    Revoked(AuthzDecision),
}

impl Open {
    /// Records the connection's end: its bytes `[to the server, to the client]` counted, the
    /// close and the access-log line (revoked, if a policy change closed it).
    fn end(self, ctx: &ProxyCtx, totals: [u64; 2], result: &std::io::Result<()>) {
        self.counters.add_bytes(totals[0], totals[1]);
        let revoked = match self.policy {
            Policy::Tracked { tracked, watcher } => {
                watcher.abort();
                tracked.revoked_by()
            }
            Policy::Revoked(decision) => Some(decision),
        };
        ctx.telemetry.close(
            &self.info,
            &self.counters,
            self.started,
            totals,
            result,
            revoked.as_ref(),
        );
    }
}

/// The kernel-direct connections open now, by their client socket's cookie.
#[derive(Default)]
struct Live {
    open: HashMap<u64, Open>,
}

/// Reads the kernel's reports of kernel-direct connections for as long as the agent runs. First
/// takes over the connections an earlier agent left open, each authorized again under the
/// current view (those it no longer allows are closed).
pub async fn run_events(ctx: Arc<ProxyCtx>) {
    let direct = ctx.conn.direct();
    if !direct.enabled() {
        return;
    }
    let Some(ring) = direct.take_events() else {
        return;
    };
    let mut ring = match watch_ring(ring) {
        Ok(ring) => ring,
        Err(error) => {
            warn!(%error, "watching the kernel-direct ring; its connections go uncounted");
            return;
        }
    };
    let mut live = Live::default();
    let adopted = direct.open_conns();
    if !adopted.is_empty() {
        info!(
            connections = adopted.len(),
            "checking the kernel-direct connections an earlier agent left open"
        );
    }
    for (key, conn) in adopted {
        live.opened(&ctx, key, conn);
    }
    let mut lost = lost_events(&ctx);
    let mut tick = tokio::time::interval(READ_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => match guard {
                Ok(mut guard) => guard.clear_ready(),
                Err(error) => {
                    warn!(%error, "kernel-direct ring");
                    tick.tick().await;
                }
            },
            _ = tick.tick() => {}
        }
        for event in drain(ring.get_mut()) {
            live.handle(&ctx, &event);
        }
        // A lost opening would leave a connection untracked (no policy re-check): take the
        // kernel's table of open connections again and track what is missing.
        let now_lost = lost_events(&ctx);
        if now_lost > lost {
            warn!(
                lost = now_lost - lost,
                "the kernel-direct ring was full; reading the open connections from the kernel"
            );
            lost = now_lost;
            live.resync(&ctx, ring.get_mut());
        }
    }
}

fn lost_events(ctx: &ProxyCtx) -> u64 {
    ctx.conn.direct().counters().map_or(0, |c| c.events_lost)
}

#[allow(unsafe_code)]
fn watch_ring(ring: RingBuf<MapData>) -> std::io::Result<AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the ring owns its descriptor and closes it only when dropped, which `AsyncFd`
    // does after deregistering it; it is never swapped for another one (`get_mut` only reads).
    unsafe { AsyncFd::register(ring) }.map_err(std::io::Error::from)
}

/// Every event the ring holds now.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<DirectEvent> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        if let Some(event) = read_event(&item) {
            events.push(event);
        }
    }
    events
}

#[allow(unsafe_code)]
fn read_event(bytes: &[u8]) -> Option<DirectEvent> {
    if bytes.len() < size_of::<DirectEvent>() {
        warn!(len = bytes.len(), "short kernel-direct event");
        return None;
    }
    // SAFETY: at least `size_of::<DirectEvent>()` bytes are there; `DirectEvent` is plain
    // integers, valid for every bit pattern (`aya::Pod`); the read is unaligned-safe.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DirectEvent>()) })
}

impl Live {
    fn opened(&mut self, ctx: &Arc<ProxyCtx>, key: SockKey, conn: DirectConn) {
        if self.open.contains_key(&conn.cookie) {
            return;
        }
        let Some((mut info, started)) = describe(ctx, key, &conn) else {
            // Not this agent's to allow: closed, if its client is still a pod of this node.
            let client = key.local.to_std().map(|a| a.ip());
            let pod = client.and_then(|ip| ctx.local.borrow().get(&ip).cloned());
            if let Some(pod) = pod {
                destroy(pod, key);
            }
            return;
        };
        let policy = match check(ctx, &mut info) {
            Ok(tracked) => {
                let watcher = tokio::spawn(close_when_revoked(
                    Arc::clone(&tracked),
                    Arc::clone(&info.pod),
                    key,
                ));
                Policy::Tracked { tracked, watcher }
            }
            Err(decision) => {
                // The kernel takes only a route of the current generation, which a view change
                // moves on: the connection opened under the view before this one, which
                // allowed it (or before this agent started, under its predecessor's). A policy
                // change since revokes it, as it would had the agent read of it sooner: closed
                // now, and recorded as revoked, with its bytes, when its close is reported.
                destroy(Arc::clone(&info.pod), key);
                Policy::Revoked(decision)
            }
        };
        let counters = ctx.telemetry.open(&info);
        let open = Open {
            info,
            counters,
            started,
            policy,
        };
        self.open.insert(conn.cookie, open);
    }

    fn handle(&mut self, ctx: &Arc<ProxyCtx>, event: &DirectEvent) {
        match event.kind {
            DirectEvent::OPENED => self.opened(ctx, event.conn, event.info),
            DirectEvent::CLOSED => self.closed(ctx, event),
            kind => warn!(kind, "unknown kernel-direct event"),
        }
    }

    /// After reports were lost: tracks every connection open in the kernel's table that it
    /// missed, and ends the records of those it tracked that closed unreported (their bytes
    /// unknown, which the record says).
    ///
    /// The kernel reports a close before it forgets the connection, so once the ring has been
    /// read again after the table, a connection known here that is missing from the table and
    /// whose close was not read had its report lost.
    fn resync(&mut self, ctx: &Arc<ProxyCtx>, ring: &mut RingBuf<MapData>) {
        let mut missing: HashSet<u64> = self.open.keys().copied().collect();
        for (key, conn) in ctx.conn.direct().open_conns() {
            missing.remove(&conn.cookie);
            self.opened(ctx, key, conn);
        }
        for event in drain(ring) {
            self.handle(ctx, &event);
        }
        for cookie in missing {
            if let Some(open) = self.open.remove(&cookie) {
                let lost = Err(std::io::Error::other(
                    "its close report was lost (the kernel-direct ring was full): bytes unknown",
                ));
                open.end(ctx, [0, 0], &lost);
            }
        }
    }

    fn closed(&mut self, ctx: &Arc<ProxyCtx>, event: &DirectEvent) {
        let cookie = event.info.cookie;
        debug!(
            cookie,
            old_state = event.old_state,
            acked = event.bytes_acked,
            received = event.bytes_received,
            "kernel-direct connection closed"
        );
        let totals = event.app_bytes();
        if let Some(open) = self.open.remove(&cookie) {
            open.end(ctx, totals, &Ok(()));
            return;
        }
        let Some((info, started)) = describe(ctx, event.conn, &event.info) else {
            return;
        };
        if event.was_established() {
            // Opened and closed between two readings whose opening the ring lost, or before
            // this agent started: recorded now, as it ended.
            let counters = ctx.telemetry.open(&info);
            counters.add_bytes(totals[0], totals[1]);
            ctx.telemetry
                .close(&info, &counters, started, totals, &Ok(()), None);
        } else {
            ctx.telemetry.refused(
                &info,
                started,
                &Refusal::Connect("the destination refused the connection".to_owned()),
            );
        }
    }
}

/// The connection as telemetry and policy see it (the client's pod, its original destination,
/// the endpoint), and when it started; `None` (with a warning) when the client or the endpoint
/// is no pod of this agent's any more.
fn describe(ctx: &ProxyCtx, key: SockKey, conn: &DirectConn) -> Option<(ConnInfo, Instant)> {
    let (Some(client), Some(server), Some(dst)) = (
        key.local.to_std(),
        key.remote.to_std(),
        conn.orig_dst.to_std(),
    ) else {
        return None;
    };
    let pods = ctx.local.borrow();
    let (Some(client_pod), Some(server_pod)) = (pods.get(&client.ip()), pods.get(&server.ip()))
    else {
        warn!(%client, %server, "kernel-direct connection between pods this agent no longer serves");
        return None;
    };
    let mut info = ConnInfo::new(Direction::Outbound, client_pod, client, dst, server);
    info.security = Security::SameNode {
        peer: server_pod.identity.clone(),
    };
    info.service = ctx.resolver.service_at(dst);
    info.src_workload = ctx.resolver.workload(client.ip());
    info.dst_workload = ctx.resolver.workload(server.ip());
    let age = Duration::from_nanos(monotonic_ns().saturating_sub(conn.started_ns));
    let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
    Some((info, started))
}

/// `CLOCK_MONOTONIC` in nanoseconds, the kernel programs' `bpf_ktime_get_ns`.
#[allow(unsafe_code)]
fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid `timespec` to write for the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut t) } != 0 {
        return 0;
    }
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

async fn close_when_revoked(tracked: Arc<Tracked>, pod: Arc<LocalPod>, key: SockKey) {
    std::future::poll_fn(|cx| {
        if tracked.poll_revoked(cx) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    destroy(pod, key);
}

/// Aborts the client's socket of a kernel-direct connection (its peer gets a reset), from inside
/// the client pod's namespace.
fn destroy(pod: Arc<LocalPod>, key: SockKey) {
    let (Some(local), Some(remote)) = (key.local.to_std(), key.remote.to_std()) else {
        return;
    };
    tokio::task::spawn_blocking(move || {
        match pod
            .netns
            .run(|| crate::sock_destroy::destroy_tcp(local, remote))
        {
            Ok(true) => info!(pod = %pod.name, %local, %remote, "kernel-direct connection closed"),
            Ok(false) => {
                debug!(pod = %pod.name, %local, %remote, "kernel-direct connection already closed");
            }
            Err(error) => {
                warn!(pod = %pod.name, %local, %remote, %error, "could not close a kernel-direct connection");
            }
        }
    });
}
