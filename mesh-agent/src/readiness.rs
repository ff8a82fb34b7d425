//! Readiness as guard objects: every part of the agent that must finish before it can serve
//! holds a [`BlockReady`] and drops it when done. The agent is ready once none is left; the
//! readiness server (`/healthz/ready`) reports it.
//!
//! Blockers must be taken before anything can observe readiness (before the readiness server
//! starts): a [`Readiness`] without blockers is ready.

use std::{collections::BTreeMap, sync::Arc};

use tokio::sync::watch;

/// The blockers still pending, by id (names may repeat).
#[derive(Debug, Default)]
struct Blockers {
    next_id: u64,
    pending: BTreeMap<u64, String>,
    /// The agent is going down: never ready again.
    down: bool,
    /// Ways the agent serves in a degraded mode while ready, by id.
    degraded: BTreeMap<u64, String>,
}

/// Whether the agent is ready to serve: ready once every [`BlockReady`] taken from it was
/// dropped. Cheap to clone; clones share the state.
#[derive(Clone, Debug)]
pub struct Readiness {
    state: Arc<watch::Sender<Blockers>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// A readiness with no blockers (ready until one is taken).
    pub fn new() -> Self {
        Self {
            state: Arc::new(watch::Sender::new(Blockers::default())),
        }
    }

    /// A blocker named `what` (e.g. `config`, `certificates`); the agent is not ready until it,
    /// and every other blocker, is dropped.
    pub fn block(&self, what: &str) -> BlockReady {
        let mut id = 0;
        self.state.send_modify(|b| {
            id = b.next_id;
            b.next_id += 1;
            b.pending.insert(id, what.to_string());
        });
        tracing::debug!(blocker = what, "readiness blocked");
        BlockReady {
            readiness: self.clone(),
            id,
            what: what.to_string(),
        }
    }

    /// Whether no blocker is pending (and the agent is not going down).
    pub fn is_ready(&self) -> bool {
        let b = self.state.borrow();
        b.pending.is_empty() && !b.down
    }

    /// Names of the blockers still pending, sorted, each once (`shutting down` when the agent is
    /// going down).
    pub fn pending(&self) -> Vec<String> {
        let b = self.state.borrow();
        let mut names: Vec<String> = b.pending.values().cloned().collect();
        if b.down {
            names.push("shutting down".to_owned());
        }
        names.sort();
        names.dedup();
        names
    }

    /// Resolves once no blocker is pending (at once if none is).
    pub async fn wait(&self) {
        let mut rx = self.state.subscribe();
        // The sender lives in `self`, so the channel cannot close while waiting.
        let _ = rx.wait_for(|b| b.pending.is_empty() && !b.down).await;
    }

    /// A note that the agent serves in a degraded way (`what`), listed by the readiness
    /// endpoint while the returned guard lives; readiness itself is unchanged.
    pub fn degraded(&self, what: &str) -> Degraded {
        let mut id = 0;
        self.state.send_modify(|b| {
            id = b.next_id;
            b.next_id += 1;
            b.degraded.insert(id, what.to_owned());
        });
        tracing::warn!(degraded = what, "serving degraded");
        Degraded {
            readiness: self.clone(),
            id,
        }
    }

    /// The degraded-mode notes in force, sorted.
    pub fn degraded_notes(&self) -> Vec<String> {
        let mut notes: Vec<String> = self.state.borrow().degraded.values().cloned().collect();
        notes.sort();
        notes
    }

    /// A guard that, when dropped, makes the agent not ready for good: held by the serving loop,
    /// so that however it ends (a clean shutdown or a fatal error) readiness never claims ready
    /// on the way down, even as the other blockers are dropped after it.
    pub fn not_ready_once_dropped(&self) -> GoingDown {
        GoingDown {
            readiness: self.clone(),
        }
    }

    fn unblock(&self, id: u64, what: &str) {
        let mut now_ready = false;
        self.state.send_if_modified(|b| {
            let removed = b.pending.remove(&id).is_some();
            now_ready = removed && b.pending.is_empty() && !b.down;
            removed
        });
        tracing::debug!("ready: {what} done");
        if now_ready {
            tracing::info!("agent is ready to serve");
        }
    }
}

