//! The copy buffers that the TCP-to-TCP copy ([`super::relay`]) and the reads under TLS
//! ([`super::read_ahead`]) borrow for one read and what follows it, and the budget of reads a
//! busy direction may do before it yields.
//!
//! Buffers go back to a pool after each use, so a busy agent does not allocate per read; the
//! pool gives back to the allocator whatever a whole [`TRIM_EVERY`] did not need, so an agent
//! returns to its resting size once a burst is over (the memory target in BENCHMARKS.md). A
//! trim that frees the last of them means no copy ran for a whole period: the agent has gone
//! quiet, and the caller hears of it once (the agent then gives the allocator's freed pages back
//! to the kernel at once instead of over its decay).

use std::{sync::Mutex, time::Duration};

/// Size of one copy buffer: large enough that a bulk transfer needs few system calls and that
/// a direction that fell behind catches up in one read.
const BUF: usize = 256 * 1024;
/// Buffers kept for reuse; more are allocated (and freed) under a burst of busy connections.
const POOL_MAX: usize = 32;
/// Reads a busy direction may do in one poll before it lets other tasks run.
pub(super) const BUDGET: u32 = 16;
/// How often the pool frees the buffers that were not needed since the previous time: an idle
/// agent has returned all of them within two periods. Two seconds: a pause that long in a bulk
/// transfer is rare, and a full pool is 8 MiB an agent should not keep for long once quiet.
const TRIM_EVERY: Duration = Duration::from_secs(2);

struct Pool {
    free: Vec<Box<[u8]>>,
    /// The fewest buffers `free` held since the last trim: that many were never needed.
    low: usize,
}

impl Pool {
    const fn new() -> Self {
        Self {
            free: Vec::new(),
            low: 0,
        }
    }

    fn take(&mut self) -> Option<Box<[u8]>> {
        let buf = self.free.pop();
        self.low = self.low.min(self.free.len());
        buf
    }

    fn give(&mut self, buf: Box<[u8]>) {
        if self.free.len() < POOL_MAX {
            self.free.push(buf);
        }
    }

    /// Frees the buffers not needed since the last trim, and says how many.
    fn trim(&mut self) -> usize {
        let unused = self.low.min(self.free.len());
        let keep = self.free.len() - unused;
        self.free.truncate(keep);
        self.low = keep;
        unused
    }

    /// Whether a trim that freed `freed` buffers found the agent quiet: none was needed for a
    /// whole period, and some were there to free (an idle agent's later trims free nothing and
    /// are not news).
    fn went_quiet(&self, freed: usize) -> bool {
        freed > 0 && self.free.is_empty()
    }
}

static POOL: Mutex<Pool> = Mutex::new(Pool::new());

fn new_buffer() -> Box<[u8]> {
    vec![0; BUF].into_boxed_slice()
}

pub(super) fn take_buffer() -> Box<[u8]> {
    POOL.lock()
        .ok()
        .and_then(|mut p| p.take())
        .unwrap_or_else(new_buffer)
}

pub(super) fn give_back(buf: Box<[u8]>) {
    if let Ok(mut p) = POOL.lock() {
        p.give(buf);
    }
}

/// Trims the pool every [`TRIM_EVERY`], forever (the agent runs it for its whole life), and
/// calls `on_quiet` each time a trim frees the last buffer: no copy needed one for a whole
/// period after a busy one.
pub async fn trim_when_idle(on_quiet: fn()) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (freed, quiet) = POOL.lock().map_or((0, false), |mut p| {
            let freed = p.trim();
            (freed, p.went_quiet(freed))
        });
        if freed > 0 {
            tracing::debug!(freed, quiet, "copy buffers returned to the allocator");
        }
        if quiet {
            on_quiet();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_unused_for_a_whole_period_are_freed_and_busy_ones_kept() {
        let mut pool = Pool::new();
        let bufs: Vec<_> = (0..4)
            .map(|_| pool.take().unwrap_or_else(new_buffer))
            .collect();
        for b in bufs {
            pool.give(b);
        }
        // All four were in use during the first period.
        assert_eq!(pool.trim(), 0);
        assert_eq!(
            pool.free.len(),
            4,
            "buffers used during the period are kept"
        );
        // One is used again during the next period: three were never needed.
        let b = pool.take().expect("pooled");
        pool.give(b);
        assert_eq!(pool.trim(), 3);
        assert_eq!(pool.free.len(), 1);
        assert!(!pool.went_quiet(3), "one buffer is still in use");
        // A quiet period frees the rest: the agent went quiet, once.
        assert_eq!(pool.trim(), 1);
        assert!(pool.free.is_empty());
        assert!(pool.went_quiet(1));
        assert_eq!(pool.trim(), 0);
        assert!(
            !pool.went_quiet(0),
            "an idle agent's later trims are not news"
        );
    }

    #[test]
    fn the_pool_keeps_at_most_its_maximum() {
        let mut pool = Pool::new();
        for _ in 0..POOL_MAX + 3 {
            pool.give(new_buffer());
        }
        assert_eq!(pool.free.len(), POOL_MAX);
    }
}
