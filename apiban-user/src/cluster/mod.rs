//! A fleet of nodes that share one ledger through etcd (`--cluster`).
//!
//! Every node watches the fleet's prefix from the revision its state file saved and applies
//! what changes through its own owner, so each node still has exactly one writer of its maps.
//! The nodes elect one leader through etcd's election API; only the leader polls APIBAN and
//! the lists, and writes what it learns to etcd in transactions fenced on its leader key, so
//! a deposed leader's late write fails. Operators' changes on any node are written to etcd
//! too, unfenced. Expiry is in each record, never an etcd lease: every node expires bans
//! itself, and etcd going away costs no protection.
//!
//! - [`keys`]: the key layout;
//! - [`clock`]: this node's clock against the fleet's, and what a node far off may not do;
//! - [`watch`]: the watch that feeds the owner, and the full read when it must start over;
//! - [`election`]: the campaign, and what the node does while it leads;
//! - [`writer`]: what the owner sends to etcd;
//! - [`janitor`]: the leader's deletion of records that expired but are still in etcd;
//! - [`members`]: which etcd members answer, said once per change;
//! - [`proofs`]: detection's proven peers, shared by every node;
//! - [`endpoints`]: the etcd endpoints' addresses, which no ban may cover.
//!
//! Just over 600 lines: the types every task above shares and the connection to etcd with its
//! retries; each task is in its own file.

pub mod clock;
mod endpoints;
pub use endpoints::endpoint_addresses;
pub mod election;
pub mod heartbeat;
pub mod janitor;
pub mod keys;
pub mod members;
pub mod pages;
pub mod proofs;
pub mod settings;
pub mod watch;
pub mod writer;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use etcd_client::{Client, ConnectOptions, LeaderKey};
use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot, watch as tokio_watch};

use crate::{
    engine::{RemoteChange, Touched},
    ledger::{Record, SourceId},
    snapshot::Snapshot,
    state::ApibanCursor,
};
use settings::ClusterSettings;

/// How long a leader's lease lives without a keep-alive: a dead leader's successor is
/// elected within this (plus one election round).
pub const LEADER_LEASE_SECS: i64 = 5;

/// What the owner sends to etcd after a change this node made.
#[derive(Debug, Default)]
pub struct Outgoing {
    pub records: Vec<Touched>,
    /// Manual allowlist entries added (true) or removed (false).
    pub allow: Vec<(IpNet, bool)>,
    /// The fleet's APIBAN position after a batch the leader applied.
    pub cursor: Option<ApibanCursor>,
    /// Written only while this node leads, in a transaction fenced on its leader key: what
    /// the leader's feeds learned, and its sweeps.
    pub fenced: bool,
    /// An operator's change: the revision this node had applied when it was made. A key
    /// etcd has not changed since is written at once; otherwise see `stamp`.
    pub base_revision: Option<i64>,
    /// An operator's change: when and where it was made. Against a key changed since
    /// `base_revision`, the later stamp wins (see [`writer`]); the value carries it, and
    /// a removal is written as a tombstone that carries it.
    pub stamp_ms: Option<u64>,
    /// The leader's sweep: these records expired on its clock, in the ledger as it was at
    /// this revision. Each key is deleted only if etcd has not changed it since (another
    /// node's re-sighting or an operator's new ban is kept).
    pub expired_at_revision: Option<i64>,
}

impl Outgoing {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.allow.is_empty() && self.cursor.is_none()
    }
}

