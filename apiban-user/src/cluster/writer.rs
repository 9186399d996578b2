//! Writes what this node changed to etcd, in the order the owner made the changes.
//!
//! Transactions hold at most [`MAX_OPS`] operations (etcd refuses more than 128 by default)
//! and stay far under its 1.5 MiB request limit. The leader's writes compare its leader key's
//! creation revision: once etcd has elected another node they fail, and this node drops
//! them. An operator's change is retried until etcd settles it: taken, or kept out by a
//! later change of the same key (see [`write_operator_change`]).

use std::sync::Arc;

use etcd_client::{Client, Compare, CompareOp, LeaderKey, Txn, TxnOp};
use tokio::sync::{mpsc, watch as tokio_watch};

use super::settings::ClusterSettings;
use super::{
    BudgetAnswer, BudgetWrite, CallError, Outgoing, Retry, connect,
    keys::{self, Keys, Stamp},
    within,
};
use crate::state::PendingKey;

/// Operations per transaction, one under etcd's default `--max-txn-ops`.
pub const MAX_OPS: usize = 127;

enum Written {
    Done,
    /// The fence failed: another node leads now.
    Deposed,
}

pub async fn run(
    settings: Arc<ClusterSettings>,
    mut outbox: mpsc::Receiver<Outgoing>,
    leader: tokio_watch::Receiver<Option<LeaderKey>>,
    updates: mpsc::Sender<super::ClusterUpdate>,
    stats: Arc<super::ClusterStats>,
) {
    let keys = Keys::new(&settings.prefix);
    let mut client: Option<Client> = None;
    let mut retry = Retry::new();
    let mut reported = false;
    let mut failures = 0u32;
    loop {
        let Some(out) = outbox.recv().await else {
            return;
        };
        stats
            .outbox_queued
            .store(outbox.len() as u64, std::sync::atomic::Ordering::Relaxed);
        loop {
            let fence = match (out.fenced, leader.borrow().clone()) {
                (false, _) => None,
                (true, Some(key)) => Some(key),
                (true, None) => {
                    tracing::debug!(
                        records = out.records.len(),
                        "no longer leading: the next leader writes what its feeds find"
                    );
                    break;
                }
            };
            let c = match &mut client {
                Some(c) => c,
                None => match connect(&settings).await {
                    Ok(c) => client.insert(c),
                    Err(e) => {
                        stats.error();
                        if !reported {
                            tracing::warn!(error = %crate::error_chain(&e), "cannot reach etcd; this node's changes wait for it");
                            reported = true;
                        }
                        retry.wait().await;
                        continue;
                    }
                },
            };
            let result = match (out.base_revision, out.expired_at_revision, &fence) {
                (Some(_), _, _) => write_operator_change(c, &keys, &out, &settings.node).await,
                (None, Some(base), Some(fence)) => {
                    delete_expired(c, &keys, &out, fence, base).await
                }
                _ => write(c, &keys, &out, fence.as_ref()).await,
            };
            match result {
                Ok(Written::Done) => {
                    if out.base_revision.is_some() {
                        let settled = super::ClusterUpdate::Settled {
                            keys: pending_keys(&out),
                        };
                        let _ = updates.send(settled).await;
                    }
                    if reported {
                        tracing::info!("etcd takes this node's changes again");
                        reported = false;
                    }
                    failures = 0;
                    retry.reset();
                    break;
                }
                Ok(Written::Deposed) => {
                    tracing::warn!(
                        records = out.records.len(),
                        "etcd refused a leader's write: another node leads now"
                    );
                    break;
                }
                Err(e) => {
                    stats.error();
                    // One failure is most often one member gone: the next try goes to
                    // another. Two in a row, and etcd is away.
                    failures += 1;
                    if failures >= 2 && !reported {
                        tracing::warn!(error = %crate::error_chain(&e), "cannot write to etcd; this node's changes wait for it");
                        reported = true;
                    } else {
                        tracing::debug!(error = %crate::error_chain(&e), "a write to etcd failed; trying another member");
                    }
                    client = None;
                    retry.wait().await;
                }
            }
        }
    }
}

