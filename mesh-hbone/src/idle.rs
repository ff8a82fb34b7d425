//! Idle timeouts of relayed connections (the agent's HBONE tunnels and relays, the waypoint's
//! TCP pass-through and upgraded connections), kept by one sweeper per process instead of a
//! timer per connection.
//!
//! A tokio `Sleep` per tunnel cost about 170 bytes for the tunnel's life (the timer entry and
//! its box), and every poll that moved bytes pushed it back: a clock read and a trip through
//! the timer wheel's lock on the data path. Here a process keeps one coarse clock: it advances
//! [`TICKS_PER_TIMEOUT`] times per timeout and wakes every registered tunnel when it does. A
//! tunnel notes the tick of its last byte ([`IdleWatch`]: 16 bytes, its waker in a shared slab)
//! and is idle once more than a timeout's worth of ticks has passed without one: it closes
//! between one timeout and one timeout plus a tick after its last byte (2 s → 2.0–2.25 s).

use std::{
    num::NonZeroU32,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex, PoisonError,
    },
    task::{Context, Waker},
    time::Duration,
};

use slab::Slab;

/// Ticks of the clock per timeout: the timeout's precision (at most an eighth of it late)
/// against how often every idle tunnel is woken to look.
const TICKS_PER_TIMEOUT: u32 = 8;
/// The clock never ticks faster than this, whatever the timeout.
const MIN_TICK: Duration = Duration::from_millis(10);

/// A process's idle clock for tunnels closed after `timeout` without a byte either way.
#[derive(Debug)]
pub struct IdleSweep {
    timeout: Duration,
    tick: Duration,
    /// Ticks a tunnel may stay without a byte (beyond the tick it last moved in).
    ticks: u32,
    /// Ticks since the sweeper started.
    now: AtomicU32,
    /// The wakers of the tunnels being watched.
    wakers: Mutex<Slab<Waker>>,
}

impl IdleSweep {
    /// A clock for `timeout`; [`IdleSweep::run`] must be spawned for it to advance.
    pub fn new(timeout: Duration) -> Arc<Self> {
        let tick = (timeout / TICKS_PER_TIMEOUT).max(MIN_TICK);
        let ticks = u32::try_from(timeout.as_nanos().div_ceil(tick.as_nanos())).unwrap_or(u32::MAX);
        Self::with(timeout, tick, ticks)
    }

    /// A clock that only wakes its watches every `tick`, never expiring them: a same-node
    /// connection whose bytes the kernel sends past the agent looks at the kernel's count on
    /// each tick, so that its bytes show while it runs.
    pub fn ticker(tick: Duration) -> Arc<Self> {
        Self::with(Duration::MAX, tick.max(MIN_TICK), u32::MAX)
    }

    fn with(timeout: Duration, tick: Duration, ticks: u32) -> Arc<Self> {
        Arc::new(Self {
            timeout,
            tick,
            ticks,
            now: AtomicU32::new(0),
            wakers: Mutex::new(Slab::new()),
        })
    }

    /// Advances the clock every tick and wakes every watched tunnel, for as long as the process
    /// runs.
    pub async fn run(self: Arc<Self>) {
        let mut interval = tokio::time::interval(self.tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            interval.tick().await;
            self.advance();
        }
    }

    fn advance(&self) {
        self.now.fetch_add(1, Ordering::Relaxed);
        for (_, waker) in self.lock().iter() {
            waker.wake_by_ref();
        }
    }

