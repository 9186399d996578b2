//! The async side of syncing: source tasks fetch, the owner task applies.
//!
//! Sources never touch the ledger or the maps. They send what they fetched to the task that
//! owns the [`Engine`] and wait for its acknowledgement, which comes after the batch is in
//! the maps and on disk; only then do they ask for the next batch. So a full pull grows
//! protection batch by batch, and an interruption at any point loses nothing.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::{mpsc, oneshot};

use ipnet::IpNet;

use crate::{
    dataplane::Scope,
    engine::{Enforcer, Engine, EngineSettings, IngestReport},
    human::RateLimit,
    rate_budget::{self, BudgetJournal, RateBudget},
    source::{
        apiban::{ApibanClient, Batch, ClientError},
        blocklist::{self, ListSpec},
    },
    state::ApibanCursor,
};

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Clone, Debug)]
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

/// Messages from the sources to the engine's owner.
#[derive(Debug)]
pub enum Update {
    BeginFullPull {
        reply: oneshot::Sender<()>,
    },
    ApibanBatch {
        addresses: Vec<String>,
        next_id: String,
        reply: oneshot::Sender<IngestReport>,
    },
    ApibanDone {
        reply: oneshot::Sender<IngestReport>,
    },
    /// Every request's outcome, for status and metrics.
    ApibanRequest(RequestReport),
    /// The poller is idle until this time (Unix seconds).
    ApibanNextPoll(u64),
    ListSnapshot {
        name: String,
        text: String,
        reply: oneshot::Sender<IngestReport>,
    },
    ListFailed {
        name: String,
        error: String,
    },
    /// This host's addresses changed (see `host_addresses`).
    OwnAddresses(Vec<std::net::IpAddr>),
    /// From the control socket or a reload; the reply says what happened, or why not.
    Control {
        change: Change,
        reply: oneshot::Sender<Result<String, ChangeError>>,
    },
}

/// Why an operator's change was not made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// Not something the agent does as asked; the text says why and what would be.
    #[error("{0}")]
    Refused(String),
    /// It could not be done now.
    #[error("{0}")]
    Failed(String),
}

impl From<crate::engine::EngineError> for ChangeError {
    fn from(e: crate::engine::EngineError) -> Self {
        match e {
            crate::engine::EngineError::Refused(..) => ChangeError::Refused(e.to_string()),
            other => ChangeError::Failed(crate::dataplane::loader::error_chain(&other)),
        }
    }
}

/// A change an operator asks for.
#[derive(Clone, Debug)]
pub enum Change {
    Ban {
        net: IpNet,
        ttl: Option<Duration>,
        comment: Option<String>,
        /// Ban what the engine would refuse (loopback, this host, allowlisted).
        force: bool,
    },
    Unban {
        net: IpNet,
    },
    AllowAdd {
        net: IpNet,
    },
    AllowRemove {
        net: IpNet,
    },
    /// Reloaded configuration: TTL, prefix limits, allowlist and port scope.
    Settings {
        engine: EngineSettings,
        scope: Scope,
    },
    /// A blocklist left the configuration.
    DropList {
        name: String,
    },
}

#[derive(Clone, Debug)]
pub struct RequestReport {
    pub outcome: &'static str,
    pub at: u64,
    pub budget_left: u32,
    /// When the poller will send its next request.
    pub next_request: Option<u64>,
    pub waited_for_budget: bool,
    /// Since when APIBAN has rejected the key (403), if it does now.
    pub key_rejected_since: Option<u64>,
}

/// What the owner knows about syncing, for `apiban status` and /metrics.
#[derive(Clone, Debug, Default)]
pub struct SyncStatus {
    pub requests: BTreeMap<&'static str, u64>,
    pub last_request: Option<(u64, &'static str)>,
    /// The last time a poll cycle or full pull completed.
    pub last_success: Option<u64>,
    pub next_request: Option<u64>,
    pub budget_left: u32,
    pub rate_limit_waits: u64,
    /// Since when APIBAN has rejected the key (403), while it does.
    pub key_rejected_since: Option<u64>,
    pub lists: BTreeMap<String, ListStatus>,
}

#[derive(Clone, Debug, Default)]
pub struct ListStatus {
    pub last_success: Option<u64>,
    pub last_error: Option<String>,
}

/// The engine and what the owner tracks beside it.
pub struct Owner<E: Enforcer> {
    pub engine: Engine<E>,
    pub sync: SyncStatus,
}

impl<E: Enforcer> Owner<E> {
    pub fn new(engine: Engine<E>) -> Self {
        Self {
            engine,
            sync: SyncStatus::default(),
        }
    }

