//! What the ledger's owner publishes after every change it makes: an immutable view of the
//! ledger, what is enforced and how syncing goes. `status`, `check`, `list`, `/metrics`, the
//! agent's own logs and the tasks that restart read it without waiting for the owner, even
//! while the owner saves a large state file.
//!
//! A snapshot shares the ledger, the enforced set and the allowlist with the engine (see
//! [`crate::engine::Engine::shared`]): publishing costs a few reference counts, and the
//! engine copies one of them only when it changes it while a reader still holds the old one.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
};

use ipnet::IpNet;

use crate::{
    engine::{EngineCounters, EngineShared},
    ledger::Ledger,
    sanitise::AllowList,
    state::ApibanCursor,
};

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
    pub lists: BTreeMap<String, ListStatus>,
}

#[derive(Clone, Debug, Default)]
pub struct ListStatus {
    pub last_success: Option<u64>,
    pub last_error: Option<String>,
}

/// The ledger and everything about it, as the owner left it after one change.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Grows by one with every publication: a reader can tell a newer view from an older one.
    pub seq: u64,
    pub ledger: Arc<Ledger>,
    /// Prefixes in the deny maps, as far as the engine applied them.
    pub enforced: Arc<BTreeSet<IpNet>>,
    /// The allowlist in force: configured and manual entries.
    pub allowlist: Arc<AllowList>,
    /// The entries `apiban allow add` made.
    pub manual_allow: Arc<BTreeSet<IpNet>>,
    pub counters: EngineCounters,
    /// The last save failed: the state file is behind what is enforced.
    pub unsaved: bool,
    pub apiban: ApibanCursor,
    /// When each blocklist was last refreshed (Unix seconds).
    pub list_refreshes: BTreeMap<String, u64>,
    /// Where the state is saved; None without a state directory.
    pub state_dir: Option<PathBuf>,
    pub sync: SyncStatus,
}

impl Snapshot {
    pub fn new(seq: u64, engine: EngineShared, sync: SyncStatus) -> Self {
        Self {
            seq,
            ledger: engine.ledger,
            enforced: engine.enforced,
            allowlist: engine.allowlist,
            manual_allow: engine.manual_allow,
            counters: engine.counters,
            unsaved: engine.unsaved,
            apiban: engine.apiban,
            list_refreshes: engine.list_refreshes,
            state_dir: engine.state_dir,
            sync,
        }
    }
}
