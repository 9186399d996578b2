//! Node heartbeats: every node keeps `P nodes/<name>` on a lease of its own, with what
//! `apiban status --fleet` shows. A node that stops (or is cut off) drops out when its lease
//! runs out; nothing else depends on these keys.

use std::{sync::Arc, time::Duration};

use etcd_client::{GetOptions, PutOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch as tokio_watch;

use super::settings::ClusterSettings;
use super::{ClusterView, Retry, connect, keys::Keys, within};
use crate::snapshot::Snapshot;

/// A node's heartbeat lives this long without a renewal.
pub const HEARTBEAT_LEASE_SECS: i64 = 10;
const BEAT_EVERY: Duration = Duration::from_secs(2);

/// What one node says about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeBeat {
    pub node: String,
    pub version: String,
    pub interfaces: Vec<String>,
    pub leader: bool,
    pub applied_revision: i64,
    pub enforced_v4: usize,
    pub enforced_v6: usize,
    pub pending_changes: usize,
    /// Unix seconds of this beat.
    pub at: u64,
    /// The same in milliseconds: what the other nodes compare their clocks with.
    #[serde(default)]
    pub at_ms: u64,
    /// This node's clock against the fleet's (ms; positive: ahead), when it has others'
    /// beats to compare with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset_ms: Option<i64>,
    /// This node's own reachable addresses: no node bans them (see `cluster::endpoints`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<std::net::IpAddr>,
}

/// Every node's latest beat, and etcd's revision when they were read.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FleetReport {
    pub revision: i64,
    pub nodes: Vec<NodeBeat>,
}

fn beat(view: &ClusterView, snapshot: &Snapshot, interfaces: &[String]) -> NodeBeat {
    let enforced = &snapshot.engine.enforced;
    let first_v6 = ipnet::IpNet::V6(ipnet::Ipv6Net::default());
    let v6 = enforced.range(first_v6..).count();
    NodeBeat {
        node: view.node.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        interfaces: interfaces.to_vec(),
        leader: view.leading(),
        applied_revision: view.stats.current_to(snapshot.engine.cluster_revision),
        enforced_v4: enforced.len() - v6,
        enforced_v6: v6,
        pending_changes: snapshot.engine.cluster_pending,
        at: crate::clock::unix_now(),
        at_ms: super::clock::unix_now_ms(),
        clock_offset_ms: view.stats.clock_offset_ms(),
        addresses: super::endpoints::own_beat_addresses(),
    }
}

pub async fn run(
    settings: Arc<ClusterSettings>,
    view: ClusterView,
    snapshots: tokio_watch::Receiver<Arc<Snapshot>>,
    interfaces: Vec<String>,
) {
    let keys = Keys::new(&settings.prefix);
    let key = keys.node(&settings.node);
    let mut retry = Retry::new();
    loop {
        let Ok(mut client) = connect(&settings).await else {
            retry.wait().await;
            continue;
        };
        let lease = match within(
            "a heartbeat lease",
            client.lease_grant(HEARTBEAT_LEASE_SECS, None),
        )
        .await
        {
            Ok(l) => l.id(),
            Err(_) => {
                view.stats.error();
                retry.wait().await;
                continue;
            }
        };
        let Ok((mut keeper, mut acks)) =
            within("a heartbeat renewal", client.lease_keep_alive(lease)).await
        else {
            view.stats.error();
            retry.wait().await;
            continue;
        };
        let mut tick = tokio::time::interval(BEAT_EVERY);
        loop {
            tick.tick().await;
            let snapshot = snapshots.borrow().clone();
            let body = serde_json::to_vec(&beat(&view, &snapshot, &interfaces)).unwrap_or_default();
            let put = within(
                "a heartbeat",
                client.put(key.clone(), body, Some(PutOptions::new().with_lease(lease))),
            )
            .await;
            let renewed = put.is_ok()
                && within("a heartbeat renewal", keeper.keep_alive())
                    .await
                    .is_ok()
                && matches!(
                    tokio::time::timeout(super::CALL_TIMEOUT, acks.message()).await,
                    Ok(Ok(Some(ack))) if ack.ttl() > 0
                );
            if !renewed {
                view.stats.error();
                break;
            }
            retry.reset();
        }
        retry.wait().await;
    }
}

/// Every node's heartbeat, read from etcd.
pub async fn read_fleet(settings: &ClusterSettings) -> Result<FleetReport, super::CallError> {
    let keys = Keys::new(&settings.prefix);
    let mut client = connect(settings).await?;
    let answer = within(
        "the fleet's heartbeats",
        client.get(keys.nodes(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let mut nodes: Vec<NodeBeat> = answer
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
        .collect();
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(FleetReport {
        revision: answer.header().map_or(0, |h| h.revision()),
        nodes,
    })
}