    /// Applies one update from a source. Acknowledgements are sent after the change is in
    /// the maps and saved.
    pub fn handle(&mut self, update: Update) {
        let now = unix_now();
        match update {
            Update::BeginFullPull { reply } => {
                self.engine.begin_full_pull(now);
                tracing::info!("APIBAN full pull started");
                let _ = reply.send(());
            }
            Update::ApibanBatch {
                addresses,
                next_id,
                reply,
            } => {
                let report = self.engine.apiban_batch(&addresses, next_id, now);
                log_sync(
                    "apiban",
                    &report,
                    self.engine.apiban_cursor().full_pull.is_some(),
                );
                let _ = reply.send(report);
            }
            Update::ApibanDone { reply } => {
                let full = self.engine.apiban_cursor().full_pull.is_some();
                let report = self.engine.apiban_done(now);
                if full {
                    tracing::info!(
                        reconciled = report.reconciled,
                        removed = report.applied.removed,
                        "APIBAN full pull complete"
                    );
                }
                self.sync.last_success = Some(now);
                let _ = reply.send(report);
            }
            Update::ApibanNextPoll(at) => self.sync.next_request = Some(at),
            Update::ApibanRequest(r) => {
                *self.sync.requests.entry(r.outcome).or_default() += 1;
                self.sync.last_request = Some((r.at, r.outcome));
                self.sync.budget_left = r.budget_left;
                self.sync.next_request = r.next_request;
                self.sync.key_rejected_since = r.key_rejected_since;
                if r.waited_for_budget {
                    self.sync.rate_limit_waits += 1;
                }
            }
            Update::ListSnapshot { name, text, reply } => {
                let items = blocklist::parse_list(&text);
                let report = self.engine.list_snapshot(&name, &items, now);
                log_sync(&format!("list:{name}"), &report, false);
                let status = self.sync.lists.entry(name).or_default();
                status.last_success = Some(now);
                status.last_error = None;
                let _ = reply.send(report);
            }
            Update::ListFailed { name, error } => {
                tracing::warn!(list = %name, %error, "blocklist refresh failed; keeping its bans");
                self.sync.lists.entry(name).or_default().last_error = Some(error);
            }
            Update::OwnAddresses(own) => {
                tracing::info!(
                    addresses = own.len(),
                    "this host's addresses changed; feeds may not ban them"
                );
                let dropped = self.engine.set_own_addresses(own, now);
                for net in dropped {
                    tracing::warn!(
                        %net,
                        "dropped a feed's ban that covers one of this host's addresses"
                    );
                }
            }
            Update::Control { change, reply } => {
                let _ = reply.send(self.change(change, now));
            }
        }
    }

