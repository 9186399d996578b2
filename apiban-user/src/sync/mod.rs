//! Syncing: sources fetch, the owner applies, readers read snapshots.
//!
//! Sources never touch the ledger or the maps. They send what they fetched to the owner of
//! the [`Engine`] and wait for its acknowledgement, which comes after the batch is in the
//! maps, on disk and published; only then do they ask for the next batch. So a full pull
//! grows protection batch by batch, and an interruption at any point loses nothing.
//!
//! - [`messages`]: what the sources, the control socket and reloads send to the owner;
//! - [`owner`]: the owner's thread, which applies them and publishes snapshots;
//! - [`poller`]: the APIBAN poller and its rate budget;
//! - [`blocklists`]: one task per configured blocklist;
//! - [`crowdsec`]: CrowdSec's decision stream;
//! - [`backoff`]: retry delays.

pub mod backoff;
pub mod blocklists;
pub mod crowdsec;
pub mod messages;
pub mod owner;
pub mod poller;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};

pub use self::{
    backoff::Backoff,
    messages::{Change, ChangeError, RequestReport, Update, send_change},
    owner::{Owner, OwnerFault, OwnerHealth, OwnerTiming},
    poller::{ApibanPoller, PollSettings},
};
use self::{blocklists::run_blocklist, crowdsec::run_crowdsec, owner::OwnerThread};
use crate::{
    engine::{Enforcer, Engine},
    rate_budget::BudgetJournal,
    snapshot::Snapshot,
    source::{
        apiban::ApibanClient,
        blocklist::ListSpec,
        crowdsec::{AlertSpec, CrowdsecSpec},
    },
};

pub use crate::clock::unix_now;

/// Messages the owner's inbox holds before senders wait.
const UPDATES_CAPACITY: usize = 16;

/// The running sync machinery: the owner's thread and every task feeding it.
pub struct Running<E: Enforcer> {
    /// The owner's inbox, for the control socket and reloads.
    pub updates: mpsc::Sender<Update>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    owner: OwnerThread<E>,
    poller: Option<tokio::task::JoinHandle<()>>,
    lists: BTreeMap<String, (ListSpec, tokio::task::JoinHandle<()>)>,
    http: reqwest::Client,
    retry_now: Arc<tokio::sync::Notify>,
    /// A fleet node that does not lead keeps its feeds configured but not running.
    standby: bool,
    apiban: Option<(ApibanClient, PollSettings)>,
    list_specs: Vec<ListSpec>,
    fleet_budget: Option<crate::cluster::FleetBudget>,
    /// CrowdSec's stream as configured, and its task while it runs.
    crowdsec_spec: Option<CrowdsecSpec>,
    crowdsec: Option<(CrowdsecSpec, tokio::task::JoinHandle<()>)>,
    /// The CrowdSec alerts task, on every node (each posts its own detections).
    crowdsec_alerts: Option<(AlertSpec, tokio::task::JoinHandle<()>)>,
}

impl<E: Enforcer> Running<E> {
    /// The owner's latest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    /// For readers that keep their own: each sees every later publication.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    /// Stops every task, as a kill would: nothing is saved beyond what each change saved.
    pub fn abort(&mut self) {
        self.abort_sources();
        self.owner.request_stop();
    }

    fn abort_sources(&mut self) {
        if let Some(p) = &self.poller {
            p.abort();
        }
        for (_, task) in self.lists.values() {
            task.abort();
        }
        if let Some((_, task)) = &self.crowdsec {
            task.abort();
        }
        if let Some((_, task)) = &self.crowdsec_alerts {
            task.abort();
        }
    }

    /// Stops the sources, then the owner after the change it is making, and hands the owner
    /// back (for the last save); None if the owner died.
    pub fn stop(mut self) -> Option<Owner<E>> {
        self.abort_sources();
        self.owner.join()
    }

    /// Replaces the APIBAN poller (new key, URL or intervals). The poller resumes from the
    /// engine's cursor with the budget its journal holds, so a reload never overspends it.
    pub fn restart_poller(&mut self, apiban: Option<(ApibanClient, PollSettings)>) {
        if let Some(p) = self.poller.take() {
            p.abort();
        }
        self.apiban = apiban;
        if self.standby {
            return;
        }
        if let Some((client, settings)) = self.apiban.clone() {
            let snapshot = self.snapshot();
            let journal = snapshot
                .engine
                .state_dir
                .as_deref()
                .map(BudgetJournal::in_dir);
            let cursor = snapshot.engine.apiban.clone();
            let poller =
                ApibanPoller::new(client, settings, &cursor, journal, self.updates.clone())
                    .with_retry_signal(self.retry_now.clone())
                    .with_fleet_budget(self.fleet_budget.clone());
            self.poller = Some(tokio::spawn(poller.run(cursor)));
        }
    }

    /// Whether the owner is alive and has shown progress within `max_silence`; why not.
    pub fn owner_health(&self, max_silence: Duration) -> Result<(), OwnerFault> {
        self.owner.health(max_silence)
    }

    /// Cuts the poller's wait after a rejected key (403) short: the operator reloaded or
    /// replaced the key. Does nothing while the key is accepted.
    pub fn retry_apiban_now(&self) {
        if self.snapshot().sync.key_rejected_since.is_some() {
            self.retry_now.notify_one();
        }
    }

    /// Starts, stops or restarts the blocklists whose configuration changed; returns the
    /// names that left the configuration (their bans are for the owner to drop).
    pub fn set_lists(&mut self, lists: Vec<ListSpec>) -> Vec<String> {
        let gone: Vec<String> = self
            .list_specs
            .iter()
            .filter(|old| !lists.iter().any(|l| l.name == old.name))
            .map(|old| old.name.clone())
            .collect();
        self.list_specs = lists;
        self.run_lists();
        gone
    }