/// From the cluster tasks to the owner.
#[derive(Debug)]
pub enum ClusterUpdate {
    /// What a watch delivered, up to `revision`.
    Changes {
        changes: Vec<RemoteChange>,
        revision: i64,
        /// The latest operator's stamp among them (Unix ms; 0: none): the node's fleet
        /// clock moves past it.
        clock: u64,
        reply: oneshot::Sender<()>,
    },
    /// Everything under the prefix at `revision`.
    Everything {
        records: Vec<(IpNet, SourceId, Record)>,
        allow: Vec<IpNet>,
        revision: i64,
        /// The etcd cluster's ID.
        cluster_id: u64,
        /// The latest operator's stamp in etcd, tombstones included.
        clock: u64,
        reply: oneshot::Sender<()>,
    },
    /// etcd has settled an operator's changes on these keys.
    Settled { keys: Vec<crate::state::PendingKey> },
    /// The fleet's nodes' own addresses, from their heartbeats: no source may ban them.
    Members { addresses: Vec<std::net::IpAddr> },
    /// This node now leads: it polls from the fleet's position, counting the requests the
    /// fleet sent within the budget's window.
    AdoptCursor {
        cursor: Option<ApibanCursor>,
        requests_ms: Vec<u64>,
        reply: oneshot::Sender<()>,
    },
}

/// One request's place in the fleet's budget: the send times as the leader's poller has
/// them, and whether etcd now holds them.
#[derive(Debug)]
pub struct BudgetWrite {
    pub sent_ms: Vec<u64>,
    pub done: oneshot::Sender<BudgetAnswer>,
}

/// What became of a request's time sent to etcd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetAnswer {
    /// etcd holds it: the request may go out.
    Recorded,
    /// etcd refuses every write (its NOSPACE alarm): the request goes out on this node's
    /// own budget, which its journal holds, rather than APIBAN going unpolled until an
    /// operator frees etcd. A leader elected after the alarm may count a window short.
    NoSpace,
    /// Not confirmed (etcd away, or this node no longer leads): the request must not go.
    NotRecorded,
}

/// The poller's side of the fleet's budget.
#[derive(Clone, Debug)]
pub struct FleetBudget {
    tx: mpsc::UnboundedSender<BudgetWrite>,
    stats: Arc<ClusterStats>,
}

impl FleetBudget {
    /// Until when (Unix ms) a leader may have sent requests that etcd's record of the
    /// fleet's budget lacks: the last time this node saw the NOSPACE alarm, plus one round of
    /// the member monitor (the alarm may have been cleared just after). None: never seen.
    pub fn unrecorded_until_ms(&self) -> Option<u64> {
        match self.stats.nospace_seen_ms.load(Ordering::Relaxed) {
            0 => None,
            seen => Some(seen + members::EVERY.as_millis() as u64),
        }
    }

    /// Puts the send times in etcd, fenced on this node's leadership, within a few seconds.
    pub async fn record(&self, sent_ms: Vec<u64>) -> BudgetAnswer {
        let (done, confirmed) = oneshot::channel();
        if self.tx.send(BudgetWrite { sent_ms, done }).is_err() {
            return BudgetAnswer::NotRecorded;
        }
        match tokio::time::timeout(Duration::from_secs(5), confirmed).await {
            Ok(Ok(answer)) => answer,
            _ => BudgetAnswer::NotRecorded,
        }
    }
}

/// Why a node refuses an entry etcd holds: a feed's checks (`sanitise::Rejection`), a
/// comment too long or not printable, another node's detection ban of a peer this node
/// holds exempt or proven, a value it cannot read.
pub const REFUSAL_REASONS: [&str; 9] = [
    "special_purpose",
    "too_broad",
    "own_address",
    "allowlisted",
    "fleet_infrastructure",
    "comment",
    "detect_exempt",
    "proven_peer",
    "undecodable",
];

/// How many changes may wait for the writer. A change the owner cannot queue is not lost:
/// an operator's is pending in the ledger and sent again from there, a feed's is held by
/// key (see `sync::owner`); so an etcd that takes nothing for hours costs memory bounded
/// by the ledger, not by how many changes were made meanwhile.
pub const OUTBOX_CHANGES: usize = 256;

/// What the owner holds of the cluster: where its changes go, and whether this node leads.
#[derive(Clone, Debug)]
pub struct ClusterLink {
    pub outbox: mpsc::Sender<Outgoing>,
    pub stats: Arc<ClusterStats>,
    pub leader: tokio_watch::Receiver<Option<LeaderKey>>,
    pub budget: FleetBudget,
}

