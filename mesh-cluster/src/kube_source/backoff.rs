//! How long a failing watch waits before it tries again: doubling from half a second up to a
//! cap, with jitter, and back to the start after any success.
//!
//! kube-rs' default goes up to 30 s; a node agent that lost the API server should see changes
//! again within seconds of its return, so the cap is lower ([`super::KubeOptions::max_backoff`]).
//! The jitter (each wait drawn between half and all of its step) spreads the agents of many
//! nodes, which lose the server together, over the interval instead of at its end.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kube::runtime::utils::Backoff;

/// The first wait.
const START: Duration = Duration::from_millis(500);

/// Exponential backoff with jitter, capped.
#[derive(Debug, Clone)]
pub(super) struct WatchBackoff {
    step: Duration,
    max: Duration,
    /// State of the jitter's generator (xorshift), seeded from the clock.
    seed: u64,
}

impl WatchBackoff {
    pub(super) fn new(max: Duration) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::from(d.subsec_nanos()) | 1);
        Self {
            step: START.min(max),
            max,
            seed: nanos,
        }
    }

    fn random(&mut self) -> u64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        let spread = u64::try_from(half.as_millis()).unwrap_or(u64::MAX).max(1);
        Some(half + Duration::from_millis(self.random() % spread))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.step = START.min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_within_jitter_up_to_the_cap_and_reset() {
        let mut b = WatchBackoff::new(Duration::from_secs(8));
        let waits: Vec<Duration> = b.by_ref().take(8).collect();
        for (i, wait) in waits.iter().enumerate() {
            let step = (START * 2u32.pow(u32::try_from(i).unwrap())).min(Duration::from_secs(8));
            assert!(
                *wait >= step / 2 && *wait <= step,
                "wait {i}: {wait:?} for step {step:?}"
            );
        }
        b.reset();
        assert!(b.next().unwrap() <= START);
    }
}