/// See [`Readiness::not_ready_once_dropped`].
#[must_use = "the agent goes not ready as soon as this is dropped"]
#[derive(Debug)]
pub struct GoingDown {
    readiness: Readiness,
}

impl Drop for GoingDown {
    fn drop(&mut self) {
        self.readiness.state.send_modify(|b| b.down = true);
        tracing::debug!("readiness: going down");
    }
}

/// See [`Readiness::degraded`]: the note goes when this is dropped.
#[must_use = "the note is removed as soon as the guard is dropped"]
#[derive(Debug)]
pub struct Degraded {
    readiness: Readiness,
    id: u64,
}

impl Drop for Degraded {
    fn drop(&mut self) {
        let id = self.id;
        self.readiness.state.send_modify(|b| {
            b.degraded.remove(&id);
        });
    }
}

/// Keeps the agent not ready while it exists; dropping it unblocks.
#[must_use = "readiness is unblocked as soon as the BlockReady is dropped"]
#[derive(Debug)]
pub struct BlockReady {
    readiness: Readiness,
    id: u64,
    what: String,
}

impl BlockReady {
    /// The name this blocker was taken with.
    pub fn what(&self) -> &str {
        &self.what
    }
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        self.readiness.unblock(self.id, &self.what);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn degraded_notes_are_listed_while_held_and_leave_readiness_alone() {
        let r = Readiness::new();
        let note = r.degraded("Kubernetes API unreachable");
        assert!(r.is_ready());
        assert_eq!(r.degraded_notes(), ["Kubernetes API unreachable"]);
        drop(note);
        assert!(r.degraded_notes().is_empty());
    }

    #[test]
    fn ready_without_blockers() {
        let r = Readiness::new();
        assert!(r.is_ready());
        assert!(r.pending().is_empty());
    }

    #[test]
    fn one_blocker() {
        let r = Readiness::new();
        let b = r.block("config");
        assert_eq!(b.what(), "config");
        assert!(!r.is_ready());
        assert_eq!(r.pending(), ["config"]);
        drop(b);
        assert!(r.is_ready());
        assert!(r.pending().is_empty());
    }

    #[test]
    fn two_blockers_and_clones_share_state() {
        let r = Readiness::new();
        let clone = r.clone();
        let certs = r.block("certificates");
        let config = clone.block("config");
        assert_eq!(r.pending(), ["certificates", "config"]);
        drop(config);
        assert!(!r.is_ready());
        assert_eq!(clone.pending(), ["certificates"]);
        drop(certs);
        assert!(r.is_ready() && clone.is_ready());
    }

    #[test]
    fn same_name_twice_needs_both_dropped() {
        let r = Readiness::new();
        let a = r.block("config");
        let b = r.block("config");
        assert_eq!(r.pending(), ["config"]);
        drop(a);
        assert!(!r.is_ready());
        drop(b);
        assert!(r.is_ready());
    }

    #[test]
    fn never_ready_again_once_going_down() {
        // The order of a fatal exit: the serving loop's guard goes first, then the blockers
        // held by tasks that are torn down after it.
        let r = Readiness::new();
        let certs = r.block("certificates");
        let down = r.not_ready_once_dropped();
        assert_eq!(r.pending(), ["certificates"]);
        drop(down);
        assert!(!r.is_ready());
        drop(certs);
        assert!(!r.is_ready(), "ready on the way down");
        assert_eq!(r.pending(), ["shutting down"]);
        // Even a ready agent goes not ready.
        let ready = Readiness::new();
        assert!(ready.is_ready());
        drop(ready.not_ready_once_dropped());
        assert!(!ready.is_ready());
    }

    #[tokio::test]
    async fn wait_resolves_when_the_last_blocker_goes() {
        let r = Readiness::new();
        tokio::time::timeout(Duration::from_secs(1), r.wait())
            .await
            .expect("ready without blockers");
        let a = r.block("a");
        let b = r.block("b");
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.wait().await }
        });
        tokio::task::yield_now().await;
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("wait resolved")
            .unwrap();
    }
}
