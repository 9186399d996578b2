//! What the sources, the control socket and reloads send to the owner, and what it answers.

use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot};

use crate::{dataplane::Scope, engine::EngineSettings, engine::IngestReport, trust::Provenance};

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
    /// One answer of CrowdSec's decision stream; `startup`: every active decision.
    CrowdsecStream {
        startup: bool,
        stream: crate::source::crowdsec::Stream,
        reply: oneshot::Sender<IngestReport>,
    },
    CrowdsecFailed {
        error: String,
    },
    /// Where this node's bans go as CrowdSec alerts (None: nowhere).
    CrowdsecAlertsTo(Option<super::crowdsec::AlertOutbox>),
    /// What the alerts task did with one batch.
    CrowdsecAlertsPosted {
        posted: usize,
        /// Dropped from its queue while LAPI could not take them.
        dropped: usize,
        error: Option<String>,
    },
    /// This host's addresses changed (see `host_addresses`).
    OwnAddresses(Vec<std::net::IpAddr>),
    /// From the control socket or a reload; the reply says what happened, or why not.
    Control {
        change: Change,
        reply: oneshot::Sender<Result<String, ChangeError>>,
    },
    /// In a fleet: what etcd holds (see `cluster`).
    Cluster(crate::cluster::ClusterUpdate),
    /// Detection recognised a scanner (enforce mode).
    Detected {
        addr: std::net::IpAddr,
        ttl: std::time::Duration,
        evidence: crate::ledger::Evidence,
        reply: oneshot::Sender<Result<String, ChangeError>>,
    },
    /// `apiban capture` starts or stops: the program's capture switch (see `capture`).
    Capture {
        on: bool,
        reply: oneshot::Sender<Result<String, ChangeError>>,
    },
}

impl Update {
    /// Where this update came from: [`crate::trust`] decides from it what the update must
    /// pass and where it goes.
    pub fn provenance(&self) -> Provenance {
        match self {
            Update::BeginFullPull { .. }
            | Update::ApibanBatch { .. }
            | Update::ApibanDone { .. }
            | Update::ListSnapshot { .. } => Provenance::Feed,
            Update::CrowdsecStream { .. } => Provenance::Crowdsec,
            Update::Detected { .. } => Provenance::Detection,
            Update::Control { change, .. } => match change {
                Change::Ban { force, .. } => Provenance::Operator { force: *force },
                Change::Unban { .. } | Change::AllowAdd { .. } | Change::AllowRemove { .. } => {
                    Provenance::Operator { force: false }
                }
                Change::ApiBan { .. } | Change::ApiUnban { .. } | Change::ApiFlush => {
                    Provenance::BanApi
                }
                // Sent only where the feeds run: a single node, or the fleet's leader.
                Change::DropList { .. } => Provenance::Feed,
                Change::Settings { .. } => Provenance::Local,
            },
            // What etcd delivers is admitted record by record (`Provenance::FleetRecord`);
            // as an update it is etcd's already and goes nowhere.
            Update::Cluster(_) => Provenance::Local,
            _ => Provenance::Local,
        }
    }
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
            other => ChangeError::Failed(crate::error_chain(&other)),
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
    /// From a SIP proxy through the ban API (source `api`).
    ApiBan {
        net: IpNet,
        ttl: Duration,
        comment: Option<String>,
    },
    ApiUnban {
        net: IpNet,
    },
    ApiFlush,
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
    /// This host's clock against the `Date` of APIBAN's last answer (ms; positive: ahead).
    pub server_clock_offset_ms: Option<i64>,
}

/// Sends a change to the owner and waits until it is applied and saved.
pub async fn send_change(
    updates: &mpsc::Sender<Update>,
    change: Change,
) -> Result<String, ChangeError> {
    let stopping = || ChangeError::Failed("the agent is stopping".to_owned());
    let (reply, rx) = oneshot::channel();
    updates
        .send(Update::Control { change, reply })
        .await
        .map_err(|_| stopping())?;
    rx.await.map_err(|_| stopping())?
}
