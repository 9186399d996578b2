//! A request rate per client address, for the ban API: one local client that floods it
//! (a runaway script, a forged request loop) gets 429s while a SIP proxy's calls go through.
//! A token bucket per address; addresses idle for a minute are forgotten, so the table holds
//! only the clients of the last minute.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// How many clients the table holds before it forgets the idle ones.
const TABLE_TIDY_AT: usize = 4096;
const IDLE: Duration = Duration::from_secs(60);

pub struct ClientRate {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl ClientRate {
    pub fn new(per_sec: u32, burst: u32) -> Self {
        Self {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `client` may make a request at `now`; spends it if so.
    pub fn allow(&self, client: IpAddr, now: Instant) -> bool {
        let mut buckets = crate::lock(&self.buckets);
        if buckets.len() >= TABLE_TIDY_AT {
            buckets.retain(|_, (_, at)| now.saturating_duration_since(*at) < IDLE);
        }
        let (tokens, at) = buckets.entry(client).or_insert((self.burst, now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() * self.per_sec;
        *tokens = (*tokens + refill).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_past_its_rate_does_not_slow_another() {
        let rate = ClientRate::new(10, 20);
        let (flood, proxy): (IpAddr, IpAddr) =
            ("127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap());
        let t0 = Instant::now();
        let allowed = (0..100).filter(|_| rate.allow(flood, t0)).count();
        assert_eq!(allowed, 20, "the burst, then nothing");
        assert!(rate.allow(proxy, t0), "another client is not affected");
        // A second later: ten more.
        let t1 = t0 + Duration::from_secs(1);
        let allowed = (0..100).filter(|_| rate.allow(flood, t1)).count();
        assert_eq!(allowed, 10);
    }
}
