//! The view's builder: one thread of its own owns the watched objects ([`Units`]), applies the
//! watches' changes in the order they arrive, and rebuilds the view after them.
//!
//! - **Off the runtime.** A rebuild takes tens of milliseconds at 10,000 pods (BENCHMARKS.md);
//!   on a runtime worker it would stall the connections that worker serves, and a watch task
//!   waiting for a lock held by it would stall another. The watch tasks only send their changes
//!   down a channel.
//! - **Paced.** After a change, the builder gathers what else arrives for
//!   [`Pacing::debounce`], then rebuilds once. A rebuild that took `t` also makes the next one
//!   wait until [`Pacing::BUSY_RATIO`] × `t` after it ended (at most [`Pacing::max_wait`]): a
//!   change after a quiet spell is applied as fast as before, while under steady churn the
//!   builder works at most a fifth of the time, so a large cluster's view costs a bounded share
//!   of a core.

use std::{
    collections::BTreeSet,
    sync::{
        mpsc::{Receiver, RecvTimeoutError, Sender},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use tokio::sync::{oneshot, watch};
use tracing::error;

use super::units::{Converted, Units};
use crate::{
    error::StateError,
    meta::{Kind, ObjectRef},
    state::ClusterState,
};

/// What a watch reports to the builder.
#[derive(Debug)]
pub(super) enum Change {
    /// An object was added or changed (or could not be read); boxed, as objects are large
    /// and the other changes small.
    Apply(ObjectRef, Box<Converted>),
    /// An object was deleted.
    Delete(ObjectRef),
    /// A full list of the kind ended with these objects; the others of the kind are gone.
    Relisted(Kind, BTreeSet<ObjectRef>),
    /// Build now, from every change sent before, and from then on publish on the channel sent
    /// back.
    First(oneshot::Sender<Result<watch::Receiver<Arc<ClusterState>>, StateError>>),
}

/// How long changes gather before a rebuild.
#[derive(Clone, Copy, Debug)]
pub(super) struct Pacing {
    /// How long changes gather after the first one.
    pub(super) debounce: Duration,
    /// The longest rest imposed after a rebuild.
    pub(super) max_wait: Duration,
}

impl Pacing {
    /// After a rebuild, the builder rests this many times as long as it took: it is busy at
    /// most 1 / (1 + `BUSY_RATIO`) of the time.
    pub(super) const BUSY_RATIO: u32 = 4;

    /// The earliest next rebuild after one that ended at `end` and took `took`.
    pub(super) fn rest_until(&self, end: Instant, took: Duration) -> Instant {
        end + (took * Self::BUSY_RATIO).min(self.max_wait)
    }

    /// When to rebuild after a first change at `now`: once the changes gathered, and not
    /// before the rest after the last rebuild is over.
    pub(super) fn deadline(&self, now: Instant, rest_until: Instant) -> Instant {
        (now + self.debounce).max(rest_until)
    }
}

/// Starts the builder thread; it ends when every sender of the returned channel is gone.
pub(super) fn spawn(units: Units, pacing: Pacing) -> std::io::Result<Sender<Change>> {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::Builder::new()
        .name("kube-view".into())
        .spawn(move || run(units, &rx, pacing))?;
    Ok(tx)
}

fn run(mut units: Units, rx: &Receiver<Change>, pacing: Pacing) {
    let mut publisher: Option<watch::Sender<Arc<ClusterState>>> = None;
    let mut rest_until = Instant::now();
    while let Ok(change) = rx.recv() {
        let mut dirty = handle(&mut units, &mut publisher, change);
        let deadline = pacing.deadline(Instant::now(), rest_until);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left) {
                Ok(change) => dirty |= handle(&mut units, &mut publisher, change),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        let Some(publisher) = publisher.as_ref().filter(|_| dirty) else {
            continue;
        };
        let started = Instant::now();
        match units.rebuild() {
            Ok(new) => {
                if !Arc::ptr_eq(&new, &publisher.borrow()) {
                    publisher.send_replace(new);
                }
            }
            Err(e) => error!(error = %e, "cluster view not rebuilt; the last state stays"),
        }
        rest_until = pacing.rest_until(Instant::now(), started.elapsed());
    }
}

/// Applies one change; whether the view needs a rebuild.
fn handle(
    units: &mut Units,
    publisher: &mut Option<watch::Sender<Arc<ClusterState>>>,
    change: Change,
) -> bool {
    match change {
        Change::Apply(key, object) => units.apply(&key, *object),
        Change::Delete(key) => units.delete(&key),
        Change::Relisted(kind, listed) => units.relisted(kind, &listed),
        Change::First(reply) => {
            let first = units.rebuild().map(|state| {
                let (tx, rx) = watch::channel(state);
                *publisher = Some(tx);
                rx
            });
            // The caller gave up waiting: nothing to do.
            let _ = reply.send(first);
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_changes_wait_the_debounce_busy_ones_the_rest_after_the_last_rebuild() {
        let pacing = Pacing {
            debounce: Duration::from_millis(50),
            max_wait: Duration::from_secs(1),
        };
        let ms = Duration::from_millis;
        let end = Instant::now();
        let rest = pacing.rest_until(end, ms(70));
        assert_eq!(rest, end + ms(280), "four times the rebuild");
        assert_eq!(pacing.rest_until(end, ms(700)), end + ms(1000), "capped");
        assert_eq!(
            pacing.deadline(end + ms(10), rest),
            rest,
            "a change right after a rebuild waits for the rest"
        );
        assert_eq!(
            pacing.deadline(end + ms(5000), rest),
            end + ms(5050),
            "after a quiet spell: the debounce only"
        );
    }
}
