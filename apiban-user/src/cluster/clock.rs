//! This node's clock against the fleet's. Expiry is an absolute time in each record, and
//! the leader deletes from etcd what expired on its clock: a leader days fast would delete
//! every live ban in the fleet. So each node compares its clock with the others': every
//! heartbeat carries its writer's time, and as the watch on `P nodes/` delivers one, the
//! node takes the difference with its own clock (the delivery's delay, milliseconds, is
//! small against the bound). Its offset is the median over the other nodes' latest beats.
//!
//! A node whose offset is over `--cluster-max-clock-offset` does not lead (it resigns, or
//! does not campaign) and so deletes nothing from etcd, and says so once. Where no majority
//! agrees (two nodes apart, or three with two apart in different directions) every node
//! that disagrees with the median stands down: the fleet then has no leader, keeps
//! enforcing, and polls nothing until the clocks are set right. Refused when in doubt.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use etcd_client::{EventType, WatchOptions};
use tokio::sync::watch as tokio_watch;

use super::settings::ClusterSettings;
use super::{ClusterStats, Retry, connect, heartbeat::NodeBeat, keys::Keys, within};

/// A beat older than this no longer counts: its node has stopped or is cut off.
const FRESH: Duration = Duration::from_secs(30);
/// How long a node watches the others' beats before it judges its clock (and, alone, may
/// lead unjudged): two beats' time, so that every live node's beat is in.
const FIRST_LOOK: Duration = Duration::from_secs(5);

/// What the clock task says of this node's clock: None until judged (or [`FIRST_LOOK`]
/// passed with too few others), then whether it is off.
pub type Judgement = Option<bool>;

pub use crate::clock::unix_now_ms;

/// The median of `offsets`; of the two middle ones, the nearer to zero (a node is off only
/// when most others say so).
pub fn median_offset(offsets: &mut [i64]) -> Option<i64> {
    if offsets.is_empty() {
        return None;
    }
    offsets.sort_unstable();
    let n = offsets.len();
    if n % 2 == 1 {
        return Some(offsets[n / 2]);
    }
    let (a, b) = (offsets[n / 2 - 1], offsets[n / 2]);
    Some(if a.abs() <= b.abs() { a } else { b })
}

/// Follows the others' beats; `off` says whether this node's clock is past the bound.
pub async fn run(
    settings: Arc<ClusterSettings>,
    stats: Arc<ClusterStats>,
    off: tokio_watch::Sender<Judgement>,
    updates: tokio::sync::mpsc::Sender<super::ClusterUpdate>,
) {
    let keys = Keys::new(&settings.prefix);
    let mut retry = Retry::new();
    // Each other node's latest offset (our clock minus theirs), and when it came.
    let mut seen: HashMap<String, (i64, Instant)> = HashMap::new();
    // The same beats say each node's own addresses, which no node may ban; what the owner
    // was last told.
    let mut addresses: HashMap<String, Vec<std::net::IpAddr>> = HashMap::new();
    let mut told: Option<Vec<std::net::IpAddr>> = None;
    let bound = settings.max_clock_offset.as_millis() as i64;
    loop {
        let Ok(mut client) = connect(&settings).await else {
            retry.wait().await;
            continue;
        };
        let Ok(mut stream) = within(
            "a watch of the heartbeats",
            client.watch(keys.nodes(), Some(WatchOptions::new().with_prefix())),
        )
        .await
        else {
            retry.wait().await;
            continue;
        };
        retry.reset();
        let watching_since = Instant::now();
        // A beat comes every 2 s from each node; a quiet watch is re-judged all the same,
        // so that stale beats age out.
        loop {
            let message = tokio::time::timeout(Duration::from_secs(1), stream.message()).await;
            let response = match message {
                Ok(Ok(Some(r))) => Some(r),
                Ok(_) => break,
                Err(_) => None,
            };
            let now_ms = unix_now_ms() as i64;
            for event in response.iter().flat_map(|r| r.events()) {
                let Some(kv) = event.kv() else { continue };
                let kind =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| event.event_type()));
                if matches!(kind, Ok(EventType::Delete)) {
                    // Its lease ended: the node stopped, or has been cut off for a while.
                    if let Some(node) = std::str::from_utf8(kv.key())
                        .ok()
                        .and_then(|k| k.strip_prefix(&keys.nodes()))
                    {
                        seen.remove(node);
                        addresses.remove(node);
                    }
                    continue;
                }
                if !matches!(kind, Ok(EventType::Put)) {
                    continue;
                }
                let Ok(beat) = serde_json::from_slice::<NodeBeat>(kv.value()) else {
                    continue;
                };
                addresses.insert(beat.node.clone(), beat.addresses.clone());
                if beat.node == settings.node || beat.at_ms == 0 {
                    continue;
                }
                tracing::debug!(node = %beat.node, offset_ms = now_ms - beat.at_ms as i64, "a heartbeat to compare with");
                seen.insert(beat.node, (now_ms - beat.at_ms as i64, Instant::now()));
            }
            let members = super::endpoints::member_addresses(&addresses);
            if told.as_ref() != Some(&members) {
                let update = super::ClusterUpdate::Members {
                    addresses: members.clone(),
                };
                if updates.send(update).await.is_err() {
                    return;
                }
                told = Some(members);
            }
            seen.retain(|_, (_, at)| at.elapsed() < FRESH);
            let mut offsets: Vec<i64> = seen.values().map(|(o, _)| *o).collect();
            let offset = median_offset(&mut offsets);
            stats.set_clock_offset(offset);
            let is_off = offset.is_some_and(|o| o.abs() > bound);
            let judged = watching_since.elapsed() >= FIRST_LOOK;
            if !judged {
                continue;
            }
            let was_off = off.borrow().unwrap_or(false);
            if off.borrow().is_none() && !is_off {
                off.send_replace(Some(false));
            }
            if is_off != was_off {
                let offset_s = offset.unwrap_or(0) as f64 / 1000.0;
                if is_off {
                    tracing::error!(
                        offset_s,
                        bound_s = bound as f64 / 1000.0,
                        nodes = offsets.len(),
                        "this node's clock is off from the fleet's: it does not lead and deletes nothing from etcd until it is set right (check NTP)"
                    );
                } else {
                    tracing::info!(offset_s, "this node's clock agrees with the fleet's again");
                }
                stats
                    .clock_off
                    .store(is_off, std::sync::atomic::Ordering::Relaxed);
                off.send_replace(Some(is_off));
            }
        }
        stats.error();
        retry.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_leans_to_agreement() {
        assert_eq!(median_offset(&mut []), None);
        assert_eq!(median_offset(&mut [40_000]), Some(40_000));
        // One of two others far off: this node is not judged off by it.
        assert_eq!(median_offset(&mut [40_000, 20]), Some(20));
        assert_eq!(median_offset(&mut [-20, 40_000, 15]), Some(15));
        // Everyone else says this node is ahead by about 8 days.
        assert_eq!(
            median_offset(&mut [691_200_000, 691_199_990, 691_200_010]),
            Some(691_200_000)
        );
    }
}
