//! Exponential backoff with jitter, for retries after failures.

use std::time::Duration;

/// Exponential backoff with jitter: each delay is drawn from [d * (1 - jitter), d], d doubling
/// from the base to a cap.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    /// The share of each delay that is random: 0.5 spreads retries widely (server errors),
    /// less keeps the doubling visible (key rejections, where the schedule is the point).
    jitter: f64,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
            jitter: 0.5,
        }
    }

    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter.clamp(0.0, 1.0);
        self
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        jitter_between(d.mul_f64(1.0 - self.jitter), d)
    }

    /// The longest delay.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

pub(super) fn jitter_between(low: Duration, high: Duration) -> Duration {
    if high <= low {
        return low;
    }
    let span = (high - low).as_millis() as u64;
    low + Duration::from_millis(fastrand::u64(0..=span))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let full = Duration::from_secs(1 << i.min(10)).min(Duration::from_secs(10));
            assert!(*d >= full / 2 && *d <= full, "attempt {i}: {d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }
}
