//! Writes what this node changed to etcd, in the order the owner made the changes.
//!
//! Transactions hold at most [`MAX_OPS`] operations (etcd refuses more than 128 by default)
//! and stay far under its 1.5 MiB request limit. The leader's writes compare its leader key's
//! creation revision: once etcd has elected another node they fail, and this node drops
//! them. An operator's change is retried until etcd takes it.

use std::sync::Arc;

use std::collections::HashMap;

use etcd_client::{Client, Compare, CompareOp, LeaderKey, Txn, TxnOp};
use tokio::sync::{mpsc, watch as tokio_watch};

use super::{
    BudgetWrite, CallError, Outgoing, Retry, connect,
    keys::{self, Keys},
    within,
};
use crate::{config::ClusterSettings, state::PendingKey, sync::Update};

/// Operations per transaction, one under etcd's default `--max-txn-ops`.
pub const MAX_OPS: usize = 127;

enum Written {
    Done,
    /// The fence failed: another node leads now.
    Deposed,
}

pub async fn run(
    settings: Arc<ClusterSettings>,
    mut outbox: mpsc::UnboundedReceiver<Outgoing>,
    mut budget: mpsc::UnboundedReceiver<BudgetWrite>,
    leader: tokio_watch::Receiver<Option<LeaderKey>>,
    updates: mpsc::Sender<Update>,
    stats: Arc<super::ClusterStats>,
) {
    let keys = Keys::new(&settings.prefix);
    let mut written = OwnWrites::default();
    let mut client: Option<Client> = None;
    let mut retry = Retry::new();
    let mut reported = false;
    loop {
        let out = tokio::select! {
            out = outbox.recv() => match out {
                Some(out) => out,
                None => return,
            },
            Some(request) = budget.recv() => {
                let written = write_budget(&settings, &mut client, &keys, &request.sent_ms, &leader).await;
                let _ = request.done.send(written);
                continue;
            }
        };
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
            let result = match out.base_revision {
                Some(base) => write_if_unchanged(c, &keys, &out, base, &mut written).await,
                None => write(c, &keys, &out, fence.as_ref()).await,
            };
            match result {
                Ok(Written::Done) => {
                    if out.base_revision.is_some() {
                        let settled = Update::Cluster(super::ClusterUpdate::Settled {
                            keys: pending_keys(&out),
                        });
                        let _ = updates.send(settled).await;
                    }
                    if reported {
                        tracing::info!("etcd takes this node's changes again");
                        reported = false;
                    }
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
                    if !reported {
                        tracing::warn!(error = %crate::error_chain(&e), "cannot write to etcd; this node's changes wait for it");
                        reported = true;
                    }
                    client = None;
                    retry.wait().await;
                }
            }
        }
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
) -> bool {
    let Some(fence) = leader.borrow().clone() else {
        return false;
    };
    let c = match client {
        Some(c) => c,
        None => match connect(settings).await {
            Ok(c) => client.insert(c),
            Err(_) => return false,
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
        Ok(answer) => answer.succeeded(),
        Err(_) => {
            *client = None;
            false
        }
    }
}

/// The revisions at which this node wrote operators' keys itself: the next change of such
/// a key compares against its own write, not against the older revision it had applied.
#[derive(Default)]
struct OwnWrites(HashMap<String, i64>);

impl OwnWrites {
    fn base(&self, key: &str, base: i64) -> i64 {
        self.0.get(key).map_or(base, |own| base.max(*own))
    }

    fn note(&mut self, key: String, revision: i64) {
        // Operators' changes are few; the map only has to bridge the watch's short lag.
        if self.0.len() >= 10_000 {
            self.0.clear();
        }
        self.0.insert(key, revision);
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

/// An operator's change, key by key: each written only if etcd's copy has not changed since
/// `base` (or since this node's own last write of it). A key another node changed meanwhile
/// keeps that node's change.
async fn write_if_unchanged(
    client: &mut Client,
    keys: &Keys,
    out: &Outgoing,
    base: i64,
    written: &mut OwnWrites,
) -> Result<Written, CallError> {
    let plain = Outgoing {
        records: out.records.clone(),
        allow: out.allow.clone(),
        ..Default::default()
    };
    let names: Vec<String> = out
        .records
        .iter()
        .map(|(net, source, _)| keys.record(source, net))
        .chain(out.allow.iter().map(|(net, _)| keys.allow(net)))
        .collect();
    for (key, op) in names.into_iter().zip(operations(keys, &plain)) {
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                key.clone(),
                CompareOp::Less,
                written.base(&key, base) + 1,
            )])
            .and_then(vec![op]);
        let answer = within("a write", client.txn(txn)).await?;
        if answer.succeeded() {
            let revision = answer.header().map_or(0, |h| h.revision());
            written.note(key, revision);
        } else {
            tracing::warn!(
                %key,
                base,
                "another node changed this key in etcd after this node's change was made;                  etcd's newer change wins"
            );
        }
    }
    Ok(Written::Done)
}

/// The operations `out` stands for, the cursor last.
fn operations(keys: &Keys, out: &Outgoing) -> Vec<TxnOp> {
    let mut ops = Vec::with_capacity(out.records.len() + out.allow.len() + 1);
    for (net, source, record) in &out.records {
        let key = keys.record(source, net);
        ops.push(match record {
            Some(r) => TxnOp::put(key, keys::encode_record(r), None),
            None => TxnOp::delete(key, None),
        });
    }
    for (net, present) in &out.allow {
        let key = keys.allow(net);
        ops.push(if *present {
            TxnOp::put(key, "{}", None)
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
