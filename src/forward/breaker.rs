//! The IAM circuit breaker: stops sending traffic to an IAM that keeps failing.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The breaker's externally visible state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub const ALL: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
    ];

    /// The `state` label of `iamproxy_iam_breaker_state`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// A consecutive-failure circuit breaker. Lock-free: the closed state, which is what the
/// hot path sees nearly always, costs one atomic load.
///
/// `consecutive_failures` failures in a row open it. While open, IAM-bound requests go to
/// Rails for `open_for`; then exactly one request is let through as a probe. A successful
/// probe closes the breaker, a failed one opens it for another `open_for`.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    epoch: Instant,
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which the breaker is open; 0 means closed.
    open_until_ms: AtomicU64,
    probing: AtomicBool,
}

impl Breaker {
    pub fn new(threshold: NonZeroU32, open_for: Duration) -> Breaker {
        Breaker {
            threshold: threshold.get(),
            open_for,
            epoch: Instant::now(),
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that an opening at the epoch itself is not mistaken for "closed".
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Asks to send one request to IAM. `None` means the breaker is open: go to Rails.
    /// The attempt must be reported with [`Attempt::succeeded`] or [`Attempt::failed`];
    /// one dropped unreported (the client went away) releases the probe slot.
    pub fn try_acquire(&self) -> Option<Attempt<'_>> {
        let open_until = self.open_until_ms.load(Ordering::Acquire);
        if open_until == 0 {
            return Some(Attempt {
                breaker: self,
                probe: false,
                reported: false,
            });
        }
        if self.now_ms() < open_until {
            return None;
        }
        // The wait is over: let exactly one request through.
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Attempt {
                breaker: self,
                probe: true,
                reported: false,
            })
    }

    fn record_success(&self) {
        self.failures.store(0, Ordering::Release);
        self.open_until_ms.store(0, Ordering::Release);
        self.probing.store(false, Ordering::Release);
    }

    fn record_failure(&self, probe: bool) -> bool {
        let failures = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        let trips = failures >= self.threshold && self.open_until_ms.load(Ordering::Acquire) == 0;
        if probe || trips {
            let until = self.now_ms() + u64::try_from(self.open_for.as_millis()).unwrap_or(0);
            self.open_until_ms.store(until, Ordering::Release);
            self.probing.store(false, Ordering::Release);
            return true;
        }
        false
    }

    pub fn state(&self) -> BreakerState {
        let open_until = self.open_until_ms.load(Ordering::Acquire);
        if open_until == 0 {
            BreakerState::Closed
        } else if self.now_ms() < open_until {
            BreakerState::Open
        } else {
            BreakerState::HalfOpen
        }
    }
}

/// One request the breaker let through to IAM.
#[derive(Debug)]
pub struct Attempt<'a> {
    breaker: &'a Breaker,
    probe: bool,
    reported: bool,
}

impl Attempt<'_> {
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    pub fn succeeded(mut self) {
        self.reported = true;
        self.breaker.record_success();
    }

    /// Returns true when this failure opened the breaker.
    pub fn failed(mut self) -> bool {
        self.reported = true;
        self.breaker.record_failure(self.probe)
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.probe && !self.reported {
            self.breaker.probing.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32) -> Breaker {
        Breaker::new(NonZeroU32::new(threshold).unwrap(), Duration::from_secs(10))
    }

    fn fail_once(b: &Breaker) -> bool {
        b.try_acquire().expect("breaker should admit").failed()
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures() {
        let b = breaker(3);
        assert!(!fail_once(&b));
        assert!(!fail_once(&b));
        assert!(fail_once(&b));
        assert!(b.try_acquire().is_none());
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count() {
        let b = breaker(2);
        fail_once(&b);
        b.try_acquire().unwrap().succeeded();
        assert!(!fail_once(&b));
        assert!(b.try_acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn lets_exactly_one_probe_through_after_open_for() {
        let b = breaker(1);
        fail_once(&b);
        tokio::time::advance(Duration::from_millis(9_990)).await;
        assert!(b.try_acquire().is_none());
        tokio::time::advance(Duration::from_millis(20)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let probe = b.try_acquire().expect("one probe");
        assert!(probe.is_probe());
        assert!(b.try_acquire().is_none(), "a second request while probing");
        drop(probe);
    }

    #[tokio::test(start_paused = true)]
    async fn successful_probe_closes_failed_probe_reopens() {
        let b = breaker(1);
        fail_once(&b);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(b.try_acquire().unwrap().failed());
        assert!(b.try_acquire().is_none());
        tokio::time::advance(Duration::from_secs(11)).await;
        b.try_acquire().unwrap().succeeded();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(!b.try_acquire().unwrap().is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_frees_the_slot() {
        let b = breaker(1);
        fail_once(&b);
        tokio::time::advance(Duration::from_secs(11)).await;
        drop(b.try_acquire().unwrap());
        assert!(b.try_acquire().unwrap().is_probe());
    }
}
