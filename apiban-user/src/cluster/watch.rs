//! The watch on the fleet's prefix. It resumes from the revision the node saved with its
//! ledger, so a restart reads only what changed. Only a first start, or a saved revision
//! that etcd has compacted away, reads everything: in pages, all at one revision.

use std::sync::{Arc, atomic::Ordering};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot, watch as tokio_watch};

use super::settings::ClusterSettings;
use super::{
    CallError, ClusterStats, ClusterUpdate, Retry, connect,
    keys::{self, Keys},
    pages::Pages,
    within,
};
use crate::{
    engine::RemoteChange,
    ledger::{Record, SourceId},
    snapshot::Snapshot,
};

/// Keys per page of a full read: well under etcd's 1.5 MiB response limit.
const PAGE: i64 = 5_000;
/// How often the watch asks etcd how far it has sent: the answer says the ledger is
/// current, and a watch that stops answering is given up and started again.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Why following the watch stopped.
#[derive(Debug, thiserror::Error)]
enum WatchEnd {
    #[error("etcd compacted the history past revision {0}")]
    Compacted(i64),
    #[error("etcd")]
    Etcd(#[from] CallError),
    #[error("etcd cancelled the watch: {0}")]
    Cancelled(String),
    #[error("etcd ended the watch")]
    Ended,
    #[error("etcd did not answer the watch's progress requests")]
    Silent,
    #[error("the agent is stopping")]
    Stopping,
}

pub async fn run(
    settings: Arc<ClusterSettings>,
    updates: mpsc::Sender<super::ClusterUpdate>,
    snapshots: tokio_watch::Receiver<Arc<Snapshot>>,
    stats: Arc<ClusterStats>,
) {
    let keys = Keys::new(&settings.prefix);
    let mut retry = Retry::new();
    let mut read_all = false;
    let mut reported_down = false;
    loop {
        let mut client = match connect(&settings).await {
            Ok(c) => c,
            Err(e) => {
                stats.error();
                if !reported_down {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot reach etcd; this node keeps enforcing what it has");
                    reported_down = true;
                }
                retry.wait().await;
                continue;
            }
        };
        let (saved, saved_id) = {
            let snapshot = snapshots.borrow();
            (snapshot.engine.cluster_revision, snapshot.engine.cluster_id)
        };
        if saved != 0 && !read_all {
            match head(&mut client, &keys).await {
                Ok((id, revision)) if (saved_id != 0 && id != saved_id) || revision < saved => {
                    tracing::warn!(
                        saved_revision = saved,
                        etcd_revision = revision,
                        saved_cluster = format!("{saved_id:x}"),
                        etcd_cluster = format!("{id:x}"),
                        "etcd is not the one this node followed (restored from a backup, or replaced); reading the whole ledger"
                    );
                    read_all = true;
                }
                Ok(_) => {}
                Err(e) => {
                    stats.error();
                    tracing::debug!(error = %crate::error_chain(&e), "cannot read etcd's revision; trying again");
                    retry.wait().await;
                    continue;
                }
            }
        }
        let from = if saved == 0 || read_all {
            match read_everything(&mut client, &keys, &updates, &stats).await {
                Ok(revision) => {
                    read_all = false;
                    stats.full_reads.fetch_add(1, Ordering::Relaxed);
                    // Another etcd's revisions may be behind the ones seen before.
                    stats.head_revision.store(revision, Ordering::Relaxed);
                    stats.caught_up.store(revision, Ordering::Relaxed);
                    revision
                }
                Err(WatchEnd::Stopping) => return,
                Err(e) => {
                    stats.error();
                    if !reported_down {
                        tracing::warn!(error = %crate::error_chain(&e), "cannot read the fleet's ledger from etcd; this node keeps enforcing what it has");
                        reported_down = true;
                    }
                    retry.wait().await;
                    continue;
                }
            }
        } else {
            saved
        };
        if reported_down {
            tracing::info!(
                revision = from,
                "etcd reachable again; catching up by watch"
            );
            reported_down = false;
        }
        let end = follow(&mut client, &keys, &updates, from, &mut retry, &stats).await;
        stats.watching.store(false, Ordering::Relaxed);
        stats.watch_restarts.fetch_add(1, Ordering::Relaxed);
        match end {
            WatchEnd::Stopping => return,
            WatchEnd::Compacted(at) => {
                tracing::warn!(
                    saved = from,
                    compacted = at,
                    "etcd no longer has the changes since this node's revision; reading the whole ledger"
                );
                read_all = true;
            }
            e => {
                // Most often one member went away: the next connection takes another at
                // once, and only if none answers does the node say etcd is away.
                stats.error();
                tracing::debug!(error = %crate::error_chain(&e), "lost the watch on one etcd member; following from another");
                retry.wait().await;
            }
        }
    }
}

/// Follows the prefix from `from + 1`, sending every batch of changes to the owner and
/// waiting until it is applied and saved.
async fn follow(
    client: &mut Client,
    keys: &Keys,
    updates: &mpsc::Sender<super::ClusterUpdate>,
    from: i64,
    retry: &mut Retry,
    stats: &ClusterStats,
) -> WatchEnd {
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(from + 1)
        .with_progress_notify();
    let stream = match within("watch", client.watch(keys.ledger(), Some(options))).await {
        Ok(s) => s,
        Err(e) => return WatchEnd::Etcd(e),
    };
    let (mut requests, mut responses) = stream.split();
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    let mut unanswered_since: Option<std::time::Instant> = None;
    loop {
        let message = tokio::select! {
            m = responses.message() => m,
            _ = progress.tick() => {
                if unanswered_since.is_some_and(|t| t.elapsed() > PROGRESS_EVERY * 3) {
                    return WatchEnd::Silent;
                }
                if requests.request_progress().await.is_err() {
                    return WatchEnd::Ended;
                }
                unanswered_since.get_or_insert_with(std::time::Instant::now);
                continue;
            }
        };
        unanswered_since = None;
        let response = match message {
            Ok(Some(r)) => r,
            Ok(None) => return WatchEnd::Ended,
            Err(e) => return WatchEnd::Etcd(e.into()),
        };
        if response.canceled() {
            if response.compact_revision() > 0 {
                return WatchEnd::Compacted(response.compact_revision());
            }
            return WatchEnd::Cancelled(response.cancel_reason().to_owned());
        }
        if response.created() {
            retry.reset();
            stats.watching.store(true, Ordering::Relaxed);
        }
        if let Some(header) = response.header() {
            stats.saw_revision(header.revision());
        }
        let mut changes = Vec::new();
        let mut revision = 0;
        let mut clock = 0;
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            revision = revision.max(kv.mod_revision());
            // An event type this client does not know panics inside etcd-client; such an
            // event is skipped, not fatal.
            let put =
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| event.event_type()))
                {
                    Ok(EventType::Put) => true,
                    Ok(EventType::Delete) => false,
                    Err(_) => continue,
                };
            let change = change_of(keys, kv.key(), put.then(|| kv.value()), stats);
            if let Some((change, stamp)) = change {
                changes.push(change);
                clock = clock.max(stamp.map_or(0, |s| s.at));
            }
        }
        if changes.is_empty() {
            // A progress answer (no events, not the creation): everything up to its revision
            // has been sent, and what was sent has been applied.
            if !response.created()
                && response.events().is_empty()
                && let Some(header) = response.header()
            {
                stats
                    .caught_up
                    .fetch_max(header.revision(), Ordering::Relaxed);
            }
            continue;
        }
        if send(updates, |reply| ClusterUpdate::Changes {
            changes,
            revision,
            clock,
            reply,
        })
        .await
        .is_err()
        {
            return WatchEnd::Stopping;
        }
    }
}

