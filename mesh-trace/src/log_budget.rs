//! How many per-connection and per-request warnings a proxy writes to its log each second,
//! each source's share and all sources' together.
//!
//! A refused, denied, failed or revoked connection (the agent), or a request no endpoint
//! answered (the waypoint), gets a `warn` line besides its access-log record. A pod that opens
//! connections or sends requests it knows will fail, thousands of times a second, would
//! otherwise have the proxy (shared by every pod of the node, or every client of the waypoint)
//! write thousands of lines a second, and bury every other pod's warnings. So:
//! - one source (a client's address) gets at most [`PER_SOURCE_PER_SECOND`] lines in any one
//!   second: a flooding pod cannot take the others' lines;
//! - all sources together get at most [`ALL_SOURCES_PER_SECOND`]: many flooding pods cannot
//!   make the log grow without bound either.
//!
//! The rest are held back and counted, and a line says how many were held back and which source
//! most of them came from (when the next warning is written, or at the next
//! [`LogBudget::report_held`]). Nothing is lost: the access log and the metrics have every
//! connection and request.
//!
//! Memory is bounded: a window remembers only the sources that wrote in it (at most
//! [`ALL_SOURCES_PER_SECOND`]), and the held-back count names at most [`HELD_SOURCES_NAMED`]
//! sources (the rest are counted all the same).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

/// Warnings one source gets in any one second, at most.
pub const PER_SOURCE_PER_SECOND: u32 = 10;

/// Warnings all sources together get in any one second, at most.
pub const ALL_SOURCES_PER_SECOND: u32 = 100;

/// Sources a held-back count tells apart, at most; lines from further sources are counted in
/// its total only.
pub const HELD_SOURCES_NAMED: usize = 256;

/// The length of one budget's window.
const WINDOW: Duration = Duration::from_secs(1);

/// Whether a warning may be written now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Write it; `held_before`: the lines held back since the last report, to say first.
    Write { held_before: Held },
    /// Hold it back (counted).
    Hold,
}

/// Lines held back since the last report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub lines: u64,
    /// The sources they came from (at most [`HELD_SOURCES_NAMED`]; more when `untold` > 0).
    pub sources: usize,
    /// The source most of them came from, and how many.
    pub most: Option<(IpAddr, u64)>,
    /// Lines from sources past the [`HELD_SOURCES_NAMED`] told apart.
    pub untold: u64,
}

/// A proxy's log budget, shared by its connections' or requests' tasks.
#[derive(Debug, Default)]
pub struct LogBudget {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the current window began (`None`: no line yet).
    began: Option<Instant>,
    written: u32,
    /// Lines written in this window by each source that wrote (at most `written` entries).
    written_by: HashMap<IpAddr, u32>,
    /// Held back and not reported yet, by source.
    held_by: HashMap<IpAddr, u64>,
    held_untold: u64,
}

impl LogBudget {
    /// Whether a warning about `source`'s connection or request may be written at `now`.
    pub fn admit(&self, source: IpAddr, now: Instant) -> Admit {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.began
            .is_none_or(|began| now.saturating_duration_since(began) >= WINDOW)
        {
            s.began = Some(now);
            s.written = 0;
            s.written_by.clear();
        }
        let by_source = s.written_by.get(&source).copied().unwrap_or(0);
        if s.written >= ALL_SOURCES_PER_SECOND || by_source >= PER_SOURCE_PER_SECOND {
            if let Some(held) = s.held_by.get_mut(&source) {
                *held += 1;
            } else if s.held_by.len() < HELD_SOURCES_NAMED {
                s.held_by.insert(source, 1);
            } else {
                s.held_untold += 1;
            }
            return Admit::Hold;
        }
        s.written += 1;
        *s.written_by.entry(source).or_default() += 1;
        Admit::Write {
            held_before: s.take_held(),
        }
    }

    /// Whether a warning about `source` may be written now; when it may, says first how many
    /// were held back since the last report.
    pub fn may_warn(&self, source: IpAddr) -> bool {
        match self.admit(source, Instant::now()) {
            Admit::Write { held_before } => {
                say_held(&held_before);
                true
            }
            Admit::Hold => false,
        }
    }

    /// The lines held back and not reported yet, now reported (no lines: none).
    pub fn take_held(&self) -> Held {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take_held()
    }

    /// Says how many lines were held back, every `every`, for as long as the proxy runs (a
    /// flood that stops is reported too, without a later warning to carry it).
    pub async fn report_held(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            say_held(&self.take_held());
        }
    }
}

impl State {
    fn take_held(&mut self) -> Held {
        let untold = std::mem::take(&mut self.held_untold);
        let sources = self.held_by.len();
        let mut lines = untold;
        let mut most: Option<(IpAddr, u64)> = None;
        for (source, held) in self.held_by.drain() {
            lines += held;
            if most.is_none_or(|(_, m)| held > m) {
                most = Some((source, held));
            }
        }
        Held {
            lines,
            sources,
            most,
            untold,
        }
    }
}

