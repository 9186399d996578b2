//! The APIBAN poller: full pulls, incremental polls and reconciliation, within the key's
//! rate budget, with what to do after each kind of failure.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{
    RequestReport, Update,
    backoff::{Backoff, jitter_between},
    unix_now,
};
use crate::{
    human::RateLimit,
    rate_budget::{self, BudgetJournal, RateBudget},
    source::apiban::{ApibanClient, Batch, ClientError},
    state::ApibanCursor,
};

#[derive(Clone, Debug, PartialEq)]
pub struct PollSettings {
    pub poll_interval: Duration,
    pub resync_interval: Duration,
    pub rate_limit: RateLimit,
    /// First retry delay after a server error, timeout or bad body; doubles up to the cap.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Longest wait between retries while APIBAN rejects the key (403). The first retry
    /// comes one poll interval later and the wait doubles from there: a 403 from a WAF or
    /// during maintenance passes in seconds, a revoked key does not.
    pub key_retry_max: Duration,
}

impl Default for PollSettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(60),
            resync_interval: Duration::from_secs(86_400),
            rate_limit: RateLimit::APIBAN,
            backoff_base: Duration::from_secs(5),
            backoff_cap: Duration::from_secs(600),
            key_retry_max: Duration::from_secs(1800),
        }
    }
}

/// The wait before a request etcd did not record in the fleet's budget is tried again.
const BUDGET_RETRY: Duration = Duration::from_secs(1);

/// How far this host's clock may be from APIBAN's `Date` before the log says so.
const CLOCK_WARN: Duration = Duration::from_secs(30);

/// Longest a request may wait for etcd to record its slot before it is sent on it.
const BUDGET_STALE: Duration = Duration::from_secs(2);

/// How often a rejected key is logged again while it stays rejected.
const KEY_REJECTED_LOG_EVERY: Duration = Duration::from_secs(3600);

/// APIBAN's answers to a rejected key (403), and when to ask again.
#[derive(Debug)]
struct KeyRejection {
    backoff: Backoff,
    /// Since when (Unix seconds) every answer has been a 403.
    since: Option<u64>,
    last_logged: Option<Instant>,
}

impl KeyRejection {
    fn new(settings: &PollSettings) -> Self {
        Self {
            backoff: Backoff::new(settings.poll_interval, settings.key_retry_max).with_jitter(0.2),
            since: None,
            last_logged: None,
        }
    }

    /// A 403: returns how long to wait before the next try.
    fn rejected(&mut self) -> Duration {
        let now = Instant::now();
        let since = *self.since.get_or_insert_with(unix_now);
        let delay = self.backoff.next_delay();
        let first = self.last_logged.is_none();
        if self
            .last_logged
            .is_none_or(|t| now.duration_since(t) >= KEY_REJECTED_LOG_EVERY)
        {
            self.last_logged = Some(now);
            let retry_in = crate::human::format_duration(Duration::from_secs(delay.as_secs()));
            if first {
                tracing::error!(
                    "API key rejected (403): enforcing the bans already known; retrying in \
                     {retry_in}, doubling up to {} (SIGHUP, `apiban reload` or a changed key \
                     file retries at once); if it persists check --api-key/APIBAN_KEY",
                    crate::human::format_duration(self.backoff.cap())
                );
            } else {
                tracing::error!(
                    since = %crate::clock::utc(since),
                    "API key still rejected (403); next try in {retry_in}"
                );
            }
        }
        delay
    }

    /// Any answer that is not a 403.
    fn accepted(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                rejected_for = %crate::human::format_duration(Duration::from_secs(
                    unix_now().saturating_sub(since)
                )),
                "API key accepted again"
            );
        }
        self.backoff.reset();
        self.last_logged = None;
    }
}

/// The APIBAN poller: full pulls, incremental polls and reconciliation, within the budget.
pub struct ApibanPoller {
    client: ApibanClient,
    settings: PollSettings,
    budget: RateBudget,
    /// Where the budget goes before each request; None without a state directory.
    journal: Option<BudgetJournal>,
    journal_failing: bool,
    key: KeyRejection,
    /// Cuts a wait after a 403 short: the operator reloaded or fixed the key.
    retry_now: std::sync::Arc<tokio::sync::Notify>,
    updates: mpsc::Sender<Update>,
    /// In a fleet: etcd holds the budget too, so that the next leader counts this one's.
    fleet_budget: Option<crate::cluster::FleetBudget>,
    /// The last request went out with etcd refusing to hold its time (NOSPACE).
    unrecorded_sends: bool,
    /// etcd did not record the last request's slot (it was not sent): said once.
    unrecorded_logged: bool,
    /// This host's clock is far from APIBAN's `Date`: said once.
    clock_warned: bool,
}