/// The ledger change one key's event stands for, and the operator's stamp it carries; None
/// for keys that are not ledger state (the election, the cursor). A tombstone is a
/// removal, and so is a value this node cannot read: what cannot be parsed is never a
/// reason to ban, nor to keep a ban etcd no longer holds in a form this node knows.
fn change_of(
    keys: &Keys,
    key: &[u8],
    value: Option<&[u8]>,
    stats: &ClusterStats,
) -> Option<(RemoteChange, Option<keys::Stamp>)> {
    if let Some((source, net)) = keys.parse_record(key) {
        let stored = value.and_then(|v| {
            let stored = keys::decode_record(v);
            if stored.is_none() {
                undecodable(key, stats);
            }
            stored
        });
        let (record, stamp) = stored.map_or((None, None), |s| (s.record, s.stamp));
        return Some((
            RemoteChange::Record {
                net,
                source,
                record,
            },
            stamp,
        ));
    }
    let net = keys.parse_allow(key)?;
    let stored = value.and_then(|v| {
        let stored = keys::decode_allowed(v);
        if stored.is_none() {
            undecodable(key, stats);
        }
        stored
    });
    let (present, stamp) = stored.map_or((false, None), |s| (!s.removed, s.stamp));
    Some((RemoteChange::Allow { net, present }, stamp))
}