    /// Applies an operator's change; the answer is one line for the operator.
    pub fn change(&mut self, change: Change, now: u64) -> Result<String, ChangeError> {
        let effect = |a: crate::engine::Applied| {
            format!(
                "{} added to and {} removed from the dataplane",
                a.added, a.removed
            )
        };
        let out = match change {
            Change::Ban {
                net,
                ttl,
                comment,
                force,
            } => {
                let applied = self.engine.ban(net, ttl, comment, force, now)?;
                let until = match ttl {
                    Some(t) => format!("for {}", crate::human::format_duration(t)),
                    None => "until unbanned".to_owned(),
                };
                format!("banned {} {until}; {}", net.trunc(), effect(applied))
            }
            Change::Unban { net } => {
                let (sources, applied) = self.engine.unban(net, now);
                if sources.is_empty() {
                    return Err(ChangeError::Refused(format!(
                        "{} is not in the ban list",
                        net.trunc()
                    )));
                }
                let names: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
                let mut msg = format!(
                    "unbanned {} (held by {}); {}",
                    net.trunc(),
                    names.join(", "),
                    effect(applied)
                );
                if sources.iter().any(|s| s.is_remote()) {
                    msg.push_str(
                        "; a feed that lists it again bans it again: `apiban allow add` keeps it out",
                    );
                }
                msg
            }
            Change::AllowAdd { net } => {
                let applied = self.engine.allow_add(net, now);
                format!("allowed {}; {}", net.trunc(), effect(applied))
            }
            Change::AllowRemove { net } => {
                let applied = self.engine.allow_remove(net, now)?;
                format!(
                    "removed {} from the allowlist; {}",
                    net.trunc(),
                    effect(applied)
                )
            }
            Change::Settings { engine, scope } => {
                self.engine
                    .enforcer_mut()
                    .set_scope(&scope)
                    .map_err(|e| ChangeError::Failed(format!("cannot set the port scope: {e}")))?;
                let applied = self.engine.reconfigure(engine, now);
                format!("settings applied; {}", effect(applied))
            }
            Change::DropList { name } => {
                let (records, applied) = self.engine.drop_list(&name, now);
                self.sync.lists.remove(&name);
                format!(
                    "dropped list {name} ({records} records); {}",
                    effect(applied)
                )
            }
        };
        tracing::info!("{out}");
        if self.engine.unsaved() {
            return Ok(format!(
                "{out}; WARNING: the state file could not be saved (see the agent's log): this \
                 is enforced now, but lost on a restart unless a later save succeeds"
            ));
        }
        Ok(out)
    }

