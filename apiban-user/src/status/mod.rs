//! What the running agent reports about itself: the types behind `apiban status` (text and
//! JSON), `apiban check`, `apiban list` and /metrics. The agent builds them from one snapshot
//! of the owner ([`build`]), so every view agrees; the client prints them ([`text`]).

pub mod build;
mod check_text;
pub mod text;

pub use self::{
    build::{check, list, report, source_hits, top_entries},
    check_text::fleet_text,
    text::{relative, shown, utc},
};

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{dataplane::DataplaneReader, snapshot::Snapshot};

/// What the read side of the agent (control socket, /metrics, its own log lines) reads: the
/// owner's latest snapshot, the agent's facts and the maps' reader. Nothing in it can wait
/// for the owner, nor write what the owner writes.
#[derive(Clone)]
pub struct Readers {
    pub snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    pub info: Arc<std::sync::Mutex<AgentInfo>>,
    /// None in a dry run.
    pub dataplane: Option<Arc<DataplaneReader>>,
    /// None without `--cluster`.
    pub cluster: Option<crate::cluster::ClusterView>,
    /// None in a dry run.
    pub detect: Option<crate::detect::DetectView>,
}

impl Readers {
    /// Runs `read` on the blocking pool with the owner's latest snapshot, off the runtime
    /// thread that serves the control socket, /metrics and the signals.
    ///
    /// The snapshot is released after the answer, on the blocking pool again: when the owner
    /// has replaced it meanwhile, its last holder frees an old copy of the ledger, which at
    /// 100k entries takes longer than the read itself (25-35 ms while the owner saves).
    pub async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Snapshot, &AgentInfo, Option<&DataplaneReader>) -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        let snapshot = self.snapshots.borrow().clone();
        let mut info = crate::lock(&self.info).clone();
        info.cluster = self.cluster.as_ref().map(|c| cluster_report(c, &snapshot));
        info.detect = self.detect.as_ref().map(detect_report);
        let dataplane = self.dataplane.clone();
        let (answer, snapshot) = tokio::task::spawn_blocking(move || {
            (read(&snapshot, &info, dataplane.as_deref()), snapshot)
        })
        .await?;
        if Arc::strong_count(&snapshot) == 1 {
            tokio::task::spawn_blocking(move || drop(snapshot));
        }
        Ok(answer)
    }

    /// The status report of this moment, without the top sources.
    pub async fn report(&self, now: u64) -> Result<StatusReport, tokio::task::JoinError> {
        self.read(move |snapshot, info, dataplane| report(snapshot, info, dataplane, now, 0))
            .await
    }
}

fn cluster_report(view: &crate::cluster::ClusterView, snapshot: &Snapshot) -> ClusterReport {
    use std::sync::atomic::Ordering::Relaxed;
    let applied = view.stats.current_to(snapshot.engine.cluster_revision);
    let head = view.stats.head_revision.load(Relaxed);
    ClusterReport {
        node: view.node.clone(),
        leader: view.leading(),
        watching: view.stats.watching.load(Relaxed),
        applied_revision: applied,
        revision_lag: (head - applied).max(0),
        watch_restarts: view.stats.watch_restarts.load(Relaxed),
        etcd_errors: view.stats.etcd_errors.load(Relaxed),
        full_reads: view.stats.full_reads.load(Relaxed),
        expired_deleted: view.stats.expired_deleted.load(Relaxed),
        etcd_members: view.stats.members.load(Relaxed),
        clock_offset_ms: view.stats.clock_offset_ms(),
        clock_off: view.stats.clock_off.load(Relaxed),
        etcd_nospace: view.stats.nospace.load(Relaxed),
        etcd_members_answering: view.stats.members_answering.load(Relaxed),
        pending_changes: snapshot.engine.cluster_pending,
        outbox_queued: view.stats.outbox_queued.load(Relaxed),
        outbox_shed: view.stats.outbox_shed.load(Relaxed),
        records_refused: {
            let mut refused: std::collections::BTreeMap<String, u64> = snapshot
                .engine
                .counters
                .fleet_refused
                .iter()
                .map(|(reason, n)| ((*reason).to_owned(), *n))
                .collect();
            let undecodable = view.stats.undecodable.load(Relaxed);
            if undecodable > 0 {
                refused.insert("undecodable".into(), undecodable);
            }
            refused
        },
    }
}

fn detect_report(view: &crate::detect::DetectView) -> DetectReport {
    use std::sync::atomic::Ordering::Relaxed;
    let settings = view.settings.borrow();
    let stats = &view.stats;
    DetectReport {
        mode: settings.mode,
        ports: settings.ports.clone(),
        tls_ports: settings.tls_ports.clone(),
        samples: stats.samples.load(Relaxed),
        rate_reports: stats.rate_reports.load(Relaxed),
        bans: stats.bans.load(Relaxed),
        refused: stats.refused.load(Relaxed),
        exempted: stats.exempted.load(Relaxed),
        responses: stats.responses.load(Relaxed),
        proven: stats.proven.load(Relaxed),
        tracked: stats.tracked.load(Relaxed),
        keepalives: stats.keepalives.load(Relaxed),
        tls_packets: stats.tls.load(Relaxed),
        untracked: stats.untracked.load(Relaxed),
        unreadable: stats.unreadable.load(Relaxed),
        last_unreadable: stats.last_unreadable().map(|u| UnreadableReport {
            addr: u.addr,
            why: u.why,
            line: u.line,
        }),
        matches: stats
            .matches()
            .into_iter()
            .map(|(rule, mode, count)| RuleMatches {
                rule: rule.to_owned(),
                mode: mode.to_owned(),
                count,
            })
            .collect(),
        recent: stats.recent(),
    }
}

