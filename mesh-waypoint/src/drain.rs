//! The waypoint's drain at shutdown, as a guard every HTTP connection is watched by.

use std::time::Duration;

use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tracing::{info, warn};

/// The drain at shutdown: every HTTP connection served on a tunnel is watched; draining asks each
/// to finish the requests it has and close (HTTP/2 `GOAWAY`, HTTP/1.1 `Connection: close` or
/// closing when idle), and waits for them, at most the drain timeout. `None` once draining.
pub(crate) struct Drain(std::sync::Mutex<Option<GracefulShutdown>>);

impl Default for Drain {
    fn default() -> Self {
        Self(std::sync::Mutex::new(Some(GracefulShutdown::new())))
    }
}

impl Drain {
    /// A watcher for a new connection; `None` once draining.
    pub(crate) fn watcher(&self) -> Option<Watcher> {
        let graceful = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        graceful.as_ref().map(GracefulShutdown::watcher)
    }

    /// Drains, waiting at most `timeout`.
    pub(crate) async fn run(&self, timeout: Duration) {
        let graceful = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(graceful) = graceful else {
            return;
        };
        let open = graceful.count();
        info!(
            open,
            timeout_s = timeout.as_secs_f64(),
            "draining the waypoint's connections"
        );
        if tokio::time::timeout(timeout, graceful.shutdown())
            .await
            .is_ok()
        {
            info!("drained");
        } else {
            warn!("drain timeout: closing the connections still open");
        }
    }
}
