//! The election of the one node that polls APIBAN and the lists. A node campaigns on a
//! lease it keeps alive; it leads from the campaign's answer until it can no longer be sure
//! the lease lives, and says so a margin before etcd could let the lease run out. Its writes
//! are fenced on the leader key (see `writer`), so one it makes after etcd elected another
//! fails.
//!
//! A lease is the cluster's, not one member's: when a keep-alive fails (a member died, or
//! its link), the leader renews the same lease through another member, so one member down
//! with quorum intact costs the fleet no leader.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use etcd_client::{Client, LeaderKey};
use tokio::sync::{mpsc, watch as tokio_watch};

use super::settings::ClusterSettings;
use super::{
    CallError, ClusterUpdate, LEADER_LEASE_SECS, Retry, connect, keys::Keys, within, within_for,
};
use crate::state::ApibanCursor;

#[derive(Debug, thiserror::Error)]
enum Lost {
    #[error("etcd")]
    Etcd(#[from] CallError),
    #[error("the leader lease was not renewed in time")]
    LeaseExpired,
    #[error("etcd answered the campaign without a leader key")]
    NoLeaderKey,
    #[error("the agent is stopping")]
    Stopping,
    #[error("this node's clock is off from the fleet's")]
    ClockOff,
}

pub async fn run(
    settings: Arc<ClusterSettings>,
    updates: mpsc::Sender<super::ClusterUpdate>,
    leader: tokio_watch::Sender<Option<LeaderKey>>,
    mut stop: tokio_watch::Receiver<bool>,
    mut clock_off: tokio_watch::Receiver<super::clock::Judgement>,
) {
    let keys = Keys::new(&settings.prefix);
    let mut retry = Retry::new();
    loop {
        // A node whose clock is off, or not yet compared with the others', does not
        // campaign: it would delete from etcd what expired on its clock (see `clock`).
        tokio::select! {
            r = clock_off.wait_for(|off| *off == Some(false)) => if r.is_err() { return },
            _ = stop.wait_for(|stopping| *stopping) => return,
        }
        let lost = match connect(&settings).await {
            Ok(client) => {
                let ends = Ends {
                    stop: &mut stop,
                    clock_off: &mut clock_off,
                };
                campaign_and_lead(client, &settings, &keys, &updates, &leader, ends).await
            }
            Err(e) => Lost::Etcd(e),
        };
        if leader.send_replace(None).is_some() {
            tracing::warn!(
                error = %crate::error_chain(&lost),
                "this node no longer leads the fleet: it stops polling APIBAN and the lists"
            );
        }
        if matches!(lost, Lost::Stopping) {
            return;
        }
        tracing::debug!(error = %crate::error_chain(&lost), "campaigning again");
        retry.wait().await;
    }
}

/// What ends a campaign or a lead besides etcd: the agent stopping, the clock going off.
struct Ends<'a> {
    stop: &'a mut tokio_watch::Receiver<bool>,
    clock_off: &'a mut tokio_watch::Receiver<super::clock::Judgement>,
}