/// How many undecodable keys a node logs by name; the rest are counted only.
const UNDECODABLE_LOGGED: u64 = 100;

/// Counts a value in etcd this node cannot read, and names its key (the first ones).
fn undecodable(key: &[u8], stats: &ClusterStats) {
    let seen = stats.undecodable.fetch_add(1, Ordering::Relaxed);
    if seen < UNDECODABLE_LOGGED {
        tracing::warn!(
            key = %String::from_utf8_lossy(key).escape_debug(),
            "a value in etcd this node cannot read: it holds nothing for this key (counted in \
             apiban_cluster_records_refused_total{{reason=\"undecodable\"}})"
        );
    }
}

async fn send(
    updates: &mpsc::Sender<super::ClusterUpdate>,
    make: impl FnOnce(oneshot::Sender<()>) -> ClusterUpdate,
) -> Result<(), ()> {
    let (reply, done) = oneshot::channel();
    updates.send(make(reply)).await.map_err(|_| ())?;
    done.await.map_err(|_| ())
}

/// Every key under `prefix` at `revision`, in pages.
async fn read_range(
    client: &mut Client,
    prefix: &str,
    revision: i64,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, CallError> {
    let mut pages = Pages::under(prefix, PAGE, "a page of the full read").at_revision(revision);
    let mut out = Vec::new();
    while let Some(page) = pages.next(client).await? {
        out.extend(page.into_iter().map(|kv| kv.into_key_value()));
    }
    Ok(out)
}

/// etcd's cluster ID and current revision.
async fn head(client: &mut Client, keys: &Keys) -> Result<(u64, i64), CallError> {
    let answer = within(
        "the ledger's revision",
        client.get(
            keys.prefix(),
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_keys_only()
                    .with_limit(1),
            ),
        ),
    )
    .await?;
    Ok(answer
        .header()
        .map_or((0, 0), |h| (h.cluster_id(), h.revision())))
}

