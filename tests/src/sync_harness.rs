//! Runs the sync machinery (owner task, APIBAN poller, blocklists) inside a test's runtime,
//! and aborts every task on drop.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use apiban::{
    dataplane::DataplaneError,
    engine::{Enforcer, Engine, MemoryEnforcer},
    snapshot::Snapshot,
    source::{apiban::ApibanClient, blocklist::ListSpec},
    sync::{self, Owner, PollSettings},
};
use ipnet::IpNet;

/// The engine's in-memory enforcer, shared with the test: the owner's thread writes it, the
/// test reads what it holds.
#[derive(Clone, Debug, Default)]
pub struct SharedMemory(Arc<Mutex<MemoryEnforcer>>);

impl SharedMemory {
    /// What the enforcer denies now.
    pub fn deny(&self) -> BTreeSet<IpNet> {
        apiban::lock(&self.0).deny.clone()
    }
}

impl Enforcer for SharedMemory {
    fn denied(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        apiban::lock(&self.0).denied()
    }
    fn allowed(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        apiban::lock(&self.0).allowed()
    }
    fn observed(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        apiban::lock(&self.0).observed()
    }
    fn deny(&mut self, nets: &[IpNet], observed: bool) -> Result<(), DataplaneError> {
        apiban::lock(&self.0).deny(nets, observed)
    }
    fn mark(&mut self, nets: &[IpNet], observed: bool) -> Result<(), DataplaneError> {
        apiban::lock(&self.0).mark(nets, observed)
    }
    fn undeny(&mut self, nets: &[IpNet]) -> Result<(), DataplaneError> {
        apiban::lock(&self.0).undeny(nets)
    }
    fn allow(&mut self, net: IpNet) -> Result<(), DataplaneError> {
        apiban::lock(&self.0).allow(net)
    }
    fn unallow(&mut self, net: IpNet) -> Result<(), DataplaneError> {
        apiban::lock(&self.0).unallow(net)
    }
}

pub struct SyncHarness<E: Enforcer + Send + 'static> {
    running: Option<sync::Running<E>>,
    /// The enforcer's contents, when it is a [`SharedMemory`].
    memory: Option<SharedMemory>,
}

impl<E: Enforcer + Send + 'static> SyncHarness<E> {
    /// Must be called from inside a tokio runtime.
    pub fn start(
        engine: Engine<E>,
        client: Option<ApibanClient>,
        poll: PollSettings,
        lists: Vec<ListSpec>,
    ) -> Self {
        let memory = (engine.enforcer() as &dyn std::any::Any)
            .downcast_ref::<SharedMemory>()
            .cloned();
        let running = sync::spawn(
            engine,
            client.map(|c| (c, poll)),
            lists,
            reqwest::Client::new(),
            sync::OwnerTiming::new(Duration::from_millis(100)),
        )
        .expect("start the owner's thread");
        Self {
            running: Some(running),
            memory,
        }
    }

    fn running(&self) -> &sync::Running<E> {
        self.running
            .as_ref()
            .expect("the harness runs until killed")
    }

    /// What the in-memory enforcer denies now; panics for other enforcers.
    pub fn denied(&self) -> BTreeSet<IpNet> {
        self.memory
            .as_ref()
            .expect("the harness was started with a SharedMemory enforcer")
            .deny()
    }

    /// Reads the owner's latest snapshot.
    pub fn with<T>(&self, f: impl FnOnce(&Snapshot) -> T) -> T {
        f(&self.running().snapshot())
    }

    /// Polls `condition` on the latest snapshot every 20 ms; panics with `what` after
    /// `timeout`.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut(&Snapshot) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.with(|s| condition(s)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every task and the owner, as a kill would: nothing is saved beyond what already
    /// was. Returns the owner, to look at what its engine holds.
    pub fn kill(mut self) -> Owner<E> {
        self.running
            .take()
            .and_then(sync::Running::stop)
            .expect("the owner was alive")
    }
}

/// A temporary directory, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        Self::at(std::env::temp_dir().join(crate::unique_name(prefix)))
    }

    /// A fixed path, emptied first.
    pub fn at(path: PathBuf) -> Self {
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
