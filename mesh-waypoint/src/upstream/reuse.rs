//! HTTP connections to endpoints kept open for the next requests: idle HTTP/1.1 connections
//! (one request at a time each), and one HTTP/2 connection per endpoint that every request
//! shares. A kept connection unused for [`KEPT_IDLE`] is let go (its handle dropped, so hyper
//! closes it once its last response is read), as Envoy ends an idle upstream connection: an
//! endpoint a client stopped calling does not keep connections, tunnels and the far agent's legs
//! open for ever. Closed ones leave as they are found.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex, PoisonError,
    },
    time::Duration,
};

use hyper::client::conn::{http1, http2};
use mesh_identity::Identity;
use tokio::time::Instant;

use crate::body::Body;

/// What HTTP connections to an endpoint are kept by: its address and, in the mesh, the identity
/// its tunnel proved (a new pod at a gone pod's address never gets the gone pod's connections).
pub(super) type EndpointKey = (SocketAddr, Option<Identity>);

/// Most idle HTTP/1.1 connections kept per endpoint.
const IDLE_PER_ENDPOINT: usize = 64;

/// Every this many kept HTTP/1.1 connections, the closed and expired ones of every endpoint are
/// dropped (and [`Reuse::sweep`] does it on a timer).
const SWEEP_EVERY: usize = 1024;

/// How long a kept connection may go unused: the HBONE pool's idle timeout, after which the
/// tunnel's HBONE connection, then without streams, closes too.
pub(crate) const KEPT_IDLE: Duration = Duration::from_secs(5 * 60);

/// A kept connection and when it was last used.
struct Kept<S> {
    used: Instant,
    sender: S,
}

impl<S> Kept<S> {
    fn fresh(&self, now: Instant) -> bool {
        now.duration_since(self.used) < KEPT_IDLE
    }
}

#[derive(Default)]
pub(super) struct Reuse {
    h1: Mutex<HashMap<EndpointKey, Vec<Kept<http1::SendRequest<Body>>>>>,
    h2: Mutex<HashMap<EndpointKey, Kept<http2::SendRequest<Body>>>>,
    /// HTTP/1.1 connections kept so far (the sweep's clock).
    keeps: AtomicUsize,
}

impl Reuse {
    /// An HTTP/1.1 connection to `key` ready for a request; those that closed or went unused
    /// too long are dropped.
    pub(super) fn h1(&self, key: &EndpointKey) -> Option<http1::SendRequest<Body>> {
        let now = Instant::now();
        let mut idle = self.h1.lock().unwrap_or_else(PoisonError::into_inner);
        let kept = idle.get_mut(key)?;
        kept.retain(|k| !k.sender.is_closed() && k.fresh(now));
        let ready = kept.iter().rposition(|k| k.sender.is_ready())?;
        Some(kept.swap_remove(ready).sender)
    }

