//! SIP scanner detection: one more source of the ledger (`detect`), fed by the dataplane.
//!
//! The XDP program counts SIP requests per source and sends samples and rate reports
//! through a ring buffer (see `apiban_common::detect`); this task reads them, applies the
//! rules (see [`rules`]) and, in `enforce` mode, asks the ledger's owner to ban what they
//! match, with evidence and a TTL that doubles on each re-offence. In `observe` mode it only
//! logs and counts what it would ban. The owner applies the ban like any feed's: the
//! allowlist wins, this host's addresses and the sanitiser's limits are refused.
//!
//! The request rules read requests, which whoever can forge a source address can send in
//! that address's name; so each needs several requests, their bans are short
//! (`--detect-forgeable-ttl`, minutes) and grow only on re-offence, and they never count
//! towards IPv6 prefix escalation. The egress program shows the server's answers, which a
//! forger never sees: `auth-failure` bans rest on them (`--detect-ttl`), and so do proven
//! peers ([`proven`]), which, like the operator's (`--detect-exempt`), detection never bans
//! (what would have happened is still reported).

pub mod offences;
pub mod proven;
pub mod rules;
pub mod sample;
mod saved;
pub mod sip;

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot, watch},
};

use self::{
    offences::Offences,
    proven::ProvenPeers,
    rules::{Detector, Finding, RULES},
    sample::Sample,
};
use crate::{
    dataplane::detect::DetectTap,
    ledger::Evidence,
    sync::{ChangeError, Update, unix_now},
};

pub use crate::config::detect::{DEFAULT_USER_AGENTS, DetectMode, DetectSettings, RateThresholds};

/// Detections kept for `status`.
const RECENT: usize = 20;

/// One match, as `status` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detection {
    pub addr: IpAddr,
    pub rule: String,
    pub mode: DetectMode,
    pub counts: String,
    pub line: String,
    pub at: u64,
    /// What the ledger's owner said (enforce mode): banned, or why not.
    pub outcome: String,
}

/// What detection has seen, for `status` and /metrics.
#[derive(Debug, Default)]
pub struct DetectStats {
    pub samples: AtomicU64,
    pub rate_reports: AtomicU64,
    /// Per rule (in `RULES` order), then per mode: observe, enforce.
    matches: [[AtomicU64; 2]; RULES.len()],
    pub bans: AtomicU64,
    pub refused: AtomicU64,
    /// Matches on proven peers (the operator's or proven by the server's answers),
    /// reported and not banned.
    pub exempted: AtomicU64,
    /// Responses the egress program sent, and peers proven now.
    pub responses: AtomicU64,
    pub proven: AtomicU64,
    pub tracked: AtomicU64,
    /// Samples that were no SIP request we could read; never a ban reason.
    pub unreadable: AtomicU64,
    /// What the program passed over: keep-alives, packets to TLS ports.
    pub keepalives: AtomicU64,
    pub tls: AtomicU64,
    /// Requests from sources the program's table had no room for (sampled, not rated).
    pub untracked: AtomicU64,
    recent: Mutex<VecDeque<Detection>>,
    last_unreadable: Mutex<Option<rules::Unreadable>>,
}

impl DetectStats {
    fn matched(&self, rule: &str, mode: DetectMode) {
        if let Some(i) = RULES.iter().position(|r| *r == rule) {
            self.matches[i][usize::from(mode == DetectMode::Enforce)].fetch_add(1, Relaxed);
        }
    }

    /// (rule, mode, count) for every rule and both modes.
    pub fn matches(&self) -> Vec<(&'static str, &'static str, u64)> {
        RULES
            .iter()
            .enumerate()
            .flat_map(|(i, rule)| {
                [("observe", 0), ("enforce", 1)]
                    .map(|(mode, m)| (*rule, mode, self.matches[i][m].load(Relaxed)))
            })
            .collect()
    }

    pub fn recent(&self) -> Vec<Detection> {
        crate::lock(&self.recent).iter().cloned().collect()
    }