impl ClusterLink {
    pub fn leading(&self) -> bool {
        self.leader.borrow().is_some()
    }
}

/// What the cluster tasks have seen of etcd, for `status` and /metrics.
#[derive(Debug)]
pub struct ClusterStats {
    /// The watch is following the prefix now.
    pub watching: AtomicBool,
    /// The newest etcd revision a watch answer or read carried.
    pub head_revision: AtomicI64,
    /// The revision up to which etcd said the watch has sent everything, all of it applied
    /// (its progress answers): the ledger is current to here even with nothing to apply.
    pub caught_up: AtomicI64,
    /// Watches that ended and were started again.
    pub watch_restarts: AtomicU64,
    /// Calls to etcd that failed or timed out.
    pub etcd_errors: AtomicU64,
    /// Whole-ledger reads (a first start, or a compacted revision).
    pub full_reads: AtomicU64,
    /// Expired records this node deleted from etcd in its passes as leader.
    pub expired_deleted: AtomicU64,
    /// etcd's endpoints, and how many answered the member monitor's last round.
    pub members: AtomicU64,
    pub members_answering: AtomicU64,
    /// This node's clock against the fleet's, ms (positive: ahead); `i64::MIN`: not known.
    clock_offset_ms: AtomicI64,
    /// The offset is past `--cluster-max-clock-offset`: the node does not lead.
    pub clock_off: AtomicBool,
    /// etcd has its NOSPACE alarm raised: it refuses every write.
    pub nospace: AtomicBool,
    /// When this node last saw the NOSPACE alarm raised, Unix ms (0: never). A leader polls
    /// APIBAN on its own budget meanwhile, so etcd's record of the fleet's requests may lack
    /// some made until then.
    pub nospace_seen_ms: AtomicU64,
    /// Changes waiting for the writer (at most [`OUTBOX_CHANGES`]).
    pub outbox_queued: AtomicU64,
    /// Changes the owner could not queue, to be sent again from the ledger.
    pub outbox_shed: AtomicU64,
    /// Values under the ledger's keys that this node could not read (held as nothing).
    pub undecodable: AtomicU64,
}

impl Default for ClusterStats {
    fn default() -> Self {
        Self {
            watching: AtomicBool::new(false),
            head_revision: AtomicI64::new(0),
            caught_up: AtomicI64::new(0),
            watch_restarts: AtomicU64::new(0),
            etcd_errors: AtomicU64::new(0),
            full_reads: AtomicU64::new(0),
            expired_deleted: AtomicU64::new(0),
            members: AtomicU64::new(0),
            members_answering: AtomicU64::new(0),
            clock_offset_ms: AtomicI64::new(i64::MIN),
            clock_off: AtomicBool::new(false),
            nospace: AtomicBool::new(false),
            nospace_seen_ms: AtomicU64::new(0),
            outbox_queued: AtomicU64::new(0),
            outbox_shed: AtomicU64::new(0),
            undecodable: AtomicU64::new(0),
        }
    }
}

impl ClusterStats {
    /// The revision this node's ledger is current to: what it applied, or what etcd said
    /// there was nothing more to apply up to.
    pub fn current_to(&self, applied: i64) -> i64 {
        applied.max(self.caught_up.load(Ordering::Relaxed))
    }

    pub(crate) fn saw_revision(&self, revision: i64) {
        self.head_revision.fetch_max(revision, Ordering::Relaxed);
    }

    pub fn clock_offset_ms(&self) -> Option<i64> {
        Some(self.clock_offset_ms.load(Ordering::Relaxed)).filter(|o| *o != i64::MIN)
    }

    pub(crate) fn set_clock_offset(&self, offset: Option<i64>) {
        self.clock_offset_ms
            .store(offset.unwrap_or(i64::MIN), Ordering::Relaxed);
    }