/// Reads the whole ledger at one revision and hands it to the owner; the revision.
async fn read_everything(
    client: &mut Client,
    keys: &Keys,
    updates: &mpsc::Sender<super::ClusterUpdate>,
    stats: &ClusterStats,
) -> Result<i64, WatchEnd> {
    let (cluster_id, revision) = head(client, keys).await?;
    let mut records: Vec<(IpNet, SourceId, Record)> = Vec::new();
    let mut clock = 0;
    let mut seen = |stamp: &Option<keys::Stamp>| {
        clock = stamp.as_ref().map_or(clock, |s| clock.max(s.at));
    };
    for (key, value) in read_range(client, &keys.records(), revision).await? {
        if let Some((
            RemoteChange::Record {
                net,
                source,
                record,
            },
            stamp,
        )) = change_of(keys, &key, Some(&value), stats)
        {
            seen(&stamp);
            if let Some(record) = record {
                records.push((net, source, record));
            }
        }
    }
    let mut allow: Vec<IpNet> = Vec::new();
    for (key, value) in read_range(client, &keys.allowlist(), revision).await? {
        if let Some((RemoteChange::Allow { net, present }, stamp)) =
            change_of(keys, &key, Some(&value), stats)
        {
            seen(&stamp);
            if present {
                allow.push(net);
            }
        }
    }
    tracing::info!(
        revision,
        records = records.len(),
        allow = allow.len(),
        "read the fleet's whole ledger from etcd"
    );
    send(updates, |reply| ClusterUpdate::Everything {
        records,
        allow,
        revision,
        cluster_id,
        clock,
        reply,
    })
    .await
    .map_err(|_| WatchEnd::Stopping)?;
    Ok(revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ledger_keys_become_changes() {
        let keys = Keys::new("/f/");
        let stats = ClusterStats::default();
        let net: IpNet = "192.0.2.9/32".parse().unwrap();
        let record = Record {
            first_seen: 1,
            last_seen: 2,
            expires: Some(3),
            comment: None,
            evidence: None,
        };
        let change = |record| RemoteChange::Record {
            net,
            source: SourceId::Apiban,
            record,
        };
        let key = keys.record(&SourceId::Apiban, &net);
        let value = keys::encode_record(&record, None);
        assert_eq!(
            change_of(&keys, key.as_bytes(), Some(&value), &stats),
            Some((change(Some(record.clone())), None))
        );
        assert_eq!(
            change_of(&keys, key.as_bytes(), None, &stats),
            Some((change(None), None))
        );
        // Unreadable: no ban from it, and none kept under its key.
        assert_eq!(
            change_of(&keys, key.as_bytes(), Some(b"not json"), &stats),
            Some((change(None), None))
        );
        assert_eq!(stats.undecodable.load(Ordering::Relaxed), 1);
        assert_eq!(
            change_of(&keys, b"/f/leader/1234", Some(b"node-a"), &stats),
            None
        );
        assert_eq!(
            change_of(&keys, keys.allow(&net).as_bytes(), Some(b"{}"), &stats),
            Some((RemoteChange::Allow { net, present: true }, None))
        );
    }

    #[test]
    fn an_operators_stamp_and_tombstone_are_read_back() {
        let stats = ClusterStats::default();
        let keys = Keys::new("/f/");
        let net: IpNet = "198.51.100.0/24".parse().unwrap();
        let stamp = keys::Stamp {
            at: 1_780_000_000_123,
            by: "node-b".into(),
        };
        let record = Record {
            first_seen: 1,
            last_seen: 2,
            expires: None,
            comment: Some("by hand".into()),
            evidence: None,
        };
        let key = keys.record(&SourceId::Manual, &net);
        let banned = keys::encode_record(&record, Some(&stamp));
        assert_eq!(
            change_of(&keys, key.as_bytes(), Some(&banned), &stats),
            Some((
                RemoteChange::Record {
                    net,
                    source: SourceId::Manual,
                    record: Some(record),
                },
                Some(stamp.clone())
            ))
        );
        // An operator's unban is a value, not a deleted key, and reads as a removal.
        let removed = keys::encode_removed(&stamp);
        assert_eq!(
            change_of(&keys, key.as_bytes(), Some(&removed), &stats),
            Some((
                RemoteChange::Record {
                    net,
                    source: SourceId::Manual,
                    record: None,
                },
                Some(stamp.clone())
            ))
        );
        let allow = keys.allow(&net);
        assert_eq!(
            change_of(&keys, allow.as_bytes(), Some(&removed), &stats),
            Some((
                RemoteChange::Allow {
                    net,
                    present: false
                },
                Some(stamp.clone())
            ))
        );
        assert_eq!(
            change_of(
                &keys,
                allow.as_bytes(),
                Some(&keys::encode_allowed(Some(&stamp))),
                &stats
            ),
            Some((RemoteChange::Allow { net, present: true }, Some(stamp)))
        );
    }
}
