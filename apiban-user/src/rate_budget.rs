//! A sliding-window request budget: at most N requests in *any* window of length T.
//!
//! A token bucket refilling at N/T lets a full bucket plus a window's refill through inside
//! one window (up to 2N); APIBAN counts requests per key per window, so a burst like that
//! earns 429s. Keeping the send times of the last N requests makes the guarantee exact.
//!
//! Exact on our clock, that is. The server counts arrivals, and a request reaches it some
//! time after we count it: a connection to set up, a TLS handshake, a retransmission, a
//! busy runtime. When an old request was slow and a new one fast, the server sees them
//! closer together than we sent them. So each request holds its place for the window plus
//! a guard (a tenth of the window, at most 5 s: 5 s of 120 s for APIBAN's 11 per 2 minutes).

use std::{
    collections::{BTreeSet, VecDeque},
    fs, io,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
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

    /// How long a request counts against the budget: the window and the guard.
    pub fn span(&self) -> Duration {
        span(self.limit)
    }

    fn forget_before(&mut self, now: Instant) {
        while let Some(&first) = self.sent.front() {
            if now.saturating_duration_since(first) >= self.span() {
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
        self.sent[0] + self.span()
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

    /// Takes back the request recorded at `at`, which was not sent after all.
    pub fn give_back(&mut self, at: Instant) {
        if let Some(i) = self.sent.iter().rposition(|&t| t == at) {
            self.sent.remove(i);
        }
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

    /// Another party may have spent the whole budget at `at` without our count knowing (a
    /// leader that polled while etcd could not record its requests): count it so, with the
    /// sends we know of, keeping the most recent.
    pub fn assume_spent_at(&mut self, at: Instant) {
        let mut all: Vec<Instant> = self.sent.iter().copied().collect();
        all.extend(std::iter::repeat_n(at, self.limit.requests as usize));
        all.sort();
        let keep = all.len().saturating_sub(self.limit.requests as usize);
        self.sent = all.into_iter().skip(keep).collect();
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
            if age < span(limit) {
                budget.record(now.checked_sub(age).unwrap_or(now));
            }
        }
        budget
    }
}

/// The budget's send times on disk, written before each request goes out.
///
/// Saving them with the ledger after each batch is not enough: a request in flight when the
/// agent dies (kill -9, OOM, a crash) would be forgotten, and the next agent, which starts
/// within a fraction of a second, would spend it again inside the same window. The file is a
/// few bytes and is replaced (write, rename) before every request; it is not fsynced, because
/// what it guards against is the agent's death, which the page cache survives. A host crash
/// can lose the last entry; the worst outcome is one 429, which the poller answers by
/// waiting a whole window.
#[derive(Debug, Clone)]
pub struct BudgetJournal {
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot read the request journal {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the request journal {path} is not a JSON list of Unix milliseconds")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write the request journal {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub const JOURNAL_FILE: &str = "requests.json";

impl BudgetJournal {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: dir.join(JOURNAL_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Send times saved by the last agent; none if it never sent a request.
    pub fn load(&self) -> Result<Vec<u64>, JournalError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(JournalError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        serde_json::from_slice(&bytes).map_err(|source| JournalError::Parse {
            path: self.path.clone(),
            source,
        })
    }

    pub fn save(&self, sent_ms: &[u64]) -> Result<(), JournalError> {
        let write_err = |source| JournalError::Write {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec(sent_ms).map_err(|e| write_err(e.into()))?;
        let written = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| io::Write::write_all(&mut f, &text))
            .and_then(|()| fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            // A full disk leaves a partial file: it must not take what little room is left.
            let _ = fs::remove_file(&tmp);
            return Err(write_err(e));
        }
        Ok(())
    }
}

/// Send times from every place a previous agent may have left them, each counted once.
pub fn merge_sent(a: &[u64], b: &[u64]) -> Vec<u64> {
    a.iter()
        .chain(b)
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn span(limit: RateLimit) -> Duration {
    limit.window + (limit.window / 10).min(Duration::from_secs(5))
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
    fn a_request_not_sent_gives_its_slot_back() {
        let limit = RateLimit {
            requests: 2,
            window: Duration::from_secs(60),
        };
        let mut budget = RateBudget::new(limit);
        let t0 = Instant::now();
        budget.record(t0);
        let t1 = t0 + Duration::from_secs(1);
        budget.record(t1);
        assert_eq!(budget.remaining(t1), 0);
        budget.give_back(t1);
        assert_eq!(budget.remaining(t1), 1);
        assert_eq!(budget.next_allowed(t1), t1);
        // Only the one given back: the other still counts.
        budget.give_back(t1);
        assert_eq!(budget.remaining(t1), 1);
    }

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
        // The 10 s window and its 1 s guard.
        assert_eq!(budget.next_allowed(t0), t0 + Duration::from_secs(11));
        assert_eq!(budget.remaining(t0 + Duration::from_secs(10)), 0);
        assert_eq!(budget.remaining(t0 + Duration::from_secs(11)), 3);
    }

    #[test]
    fn exhaust_waits_a_whole_window() {
        let t0 = Instant::now();
        let mut budget = RateBudget::new(limit(11, 120));
        budget.record(t0);
        budget.exhaust(t0 + Duration::from_secs(5));
        assert_eq!(
            budget.next_allowed(t0 + Duration::from_secs(6)),
            t0 + Duration::from_secs(130)
        );
    }

    #[test]
    fn a_budget_spent_elsewhere_waits_a_window_from_then_and_keeps_later_sends() {
        let t0 = Instant::now();
        let mut budget = RateBudget::new(limit(3, 60));
        budget.record(t0);
        budget.assume_spent_at(t0 + Duration::from_secs(10));
        // The whole budget at 10 s: nothing before 10 s + the window and guard (65 s).
        assert_eq!(
            budget.next_allowed(t0 + Duration::from_secs(20)),
            t0 + Duration::from_secs(75)
        );
        // A send known after it stays counted.
        let mut later = RateBudget::new(limit(3, 60));
        later.record(t0 + Duration::from_secs(30));
        later.assume_spent_at(t0 + Duration::from_secs(10));
        assert_eq!(
            later.next_allowed(t0 + Duration::from_secs(31)),
            t0 + Duration::from_secs(75)
        );
        assert_eq!(later.remaining(t0 + Duration::from_secs(76)), 2);
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
        // The oldest, 50 s ago, leaves after the 60 s window and its 5 s guard.
        let wait = next.duration_since(now);
        assert!(
            wait >= Duration::from_secs(14) && wait <= Duration::from_secs(16),
            "{wait:?}"
        );
        // A tighter limit after a config change still respects what was sent.
        let mut tighter = RateBudget::from_wall_clock(limit(2, 60), &saved, now);
        assert_eq!(tighter.remaining(now), 0);
    }

    #[test]
    fn the_journal_round_trips_and_a_missing_one_is_empty() {
        let dir = std::env::temp_dir().join(format!("apiban-journal-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let journal = BudgetJournal::in_dir(&dir);
        assert_eq!(journal.load().unwrap(), Vec::<u64>::new());
        journal.save(&[10, 20, 30]).unwrap();
        journal.save(&[20, 30, 40]).unwrap();
        assert_eq!(journal.load().unwrap(), vec![20, 30, 40]);
        fs::write(journal.path(), b"{not a list").unwrap();
        assert!(matches!(journal.load(), Err(JournalError::Parse { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn merged_send_times_count_once() {
        assert_eq!(merge_sent(&[3, 1, 2], &[2, 4]), vec![1, 2, 3, 4]);
    }
}
