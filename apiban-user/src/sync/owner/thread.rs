//! The owner's thread: starting it, stopping it, and whether it is alive and getting
//! through its work (what the systemd watchdog's pings are made of).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot, watch};

use super::Owner;
use crate::{
    cluster::ClusterLink,
    engine::{Enforcer, Engine},
    snapshot::Snapshot,
    sync::Update,
};

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

    pub(super) fn beat(&self) {
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

/// The owner's thread: how to stop it and get the owner back.
pub(in crate::sync) struct OwnerThread<E: Enforcer> {
    thread: Option<std::thread::JoinHandle<Owner<E>>>,
    stop: Option<oneshot::Sender<()>>,
    health: OwnerHealth,
}

impl<E: Enforcer + Send + 'static> OwnerThread<E> {
    /// Starts the owner on its own thread; the first snapshot is there before this returns.
    pub(in crate::sync) fn start(
        engine: Engine<E>,
        updates: mpsc::Receiver<Update>,
        timing: OwnerTiming,
        cluster: Option<ClusterLink>,
    ) -> std::io::Result<(Self, watch::Receiver<Arc<Snapshot>>)> {
        let (owner, snapshots) = Owner::new(engine, cluster);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let health = OwnerHealth::new();
        health.beat();
        let (stop, stopped) = oneshot::channel();
        let beats = health.clone();
        let thread = std::thread::Builder::new()
            .name("apiban-owner".into())
            .spawn(move || runtime.block_on(owner.run(updates, timing, beats, stopped)))?;
        Ok((
            Self {
                thread: Some(thread),
                stop: Some(stop),
                health,
            },
            snapshots,
        ))
    }
}

impl<E: Enforcer> OwnerThread<E> {
    /// Asks the owner to stop after the change it is making.
    pub(in crate::sync) fn request_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops the owner and waits for it; None if it died (a panic), or was stopped before.
    pub(in crate::sync) fn join(&mut self) -> Option<Owner<E>> {
        self.request_stop();
        self.thread.take()?.join().ok()
    }

    /// Whether the owner is alive and has shown progress within `max_silence`; why not.
    /// A panic ends its thread; a stuck owner stops beating.
    pub(in crate::sync) fn health(&self, max_silence: Duration) -> Result<(), OwnerFault> {
        if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
            return Err(OwnerFault::Stopped);
        }
        let silence = self.health.silence();
        if silence > max_silence {
            return Err(OwnerFault::Silent(Duration::from_secs(silence.as_secs())));
        }
        Ok(())
    }
}

/// Why the owner does not count as healthy: the watchdog is not pinged, and the agent exits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OwnerFault {
    #[error("the ledger's owner has stopped (it panicked)")]
    Stopped,
    #[error("the ledger's owner has shown no progress for {}", crate::human::format_duration(*.0))]
    Silent(Duration),
}