#[derive(Debug)]
enum Position {
    Full(String),
    Incremental(String),
}

/// How a cycle of requests ended.
enum CycleEnd {
    /// "No new bans": the list is read to its end from this ID.
    Complete(String),
    /// An answer that did not move the list on (an empty batch, or the ID it was asked
    /// for): asking again at once would get the same answer and spend the budget doing it,
    /// so the poller waits a poll interval and goes on from this ID, a full pull included.
    Paused(String),
}

/// The owner went away: the agent is stopping.
struct Stopped;

impl ApibanPoller {
    pub fn new(
        client: ApibanClient,
        settings: PollSettings,
        cursor: &ApibanCursor,
        journal: Option<BudgetJournal>,
        updates: mpsc::Sender<Update>,
    ) -> Self {
        let now = Instant::now();
        let budget = match journal.as_ref().map_or(Ok(Vec::new()), BudgetJournal::load) {
            Ok(sent) => {
                // Agents before the journal saved the times in the state file.
                let sent = rate_budget::merge_sent(&sent, &cursor.requests_ms);
                RateBudget::from_wall_clock(settings.rate_limit, &sent, now)
            }
            Err(e) => {
                // What the last agent spent is unknown: assume all of it, just now.
                tracing::warn!(error = %crate::error_chain(&e), "waiting one rate-limit window before the first request");
                let mut budget = RateBudget::new(settings.rate_limit);
                budget.exhaust(now);
                budget
            }
        };
        Self {
            client,
            key: KeyRejection::new(&settings),
            settings,
            budget,
            journal,
            journal_failing: false,
            retry_now: Default::default(),
            updates,
            fleet_budget: None,
            unrecorded_sends: false,
            unrecorded_logged: false,
            clock_warned: false,
        }
    }

    /// A fleet leader's poller: no request goes out before etcd holds it in the budget.
    pub fn with_fleet_budget(mut self, budget: Option<crate::cluster::FleetBudget>) -> Self {
        // A leader that polled while etcd refused writes (NOSPACE) and then died left requests
        // etcd's record lacks; its successor counts the whole budget as spent then.
        if let Some(until_ms) = budget
            .as_ref()
            .and_then(crate::cluster::FleetBudget::unrecorded_until_ms)
        {
            let ago = Duration::from_millis(
                crate::cluster::clock::unix_now_ms().saturating_sub(until_ms),
            );
            if ago < self.budget.span() {
                let now = Instant::now();
                self.budget
                    .assume_spent_at(now.checked_sub(ago).unwrap_or(now));
                tracing::warn!(
                    "etcd refused writes within the last rate-limit window, so the fleet's record of APIBAN requests may lack some: counting the whole budget as spent then"
                );
            }
        }
        self.fleet_budget = budget;
        self
    }

    /// The poller waits on this after a 403; `notify_one` makes it retry at once.
    pub fn with_retry_signal(mut self, retry_now: std::sync::Arc<tokio::sync::Notify>) -> Self {
        self.retry_now = retry_now;
        self
    }

    /// Puts the budget on disk before a request goes out, so that the next agent counts it
    /// even if this one dies while the request is in flight.
    fn journal_budget(&mut self, sent_at: Instant) {
        let Some(journal) = &self.journal else { return };
        // A few bytes, written synchronously: the request must not leave before they are.
        match journal.save(&self.budget.to_wall_clock(sent_at)) {
            Ok(()) => self.journal_failing = false,
            Err(e) => {
                if !self.journal_failing {
                    tracing::error!(
                        error = %crate::error_chain(&e),
                        "a restart may overspend the APIBAN rate limit by the requests in flight"
                    );
                }
                self.journal_failing = true;
            }
        }
    }

