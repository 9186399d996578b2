//! The leader's pass over etcd for records that have expired but are still there, and for
//! operators' tombstones older than `keys::TOMBSTONE_DAYS`.
//!
//! Every node expires bans on its own clock, and the leader deletes in etcd what its own
//! sweeps expire. A key can still outlive its expiry: a node that dropped it in its start-up
//! sweep before it joined, a leader that died between its sweep and the write, a record that
//! arrived already expired. So a node that becomes leader, and every hour while it leads,
//! reads the records in pages and deletes the expired ones in bounded transactions.
//!
//! Each delete compares the key's `mod_revision` with the one read, so a record re-sighted
//! meanwhile is kept, and each transaction is fenced on the leader key, so a deposed leader
//! deletes nothing.

use std::{sync::Arc, time::Duration};

use etcd_client::{Client, Compare, CompareOp, KeyValue, LeaderKey, Txn, TxnOp};
use tokio::sync::watch as tokio_watch;

use super::settings::ClusterSettings;
use super::{
    CallError, ClusterStats, connect,
    keys::{self, Keys},
    pages::Pages,
    within,
    writer::MAX_OPS,
};
use crate::clock::unix_now;

/// How often a leader looks again; its own sweeps delete almost everything before then.
const EVERY: Duration = Duration::from_secs(3600);
/// Records read per page: small enough to keep a page's memory and etcd's answer small.
const PAGE: i64 = 1_000;
/// Deletes per transaction: each carries its own compare, plus the fence.
const PER_TXN: usize = MAX_OPS - 1;

pub async fn run(
    settings: Arc<ClusterSettings>,
    mut leader: tokio_watch::Receiver<Option<LeaderKey>>,
    stats: Arc<ClusterStats>,
    clock_off: tokio_watch::Receiver<super::clock::Judgement>,
) {
    let keys = Keys::new(&settings.prefix);
    loop {
        let Ok(fence) = leader.wait_for(Option::is_some).await.map(|k| k.clone()) else {
            return;
        };
        let Some(fence) = fence else { continue };
        let still_leading = |leader: &tokio_watch::Receiver<Option<LeaderKey>>| {
            leader.borrow().as_ref().map(LeaderKey::rev) == Some(fence.rev())
        };
        if *clock_off.borrow() != Some(false) {
            // Expiry is judged on this node's clock, which is off from the fleet's: what
            // looks expired here may be live everywhere else. (It does not lead long, either.)
            tracing::debug!("this node's clock is off: no pass over etcd's expired records");
        } else {
            match connect(&settings).await {
                Ok(mut client) => match delete_expired(&mut client, &keys, &fence, &leader).await {
                    Ok(0) => tracing::debug!("no expired keys in etcd"),
                    Ok(deleted) => {
                        stats
                            .expired_deleted
                            .fetch_add(deleted, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(deleted, "deleted expired records from etcd");
                    }
                    Err(e) => {
                        stats.error();
                        tracing::warn!(error = %crate::error_chain(&e), "could not look for expired records in etcd; trying again within the hour");
                    }
                },
                Err(e) => {
                    stats.error();
                    tracing::warn!(error = %crate::error_chain(&e), "could not look for expired records in etcd; trying again within the hour");
                }
            }
        }
        // Until the next pass, or until this node stops leading under this key.
        let _ = tokio::time::timeout(
            EVERY,
            leader.wait_for(|k| k.as_ref().map(LeaderKey::rev) != Some(fence.rev())),
        )
        .await;
        if still_leading(&leader) {
            continue;
        }
        // Wait out the loss before campaigning's next win starts a pass.
        let _ = leader.wait_for(Option::is_none).await;
    }
}

/// Deletes the expired records and old tombstones; how many. Stops at once when this node
/// stops leading.
async fn delete_expired(
    client: &mut Client,
    keys: &Keys,
    fence: &LeaderKey,
    leader: &tokio_watch::Receiver<Option<LeaderKey>>,
) -> Result<u64, CallError> {
    let mut deleted = 0;
    for (prefix, decode) in [
        (
            keys.records(),
            keys::decode_record as fn(&[u8]) -> Option<keys::Stored>,
        ),
        (keys.allowlist(), keys::decode_allowed),
    ] {
        deleted += delete_under(client, &prefix, decode, fence, leader).await?;
    }
    Ok(deleted)
}

/// Whether a value under `ledger/` has served its time: an expired record, or a tombstone
/// older than [`keys::TOMBSTONE_DAYS`].
fn done_with(stored: &keys::Stored, now: u64) -> bool {
    if stored.removed {
        let kept_ms = keys::TOMBSTONE_DAYS * 86_400_000;
        return stored
            .stamp
            .as_ref()
            .is_none_or(|s| s.at.saturating_add(kept_ms) < now.saturating_mul(1000));
    }
    stored.record.as_ref().is_some_and(|r| !r.is_live(now))
}

async fn delete_under(
    client: &mut Client,
    prefix: &str,
    decode: fn(&[u8]) -> Option<keys::Stored>,
    fence: &LeaderKey,
    leader: &tokio_watch::Receiver<Option<LeaderKey>>,
) -> Result<u64, CallError> {
    let mut pages = Pages::under(prefix, PAGE, "a page of records");
    let mut deleted = 0;
    while let Some(page) = pages.next(client).await? {
        let now = unix_now();
        let expired: Vec<&KeyValue> = page
            .iter()
            .filter(|kv| decode(kv.value()).is_some_and(|s| done_with(&s, now)))
            .collect();
        for chunk in expired.chunks(PER_TXN) {
            if leader.borrow().as_ref().map(LeaderKey::rev) != Some(fence.rev()) {
                return Ok(deleted);
            }
            let mut compares = vec![Compare::create_revision(
                fence.key().to_vec(),
                CompareOp::Equal,
                fence.rev(),
            )];
            compares.extend(chunk.iter().map(|kv| {
                Compare::mod_revision(kv.key().to_vec(), CompareOp::Equal, kv.mod_revision())
            }));
            let deletes = chunk
                .iter()
                .map(|kv| TxnOp::delete(kv.key().to_vec(), None))
                .collect::<Vec<_>>();
            let answer = within(
                "deleting expired records",
                client.txn(Txn::new().when(compares).and_then(deletes)),
            )
            .await?;
            if answer.succeeded() {
                deleted += chunk.len() as u64;
            } else {
                // A key was re-sighted meanwhile, or another node leads now: the next pass
                // (or the next leader's) looks again.
                tracing::debug!(keys = chunk.len(), "etcd kept a batch of expired records");
            }
        }
    }
    Ok(deleted)
}