/// What SIP scanner detection has seen and done.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DetectReport {
    pub mode: crate::detect::DetectMode,
    pub ports: Vec<u16>,
    pub tls_ports: Vec<u16>,
    /// Samples of requests the dataplane sent.
    pub samples: u64,
    /// Sources the dataplane reported over the rate threshold.
    pub rate_reports: u64,
    /// Bans made (enforce mode).
    pub bans: u64,
    /// Matches the ledger refused (allowlisted, this host, special-purpose).
    pub refused: u64,
    /// Matches on proven peers (`--detect-exempt`, or proven by the server's answers), not
    /// banned.
    pub exempted: u64,
    /// Responses to followed sources the egress program sent.
    #[serde(default)]
    pub responses: u64,
    /// Peers proven by the server's answers now.
    #[serde(default)]
    pub proven: u64,
    /// Sources the rules follow now.
    pub tracked: u64,
    /// Keep-alives (CRLF, STUN) and packets to TLS ports the program passed over.
    pub keepalives: u64,
    pub tls_packets: u64,
    /// Requests from sources the program's table had no room for: sampled within the cap,
    /// not counted against a rate.
    #[serde(default)]
    pub untracked: u64,
    /// Samples that were no SIP request the parser could read: never a ban reason.
    pub unreadable: u64,
    pub last_unreadable: Option<UnreadableReport>,
    pub matches: Vec<RuleMatches>,
    /// The latest matches, oldest first.
    pub recent: Vec<crate::detect::Detection>,
}

/// The latest sample that could not be read, as `status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UnreadableReport {
    pub addr: std::net::IpAddr,
    pub why: String,
    pub line: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuleMatches {
    pub rule: String,
    pub mode: String,
    pub count: u64,
}

/// A fleet node's view of its fleet.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClusterReport {
    pub node: String,
    /// This node polls APIBAN and the lists for the fleet.
    pub leader: bool,
    /// The watch on etcd is up.
    pub watching: bool,
    pub applied_revision: i64,
    /// How far the applied revision is behind the newest one this node has seen.
    pub revision_lag: i64,
    pub watch_restarts: u64,
    pub etcd_errors: u64,
    pub full_reads: u64,
    /// Expired records this node deleted from etcd while it led.
    #[serde(default)]
    pub expired_deleted: u64,
    /// etcd's endpoints, and how many answered a read in the last round (every 2 s).
    #[serde(default)]
    pub etcd_members: u64,
    #[serde(default)]
    pub etcd_members_answering: u64,
    /// This node's clock against the fleet's (ms, positive: ahead); None until another
    /// node's heartbeat was compared.
    #[serde(default)]
    pub clock_offset_ms: Option<i64>,
    /// Over `--cluster-max-clock-offset`: the node does not lead.
    #[serde(default)]
    pub clock_off: bool,
    /// etcd's NOSPACE alarm is raised: it refuses every write.
    #[serde(default)]
    pub etcd_nospace: bool,
    /// Operators' changes on this node that etcd has not confirmed yet.
    pub pending_changes: usize,
    /// Changes waiting for the writer to etcd (bounded), and those it could not take,
    /// sent again from the ledger.
    #[serde(default)]
    pub outbox_queued: u64,
    #[serde(default)]
    pub outbox_shed: u64,
    /// Records and allowlist entries in etcd this node refused (see
    /// [`crate::cluster::REFUSAL_REASONS`]), by reason.
    #[serde(default)]
    pub records_refused: std::collections::BTreeMap<String, u64>,
}