    /// Runs until the owner stops listening. `cursor` is the engine's at start.
    pub async fn run(mut self, cursor: ApibanCursor) {
        let mut last_full_pull = cursor.last_full_pull;
        let mut position = match (&cursor.full_pull, &cursor.next_id) {
            (Some(pull), _) => {
                tracing::info!(id = %pull.next_id, "resuming the interrupted APIBAN full pull");
                Some(Position::Full(pull.next_id.clone()))
            }
            (None, Some(id)) => Some(Position::Incremental(id.clone())),
            (None, None) => None,
        };
        loop {
            let resync_due = last_full_pull.is_none_or(|t| {
                unix_now().saturating_sub(t) >= self.settings.resync_interval.as_secs()
            });
            let start = match position.take() {
                Some(Position::Full(id)) => Position::Full(id),
                Some(Position::Incremental(id)) if !resync_due => Position::Incremental(id),
                // No state yet, or reconciliation is due.
                _ => {
                    if self
                        .ask(|reply| Update::BeginFullPull { reply })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    Position::Full(crate::source::apiban::FIRST_ID.into())
                }
            };
            let full = matches!(start, Position::Full(_));
            position = Some(match self.cycle(start).await {
                Ok(CycleEnd::Complete(id)) => {
                    if full {
                        last_full_pull = Some(unix_now());
                    }
                    Position::Incremental(id)
                }
                Ok(CycleEnd::Paused(id)) if full => Position::Full(id),
                Ok(CycleEnd::Paused(id)) => Position::Incremental(id),
                Err(Stopped) => return,
            });
            let next = unix_now() + self.settings.poll_interval.as_secs();
            if self
                .updates
                .send(Update::ApibanNextPoll(next))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(self.settings.poll_interval).await;
        }
    }