    /// Expires what is due; one log line when anything expired.
    pub fn sweep(&mut self) {
        let (expired, applied) = self.engine.sweep(unix_now());
        if expired > 0 {
            tracing::info!(expired, removed = applied.removed, "expired bans removed");
        }
    }
}

/// Whether the owner is alive and getting through its work: it beats on every update and
/// on a heartbeat while idle. What the watchdog ping is made of, so that a dead or
/// stuck owner stops the pings and the service manager restarts the agent.
#[derive(Clone, Debug)]
pub struct OwnerHealth {
    inner: std::sync::Arc<HealthInner>,
}

#[derive(Debug)]
struct HealthInner {
    started: Instant,
    /// Milliseconds after `started` of the owner's last beat.
    last_beat_ms: std::sync::atomic::AtomicU64,
}

impl OwnerHealth {
    fn new() -> Self {
        Self {
            inner: std::sync::Arc::new(HealthInner {
                started: Instant::now(),
                last_beat_ms: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    fn beat(&self) {
        let ms = self.inner.started.elapsed().as_millis() as u64;
        self.inner
            .last_beat_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long since the owner last showed progress.
    pub fn silence(&self) -> Duration {
        let last = self
            .inner
            .last_beat_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        self.inner
            .started
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
}

/// How often the owner retries a state save that failed (a full or read-only state
/// directory): the change is in the maps already, the retry only brings the file up to date.
const SAVE_RETRY_EVERY: Duration = Duration::from_secs(10);

/// The owner's loop: applies source updates in arrival order, sweeps expired bans and
/// retries failed saves. Returns when every sender is gone.
pub async fn run_owner<E: Enforcer>(
    owner: std::sync::Arc<std::sync::Mutex<Owner<E>>>,
    mut updates: mpsc::Receiver<Update>,
    sweep_every: Duration,
    health: OwnerHealth,
    heartbeat_every: Duration,
) {
    let mut sweep = tokio::time::interval(sweep_every);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat = tokio::time::interval(heartbeat_every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut save_retry = tokio::time::interval(SAVE_RETRY_EVERY);
    save_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            update = updates.recv() => match update {
                Some(u) => lock(&owner).handle(u),
                None => return,
            },
            _ = sweep.tick() => lock(&owner).sweep(),
            _ = save_retry.tick() => lock(&owner).engine.retry_save(unix_now()),
            _ = heartbeat.tick() => {}
        }
        health.beat();
    }
}

/// The running sync machinery: the owner and every task feeding it.
pub struct Running<E: Enforcer> {
    pub owner: std::sync::Arc<std::sync::Mutex<Owner<E>>>,
    /// The owner's inbox, for the control socket and reloads.
    pub updates: mpsc::Sender<Update>,
    owner_task: tokio::task::JoinHandle<()>,
    health: OwnerHealth,
    poller: Option<tokio::task::JoinHandle<()>>,
    lists: BTreeMap<String, (ListSpec, tokio::task::JoinHandle<()>)>,
    http: reqwest::Client,
    retry_now: std::sync::Arc<tokio::sync::Notify>,
}

impl<E: Enforcer> Running<E> {
    /// Stops every task. Nothing is lost: each change was saved when it was applied.
    pub fn abort(&self) {
        self.owner_task.abort();
        if let Some(p) = &self.poller {
            p.abort();
        }
        for (_, task) in self.lists.values() {
            task.abort();
        }
    }

    /// Replaces the APIBAN poller (new key, URL or intervals) and starts, stops or restarts
    /// the blocklists whose configuration changed. The poller resumes from the engine's
    /// cursor with the budget its journal holds, so a reload never overspends it.
    pub fn restart_poller(&mut self, apiban: Option<(ApibanClient, PollSettings)>) {
        if let Some(p) = self.poller.take() {
            p.abort();
        }
        if let Some((client, settings)) = apiban {
            let (cursor, journal) = {
                let owner = lock(&self.owner);
                let journal = owner.engine.state_dir().map(BudgetJournal::in_dir);
                (owner.engine.apiban_cursor().clone(), journal)
            };
            let poller =
                ApibanPoller::new(client, settings, &cursor, journal, self.updates.clone())
                    .with_retry_signal(self.retry_now.clone());
            self.poller = Some(tokio::spawn(poller.run(cursor)));
        }
    }

    /// Whether the owner is alive and has shown progress within `max_silence`; why not.
    /// A panic in the owner ends its task; a stuck owner stops beating.
    pub fn owner_health(&self, max_silence: Duration) -> Result<(), String> {
        if self.owner_task.is_finished() {
            return Err("the ledger's owner has stopped (it panicked)".into());
        }
        let silence = self.health.silence();
        if silence > max_silence {
            return Err(format!(
                "the ledger's owner has shown no progress for {}",
                crate::human::format_duration(Duration::from_secs(silence.as_secs()))
            ));
        }
        Ok(())
    }

    /// Cuts the poller's wait after a rejected key (403) short: the operator reloaded or
    /// replaced the key. Does nothing while the key is accepted.
    pub fn retry_apiban_now(&self) {
        if lock(&self.owner).sync.key_rejected_since.is_some() {
            self.retry_now.notify_one();
        }
    }

    /// Brings the running blocklists in line with `lists`; returns the names that left the
    /// configuration (their bans are for the owner to drop).
    pub fn set_lists(&mut self, lists: Vec<ListSpec>) -> Vec<String> {
        let wanted: BTreeMap<String, ListSpec> =
            lists.into_iter().map(|l| (l.name.clone(), l)).collect();
        let mut gone = Vec::new();
        self.lists.retain(|name, (spec, task)| {
            let keep = wanted.get(name) == Some(spec);
            if !keep {
                task.abort();
                if !wanted.contains_key(name) {
                    gone.push(name.clone());
                }
            }
            keep
        });
        for (name, spec) in wanted {
            if self.lists.contains_key(&name) {
                continue;
            }
            let last = lock(&self.owner)
                .engine
                .list_cursor(&name)
                .and_then(|c| c.last_refresh);
            let task = tokio::spawn(run_blocklist(
                spec.clone(),
                self.http.clone(),
                last,
                self.updates.clone(),
            ));
            self.lists.insert(name, (spec, task));
        }
        gone
    }
}

/// How often the owner sweeps expired bans and, while idle, beats (see [`OwnerHealth`]).
#[derive(Clone, Copy, Debug)]
pub struct OwnerTiming {
    pub sweep_every: Duration,
    /// Well under the watchdog timeout, so that an idle owner is never taken for a stuck one.
    pub heartbeat_every: Duration,
}

impl OwnerTiming {
    pub fn new(sweep_every: Duration) -> Self {
        Self {
            sweep_every,
            heartbeat_every: Duration::from_secs(1),
        }
    }
}

/// Starts the owner loop, the APIBAN poller (when there is a client) and one task per
/// blocklist. Must be called inside a tokio runtime.
pub fn spawn<E: Enforcer + Send + 'static>(
    engine: Engine<E>,
    apiban: Option<(ApibanClient, PollSettings)>,
    lists: Vec<ListSpec>,
    http: reqwest::Client,
    timing: OwnerTiming,
) -> Running<E> {
    let owner = std::sync::Arc::new(std::sync::Mutex::new(Owner::new(engine)));
    let (tx, rx) = mpsc::channel(16);
    let health = OwnerHealth::new();
    health.beat();
    let owner_task = tokio::spawn(run_owner(
        owner.clone(),
        rx,
        timing.sweep_every,
        health.clone(),
        timing.heartbeat_every,
    ));
    let mut running = Running {
        owner,
        updates: tx,
        owner_task,
        health,
        poller: None,
        lists: BTreeMap::new(),
        http,
        retry_now: Default::default(),
    };
    running.restart_poller(apiban);
    running.set_lists(lists);
    running
}

/// A panic while holding the owner poisons the mutex; the data is still the ledger's last
/// consistent state (each change completes before the next), so keep going.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn log_sync(source: &str, r: &IngestReport, full_pull: bool) {
    tracing::info!(
        source,
        full_pull,
        received = r.received,
        added = r.applied.added,
        removed = r.applied.removed,
        refreshed = r.accepted - r.new,
        skipped = r.skipped_total(),
        reconciled = r.reconciled,
        not_enforced = r.applied.not_enforced,
        "sync"
    );
}

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

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

fn jitter_between(low: Duration, high: Duration) -> Duration {
    if high <= low {
        return low;
    }
    let span = (high - low).as_millis() as u64;
    low + Duration::from_millis(fastrand::u64(0..=span))
}

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
                    crate::human::format_duration(self.backoff.cap)
                );
            } else {
                tracing::error!(
                    since = %crate::status::utc(since),
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
                tracing::warn!(error = %e, "waiting one rate-limit window before the first request");
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
        }
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
                        error = %e,
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
                    tracing::warn!(error = %e, retry_in = ?d, full, "APIBAN request failed");
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
        let report = RequestReport {
            outcome,
            at: unix_now(),
            budget_left: self.budget.remaining(now),
            next_request: Some(unix_now() + next.saturating_duration_since(now).as_secs()),
            waited_for_budget: waited,
            key_rejected_since: self.key.since,
        };
        self.updates
            .send(Update::ApibanRequest(report))
            .await
            .map_err(|_| Stopped)
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Update) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.updates.send(make(tx)).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }
}

