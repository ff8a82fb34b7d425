//! The connections this agent authorized as the destination's agent, so that a policy change
//! can check them again and close those it no longer allows.
//!
//! Each authorized connection registers its subject (source address and identity, destination)
//! and keeps a [`Tracked`] handle; the relay polls the handle, so revoking wakes the relay,
//! which closes both sockets and logs the connection as revoked. The entry is removed when the
//! connection ends (the handle's guard is dropped).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, OnceLock, PoisonError},
    task::Context,
};

use futures_util::task::AtomicWaker;
use mesh_identity::Identity;

use mesh_cluster::{AuthzDecision, Inbound, Origin};

/// What a connection's authorization depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthzSubject {
    /// The original client.
    pub src: SocketAddr,
    /// Proven by mTLS, or known to the agent for a pod of its node; `None` for plaintext.
    pub src_identity: Option<Identity>,
    /// The destination workload's address and port.
    pub dst: SocketAddr,
    /// The node itself, or the network (kept for the re-checks).
    pub origin: Origin,
}

impl AuthzSubject {
    /// The connection as the cluster model decides on it ([`mesh_cluster::ClusterState::admit`]).
    pub fn as_inbound(&self) -> Inbound<'_> {
        Inbound {
            src: self.src,
            dst: self.dst,
            src_identity: self.src_identity.as_ref(),
            origin: self.origin,
        }
    }
}

/// An address as policy sees it, in 20 bytes instead of a `SocketAddr`'s 32 (no IPv6 flow
/// label or scope: policy does not match them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Addr {
    ip: IpAddr,
    port: u16,
}

impl From<SocketAddr> for Addr {
    fn from(a: SocketAddr) -> Self {
        Self {
            ip: a.ip(),
            port: a.port(),
        }
    }
}

impl From<Addr> for SocketAddr {
    fn from(a: Addr) -> Self {
        SocketAddr::new(a.ip, a.port)
    }
}

/// The source as policy sees it: its address and where it comes from, in the same 20 bytes
/// (the origin fills the address's padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Source {
    ip: IpAddr,
    port: u16,
    origin: Origin,
}

/// One tracked connection: 112 bytes, so that with its reference counts it takes jemalloc's
/// 128-byte class (unit-tested). Its subject is kept compact and rebuilt for a re-check, which
/// is rare; its place in the tracker is its address.
#[derive(Debug)]
pub struct Tracked {
    src: Source,
    dst: Addr,
    src_identity: Option<Identity>,
    /// The decision that revoked the connection, once one has. Boxed: rare, and every open
    /// connection would otherwise carry its size.
    revoked_by: OnceLock<Box<AuthzDecision>>,
    waker: AtomicWaker,
    tracker: Arc<Tracker>,
}

impl Tracked {
    /// What the connection's authorization depends on.
    fn subject(&self) -> AuthzSubject {
        AuthzSubject {
            src: SocketAddr::new(self.src.ip, self.src.port),
            src_identity: self.src_identity.clone(),
            dst: self.dst.into(),
            origin: self.src.origin,
        }
    }

    /// Its key in the tracker: its address, unique while it lives.
    fn key(&self) -> usize {
        std::ptr::from_ref(self).addr()
    }

    /// Whether a policy change revoked the connection; registers the task to be woken when it
    /// is.
    pub fn poll_revoked(&self, cx: &Context<'_>) -> bool {
        if self.revoked_by.get().is_some() {
            return true;
        }
        self.waker.register(cx.waker());
        self.revoked_by.get().is_some()
    }

    /// The decision that revoked the connection.
    pub fn revoked_by(&self) -> Option<AuthzDecision> {
        self.revoked_by.get().map(|d| AuthzDecision::clone(d))
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.tracker
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key());
    }
}

/// The set of tracked connections (one per agent).
#[derive(Debug, Default)]
pub struct Tracker {
    /// Weak references by [`Tracked::key`]: the connection owns its `Tracked`.
    conns: Mutex<HashMap<usize, std::sync::Weak<Tracked>>>,
}

impl Tracker {
    /// Registers a connection that was authorized; keep the handle for its life.
    pub fn track(self: &Arc<Self>, subject: AuthzSubject) -> Arc<Tracked> {
        let tracked = Arc::new(Tracked {
            src: Source {
                ip: subject.src.ip(),
                port: subject.src.port(),
                origin: subject.origin,
            },
            dst: subject.dst.into(),
            src_identity: subject.src_identity,
            revoked_by: OnceLock::new(),
            waker: AtomicWaker::new(),
            tracker: Arc::clone(self),
        });
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(tracked.key(), Arc::downgrade(&tracked));
        tracked
    }

    /// Number of tracked connections.
    pub fn len(&self) -> usize {
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no connection is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks every tracked connection with `decide` and revokes those it denies; returns how
    /// many were revoked. The lock is held only to collect the connections.
    pub fn recheck(&self, decide: impl Fn(&AuthzSubject) -> Option<AuthzDecision>) -> usize {
        let conns: Vec<Arc<Tracked>> = self
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        let mut revoked = 0;
        for conn in conns {
            if conn.revoked_by.get().is_some() {
                continue;
            }
            if let Some(decision) = decide(&conn.subject()) {
                // Set before the wake-up, read after registering: the relay cannot miss it.
                if conn.revoked_by.set(Box::new(decision)).is_ok() {
                    conn.waker.wake();
                    revoked += 1;
                }
            }
        }
        revoked
    }
}

#[cfg(test)]
mod tests {
    use std::{future::poll_fn, task::Poll};

    use super::*;
    use mesh_cluster::{DecisionReason, Verdict};

    fn subject(port: u16) -> AuthzSubject {
        AuthzSubject {
            src: "10.0.0.1:40000".parse().unwrap(),
            src_identity: None,
            dst: SocketAddr::new("10.0.1.1".parse().unwrap(), port),
            origin: Origin::Network,
        }
    }

    fn deny() -> AuthzDecision {
        AuthzDecision {
            verdict: Verdict::Deny,
            reason: DecisionReason::DenyMatched,
            policy: Some(Arc::from("ns/deny")),
            audited: Box::default(),
        }
    }

    #[test]
    fn a_tracked_connection_takes_jemallocs_128_byte_class() {
        let size = size_of::<Tracked>();
        assert!(
            size <= 112,
            "Tracked is {size} bytes (plus 16 for the Arc's counts)"
        );
    }

    #[tokio::test]
    async fn recheck_revokes_only_denied_connections_and_wakes_them() {
        let tracker = Arc::new(Tracker::default());
        let a = tracker.track(subject(80));
        let b = tracker.track(subject(81));
        assert_eq!(tracker.len(), 2);
        let waiting = {
            let a = Arc::clone(&a);
            tokio::spawn(async move {
                poll_fn(|cx| {
                    if a.poll_revoked(cx) {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                })
                .await;
            })
        };
        tokio::task::yield_now().await;
        let n = tracker.recheck(|s| (s.dst.port() == 80).then(deny));
        assert_eq!(n, 1);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the revoked connection was woken")
            .unwrap();
        assert_eq!(a.revoked_by(), Some(deny()));
        assert!(b.revoked_by().is_none());
        // Already revoked: not counted again.
        assert_eq!(tracker.recheck(|_| Some(deny())), 1);
        drop(a);
        drop(b);
        assert!(tracker.is_empty());
    }
}
