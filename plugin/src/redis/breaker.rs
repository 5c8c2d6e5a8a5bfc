//! The per-VM circuit breaker: after `failures` consecutive failed calls it opens and no Redis
//! calls are made for `cooldown`; then one probe call is let through (half-open). The probe's
//! success closes the breaker, its failure opens it for another cool-down.

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
    cooldown_ms: u64,
    consecutive_failures: u32,
    state: BreakerState,
    /// Open: when the cool-down ends. Half-open: when the probe is given up as lost.
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
    pub fn new(threshold: u32, cooldown_ms: u64) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown_ms: cooldown_ms.max(1),
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
                // Cool-down over (or the previous probe was lost): this call is the probe.
                self.state = BreakerState::HalfOpen;
                self.until_ms = now_ms.saturating_add(probe_timeout_ms.max(1));
                true
            }
            BreakerState::Open | BreakerState::HalfOpen => false,
        }
    }

    pub fn on_success(&mut self) -> Transition {
        self.consecutive_failures = 0;
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
                self.state = BreakerState::Open;
                self.until_ms = now_ms.saturating_add(self.cooldown_ms);
                Transition::None
            }
            BreakerState::Closed if self.consecutive_failures >= self.threshold => {
                self.state = BreakerState::Open;
                self.until_ms = now_ms.saturating_add(self.cooldown_ms);
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
        let mut b = Breaker::new(3, 1000);
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
        let mut b = Breaker::new(1, 1000);
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
        let mut b = Breaker::new(2, 1000);
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
        let mut b = Breaker::new(1, 1000);
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
        let mut b = Breaker::new(1, 1000);
        b.on_failure(0);
        assert_eq!(b.on_failure(900), Transition::None);
        assert!(b.try_acquire(1000, 100));
    }
}