    fn now(&self) -> u32 {
        self.now.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slab<Waker>> {
        // A waker's `wake_by_ref` panicking cannot leave the slab half-changed.
        self.wakers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts watching a tunnel whose bytes have just moved.
    pub fn watch(self: &Arc<Self>) -> IdleWatch {
        IdleWatch {
            since: self.now(),
            slot: None,
            sweep: Arc::clone(self),
        }
    }
}

/// One tunnel's place on the idle clock.
#[derive(Debug)]
pub struct IdleWatch {
    sweep: Arc<IdleSweep>,
    /// Its waker's slot in the sweep plus one, once polled (four bytes, so the watch takes 16).
    slot: Option<NonZeroU32>,
    /// The tick in which its bytes last moved.
    since: u32,
}

impl IdleWatch {
    /// Whether the tunnel has been idle for the timeout; `moved`: bytes moved since the last
    /// call. Keeps `cx`'s waker registered, so the tunnel looks again at the next tick.
    pub fn expired(&mut self, moved: bool, cx: &mut Context<'_>) -> bool {
        let now = self.sweep.now();
        if moved {
            self.since = now;
        }
        let mut wakers = self.sweep.lock();
        if let Some(slot) = self.slot {
            let registered = &mut wakers[slot_index(slot)];
            if !registered.will_wake(cx.waker()) {
                registered.clone_from(cx.waker());
            }
        } else {
            let index = wakers.insert(cx.waker().clone());
            // More than four billion open tunnels cannot be: the kernel runs out of sockets long
            // before.
            self.slot = u32::try_from(index + 1).ok().and_then(NonZeroU32::new);
            assert!(self.slot.is_some(), "idle sweep slot {index} out of range");
        }
        now.wrapping_sub(self.since) > self.sweep.ticks
    }

    pub fn timeout(&self) -> Duration {
        self.sweep.timeout
    }

    /// The clock's tick now.
    pub fn now(&self) -> u32 {
        self.sweep.now()
    }
}

impl Drop for IdleWatch {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            self.sweep.lock().remove(slot_index(slot));
        }
    }
}

fn slot_index(slot: NonZeroU32) -> usize {
    usize::try_from(slot.get() - 1).expect("u32 fits usize")
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    #[test]
    fn idle_after_more_than_a_timeouts_ticks_without_a_byte() {
        let sweep = IdleSweep::new(Duration::from_secs(2));
        assert_eq!((sweep.tick, sweep.ticks), (Duration::from_millis(250), 8));
        let mut watch = sweep.watch();
        for _ in 0..8 {
            assert!(!watch.expired(false, &mut cx()));
            sweep.advance();
        }
        // Eight ticks later: the last byte may have moved at the end of its tick, so not yet.
        assert!(!watch.expired(false, &mut cx()));
        sweep.advance();
        assert!(watch.expired(false, &mut cx()), "nine ticks without a byte");
        // A byte starts the count again.
        assert!(!watch.expired(true, &mut cx()));
    }

    #[test]
    fn a_tunnel_that_moves_bytes_is_never_idle() {
        let sweep = IdleSweep::new(Duration::from_secs(1));
        let mut watch = sweep.watch();
        for _ in 0..100 {
            sweep.advance();
            assert!(!watch.expired(true, &mut cx()));
        }
    }

    #[test]
    fn each_tick_wakes_every_watched_tunnel_and_a_closed_one_leaves() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let sweep = IdleSweep::new(Duration::from_secs(1));
        let count = Arc::new(Count(0.into()));
        let waker = Waker::from(Arc::clone(&count));
        let mut watches: Vec<_> = (0..3).map(|_| sweep.watch()).collect();
        for w in &mut watches {
            w.expired(false, &mut Context::from_waker(&waker));
        }
        sweep.advance();
        assert_eq!(count.0.load(Ordering::Relaxed), 3);
        watches.pop();
        sweep.advance();
        assert_eq!(count.0.load(Ordering::Relaxed), 5);
        drop(watches);
        assert!(sweep.lock().is_empty(), "closed tunnels leave the sweep");
    }

    #[test]
    fn short_timeouts_tick_no_faster_than_the_minimum() {
        let sweep = IdleSweep::new(Duration::from_millis(20));
        assert_eq!((sweep.tick, sweep.ticks), (MIN_TICK, 2));
    }

    #[test]
    fn the_watch_is_small() {
        // What a tunnel keeps for its timeout (the slab's waker aside): 16 bytes in its record.
        assert!(size_of::<Option<IdleWatch>>() <= 16);
    }
}
