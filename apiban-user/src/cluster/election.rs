//! The election of the one node that polls APIBAN and the lists. A node campaigns on a
//! lease it keeps alive; it leads from the campaign's answer until a keep-alive fails, and
//! says so at once, before etcd lets the lease run out. Its writes are fenced on the leader
//! key (see `writer`), so one it makes after etcd elected another fails.

use std::{sync::Arc, time::Duration};

use etcd_client::{Client, LeaderKey};
use tokio::sync::{mpsc, watch as tokio_watch};

use super::{CallError, ClusterUpdate, LEADER_LEASE_SECS, Retry, connect, keys::Keys, within};
use crate::{config::ClusterSettings, state::ApibanCursor, sync::Update};

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
}

pub async fn run(
    settings: Arc<ClusterSettings>,
    updates: mpsc::Sender<Update>,
    leader: tokio_watch::Sender<Option<LeaderKey>>,
    mut stop: tokio_watch::Receiver<bool>,
) {
    let keys = Keys::new(&settings.prefix);
    let mut retry = Retry::new();
    loop {
        let lost = match connect(&settings).await {
            Ok(client) => {
                campaign_and_lead(client, &settings, &keys, &updates, &leader, &mut stop).await
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

async fn campaign_and_lead(
    mut client: Client,
    settings: &ClusterSettings,
    keys: &Keys,
    updates: &mpsc::Sender<Update>,
    leader: &tokio_watch::Sender<Option<LeaderKey>>,
    stop: &mut tokio_watch::Receiver<bool>,
) -> Lost {
    let lease = match within("a lease", client.lease_grant(LEADER_LEASE_SECS, None)).await {
        Ok(l) => l.id(),
        Err(e) => return e.into(),
    };
    let (mut keeper, mut acks) = match within("keep-alive", client.lease_keep_alive(lease)).await {
        Ok(k) => k,
        Err(e) => return e.into(),
    };
    let keep_alive = keep_lease(&mut keeper, &mut acks);
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
    let adopt = Update::Cluster(ClusterUpdate::AdoptCursor {
        cursor,
        requests_ms,
        reply,
    });
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
    };
    if matches!(lost, Lost::Stopping) {
        leader.send_replace(None);
        tracing::info!("stopping: resigning, so that another node polls at once");
    }
    // Let another node take over at once rather than after the lease runs out.
    let _ = tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(lease)).await;
    lost
}

/// Keeps the lease alive until a keep-alive fails or goes unanswered; why it stopped.
async fn keep_lease(
    keeper: &mut etcd_client::LeaseKeeper,
    acks: &mut etcd_client::LeaseKeepAliveStream,
) -> Lost {
    let every = Duration::from_millis(LEADER_LEASE_SECS as u64 * 1000 / 3);
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if let Err(e) = within("keep-alive", keeper.keep_alive()).await {
            return e.into();
        }
        match tokio::time::timeout(every * 2, acks.message()).await {
            Ok(Ok(Some(ack))) if ack.ttl() > 0 => {}
            Ok(Err(e)) => return CallError::from(e).into(),
            _ => return Lost::LeaseExpired,
        }
    }
}
