//! Runs the sync machinery (owner task, APIBAN poller, blocklists) inside a test's runtime,
//! and aborts every task on drop.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use apiban::{
    engine::{Enforcer, Engine},
    source::{apiban::ApibanClient, blocklist::ListSpec},
    sync::{self, Owner, PollSettings},
};

pub struct SyncHarness<E: Enforcer + Send + 'static> {
    pub owner: Arc<Mutex<Owner<E>>>,
    running: sync::Running<E>,
}

impl<E: Enforcer + Send + 'static> SyncHarness<E> {
    /// Must be called from inside a tokio runtime.
    pub fn start(
        engine: Engine<E>,
        client: Option<ApibanClient>,
        poll: PollSettings,
        lists: Vec<ListSpec>,
    ) -> Self {
        let running = sync::spawn(
            engine,
            client.map(|c| (c, poll)),
            lists,
            reqwest::Client::new(),
            sync::OwnerTiming::new(Duration::from_millis(100)),
        );
        Self {
            owner: running.owner.clone(),
            running,
        }
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut Owner<E>) -> T) -> T {
        f(&mut sync::lock(&self.owner))
    }

    /// Polls `condition` every 20 ms; panics with `what` after `timeout`.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut(&Owner<E>) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.with(|o| condition(o)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every task, as a kill would: nothing is saved beyond what already was.
    pub fn kill(self) -> Arc<Mutex<Owner<E>>> {
        self.running.abort();
        self.owner.clone()
    }
}

impl<E: Enforcer + Send + 'static> Drop for SyncHarness<E> {
    fn drop(&mut self) {
        self.running.abort();
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