async fn campaign_and_lead(
    mut client: Client,
    settings: &ClusterSettings,
    keys: &Keys,
    updates: &mpsc::Sender<super::ClusterUpdate>,
    leader: &tokio_watch::Sender<Option<LeaderKey>>,
    ends: Ends<'_>,
) -> Lost {
    let Ends { stop, clock_off } = ends;
    let asked = Instant::now();
    let lease = match within("a lease", client.lease_grant(LEADER_LEASE_SECS, None)).await {
        Ok(l) => l.id(),
        Err(e) => return e.into(),
    };
    let keep_alive = keep_lease(settings, client.clone(), lease, asked);
    tokio::pin!(keep_alive);
    let mut campaigner = client.clone();
    let key = tokio::select! {
        answer = campaigner.campaign(keys.election(), settings.node.clone(), lease) => {
            match answer.map(|mut a| a.take_leader()) {
                Ok(Some(key)) => key,
                Ok(None) => return Lost::NoLeaderKey,
                Err(e) => return CallError::from(e).into(),
            }
        }
        lost = &mut keep_alive => return lost,
        _ = clock_off.wait_for(|off| *off == Some(true)) => return Lost::ClockOff,
    };
    // The fleet's position, so that no ID is fetched twice or skipped (a fleet's first
    // leader starts from its own), and the requests the fleet sent lately, so that the
    // budget holds across leaders.
    let read = |key: String| {
        let mut client = client.clone();
        async move {
            within("the fleet's APIBAN position", client.get(key, None))
                .await
                .map(|r| r.kvs().first().map(|kv| kv.value().to_vec()))
        }
    };
    let (cursor, requests) = match (
        read(keys.apiban_cursor()).await,
        read(keys.apiban_requests()).await,
    ) {
        (Ok(c), Ok(r)) => (c, r),
        (Err(e), _) | (_, Err(e)) => return e.into(),
    };
    let cursor = cursor.and_then(|v| serde_json::from_slice::<ApibanCursor>(&v).ok());
    let requests_ms: Vec<u64> = requests
        .and_then(|v| serde_json::from_slice(&v).ok())
        .unwrap_or_default();
    let (reply, done) = tokio::sync::oneshot::channel();
    let adopt = ClusterUpdate::AdoptCursor {
        cursor,
        requests_ms,
        reply,
    };
    if updates.send(adopt).await.is_err() || done.await.is_err() {
        return Lost::Stopping;
    }
    tracing::info!(
        node = %settings.node,
        "this node leads the fleet: it polls APIBAN and the lists for every node"
    );
    leader.send_replace(Some(key));
    let lost = tokio::select! {
        lost = keep_alive => lost,
        _ = stop.wait_for(|stopping| *stopping) => Lost::Stopping,
        _ = clock_off.wait_for(|off| *off == Some(true)) => Lost::ClockOff,
    };
    match lost {
        Lost::Stopping => {
            leader.send_replace(None);
            tracing::info!("stopping: resigning, so that another node polls at once");
        }
        Lost::ClockOff => {
            leader.send_replace(None);
            tracing::warn!(
                "this node's clock is off from the fleet's: resigning, so that another node leads"
            );
        }
        _ => {}
    }
    // Let another node take over at once rather than after the lease runs out.
    let _ = tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(lease)).await;
    lost
}

/// How long one keep-alive may take before the leader tries another member.
const KEEP_ALIVE_DEADLINE: Duration = Duration::from_secs(1);
/// How long before the lease could run out in etcd the leader stops leading when it cannot
/// renew it: it must have stopped before etcd can let another node lead.
const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// Keeps the lease alive, through whichever member answers, until it may have run out;
/// why it stopped. `asked` is when the lease was asked for: etcd's clock for it started
/// after that.
async fn keep_lease(
    settings: &ClusterSettings,
    mut client: Client,
    lease: i64,
    asked: Instant,
) -> Lost {
    let every = Duration::from_millis(LEADER_LEASE_SECS as u64 * 1000 / 3);
    let mut lives_until = asked + Duration::from_secs(LEADER_LEASE_SECS as u64);
    let mut stream = None;
    let mut failing = false;
    loop {
        let sent = Instant::now();
        if sent + LEASE_MARGIN >= lives_until {
            return Lost::LeaseExpired;
        }
        match renew(&mut client, &mut stream, lease).await {
            Ok(ttl) if ttl > 0 => {
                lives_until = sent + Duration::from_secs(ttl as u64);
                if std::mem::take(&mut failing) {
                    tracing::info!("the leader's lease is renewed through another etcd member");
                }
                tokio::time::sleep(every).await;
            }
            Ok(_) => return Lost::LeaseExpired,
            Err(e) => {
                stream = None;
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(
                        error = %crate::error_chain(&e),
                        "a keep-alive of the leader's lease failed; renewing it through the other etcd members"
                    );
                }
                // A new client: its balancer sends to the members that answer.
                if let Ok(c) = connect(settings).await {
                    client = c;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One keep-alive of `lease`, on `stream` (opened if there is none); the lease's TTL left.
async fn renew(
    client: &mut Client,
    stream: &mut Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
    lease: i64,
) -> Result<i64, CallError> {
    let (keeper, acks) = match stream {
        Some(s) => s,
        None => stream.insert(
            within_for(
                "a keep-alive stream",
                KEEP_ALIVE_DEADLINE,
                client.lease_keep_alive(lease),
            )
            .await?,
        ),
    };
    within_for("a keep-alive", KEEP_ALIVE_DEADLINE, keeper.keep_alive()).await?;
    match within_for("a keep-alive's answer", KEEP_ALIVE_DEADLINE, acks.message()).await? {
        Some(ack) => Ok(ack.ttl()),
        None => Err(CallError::Late(
            "a keep-alive's answer",
            KEEP_ALIVE_DEADLINE,
        )),
    }
}