    pub(crate) fn error(&self) {
        self.etcd_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// What readers (status, /metrics) hold of the cluster.
#[derive(Clone, Debug)]
pub struct ClusterView {
    pub node: String,
    pub settings: Arc<ClusterSettings>,
    pub stats: Arc<ClusterStats>,
    pub leader: tokio_watch::Receiver<Option<LeaderKey>>,
}

impl ClusterView {
    pub fn leading(&self) -> bool {
        self.leader.borrow().is_some()
    }
}

/// The other ends of a [`ClusterLink`], for [`start`].
pub struct LinkEnds {
    outbox: mpsc::Receiver<Outgoing>,
    stats: Arc<ClusterStats>,
    leader: tokio_watch::Sender<Option<LeaderKey>>,
    budget: mpsc::UnboundedReceiver<BudgetWrite>,
}

/// The channels between the owner and the cluster tasks, made before either runs.
pub fn link() -> (ClusterLink, LinkEnds) {
    let (outbox_tx, outbox) = mpsc::channel(OUTBOX_CHANGES);
    let (leader, leader_rx) = tokio_watch::channel(None);
    let (budget_tx, budget) = mpsc::unbounded_channel();
    let stats = Arc::new(ClusterStats::default());
    (
        ClusterLink {
            outbox: outbox_tx,
            stats: stats.clone(),
            leader: leader_rx,
            budget: FleetBudget {
                tx: budget_tx,
                stats: stats.clone(),
            },
        },
        LinkEnds {
            outbox,
            stats,
            leader,
            budget,
        },
    )
}

/// The running cluster tasks; dropping this stops them.
pub struct Cluster {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: tokio_watch::Sender<bool>,
    election: Option<tokio::task::JoinHandle<()>>,
    /// Whether this node leads, as the election sees it.
    pub leader: tokio_watch::Receiver<Option<LeaderKey>>,
    pub view: ClusterView,
}

impl Cluster {
    /// Stops the tasks; a leader resigns first (within a second), so that another node
    /// polls at once instead of after the lease runs out.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(election) = self.election.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), election).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in self.tasks.iter().chain(&self.election) {
            t.abort();
        }
    }
}

/// Options for every connection: HTTP/2 pings find a dead member within seconds, and a
/// member cut off from the cluster's leader refuses watches rather than serving stale ones.
fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true)
}

/// How long a member may take to answer the read that shows it serves: one that takes
/// longer is passed over for the next.
const MEMBER_PROBE: Duration = Duration::from_secs(1);

/// Which member the next connection tries first: each connection starts one further, so
/// that a task whose member failed moves on, and the tasks spread over the members.
static NEXT_MEMBER: AtomicUsize = AtomicUsize::new(0);

/// A client on one member that serves now: it answered a linearizable read (so it is in
/// the quorum) within [`MEMBER_PROBE`]. Members are tried in turn from a rotating start; a
/// call that fails on this client's member makes its task connect again, to the next.
/// (A client balanced over every endpoint kept sending a share of calls to a dead member.)
pub async fn connect(settings: &ClusterSettings) -> Result<Client, CallError> {
    let options = connect_options_for(settings)?;
    let endpoints = &settings.endpoints;
    let start = NEXT_MEMBER.fetch_add(1, Ordering::Relaxed);
    let mut last = None;
    for k in 0..endpoints.len() {
        let endpoint = &endpoints[(start + k) % endpoints.len()];
        let connected = within_for(
            "a connection",
            MEMBER_PROBE * 3,
            Client::connect([endpoint], Some(options.clone())),
        )
        .await;
        let mut client = match connected {
            Ok(c) => c,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let probe = etcd_client::GetOptions::new()
            .with_keys_only()
            .with_limit(1);
        match within_for(
            "a member's first read",
            MEMBER_PROBE,
            client.get(settings.prefix.as_str(), Some(probe)),
        )
        .await
        {
            Ok(_) => return Ok(client),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(CallError::NoEndpoints))
}

/// The options every connection to the fleet's etcd takes.
fn connect_options_for(settings: &ClusterSettings) -> Result<ConnectOptions, CallError> {
    let mut options = connect_options();
    if let Some(tls) = &settings.tls {
        // Read at every connect, so that rotated files are used without a restart.
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| CallError::Credentials {
                path: path.to_owned(),
                source,
            })
        };
        let mut config = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(config);
    }
    if let Some((user, password_file)) = &settings.user {
        let password =
            std::fs::read_to_string(password_file).map_err(|source| CallError::Credentials {
                path: password_file.clone(),
                source,
            })?;
        let password = password.lines().next().unwrap_or_default().to_owned();
        options = options.with_user(user.clone(), password);
    }
    Ok(options)
}