/// Facts about the agent that are not the ledger's: what it attached to and how it runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    pub pid: u32,
    pub started_at: u64,
    pub dry_run: bool,
    pub interfaces: Vec<InterfaceInfo>,
    pub scope: String,
    pub apiban_enabled: bool,
    pub rate_limit: String,
    pub poll_interval: String,
    pub config_file: Option<String>,
    /// In a fleet: this node's view of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterReport>,
    /// SIP scanner detection (absent in a dry run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect: Option<DetectReport>,
    /// What this kernel lets the agent do (empty in a dry run: nothing is loaded).
    #[serde(default)]
    pub features: Vec<crate::dataplane::kernel::FeatureState>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InterfaceInfo {
    pub name: String,
    pub mode: String,
    /// The egress classifier that shows detection the server's answers: `tcx`, or `off: why`.
    #[serde(default)]
    pub egress: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EntryCount {
    pub source: String,
    pub family: String,
    pub count: usize,
}

/// What one source's entries did in the dataplane: dropped (enforce) or let pass and counted
/// (observe). Counted from the hit counts of the entries in the maps now: an entry held by
/// two sources counts for both, and an entry's count goes with it when it leaves.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceReport {
    pub source: String,
    /// "enforce" or "observe".
    pub mode: String,
    /// Prefixes of this source in the ledger.
    pub entries: usize,
    /// Packets its entries dropped.
    pub dropped: u64,
    /// Packets its entries matched in observe mode: what it would have dropped.
    pub observed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopEntry {
    pub net: IpNet,
    pub hits: u64,
    /// Seconds since the last hit.
    pub last_hit_ago: Option<u64>,
    pub sources: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SyncReport {
    pub requests: BTreeMap<String, u64>,
    pub last_request_at: Option<u64>,
    pub last_request_outcome: Option<String>,
    pub last_success: Option<u64>,
    pub next_request: Option<u64>,
    pub budget_left: u32,
    pub rate_limit_waits: u64,
    /// Since when APIBAN has rejected the key (403), while it does.
    #[serde(default)]
    pub key_rejected_since: Option<u64>,
    /// This host's clock against the `Date` of APIBAN's last answer (ms; positive: ahead).
    #[serde(default)]
    pub apiban_clock_offset_ms: Option<i64>,
    pub next_id: Option<String>,
    pub full_pull_in_progress: bool,
    pub lists: Vec<ListReport>,
    /// CrowdSec's decision stream, once this node has read it or tried to.
    #[serde(default)]
    pub crowdsec: Option<CrowdsecReport>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CrowdsecReport {
    pub last_success: Option<u64>,
    pub last_error: Option<String>,
    /// Decisions left: not a ban of an address or range (captcha...).
    pub other_decisions: u64,
    /// Decisions that could not be read; they ban nothing.
    pub unreadable_decisions: u64,
    /// This node's bans posted to CrowdSec as alerts; not posted as CrowdSec had them; not
    /// posted as their evidence is forgeable; lost to a full queue.
    #[serde(default)]
    pub alerts_posted: u64,
    #[serde(default)]
    pub alerts_skipped: u64,
    #[serde(default)]
    pub alerts_forgeable: u64,
    #[serde(default)]
    pub alerts_dropped: u64,
    #[serde(default)]
    pub alerts_error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListReport {
    pub name: String,
    pub last_success: Option<u64>,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EngineReport {
    pub added: u64,
    pub removed: u64,
    pub expired: u64,
    pub reconciled: u64,
    pub skipped: BTreeMap<String, u64>,
    pub map_full: u64,
    pub saves: u64,
    pub save_failures: u64,
    pub last_save_seconds: f64,
    /// The last save failed: the state file is behind what is enforced.
    #[serde(default)]
    pub unsaved: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatusReport {
    pub now: u64,
    pub agent: AgentInfo,
    /// Ledger records by source and family.
    pub entries: Vec<EntryCount>,
    /// IPv6 blocks banned by escalation (absent from agents before it).
    #[serde(default)]
    pub derived_prefixes: usize,
    /// Each source's mode and what its entries dropped or would have dropped (absent from
    /// agents before observe mode).
    #[serde(default)]
    pub sources: Vec<SourceReport>,
    /// Prefixes in the deny maps by family.
    pub enforced: BTreeMap<String, usize>,
    /// Deny map capacity by family (each of the host hash and the prefix trie holds this many).
    pub capacity: BTreeMap<String, u32>,
    pub allowlist: usize,
    /// Packets and bytes by interface, then verdict; "other" is interfaces without a slot.
    pub traffic: BTreeMap<String, BTreeMap<String, Traffic>>,
    pub top: Vec<TopEntry>,
    pub sync: SyncReport,
    pub engine: EngineReport,
    /// Set when the dataplane could not be read; the rest is still true.
    pub dataplane_error: Option<String>,
}

/// `apiban check`: the verdict for one address and why.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckReport {
    pub addr: IpAddr,
    /// "banned", "observed" (only sources in observe mode ban it: it would be dropped),
    /// "allowed" (banned but the allowlist wins) or "not banned".
    pub verdict: String,
    /// With "observed": the sources in observe mode that hold it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub observed_by: Vec<String>,
    /// IPv6 blocks banned by escalation that cover the address, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub derived: Vec<crate::ledger::Escalation>,
    pub entry: Option<IpNet>,
    pub enforced: bool,
    pub records: Vec<RecordReport>,
    pub allowed_by: Option<IpNet>,
    pub hits: Option<u64>,
    pub last_hit_ago: Option<u64>,
    pub dry_run: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordReport {
    pub source: String,
    pub first_seen: u64,
    pub last_seen: u64,
    pub expires: Option<u64>,
    pub comment: Option<String>,
    /// Why detection banned it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<crate::ledger::Evidence>,
}

/// `apiban list`: one row per prefix and source.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListRow {
    pub net: IpNet,
    pub source: String,
    pub first_seen: u64,
    pub last_seen: u64,
    pub expires: Option<u64>,
    pub comment: Option<String>,
    pub enforced: bool,
}
