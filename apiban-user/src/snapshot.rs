//! What the ledger's owner publishes after every change it makes: an immutable view of the
//! ledger, what is enforced and how syncing goes. `status`, `check`, `list`, `/metrics`, the
//! agent's own logs and the tasks that restart read it without waiting for the owner, even
//! while the owner saves a large state file.
//!
//! A snapshot shares the ledger, the enforced set and the allowlist with the engine (see
//! [`crate::engine::Engine::shared`]): publishing costs a few reference counts, and the
//! engine copies one of them only when it changes it while a reader still holds the old one.

use std::collections::BTreeMap;

use crate::engine::EngineShared;

/// What the owner knows about syncing beside the engine, for `apiban status` and /metrics.
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
    /// This host's clock against APIBAN's `Date` (ms; positive: ahead), once an answer had one.
    pub apiban_clock_offset_ms: Option<i64>,
    pub lists: BTreeMap<String, ListStatus>,
    pub crowdsec: CrowdsecStatus,
}

/// CrowdSec's stream as this node last read it (nothing when it is not configured).
#[derive(Clone, Debug, Default)]
pub struct CrowdsecStatus {
    pub last_success: Option<u64>,
    /// While reads fail: the last failure.
    pub last_error: Option<String>,
    /// Decisions left because they are not bans of an address or range (captcha...).
    pub other_decisions: u64,
    /// Decisions whose value or duration could not be read.
    pub unreadable_decisions: u64,
    /// This node's bans posted to CrowdSec as alerts.
    pub alerts_posted: u64,
    /// Not posted: CrowdSec bans the address already.
    pub alerts_skipped: u64,
    /// Not posted: detection's ban rests on evidence a forged address can bring, and
    /// `--crowdsec-post-forgeable` is off.
    pub alerts_forgeable: u64,
    /// Lost: the queue to LAPI was full.
    pub alerts_dropped: u64,
    /// While posts fail: the last failure.
    pub alerts_error: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct ListStatus {
    pub last_success: Option<u64>,
    pub last_error: Option<String>,
}

/// The ledger and everything about it, as the owner left it after one change.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Grows by one with every publication: a reader can tell a newer view from an older one.
    pub seq: u64,
    pub engine: EngineShared,
    pub sync: SyncStatus,
}