/// The line that says how many warnings were held back (none when none were).
pub fn say_held(held: &Held) {
    if held.lines == 0 {
        return;
    }
    let (most_from, most_held) = held
        .most
        .map_or((String::new(), 0), |(source, n)| (source.to_string(), n));
    // A root event: not in the span of the connection or request whose warning carries it.
    tracing::warn!(
        parent: None,
        held = held.lines,
        sources = held.sources,
        most_from = %most_from,
        most_held,
        untold = held.untold,
        per_source = PER_SOURCE_PER_SECOND,
        all_sources = ALL_SOURCES_PER_SECOND,
        "warnings held back (more than per_source from one source, or all_sources in all, in a \
         second); the access log and the metrics have every connection and request"
    );
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn written(admit: &Admit) -> bool {
        matches!(admit, Admit::Write { .. })
    }

    #[test]
    fn a_flooding_source_gets_its_share_then_one_count_naming_it() {
        let budget = LogBudget::default();
        let t0 = Instant::now();
        for i in 0..PER_SOURCE_PER_SECOND {
            let at = t0 + Duration::from_millis(u64::from(i));
            assert_eq!(
                budget.admit(ip(1), at),
                Admit::Write {
                    held_before: Held::default()
                }
            );
        }
        for _ in 0..500 {
            assert_eq!(
                budget.admit(ip(1), t0 + Duration::from_millis(900)),
                Admit::Hold
            );
        }
        // The next second: written again, saying what was held and whose.
        let Admit::Write { held_before } = budget.admit(ip(1), t0 + WINDOW) else {
            panic!("not written in the next second");
        };
        assert_eq!(
            held_before,
            Held {
                lines: 500,
                sources: 1,
                most: Some((ip(1), 500)),
                untold: 0
            }
        );
        assert_eq!(
            budget.admit(ip(1), t0 + WINDOW + Duration::from_millis(1)),
            Admit::Write {
                held_before: Held::default()
            }
        );
    }

    #[test]
    fn another_sources_warnings_are_written_during_a_flood() {
        let budget = LogBudget::default();
        let t0 = Instant::now();
        for _ in 0..1_000 {
            budget.admit(ip(1), t0);
        }
        // The victim's lines are written, and the first says what the flood held back.
        let Admit::Write { held_before } = budget.admit(ip(2), t0) else {
            panic!("the victim's warning was held back");
        };
        assert_eq!(held_before.lines, 1_000 - u64::from(PER_SOURCE_PER_SECOND));
        assert_eq!(held_before.most, Some((ip(1), held_before.lines)));
        for _ in 1..PER_SOURCE_PER_SECOND {
            assert!(written(&budget.admit(ip(2), t0)));
        }
    }

    #[test]
    fn all_sources_together_stay_within_the_total() {
        let budget = LogBudget::default();
        let t0 = Instant::now();
        let mut written_now = 0;
        for last in 0..=u8::MAX {
            for _ in 0..PER_SOURCE_PER_SECOND {
                written_now += u32::from(written(&budget.admit(ip(last), t0)));
            }
        }
        assert_eq!(written_now, ALL_SOURCES_PER_SECOND);
        let held = budget.take_held();
        assert_eq!(
            held.lines,
            256 * u64::from(PER_SOURCE_PER_SECOND) - u64::from(ALL_SOURCES_PER_SECOND)
        );
        // The sources that wrote are all a window remembers.
        let remembered = budget.state.lock().unwrap().written_by.len();
        assert_eq!(
            remembered,
            (ALL_SOURCES_PER_SECOND / PER_SOURCE_PER_SECOND) as usize
        );
    }

    #[test]
    fn held_back_sources_past_the_named_ones_are_counted_all_the_same() {
        let budget = LogBudget::default();
        let t0 = Instant::now();
        // The total spent by ten sources, then one line each from 300 more.
        for last in 0..10 {
            for _ in 0..PER_SOURCE_PER_SECOND {
                budget.admit(ip(last), t0);
            }
        }
        for n in 0..300_u32 {
            let source = IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + n));
            assert_eq!(budget.admit(source, t0), Admit::Hold);
        }
        let held = budget.take_held();
        assert_eq!(held.lines, 300);
        assert_eq!(held.sources, HELD_SOURCES_NAMED);
        assert_eq!(held.untold, 300 - HELD_SOURCES_NAMED as u64);
        assert_eq!(budget.take_held(), Held::default());
    }

    #[test]
    fn a_quiet_proxy_writes_every_warning() {
        let budget = LogBudget::default();
        let t0 = Instant::now();
        for s in 0..100 {
            let at = t0 + WINDOW * s;
            for _ in 0..PER_SOURCE_PER_SECOND {
                assert!(written(&budget.admit(ip(1), at)));
            }
        }
        assert_eq!(budget.take_held(), Held::default());
    }
}