    /// Keeps an HTTP/1.1 connection for the next request (it is ready again once its response
    /// has been read).
    pub(super) fn keep_h1(&self, key: EndpointKey, sender: http1::SendRequest<Body>) {
        let now = Instant::now();
        let mut idle = self.h1.lock().unwrap_or_else(PoisonError::into_inner);
        // Now and then, connections that closed (an endpoint that went away, a server that ended
        // them) or expired leave, so gone endpoints do not keep entries.
        if self
            .keeps
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SWEEP_EVERY)
        {
            sweep_h1(&mut idle, now);
        }
        let kept = idle.entry(key).or_default();
        if kept.len() < IDLE_PER_ENDPOINT {
            kept.push(Kept { used: now, sender });
        }
    }

    /// The HTTP/2 connection to `key`, unless it closed or went unused too long.
    pub(super) fn h2(&self, key: &EndpointKey) -> Option<http2::SendRequest<Body>> {
        let now = Instant::now();
        let mut shared = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        let kept = shared.get_mut(key)?;
        if kept.sender.is_closed() || !kept.fresh(now) {
            shared.remove(key);
            return None;
        }
        kept.used = now;
        Some(kept.sender.clone())
    }

    pub(super) fn keep_h2(&self, key: EndpointKey, sender: http2::SendRequest<Body>) {
        let now = Instant::now();
        let mut shared = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        // A new connection is kept only when the last one closed, expired or none was: the time
        // to drop the other closed and expired ones.
        shared.retain(|_, k| !k.sender.is_closed() && k.fresh(now));
        shared.insert(key, Kept { used: now, sender });
    }

    /// Drops the closed and expired connections of every endpoint (on a timer, so that an
    /// endpoint no request asks for any more lets its connections go too).
    pub(super) fn sweep(&self) {
        let now = Instant::now();
        sweep_h1(
            &mut self.h1.lock().unwrap_or_else(PoisonError::into_inner),
            now,
        );
        self.h2
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, k| !k.sender.is_closed() && k.fresh(now));
    }

    /// How many connections are kept (HTTP/1.1, HTTP/2).
    #[cfg(test)]
    fn kept(&self) -> (usize, usize) {
        let h1 = self.h1.lock().unwrap_or_else(PoisonError::into_inner);
        let h2 = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        (h1.values().map(Vec::len).sum(), h2.len())
    }
}

fn sweep_h1(idle: &mut HashMap<EndpointKey, Vec<Kept<http1::SendRequest<Body>>>>, now: Instant) {
    idle.retain(|_, kept| {
        kept.retain(|k| !k.sender.is_closed() && k.fresh(now));
        !kept.is_empty()
    });
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, time::Duration};

    use http_body_util::BodyExt as _;
    use hyper::{client::conn::http1, Request, Response};
    use hyper_util::rt::TokioIo;

    use super::{Reuse, KEPT_IDLE};
    use crate::body::Body;

    /// An HTTP/1.1 connection to an in-memory server; the server's task ends when it closes.
    async fn connection() -> (http1::SendRequest<Body>, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let service = hyper::service::service_fn(|_: Request<hyper::body::Incoming>| async {
            Ok::<_, Infallible>(Response::new(String::from("ok")))
        });
        let finished = tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service)
                .await;
        });
        let (sender, conn) = http1::handshake(TokioIo::new(client)).await.unwrap();
        tokio::spawn(conn);
        (sender, finished)
    }

    fn get() -> Request<Body> {
        Request::new(crate::body::full(bytes::Bytes::new()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_connection_is_reused_then_let_go_when_idle() {
        let reuse = Reuse::default();
        let key = ("10.0.0.1:80".parse().unwrap(), None);
        let (mut sender, served) = connection().await;
        let response = sender.send_request(get()).await.unwrap();
        response.into_body().collect().await.unwrap();
        reuse.keep_h1(key.clone(), sender);
        // Used again within the idle time: the same connection, kept again.
        tokio::time::sleep(KEPT_IDLE.saturating_sub(Duration::from_secs(1))).await;
        let mut again = reuse.h1(&key).expect("kept and fresh");
        let response = again.send_request(get()).await.unwrap();
        response.into_body().collect().await.unwrap();
        reuse.keep_h1(key.clone(), again);
        assert_eq!(reuse.kept(), (1, 0));
        // Then unused past it: the timer's sweep lets it go, and the server sees it close.
        tokio::time::sleep(KEPT_IDLE).await;
        reuse.sweep();
        assert_eq!(reuse.kept(), (0, 0));
        tokio::time::timeout(Duration::from_secs(1), served)
            .await
            .expect("the connection closes once let go")
            .unwrap();
        assert!(reuse.h1(&key).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_connection_is_not_handed_out() {
        let reuse = Reuse::default();
        let key = ("10.0.0.2:80".parse().unwrap(), None);
        let (sender, _served) = connection().await;
        reuse.keep_h1(key.clone(), sender);
        tokio::time::sleep(KEPT_IDLE).await;
        assert!(reuse.h1(&key).is_none(), "expired, without a sweep");
    }
}