/// Starts the watch, the election and the writer, and with detection on, the sharing of
/// its proven peers.
pub fn start(
    settings: ClusterSettings,
    ends: LinkEnds,
    updates: mpsc::Sender<ClusterUpdate>,
    snapshots: tokio_watch::Receiver<Arc<Snapshot>>,
    interfaces: Vec<String>,
    proofs: Option<proofs::ProofEnds>,
) -> Cluster {
    let settings = Arc::new(settings);
    let leader = ends.leader.subscribe();
    let stats = ends.stats;
    let view = ClusterView {
        node: settings.node.clone(),
        settings: settings.clone(),
        stats: stats.clone(),
        leader: leader.clone(),
    };
    let (stop, stopping) = tokio_watch::channel(false);
    let (clock_off, clock_judged) = tokio_watch::channel(None);
    let election = tokio::spawn(election::run(
        settings.clone(),
        updates.clone(),
        ends.leader,
        stopping,
        clock_judged.clone(),
    ));
    let mut tasks = Vec::new();
    if let Some(ends) = proofs {
        tasks.push(tokio::spawn(proofs::run(
            settings.clone(),
            ends,
            stats.clone(),
        )));
    }
    tasks.extend([
        tokio::spawn(clock::run(
            settings.clone(),
            stats.clone(),
            clock_off,
            updates.clone(),
        )),
        tokio::spawn(members::run(
            settings.clone(),
            stats.clone(),
            stop.subscribe(),
        )),
        tokio::spawn(heartbeat::run(
            settings.clone(),
            view.clone(),
            snapshots.clone(),
            interfaces,
        )),
        tokio::spawn(watch::run(
            settings.clone(),
            updates.clone(),
            snapshots.clone(),
            stats.clone(),
        )),
        tokio::spawn(janitor::run(
            settings.clone(),
            leader.clone(),
            stats.clone(),
            clock_judged,
        )),
        tokio::spawn(writer::run_budget(
            settings.clone(),
            ends.budget,
            leader.clone(),
        )),
        tokio::spawn(writer::run(
            settings,
            ends.outbox,
            leader.clone(),
            updates,
            stats,
        )),
    ]);
    Cluster {
        tasks,
        stop,
        election: Some(election),
        leader,
        view,
    }
}

/// How long one call may wait for etcd: with no member reachable, a call on the client's
/// balanced channel would wait for one forever.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a call to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("etcd")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer ({0}) within {secs} s", secs = CALL_TIMEOUT.as_secs())]
    Timeout(&'static str),
    #[error("etcd did not answer ({0}) within {1:?}")]
    Late(&'static str, Duration),
    #[error("no etcd endpoints configured")]
    NoEndpoints,
    #[error("{0} changed under every one of this node's tries to write it; trying again")]
    Contended(String),
    #[error("cannot read {path} (for etcd's TLS or password)")]
    Credentials {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One call to etcd, within [`CALL_TIMEOUT`].
pub async fn within<T>(
    what: &'static str,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(CallError::Timeout(what)),
    }
}

/// One call to etcd, within `deadline`: for calls whose answer matters sooner than
/// [`CALL_TIMEOUT`] (the leader's keep-alives).
pub async fn within_for<T>(
    what: &'static str,
    deadline: Duration,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(deadline, call).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(CallError::Late(what, deadline)),
    }
}

/// Waits before trying etcd again: doubling from 200 ms to 5 s.
pub(crate) struct Retry(Duration);

impl Retry {
    pub fn new() -> Self {
        Self(Duration::from_millis(200))
    }

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
    }

    pub fn reset(&mut self) {
        self.0 = Duration::from_millis(200);
    }
}
