//! The per-VM circuit breaker: after `failures` consecutive failed calls it opens and no Redis
//! calls are made until the next probe is due; then one call, whichever comes first (a rate
//! limit, a cache lookup, a flush, a job), is let through as the probe (half-open). The probe's
//! success closes the breaker at once; its failure opens it again for twice the previous wait.
//!
//! Probe schedule: the first probe is due `probe_interval` after the breaker opens (100ms by
//! default), each failed probe doubles the wait, up to `cooldown` (1s by default). So a short
//! outage is over for the filter within about one interval of Redis answering, and a long one
//! costs at most one probe per `cooldown` per VM.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// The value of the breaker gauge: 0 closed, 1 open or probing.
    pub fn is_open(self) -> bool {
        self != BreakerState::Closed
    }
}

#[derive(Clone, Debug)]
pub struct Breaker {
    threshold: u32,
    first_wait_ms: u64,
    max_wait_ms: u64,
    /// The wait before the next probe after a failure while open.
    wait_ms: u64,
    consecutive_failures: u32,
    state: BreakerState,
    /// Open: when the next probe is due. Half-open: when the probe is given up as lost.
    until_ms: u64,
}

/// What a state change means for the caller (metrics, logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    None,
    Opened,
    Closed,
}

impl Breaker {
    /// `probe_interval_ms`: the wait before the first probe (capped at `cooldown_ms`, the
    /// longest wait between probes).
    pub fn new(threshold: u32, probe_interval_ms: u64, cooldown_ms: u64) -> Breaker {
        let max_wait_ms = cooldown_ms.max(1);
        let first_wait_ms = probe_interval_ms.clamp(1, max_wait_ms);
        Breaker {
            threshold: threshold.max(1),
            first_wait_ms,
            max_wait_ms,
            wait_ms: first_wait_ms,
            consecutive_failures: 0,
            state: BreakerState::Closed,
            until_ms: 0,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a call may be made now. In half-open state exactly one caller (the probe) gets
    /// `true`; `probe_timeout_ms` bounds how long the breaker waits for that probe's outcome.
    pub fn try_acquire(&mut self, now_ms: u64, probe_timeout_ms: u64) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open | BreakerState::HalfOpen if now_ms >= self.until_ms => {
                // The probe is due (or the previous one was lost): this call is the probe.
                self.state = BreakerState::HalfOpen;
                self.until_ms = now_ms.saturating_add(probe_timeout_ms.max(1));
                true
            }
            BreakerState::Open | BreakerState::HalfOpen => false,
        }
    }

    pub fn on_success(&mut self) -> Transition {
        self.consecutive_failures = 0;
        self.wait_ms = self.first_wait_ms;
        let was_open = self.state.is_open();
        self.state = BreakerState::Closed;
        if was_open {
            Transition::Closed
        } else {
            Transition::None
        }
    }

    pub fn on_failure(&mut self, now_ms: u64) -> Transition {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        match self.state {
            BreakerState::HalfOpen => {
                // The probe failed: wait twice as long for the next one, up to the cool-down.
                self.wait_ms = self.wait_ms.saturating_mul(2).min(self.max_wait_ms);
                self.state = BreakerState::Open;
                self.until_ms = now_ms.saturating_add(self.wait_ms);
                Transition::None
            }
            BreakerState::Closed if self.consecutive_failures >= self.threshold => {
                self.wait_ms = self.first_wait_ms;
                self.state = BreakerState::Open;
                self.until_ms = now_ms.saturating_add(self.wait_ms);
                Transition::Opened
            }
            // Late failures of calls made before the breaker opened change nothing.
            _ => Transition::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_only() {
        let mut b = Breaker::new(3, 1000, 1000);
        assert_eq!(b.on_failure(0), Transition::None);
        assert_eq!(b.on_failure(0), Transition::None);
        assert_eq!(b.on_success(), Transition::None);
        assert_eq!(b.on_failure(0), Transition::None);
        assert_eq!(b.on_failure(0), Transition::None);
        assert!(b.try_acquire(0, 100));
        assert_eq!(b.on_failure(10), Transition::Opened);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.try_acquire(500, 100));
        assert!(!b.try_acquire(1009, 100));
    }

    #[test]
    fn one_probe_after_cooldown_then_closes_on_success() {
        let mut b = Breaker::new(1, 1000, 1000);
        assert_eq!(b.on_failure(0), Transition::Opened);
        assert!(b.try_acquire(1000, 100), "cool-down over: probe");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.try_acquire(1001, 100), "only one probe");
        assert_eq!(b.on_success(), Transition::Closed);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.try_acquire(1002, 100));
    }

    #[test]
    fn failed_probe_reopens_for_another_cooldown() {
        let mut b = Breaker::new(2, 1000, 1000);
        b.on_failure(0);
        b.on_failure(0);
        assert!(b.try_acquire(1000, 100));
        assert_eq!(b.on_failure(1050), Transition::None);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.try_acquire(2000, 100));
        assert!(b.try_acquire(2050, 100));
    }

    #[test]
    fn lost_probe_allows_another_probe() {
        let mut b = Breaker::new(1, 1000, 1000);
        b.on_failure(0);
        assert!(b.try_acquire(1000, 100));
        assert!(!b.try_acquire(1099, 100));
        assert!(
            b.try_acquire(1100, 100),
            "probe outcome never came: probe again"
        );
    }

    #[test]
    fn late_failures_while_open_do_not_extend_the_cooldown() {
        let mut b = Breaker::new(1, 1000, 1000);
        b.on_failure(0);
        assert_eq!(b.on_failure(900), Transition::None);
        assert!(b.try_acquire(1000, 100));
    }

    /// When each probe is due after the breaker opened at 0, every probe failing at once.
    fn probe_times(b: &mut Breaker, probes: usize) -> Vec<u64> {
        let mut times = Vec::new();
        let mut now = 0;
        while times.len() < probes {
            if b.try_acquire(now, 50) {
                times.push(now);
                b.on_failure(now);
            }
            now += 1;
        }
        times
    }

    #[test]
    fn probes_start_after_the_probe_interval_and_back_off_to_the_cooldown() {
        let mut b = Breaker::new(1, 100, 1000);
        assert_eq!(b.on_failure(0), Transition::Opened);
        assert_eq!(
            probe_times(&mut b, 7),
            vec![100, 300, 700, 1500, 2500, 3500, 4500],
            "100, 200, 400, 800ms, then every cool-down"
        );
    }

    #[test]
    fn a_successful_probe_closes_and_the_next_opening_starts_short_again() {
        let mut b = Breaker::new(1, 100, 1000);
        b.on_failure(0);
        assert_eq!(probe_times(&mut b, 5).last(), Some(&2500));
        assert!(b.try_acquire(3500, 50));
        assert_eq!(b.on_success(), Transition::Closed);
        assert_eq!(b.on_failure(4000), Transition::Opened);
        assert!(!b.try_acquire(4099, 50));
        assert!(b.try_acquire(4100, 50), "first probe 100ms after reopening");
    }

    #[test]
    fn the_probe_interval_is_capped_at_the_cooldown() {
        let mut b = Breaker::new(1, 500, 200);
        b.on_failure(0);
        assert_eq!(probe_times(&mut b, 3), vec![200, 400, 600]);
    }
}
