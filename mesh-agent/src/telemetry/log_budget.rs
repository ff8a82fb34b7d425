//! How many per-connection warnings the agent writes to its log each second.
//!
//! A refused, denied, revoked or failed connection gets a `warn` line besides its access-log
//! record. A pod that opens connections it knows will be denied, or that fail, thousands of
//! times a second, would otherwise have the agent (shared by every pod of the node) write
//! thousands of lines a second, and bury every other pod's warnings. So at most
//! [`LINES_PER_SECOND`] such lines are written in any one second; the rest are held back and
//! counted, and a line says how many were held back (when the next second's first warning is
//! written, or at the next [`LogBudget::report_held`]). Nothing is lost: the access log and the
//! metrics have every connection.

use std::sync::{Mutex, PoisonError};

use tokio::time::{Duration, Instant};

/// Per-connection warnings written in any one second, at most.
pub const LINES_PER_SECOND: u32 = 20;

/// The length of one budget's window.
const WINDOW: Duration = Duration::from_secs(1);

/// Whether a per-connection warning may be written now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Write it. `held_before`: the lines held back since the last report, to say first.
    Write { held_before: u64 },
    /// Hold it back (counted).
    Hold,
}

#[derive(Debug, Default)]
pub struct LogBudget {
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// When the current window began (`None`: no line yet).
    began: Option<Instant>,
    written: u32,
    /// Held back and not reported yet.
    held: u64,
}

impl LogBudget {
    /// Whether a per-connection warning may be written at `now`.
    pub fn admit(&self, now: Instant) -> Admit {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        if w.began
            .is_none_or(|began| now.duration_since(began) >= WINDOW)
        {
            w.began = Some(now);
            w.written = 0;
        }
        if w.written >= LINES_PER_SECOND {
            w.held += 1;
            return Admit::Hold;
        }
        w.written += 1;
        Admit::Write {
            held_before: std::mem::take(&mut w.held),
        }
    }

    /// The lines held back and not reported yet, now reported (zero: none).
    pub fn take_held(&self) -> u64 {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut w.held)
    }

    /// Says how many lines were held back, every `every`, for as long as the agent runs (a
    /// flood that stops is reported too, without a later warning to carry it).
    pub async fn report_held(self: std::sync::Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            say_held(self.take_held());
        }
    }
}

/// The line that says how many warnings were held back (none when `held` is zero).
pub fn say_held(held: u64) {
    if held > 0 {
        tracing::warn!(
            held,
            per_second = LINES_PER_SECOND,
            "per-connection warnings held back (more than per_second in a second); the access \
             log and the metrics have every connection"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_gets_its_seconds_budget_then_one_count() {
        let budget = LogBudget::default();
        let t0 = Instant::now();
        for i in 0..LINES_PER_SECOND {
            assert_eq!(
                budget.admit(t0 + Duration::from_millis(u64::from(i))),
                Admit::Write { held_before: 0 }
            );
        }
        for _ in 0..500 {
            assert_eq!(budget.admit(t0 + Duration::from_millis(900)), Admit::Hold);
        }
        // The next second: written again, saying what was held.
        assert_eq!(budget.admit(t0 + WINDOW), Admit::Write { held_before: 500 });
        assert_eq!(
            budget.admit(t0 + WINDOW + Duration::from_millis(1)),
            Admit::Write { held_before: 0 }
        );
    }

    #[test]
    fn held_lines_are_reported_once_without_a_later_warning() {
        let budget = LogBudget::default();
        let t0 = Instant::now();
        for _ in 0..LINES_PER_SECOND + 7 {
            budget.admit(t0);
        }
        assert_eq!(budget.take_held(), 7);
        assert_eq!(budget.take_held(), 0);
        assert_eq!(budget.admit(t0 + WINDOW), Admit::Write { held_before: 0 });
    }

    #[test]
    fn a_quiet_agent_writes_every_warning() {
        let budget = LogBudget::default();
        let t0 = Instant::now();
        for s in 0..100 {
            let at = t0 + WINDOW * s;
            for _ in 0..LINES_PER_SECOND {
                assert!(matches!(budget.admit(at), Admit::Write { .. }));
            }
        }
        assert_eq!(budget.take_held(), 0);
    }
}