/// Puts the poller's request times in etcd, on a connection of its own: a budget write
/// never waits behind the ledger's writes, which may be retrying for long.
pub async fn run_budget(
    settings: Arc<ClusterSettings>,
    mut budget: mpsc::UnboundedReceiver<BudgetWrite>,
    leader: tokio_watch::Receiver<Option<LeaderKey>>,
) {
    let keys = Keys::new(&settings.prefix);
    let mut client: Option<Client> = None;
    while let Some(request) = budget.recv().await {
        // Twice at most: a failure on one member moves the next try to another.
        let mut answer = BudgetAnswer::NotRecorded;
        for _ in 0..2 {
            answer = write_budget(&settings, &mut client, &keys, &request.sent_ms, &leader).await;
            if answer != BudgetAnswer::NotRecorded {
                break;
            }
        }
        let _ = request.done.send(answer);
    }
}

/// Puts the fleet's request times in etcd, fenced on this node's leadership; whether etcd
/// holds them now. One try: the poller decides what a failure means.
async fn write_budget(
    settings: &ClusterSettings,
    client: &mut Option<Client>,
    keys: &Keys,
    sent_ms: &[u64],
    leader: &tokio_watch::Receiver<Option<LeaderKey>>,
) -> BudgetAnswer {
    let Some(fence) = leader.borrow().clone() else {
        return BudgetAnswer::NotRecorded;
    };
    let c = match client {
        Some(c) => c,
        None => match connect(settings).await {
            Ok(c) => client.insert(c),
            Err(_) => return BudgetAnswer::NotRecorded,
        },
    };
    let txn = Txn::new()
        .when(vec![Compare::create_revision(
            fence.key().to_vec(),
            CompareOp::Equal,
            fence.rev(),
        )])
        .and_then(vec![TxnOp::put(
            keys.apiban_requests(),
            serde_json::to_vec(sent_ms).unwrap_or_default(),
            None,
        )]);
    match within("the budget", c.txn(txn)).await {
        Ok(answer) if answer.succeeded() => BudgetAnswer::Recorded,
        Ok(_) => BudgetAnswer::NotRecorded,
        // etcd's words for its NOSPACE alarm; this node still leads as far as it knows
        // (checked above), and etcd can elect no other while it refuses writes.
        Err(CallError::Etcd(e)) if e.to_string().contains("database space exceeded") => {
            BudgetAnswer::NoSpace
        }
        Err(_) => {
            *client = None;
            BudgetAnswer::NotRecorded
        }
    }
}

fn pending_keys(out: &Outgoing) -> Vec<PendingKey> {
    out.records
        .iter()
        .map(|(net, source, _)| PendingKey::Record {
            net: *net,
            source: source.clone(),
        })
        .chain(
            out.allow
                .iter()
                .map(|(net, _)| PendingKey::Allow { net: *net }),
        )
        .collect()
}

/// Tries per key before an operator's change waits for the writer's next round: each
/// failed try means another node changed the key in between.
const TRIES_PER_KEY: usize = 5;

/// An operator's change, key by key. A key etcd has not changed since the node applied
/// `base_revision` takes the change at once. Otherwise the later [`Stamp`] wins: the
/// change is written over a value with an earlier stamp (this node's own earlier change,
/// even one whose answer was lost; a feed's record, which has none), and etcd's value is
/// kept when its stamp is later (another node's newer change, or this very change, already
/// written). A removal is a tombstone with its stamp, so it is seen like any other change.
async fn write_operator_change(
    client: &mut Client,
    keys: &Keys,
    out: &Outgoing,
    node: &str,
) -> Result<Written, CallError> {
    let stamp = Stamp {
        at: out.stamp_ms.unwrap_or(0),
        by: node.to_owned(),
    };
    let base = out.base_revision.unwrap_or(0);
    for (key, value) in operator_values(keys, out, &stamp) {
        write_key(client, &key, value, base, &stamp).await?;
    }
    Ok(Written::Done)
}

