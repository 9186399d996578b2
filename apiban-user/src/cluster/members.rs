//! Which etcd members answer: each endpoint is asked, every few seconds, for a read that
//! only a member in the quorum serves. What changes is said once in the log (a member down,
//! the same member back), and the count is in `status` and /metrics. The other cluster
//! tasks move to another member on their own (see `cluster::connect`) and say nothing of
//! one member's failure. The same round asks for etcd's alarms: with `NOSPACE` raised
//! (its quota full) etcd refuses every write, which the operator must be told how to end.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use etcd_client::{AlarmAction, AlarmType, Client, GetOptions};
use tokio::sync::watch as tokio_watch;

use super::{CallError, ClusterStats, connect_options_for, within_for};
use crate::config::ClusterSettings;

/// How often each member is asked.
pub(super) const EVERY: Duration = Duration::from_secs(2);
/// How long a member may take to answer before it counts as down for this round.
const DEADLINE: Duration = Duration::from_secs(1);

/// Rounds in a row a member must fail before it is said to be down: a Raft election (the
/// leader member killed) makes every member refuse linearizable reads for a second or so,
/// and that is no member being down.
const DOWN_AFTER: u32 = 2;

/// One member as the monitor last saw it.
struct Member {
    endpoint: String,
    client: Option<Client>,
    /// What the log last said of it; None before it said anything.
    answering: Option<bool>,
    /// Rounds in a row it failed.
    failures: u32,
}

pub async fn run(
    settings: Arc<ClusterSettings>,
    stats: Arc<ClusterStats>,
    mut stop: tokio_watch::Receiver<bool>,
) {
    let mut members: Vec<Member> = settings
        .endpoints
        .iter()
        .map(|endpoint| Member {
            endpoint: endpoint.clone(),
            client: None,
            answering: None,
            failures: 0,
        })
        .collect();
    stats.members.store(members.len() as u64, Ordering::Relaxed);
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let mut answering = 0;
        for m in &mut members {
            let result = ask(&settings, m).await;
            let now = result.is_ok();
            answering += u64::from(now);
            m.failures = if now { 0 } else { m.failures + 1 };
            match (m.answering, &result) {
                (Some(true) | None, Err(e)) if m.failures >= DOWN_AFTER => {
                    tracing::warn!(
                        member = %m.endpoint,
                        error = %crate::error_chain(e),
                        "an etcd member does not answer; this node uses the others"
                    );
                    m.answering = Some(false);
                }
                (Some(false), Ok(())) => {
                    tracing::info!(member = %m.endpoint, "the etcd member answers again");
                    m.answering = Some(true);
                }
                (None, Ok(())) => m.answering = Some(true),
                _ => {}
            }
            if !now {
                m.client = None;
            }
        }
        stats.members_answering.store(answering, Ordering::Relaxed);
        // Alarms are the cluster's: one member that answers can say.
        let Some(client) = members.iter_mut().find_map(|m| m.client.as_mut()) else {
            continue;
        };
        let nospace = match within_for(
            "the alarms",
            DEADLINE,
            client.alarm(AlarmAction::Get, AlarmType::None, None),
        )
        .await
        {
            Ok(answer) => answer
                .alarms()
                .iter()
                .any(|a| a.alarm() == AlarmType::Nospace),
            Err(e) => {
                // A user without the right to read alarms, most often: nothing to say.
                tracing::debug!(error = %crate::error_chain(&e), "cannot read etcd's alarms");
                continue;
            }
        };
        if nospace {
            stats
                .nospace_seen_ms
                .store(super::clock::unix_now_ms(), Ordering::Relaxed);
        }
        if stats.nospace.swap(nospace, Ordering::Relaxed) != nospace {
            if nospace {
                tracing::error!(
                    "etcd's space quota is full (NOSPACE alarm): it refuses every write, so operators' changes wait and the leader does not poll APIBAN; enforcement goes on. Fix it on etcd: compact, `etcdctl defrag`, then `etcdctl alarm disarm`"
                );
            } else {
                tracing::info!("etcd's NOSPACE alarm is cleared: it takes writes again");
            }
        }
    }
}

/// A linearizable read of one key, from this member only.
async fn ask(settings: &ClusterSettings, m: &mut Member) -> Result<(), CallError> {
    let client = match &mut m.client {
        Some(c) => c,
        None => {
            let options = connect_options_for(settings)?;
            let connected = within_for(
                "a connection",
                DEADLINE,
                Client::connect([&m.endpoint], Some(options)),
            )
            .await?;
            m.client.insert(connected)
        }
    };
    let probe = GetOptions::new().with_keys_only().with_limit(1);
    within_for(
        "a read",
        DEADLINE,
        client.get(settings.prefix.as_str(), Some(probe)),
    )
    .await
    .map(|_| ())
}
