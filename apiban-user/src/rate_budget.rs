//! A sliding-window request budget: at most N requests in *any* window of length T.
//!
//! A token bucket refilling at N/T lets a full bucket plus a window's refill through inside
//! one window (up to 2N); APIBAN counts requests per key per window, so a burst like that
//! earns 429s. Keeping the send times of the last N requests makes the guarantee exact.

use std::{
    collections::VecDeque,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::human::RateLimit;

#[derive(Debug, Clone)]
pub struct RateBudget {
    limit: RateLimit,
    /// Send times of the most recent requests, oldest first; never more than `limit.requests`.
    sent: VecDeque<Instant>,
}

impl RateBudget {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            sent: VecDeque::with_capacity(limit.requests as usize),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    fn forget_before(&mut self, now: Instant) {
        while let Some(&first) = self.sent.front() {
            if now.saturating_duration_since(first) >= self.limit.window {
                self.sent.pop_front();
            } else {
                break;
            }
        }
    }

    /// Requests still allowed now without waiting.
    pub fn remaining(&mut self, now: Instant) -> u32 {
        self.forget_before(now);
        self.limit.requests - self.sent.len() as u32
    }

    /// The earliest instant at which one more request keeps every window within the limit.
    pub fn next_allowed(&mut self, now: Instant) -> Instant {
        self.forget_before(now);
        if (self.sent.len() as u32) < self.limit.requests {
            return now;
        }
        // Full: the oldest send must leave the window first.
        self.sent[0] + self.limit.window
    }

    /// Records a request sent at `now`. Callers wait for [`next_allowed`](Self::next_allowed)
    /// first; recording beyond the limit evicts the oldest entry so the state stays bounded.
    pub fn record(&mut self, now: Instant) {
        self.forget_before(now);
        if self.sent.len() as u32 >= self.limit.requests {
            self.sent.pop_front();
        }
        self.sent.push_back(now);
    }

    /// The server said we are over its limit although our own count disagrees (another client
    /// with the same key, or a restart we could not account for): treat the window as full
    /// from now, so the next request waits for a whole window.
    pub fn exhaust(&mut self, now: Instant) {
        self.sent.clear();
        for _ in 0..self.limit.requests {
            self.sent.push_back(now);
        }
    }

    /// Send times as Unix milliseconds, for the state file: a restarted agent must not spend
    /// a budget its previous life already used.
    pub fn to_wall_clock(&self, now: Instant) -> Vec<u64> {
        let wall_now = unix_millis(SystemTime::now());
        self.sent
            .iter()
            .map(|&t| wall_now.saturating_sub(now.saturating_duration_since(t).as_millis() as u64))
            .collect()
    }

    /// Restores send times saved by [`to_wall_clock`](Self::to_wall_clock).
    pub fn from_wall_clock(limit: RateLimit, sent_ms: &[u64], now: Instant) -> Self {
        let wall_now = unix_millis(SystemTime::now());
        let mut budget = Self::new(limit);
        let mut times: Vec<u64> = sent_ms.to_vec();
        times.sort_unstable();
        for ms in times {
            // A send time in the future (clock stepped back) counts as now: conservative.
            let age = Duration::from_millis(wall_now.saturating_sub(ms));
            if age < limit.window {
                budget.record(now.checked_sub(age).unwrap_or(now));
            }
        }
        budget
    }
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(n: u32, secs: u64) -> RateLimit {
        RateLimit {
            requests: n,
            window: Duration::from_secs(secs),
        }
    }

    /// Drives the budget as the poller does (wait, then send) and checks every window.
    #[test]
    fn never_more_than_n_in_any_window() {
        let start = Instant::now();
        let mut budget = RateBudget::new(limit(11, 120));
        let mut sends = Vec::new();
        let mut now = start;
        for i in 0..200u64 {
            now = budget.next_allowed(now).max(now);
            budget.record(now);
            sends.push(now);
            // Irregular demand: sometimes idle for a while, mostly as fast as allowed.
            if i % 17 == 0 {
                now += Duration::from_secs(37);
            }
        }
        for (i, &t) in sends.iter().enumerate() {
            let in_window = sends[i..]
                .iter()
                .take_while(|&&u| u.duration_since(t) < Duration::from_secs(120))
                .count();
            assert!(
                in_window <= 11,
                "{in_window} requests in one window from send {i}"
            );
        }
        // And it is not needlessly slow: 200 requests need 18 full windows, plus the idle
        // pauses (12 of 37 s).
        let elapsed = now.duration_since(start);
        assert!(
            elapsed <= Duration::from_secs(120 * 18 + 37 * 12),
            "{elapsed:?}"
        );
    }

    #[test]
    fn a_token_bucket_burst_is_refused() {
        let t0 = Instant::now();
        let mut budget = RateBudget::new(limit(3, 10));
        for _ in 0..3 {
            assert_eq!(budget.next_allowed(t0), t0);
            budget.record(t0);
        }
        assert_eq!(budget.next_allowed(t0), t0 + Duration::from_secs(10));
        assert_eq!(budget.remaining(t0 + Duration::from_secs(9)), 0);
        assert_eq!(budget.remaining(t0 + Duration::from_secs(10)), 3);
    }

    #[test]
    fn exhaust_waits_a_whole_window() {
        let t0 = Instant::now();
        let mut budget = RateBudget::new(limit(11, 120));
        budget.record(t0);
        budget.exhaust(t0 + Duration::from_secs(5));
        assert_eq!(
            budget.next_allowed(t0 + Duration::from_secs(6)),
            t0 + Duration::from_secs(125)
        );
    }

    #[test]
    fn survives_a_restart_through_wall_clock_times() {
        let now = Instant::now();
        let mut budget = RateBudget::new(limit(4, 60));
        for s in [50, 30, 10, 1] {
            budget.record(now - Duration::from_secs(s));
        }
        let saved = budget.to_wall_clock(now);
        let mut restored = RateBudget::from_wall_clock(limit(4, 60), &saved, now);
        assert_eq!(restored.remaining(now), 0);
        let next = restored.next_allowed(now);
        let wait = next.duration_since(now);
        assert!(
            wait >= Duration::from_secs(9) && wait <= Duration::from_secs(11),
            "{wait:?}"
        );
        // A tighter limit after a config change still respects what was sent.
        let mut tighter = RateBudget::from_wall_clock(limit(2, 60), &saved, now);
        assert_eq!(tighter.remaining(now), 0);
    }
}