    /// Fetches batches from `start` until "no new bans", or an answer that does not move the
    /// list on; returns how it ended and the ID to poll from next.
    async fn cycle(&mut self, start: Position) -> Result<CycleEnd, Stopped> {
        let (mut id, full) = match start {
            Position::Full(id) => (id, true),
            Position::Incremental(id) => (id, false),
        };
        let mut backoff = Backoff::new(self.settings.backoff_base, self.settings.backoff_cap);
        loop {
            let waited = self.wait_for_budget().await;
            let sent_at = Instant::now();
            self.budget.record(sent_at);
            self.journal_budget(sent_at);
            let answer = match &self.fleet_budget {
                Some(fleet) => fleet.record(self.budget.to_wall_clock(sent_at)).await,
                None => crate::cluster::BudgetAnswer::Recorded,
            };
            if answer == crate::cluster::BudgetAnswer::NoSpace && !self.unrecorded_sends {
                tracing::warn!(
                    "etcd refuses writes (NOSPACE): polling APIBAN on this node's own budget until it takes them again"
                );
            }
            self.unrecorded_sends = answer == crate::cluster::BudgetAnswer::NoSpace;
            if answer == crate::cluster::BudgetAnswer::NotRecorded {
                // Not confirmed by etcd, so not sent: its slot is given back here (etcd may
                // still hold it, if only its answer was lost; then the next leader counts
                // one request too many, which errs on the safe side). etcd, not APIBAN,
                // failed: a member that died or a Raft election takes a second or two, so
                // the next try comes after a second, not after APIBAN's backoff, which
                // would leave the fleet unpolled for tens of seconds.
                self.budget.give_back(sent_at);
                self.journal_budget(Instant::now());
                if !self.unrecorded_logged {
                    tracing::warn!(
                        "etcd did not record a request in the fleet's budget; it is not sent, and tried again every second"
                    );
                    self.unrecorded_logged = true;
                }
                tokio::time::sleep(BUDGET_RETRY).await;
                continue;
            }
            if self.unrecorded_logged {
                tracing::info!("etcd records the fleet's budget again; polling APIBAN");
                self.unrecorded_logged = false;
            }
            if sent_at.elapsed() > BUDGET_STALE {
                // etcd took so long (a Raft election, a member dying under the call) that
                // the time it holds is no longer this request's: a later leader would count
                // the slot free while APIBAN still counts the request. The slot stays spent
                // (the safe side); the request goes out on a fresh one.
                tracing::debug!(took = ?sent_at.elapsed(), "the budget write took too long; taking a fresh slot");
                continue;
            }
            let result = self.client.fetch(&id).await;
            let outcome = match &result {
                Ok(_) => "ok",
                Err(e) => e.outcome(),
            };
            if !matches!(result, Err(ClientError::KeyRejected)) {
                self.key.accepted();
            }
            let mut delay = None;
            match result {
                Ok(Batch::Addresses { addresses, next_id }) => {
                    backoff.reset();
                    let same_id = next_id == id;
                    if same_id && !addresses.is_empty() {
                        tracing::warn!(%id, "APIBAN returned the same ID again; polling later");
                    }
                    self.report(outcome, waited, None).await?;
                    if !same_id {
                        self.ask(|reply| Update::ApibanBatch {
                            addresses: addresses.clone(),
                            next_id: next_id.clone(),
                            reply,
                        })
                        .await?;
                        id = next_id;
                    }
                    if addresses.is_empty() || same_id {
                        return Ok(CycleEnd::Paused(id));
                    }
                    continue;
                }
                Ok(Batch::Done) => {
                    self.report(outcome, waited, None).await?;
                    self.ask(|reply| Update::ApibanDone { reply }).await?;
                    return Ok(CycleEnd::Complete(id));
                }
                Err(ClientError::RateLimited) => {
                    // Our count says we were within the limit; the server's disagrees (the
                    // same key used elsewhere, or requests before a restart). Wait a window.
                    tracing::warn!("APIBAN says the rate limit is exceeded; waiting a full window");
                    self.budget.exhaust(Instant::now());
                }
                Err(ClientError::KeyRejected) => {
                    let d = self.key.rejected();
                    self.report(outcome, waited, Some(d)).await?;
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = self.retry_now.notified() => {
                            tracing::info!("retrying APIBAN now, as asked");
                        }
                    }
                    continue;
                }
                Err(e) => {
                    let mut d = backoff.next_delay();
                    if matches!(e, ClientError::Transport(_)) {
                        // Nothing reached APIBAN (no route, refused, DNS): at boot the agent
                        // starts before the network does, and must not sleep past its coming
                        // up for longer than a poll interval.
                        d = d.min(self.settings.poll_interval.max(self.settings.backoff_base));
                    }
                    tracing::warn!(error = %crate::error_chain(&e), retry_in = ?d, full, "APIBAN request failed");
                    delay = Some(d);
                }
            }
            self.report(outcome, waited, delay).await?;
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
        }
    }

    /// Sleeps until one more request fits in every window; true if it had to wait.
    async fn wait_for_budget(&mut self) -> bool {
        let now = Instant::now();
        let at = self.budget.next_allowed(now);
        if at <= now {
            return false;
        }
        // Jitter so that many agents released by the same window do not arrive together.
        let window = self.budget.limit().window;
        let extra = jitter_between(Duration::ZERO, (window / 20).min(Duration::from_secs(5)));
        tokio::time::sleep_until((at + extra).into()).await;
        true
    }

    /// Reports a request's outcome; `retry_in` is the poller's own wait before the next one,
    /// when it has one (the budget may add to it).
    async fn report(
        &mut self,
        outcome: &'static str,
        waited: bool,
        retry_in: Option<Duration>,
    ) -> Result<(), Stopped> {
        let now = Instant::now();
        let next = self
            .budget
            .next_allowed(now)
            .max(now + retry_in.unwrap_or_default());
        self.judge_clock();
        let report = RequestReport {
            outcome,
            at: unix_now(),
            budget_left: self.budget.remaining(now),
            next_request: Some(unix_now() + next.saturating_duration_since(now).as_secs()),
            waited_for_budget: waited,
            key_rejected_since: self.key.since,
            server_clock_offset_ms: self.client.server_clock_offset_ms(),
        };
        self.updates
            .send(Update::ApibanRequest(report))
            .await
            .map_err(|_| Stopped)
    }

    /// Says once when this host's clock is far from APIBAN's `Date`, and once when it is
    /// back: expiry times are absolute, and a clock off by long expires bans early or late
    /// (in a fleet, the nodes' clocks are also compared with each other's).
    fn judge_clock(&mut self) {
        let Some(ms) = self.client.server_clock_offset_ms() else {
            return;
        };
        let off = ms.unsigned_abs() > CLOCK_WARN.as_millis() as u64;
        if off && !self.clock_warned {
            tracing::warn!(
                offset_s = ms / 1000,
                "this host's clock is far from APIBAN's (the Date of its answers): bans expire early or late; set the clock (NTP)"
            );
        } else if !off && self.clock_warned {
            tracing::info!(
                offset_s = ms / 1000,
                "this host's clock agrees with APIBAN's again"
            );
        }
        self.clock_warned = off;
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Update) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.updates.send(make(tx)).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }
}