    pub fn last_unreadable(&self) -> Option<rules::Unreadable> {
        crate::lock(&self.last_unreadable).clone()
    }

    fn remember(&self, detection: Detection) {
        let mut recent = crate::lock(&self.recent);
        if recent.len() >= RECENT {
            recent.pop_front();
        }
        recent.push_back(detection);
    }
}

/// What readers hold of detection.
#[derive(Clone, Debug)]
pub struct DetectView {
    pub stats: Arc<DetectStats>,
    pub settings: watch::Receiver<DetectSettings>,
}

/// Reads the ring buffer until the agent stops; a change of `settings` is written to the
/// program at once.
pub async fn run(
    tap: DetectTap,
    mut settings: watch::Receiver<DetectSettings>,
    updates: mpsc::Sender<Update>,
    stats: Arc<DetectStats>,
    state_dir: Option<std::path::PathBuf>,
    fleet: Option<crate::cluster::proofs::ProofLink>,
    view: crate::proven_view::ProvenView,
) {
    let DetectTap {
        mut switches,
        samples,
        counts,
    } = tap;
    let mut current = settings.borrow_and_update().clone();
    if let Err(e) = switches.set(
        current.dataplane_config(),
        &current.ports,
        &current.tls_ports,
    ) {
        tracing::error!(error = %crate::error_chain(&e), "cannot set up SIP scanner detection; it stays off");
        return;
    }
    tracing::info!(mode = current.mode.name(), ports = ?current.ports, tls_ports = ?current.tls_ports, "SIP scanner detection");
    for notice in &current.notices {
        tracing::warn!("{notice}");
    }
    let mut detector = Detector::default();
    // Detection's bans per source, for the doubling TTL, across restarts; forgotten after
    // the longest TTL. Written at most every few seconds, however many bans a wave brings.
    let mut offences = Offences::load(state_dir.as_ref().map(|d| d.join(offences::FILE)));
    let mut proven = ProvenPeers::load(state_dir.as_ref().map(|d| d.join(proven::FILE)));
    stats.proven.store(proven.len() as u64, Relaxed);
    let mut save_tick = tokio::time::interval(Duration::from_secs(1));
    save_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    // In a fleet: this node's proofs go to etcd (each renewed there once a quarter of the
    // TTL old), and other nodes' come from it.
    let (publish, mut shared) = match fleet {
        Some(link) => (Some(link.publish), Some(link.shared)),
        None => (None, None),
    };
    let mut published: HashMap<IpAddr, u64> = HashMap::new();
    // The ledger's owner reads the proven peers through `view`, refreshed within a second
    // of a change.
    view.replace(proven.until(current.proven_ttl.as_secs()));
    let mut view_stale = false;
    // Sources already matched, until their TTL: one scanner is one log line and one ban a
    // TTL, in either mode, however many samples it keeps sending.
    let mut reported: HashMap<IpAddr, u64> = HashMap::new();
    // SAFETY: the ring buffer owns its descriptor and keeps it open until it is dropped,
    // which only the AsyncFd does.
    let mut ring = match unsafe { AsyncFd::register(samples) } {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot wait on the detection ring buffer; detection stays off");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = save_tick.tick() => {
                match counts.read() {
                    Ok(passed) => {
                        stats.keepalives.store(passed.keepalives, Relaxed);
                        stats.tls.store(passed.tls, Relaxed);
                        stats.untracked.store(passed.untracked, Relaxed);
                    }
                    Err(e) => tracing::debug!(error = %crate::error_chain(&e), "cannot read detection's counts"),
                }
                if view_stale {
                    view.replace(proven.until(current.proven_ttl.as_secs()));
                    view_stale = false;
                }
                ticks += 1;
                if !ticks.is_multiple_of(5) {
                    continue;
                }
                offences.forget_older_than(unix_now(), current.ttl_max.as_secs().max(current.ttl.as_secs()) * 2);
                if let Err(e) = offences.save_if_changed() {
                    tracing::warn!(error = %e, "cannot save detection's offence counts; re-offences after a restart start over");
                }
                let before = proven.len();
                proven.forget_older_than(unix_now(), current.proven_ttl.as_secs());
                view_stale |= proven.len() != before;
                stats.proven.store(proven.len() as u64, Relaxed);
                if let Err(e) = proven.save_if_changed() {
                    tracing::warn!(error = %e, "cannot save detection's proven peers; they prove themselves again after a restart");
                }
                continue;
            }
            proof = next_shared(&mut shared) => {
                let Some(proof) = proof else {
                    shared = None;
                    continue;
                };
                let now = unix_now();
                if now.saturating_sub(proof.at) >= current.proven_ttl.as_secs() {
                    continue;
                }
                let how = format!("{} (at {})", proof.how, proof.node);
                view_stale = true;
                if proven.prove_if_newer(proven::Proof { addr: proof.addr, at: proof.at.min(now), how: how.clone() }) {
                    tracing::info!(addr = %proof.addr, how = %how, "proven peer shared by another node: detection will not ban it");
                    stats.proven.store(proven.len() as u64, Relaxed);
                }
                continue;
            }
            changed = settings.changed() => {
                if changed.is_err() {
                    return;
                }
                current = settings.borrow_and_update().clone();
                match switches.set(current.dataplane_config(), &current.ports, &current.tls_ports) {
                    Ok(()) => tracing::info!(mode = current.mode.name(), "SIP scanner detection settings applied"),
                    Err(e) => tracing::warn!(error = %crate::error_chain(&e), "cannot apply the detection settings"),
                }
                continue;
            }
            guard = ring.readable_mut() => {
                let Ok(mut guard) = guard else { return };
                // Cleared before draining: a record committed while we drain wakes us again
                // rather than waiting for the next one.
                guard.clear_ready();
                let mut batch = Vec::new();
                while let Some(item) = guard.get_inner_mut().next() {
                    if let Some(sample) = Sample::decode(&item) {
                        batch.push(sample);
                    }
                }
                let now = unix_now();
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(now.saturating_mul(1000), |d| d.as_millis() as u64);
                for sample in batch {
                    match sample.kind {
                        apiban_common::detect::KIND_RATE => stats.rate_reports.fetch_add(1, Relaxed),
                        apiban_common::detect::KIND_RESPONSE => stats.responses.fetch_add(1, Relaxed),
                        _ => stats.samples.fetch_add(1, Relaxed),
                    };
                    if current.mode == DetectMode::Off {
                        continue;
                    }
                    let finding = detector.observe(&current, &sample, now_ms);
                    for proof in detector.take_proofs() {
                        let first = proven.prove(proven::Proof { addr: proof.addr, at: now, how: proof.how.clone() });
                        view_stale = true;
                        if first {
                            tracing::info!(addr = %proof.addr, how = %proof.how, "proven peer: detection will not ban it");
                            stats.proven.store(proven.len() as u64, Relaxed);
                        }
                        let ttl = current.proven_ttl.as_secs();
                        if let Some(tx) = &publish
                            && published.get(&proof.addr).is_none_or(|at| now.saturating_sub(*at) >= ttl / 4)
                        {
                            let _ = tx.send(crate::cluster::proofs::Publish { addr: proof.addr, at: now, how: proof.how.clone(), ttl_secs: ttl });
                            if published.len() >= 100_000 {
                                published.retain(|_, at| now.saturating_sub(*at) < ttl / 4);
                            }
                            published.insert(proof.addr, now);
                        }
                    }
                    if detector.unreadable != stats.unreadable.load(Relaxed) {
                        stats.unreadable.store(detector.unreadable, Relaxed);
                        *crate::lock(&stats.last_unreadable) = detector.last_unreadable.clone();
                    }
                    let Some(finding) = finding else {
                        continue;
                    };
                    if reported.get(&finding.addr).is_some_and(|until| *until > now) {
                        continue;
                    }
                    stats.matched(finding.rule, current.mode);
                    let proof = proven.get(finding.addr, now, current.proven_ttl.as_secs()).cloned();
                    act(&current, finding, proof, now, &updates, &stats, &mut offences, &mut reported).await;
                }
                stats.tracked.store(detector.tracked() as u64, Relaxed);
                if reported.len() > 100_000 {
                    reported.retain(|_, until| *until > now);
                }
            }
        }
    }
}