    /// Whether this node's feeds run: a single node's always do, a fleet node's while it
    /// leads.
    pub fn polling(&self) -> bool {
        !self.standby
    }

    /// A fleet node stands by while another leads: its poller and lists stop, and start
    /// again, as configured, once it leads.
    pub fn set_standby(&mut self, standby: bool) {
        if self.standby == standby {
            return;
        }
        self.standby = standby;
        self.restart_poller(self.apiban.clone());
        self.run_lists();
        self.run_crowdsec();
    }

    /// Starts, stops or restarts CrowdSec's tasks to match: the stream's (a new key, URL or
    /// filter restarts it, with a full read) and the alerts' (a new machine or password).
    pub async fn set_crowdsec(&mut self, spec: Option<CrowdsecSpec>, alerts: Option<AlertSpec>) {
        self.crowdsec_spec = spec;
        self.run_crowdsec();
        if self.crowdsec_alerts.as_ref().map(|(s, _)| s) == alerts.as_ref() {
            return;
        }
        if let Some((_, task)) = self.crowdsec_alerts.take() {
            task.abort();
        }
        let outbox = alerts.map(|spec| {
            let (tx, rx) = mpsc::channel(crowdsec::ALERTS_PENDING);
            let task = tokio::spawn(crowdsec::run_alerts(spec.clone(), rx, self.updates.clone()));
            let outbox = crowdsec::AlertOutbox {
                tx,
                post_api_bans: spec.post_api_bans,
                post_forgeable: spec.post_forgeable,
            };
            self.crowdsec_alerts = Some((spec, task));
            outbox
        });
        // The owner gone: there is nothing to post from either.
        let _ = self.updates.send(Update::CrowdsecAlertsTo(outbox)).await;
    }

    /// An inbox for the fleet's tasks (`crate::cluster`), which speak only of the fleet:
    /// what arrives is handed to the owner in order, as `Update::Cluster`, with the owner's
    /// own back-pressure.
    pub fn cluster_updates(&self) -> mpsc::Sender<crate::cluster::ClusterUpdate> {
        let (tx, mut rx) = mpsc::channel(UPDATES_CAPACITY);
        let owner = self.updates.clone();
        tokio::spawn(async move {
            while let Some(update) = rx.recv().await {
                if owner.send(Update::Cluster(update)).await.is_err() {
                    return;
                }
            }
        });
        tx
    }

    fn run_crowdsec(&mut self) {
        let wanted = self.crowdsec_spec.clone().filter(|_| !self.standby);
        if let Some((running, task)) = &self.crowdsec {
            if Some(running) == wanted.as_ref() {
                return;
            }
            task.abort();
            self.crowdsec = None;
        }
        if let Some(spec) = wanted {
            let task = tokio::spawn(run_crowdsec(spec.clone(), self.updates.clone()));
            self.crowdsec = Some((spec, task));
        }
    }

    /// Starts, stops or restarts the list tasks to match the configured lists (none while
    /// standing by).
    fn run_lists(&mut self) {
        let lists = if self.standby {
            Vec::new()
        } else {
            self.list_specs.clone()
        };
        let wanted: BTreeMap<String, ListSpec> =
            lists.into_iter().map(|l| (l.name.clone(), l)).collect();
        self.lists.retain(|name, (spec, task)| {
            let keep = wanted.get(name) == Some(spec);
            if !keep {
                task.abort();
            }
            keep
        });
        let refreshes = self.snapshot().engine.list_refreshes.clone();
        for (name, spec) in wanted {
            if self.lists.contains_key(&name) {
                continue;
            }
            let task = tokio::spawn(run_blocklist(
                spec.clone(),
                self.http.clone(),
                refreshes.get(&name).copied(),
                self.updates.clone(),
            ));
            self.lists.insert(name, (spec, task));
        }
    }
}

impl<E: Enforcer> Drop for Running<E> {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Starts the owner's thread, the APIBAN poller (when there is a client) and one task per
/// blocklist. Must be called inside a tokio runtime (the sources run on it).
pub fn spawn<E: Enforcer + Send + 'static>(
    engine: Engine<E>,
    apiban: Option<(ApibanClient, PollSettings)>,
    lists: Vec<ListSpec>,
    http: reqwest::Client,
    timing: OwnerTiming,
) -> std::io::Result<Running<E>> {
    spawn_node(engine, apiban, lists, http, timing, None)
}

/// [`spawn`] for a node that may be in a fleet: the owner sends what this node changes to
/// the cluster's writer.
pub fn spawn_node<E: Enforcer + Send + 'static>(
    engine: Engine<E>,
    apiban: Option<(ApibanClient, PollSettings)>,
    lists: Vec<ListSpec>,
    http: reqwest::Client,
    timing: OwnerTiming,
    cluster: Option<crate::cluster::ClusterLink>,
) -> std::io::Result<Running<E>> {
    let (tx, rx) = mpsc::channel(UPDATES_CAPACITY);
    let standby = cluster.is_some();
    let fleet_budget = cluster.as_ref().map(|c| c.budget.clone());
    let (owner, snapshots) = OwnerThread::start(engine, rx, timing, cluster)?;
    let mut running = Running {
        updates: tx,
        snapshots,
        owner,
        poller: None,
        lists: BTreeMap::new(),
        http,
        retry_now: Default::default(),
        standby,
        apiban: None,
        list_specs: Vec::new(),
        fleet_budget,
        crowdsec_spec: None,
        crowdsec: None,
        crowdsec_alerts: None,
    };
    running.restart_poller(apiban);
    running.set_lists(lists);
    Ok(running)
}