async fn write_key(
    client: &mut Client,
    key: &str,
    value: Vec<u8>,
    base: i64,
    stamp: &Stamp,
) -> Result<(), CallError> {
    let mut unchanged = Compare::mod_revision(key, CompareOp::Less, base + 1);
    for _ in 0..TRIES_PER_KEY {
        let txn =
            Txn::new()
                .when(vec![unchanged])
                .and_then(vec![TxnOp::put(key, value.clone(), None)]);
        if within("a write", client.txn(txn)).await?.succeeded() {
            return Ok(());
        }
        let answer = within("a read", client.get(key, None)).await?;
        let Some(kv) = answer.kvs().first() else {
            // Deleted since: an expiry, or the janitor's pass over old tombstones. Nothing
            // newer to keep.
            unchanged = Compare::version(key, CompareOp::Equal, 0);
            continue;
        };
        let theirs = keys::decode_stamp(kv.value());
        if theirs.as_ref() >= Some(stamp) {
            if theirs.as_ref() != Some(stamp) {
                tracing::warn!(
                    %key,
                    by = theirs.as_ref().map_or("", |s| s.by.as_str()),
                    "another node changed this key after this node's change was made; its later change wins"
                );
            }
            return Ok(());
        }
        unchanged = Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision());
    }
    Err(CallError::Contended(key.to_owned()))
}

/// The keys and values of an operator's change, each carrying `stamp`.
fn operator_values(keys: &Keys, out: &Outgoing, stamp: &Stamp) -> Vec<(String, Vec<u8>)> {
    let records = out.records.iter().map(|(net, source, record)| {
        let value = match record {
            Some(r) => keys::encode_record(r, Some(stamp)),
            None => keys::encode_removed(stamp),
        };
        (keys.record(source, net), value)
    });
    let allow = out.allow.iter().map(|(net, present)| {
        let value = if *present {
            keys::encode_allowed(Some(stamp))
        } else {
            keys::encode_removed(stamp)
        };
        (keys.allow(net), value)
    });
    records.chain(allow).collect()
}

/// The operations of what the leader's feeds found, the cursor last.
fn operations(keys: &Keys, out: &Outgoing) -> Vec<TxnOp> {
    let mut ops = Vec::with_capacity(out.records.len() + out.allow.len() + 1);
    for (net, source, record) in &out.records {
        let key = keys.record(source, net);
        ops.push(match record {
            Some(r) => TxnOp::put(key, keys::encode_record(r, None), None),
            None => TxnOp::delete(key, None),
        });
    }
    for (net, present) in &out.allow {
        let key = keys.allow(net);
        ops.push(if *present {
            TxnOp::put(key, keys::encode_allowed(None), None)
        } else {
            TxnOp::delete(key, None)
        });
    }
    if let Some(cursor) = &out.cursor {
        ops.push(TxnOp::put(
            keys.apiban_cursor(),
            serde_json::to_vec(cursor).unwrap_or_default(),
            None,
        ));
    }
    ops
}

/// The leader's sweep: each key deleted only if etcd has not changed it since `base`, in
/// transactions fenced on the leader key (a nested transaction per key, so that one key
/// kept does not keep the others).
async fn delete_expired(
    client: &mut Client,
    keys: &Keys,
    out: &Outgoing,
    fence: &LeaderKey,
    base: i64,
) -> Result<Written, CallError> {
    let names: Vec<String> = out
        .records
        .iter()
        .filter(|(_, _, record)| record.is_none())
        .map(|(net, source, _)| keys.record(source, net))
        .collect();
    for chunk in names.chunks(MAX_OPS) {
        let deletes = chunk
            .iter()
            .map(|key| {
                TxnOp::txn(
                    Txn::new()
                        .when(vec![Compare::mod_revision(
                            key.as_str(),
                            CompareOp::Less,
                            base + 1,
                        )])
                        .and_then(vec![TxnOp::delete(key.as_str(), None)]),
                )
            })
            .collect::<Vec<_>>();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                fence.key().to_vec(),
                CompareOp::Equal,
                fence.rev(),
            )])
            .and_then(deletes);
        if !within("deleting expired records", client.txn(txn))
            .await?
            .succeeded()
        {
            return Ok(Written::Deposed);
        }
    }
    Ok(Written::Done)
}

async fn write(
    client: &mut Client,
    keys: &Keys,
    out: &Outgoing,
    fence: Option<&LeaderKey>,
) -> Result<Written, CallError> {
    let ops = operations(keys, out);
    for chunk in ops.chunks(MAX_OPS) {
        let mut txn = Txn::new();
        if let Some(key) = fence {
            txn = txn.when(vec![Compare::create_revision(
                key.key().to_vec(),
                CompareOp::Equal,
                key.rev(),
            )]);
        }
        let answer = within("a write", client.txn(txn.and_then(chunk.to_vec()))).await?;
        if !answer.succeeded() {
            return Ok(Written::Deposed);
        }
    }
    Ok(Written::Done)
}