/// The next proof another node shared; never, outside a fleet.
async fn next_shared(
    shared: &mut Option<tokio::sync::mpsc::Receiver<crate::cluster::proofs::SharedProof>>,
) -> Option<crate::cluster::proofs::SharedProof> {
    match shared {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn act(
    settings: &DetectSettings,
    finding: Finding,
    proof: Option<proven::Proof>,
    now: u64,
    updates: &mpsc::Sender<Update>,
    stats: &DetectStats,
    offences: &mut Offences,
    reported: &mut HashMap<IpAddr, u64>,
) {
    let offence = offences.next(finding.addr);
    let forgeable = finding.forgeable;
    let ttl = settings.ttl_for(offence, forgeable);
    let proven = settings
        .exempt
        .iter()
        .find(|n| n.contains(&finding.addr))
        .map(|peer| format!("--detect-exempt {peer}"))
        .or_else(|| {
            proof.map(|p| {
                format!(
                    "{}, {} ago",
                    p.how,
                    crate::human::format_duration(Duration::from_secs(now.saturating_sub(p.at)))
                )
            })
        });
    // Observe mode only logs and counts: detection is on by default, and a default must not
    // fill the ledger (and a fleet's etcd) with every scanner's address.
    let outcome = if let Some(peer) = proven {
        stats.exempted.fetch_add(1, Relaxed);
        tracing::warn!(
            addr = %finding.addr, rule = finding.rule, counts = %finding.counts,
            line = %finding.line, proven_peer = %peer,
            "SIP scanner rule matched a proven peer: not banned"
        );
        format!("not banned: proven peer ({peer})")
    } else if settings.mode == DetectMode::Enforce {
        let evidence = Evidence {
            rule: finding.rule.to_owned(),
            counts: finding.counts.clone(),
            line: finding.line.clone(),
            at: now,
            offence,
            unforgeable: !forgeable,
        };
        let (reply, answer) = oneshot::channel();
        let sent = updates
            .send(Update::Detected {
                addr: finding.addr,
                ttl,
                evidence,
                reply,
            })
            .await;
        let answer = match sent {
            Ok(()) => answer
                .await
                .unwrap_or(Err(ChangeError::Failed("the agent is stopping".into()))),
            Err(_) => Err(ChangeError::Failed("the agent is stopping".into())),
        };
        match answer {
            Ok(_) => {
                stats.bans.fetch_add(1, Relaxed);
                offences.record(finding.addr, offence, now);
                tracing::warn!(
                    addr = %finding.addr, rule = finding.rule, counts = %finding.counts,
                    line = %finding.line, ttl = %crate::human::format_duration(ttl), offence,
                    "SIP scanner detected: banned"
                );
                "banned".to_owned()
            }
            Err(e) => {
                stats.refused.fetch_add(1, Relaxed);
                tracing::info!(addr = %finding.addr, rule = finding.rule, why = %e, "SIP scanner detected, not banned");
                format!("not banned: {e}")
            }
        }
    } else {
        tracing::warn!(
            addr = %finding.addr, rule = finding.rule, counts = %finding.counts,
            line = %finding.line, "SIP scanner detected (observe mode: would ban, dropping nothing)"
        );
        "would ban (observe mode)".to_owned()
    };
    reported.insert(finding.addr, now.saturating_add(ttl.as_secs()));
    stats.remember(Detection {
        addr: finding.addr,
        rule: finding.rule.to_owned(),
        mode: settings.mode,
        counts: finding.counts,
        line: finding.line,
        at: now,
        outcome,
    });
}