/// Refreshes one blocklist on its interval; a failed fetch keeps the list's bans and retries
/// with backoff.
pub async fn run_blocklist(
    spec: ListSpec,
    http: reqwest::Client,
    last_refresh: Option<u64>,
    updates: mpsc::Sender<Update>,
) {
    if let Some(last) = last_refresh {
        let age = Duration::from_secs(unix_now().saturating_sub(last));
        if age < spec.refresh {
            tokio::time::sleep(spec.refresh - age).await;
        }
    }
    let mut backoff = Backoff::new(
        Duration::from_secs(5),
        spec.refresh.max(Duration::from_secs(5)),
    );
    loop {
        let delay = match blocklist::fetch(&spec.location, &http).await {
            Ok(text) => {
                let (tx, rx) = oneshot::channel();
                let update = Update::ListSnapshot {
                    name: spec.name.clone(),
                    text,
                    reply: tx,
                };
                if updates.send(update).await.is_err() || rx.await.is_err() {
                    return;
                }
                backoff.reset();
                spec.refresh
            }
            Err(e) => {
                let update = Update::ListFailed {
                    name: spec.name.clone(),
                    error: e.to_string(),
                };
                if updates.send(update).await.is_err() {
                    return;
                }
                backoff.next_delay()
            }
        };
        tokio::time::sleep(delay).await;
    }
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
