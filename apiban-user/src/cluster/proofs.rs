//! The fleet's proven peers, under `P proven/<address>`. Each node writes the proofs its own
//! detection saw (the server answered 2xx to credentials for a nonce it had issued to that
//! address) and reads every node's, so that an office proven at one node is spared by the
//! others' detection too.
//!
//! A proof can only keep detection from banning an address, never ban one; still, what etcd
//! holds is input from outside and passes the same checks here as anything else: a key that
//! names no address canonically, a value that is not the JSON below, a text too long or with
//! control characters, a time in the future: each is skipped and counted, never applied.
//!
//! Proofs live on leases, one per writing node per hour, of the proof's TTL plus that hour:
//! a proof nobody renews leaves etcd by itself, and the leases stay few. A node renews a
//! proof in etcd only once it is a quarter of its TTL old (the detection task decides), so a
//! thousand phones re-registering every minute cost etcd nothing.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::settings::ClusterSettings;
use super::{CallError, ClusterStats, Retry, connect, keys::Keys, pages::Pages, within};
use crate::clock::unix_now;

/// Characters of a proof's description and of a node's name at most.
const MAX_HOW: usize = 200;
const MAX_NODE: usize = 100;
/// How far ahead of this node's clock a proof's time may be (clocks differ a little).
const CLOCK_SLACK_SECS: u64 = 300;
/// How long one lease takes new proofs.
const LEASE_EVERY: Duration = Duration::from_secs(3600);
/// Proofs waiting for etcd at most; the oldest go first (they are renewed anyway).
const MAX_PENDING: usize = 10_000;
/// Proofs read per page.
const PAGE: i64 = 1_000;

/// A proof as etcd holds it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Value {
    /// When it was seen (Unix seconds, the writer's clock).
    at: u64,
    /// What was seen, e.g. `200 to an authenticated REGISTER for 201`.
    how: String,
    /// The node that saw it.
    node: String,
}

/// A proof another node saw, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedProof {
    pub addr: IpAddr,
    pub at: u64,
    pub how: String,
    pub node: String,
}

/// A proof this node's detection saw, for etcd.
#[derive(Clone, Debug)]
pub struct Publish {
    pub addr: IpAddr,
    pub at: u64,
    pub how: String,
    /// How long a proof proves (`--detect-proven-ttl`).
    pub ttl_secs: u64,
}

/// The detection task's end.
pub struct ProofLink {
    pub publish: mpsc::UnboundedSender<Publish>,
    pub shared: mpsc::Receiver<SharedProof>,
}

/// The proofs task's end, for [`super::start`].
pub struct ProofEnds {
    publish: mpsc::UnboundedReceiver<Publish>,
    shared: mpsc::Sender<SharedProof>,
}

pub fn link() -> (ProofLink, ProofEnds) {
    let (publish_tx, publish) = mpsc::unbounded_channel();
    let (shared, shared_rx) = mpsc::channel(1_024);
    (
        ProofLink {
            publish: publish_tx,
            shared: shared_rx,
        },
        ProofEnds { publish, shared },
    )
}

/// Why a proof from etcd was not taken.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("its key names no address (or not as this version writes it)")]
    Key,
    #[error("its value is not a proof")]
    Value,
    #[error("its description or node name is too long or holds control characters")]
    Text,
    #[error("it is dated {0} s ahead of this node's clock")]
    Future(u64),
}

/// The proof `key` and `value` hold, checked.
pub fn decode(keys: &Keys, key: &[u8], value: &[u8], now: u64) -> Result<SharedProof, Refused> {
    let addr = keys.parse_proof(key).ok_or(Refused::Key)?;
    let value: Value = serde_json::from_slice(value).map_err(|_| Refused::Value)?;
    let clean = |s: &str, max: usize| {
        !s.is_empty() && s.chars().count() <= max && !s.chars().any(char::is_control)
    };
    if !clean(&value.how, MAX_HOW) || !clean(&value.node, MAX_NODE) {
        return Err(Refused::Text);
    }
    if value.at > now + CLOCK_SLACK_SECS {
        return Err(Refused::Future(value.at - now));
    }
    Ok(SharedProof {
        addr,
        at: value.at,
        how: value.how,
        node: value.node,
    })
}

/// Reads every proof, then follows them, handing other nodes' to detection, and writes this
/// node's own; starts over after any failure.
pub async fn run(settings: Arc<ClusterSettings>, ends: ProofEnds, stats: Arc<ClusterStats>) {
    let ProofEnds {
        mut publish,
        shared,
    } = ends;
    let keys = Keys::new(&settings.prefix);
    let mut retry = Retry::new();
    let mut lease: Option<(i64, Instant)> = None;
    let mut pending: Vec<Publish> = Vec::new();
    loop {
        let mut client = match connect(&settings).await {
            Ok(c) => c,
            Err(e) => {
                stats.error();
                tracing::debug!(error = %crate::error_chain(&e), "cannot reach etcd for the fleet's proven peers");
                retry.wait().await;
                continue;
            }
        };
        match follow(
            &mut client,
            &keys,
            &settings.node,
            &mut publish,
            &shared,
            &mut lease,
            &mut pending,
        )
        .await
        {
            Ok(()) => return,
            Err(e) => {
                stats.error();
                // A member that went away: the next connection takes another (the member
                // monitor says so once); etcd wholly away is the watch's to say.
                tracing::debug!(error = %crate::error_chain(&e), "the fleet's proven peers: etcd failed; trying again");
                lease = None;
            }
        }
        retry.wait().await;
    }
}

/// One connection's work; `Ok` once this node stops.
#[allow(clippy::too_many_arguments)]
async fn follow(
    client: &mut Client,
    keys: &Keys,
    node: &str,
    publish: &mut mpsc::UnboundedReceiver<Publish>,
    shared: &mpsc::Sender<SharedProof>,
    lease: &mut Option<(i64, Instant)>,
    pending: &mut Vec<Publish>,
) -> Result<(), CallError> {
    let head = within(
        "counting proofs",
        client.get(
            keys.proven(),
            Some(GetOptions::new().with_prefix().with_count_only()),
        ),
    )
    .await?;
    let revision = head.header().map_or(0, |h| h.revision());
    let mut pages = Pages::under(&keys.proven(), PAGE, "a page of proofs").at_revision(revision);
    while let Some(page) = pages.next(client).await? {
        for kv in page {
            if hand_over(keys, node, kv.key(), kv.value(), shared)
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    }
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let (_watcher, mut events) = within(
        "watching proofs",
        client.watch(keys.proven(), Some(options)),
    )
    .await?
    .split();
    loop {
        while let Some(p) = pending.first() {
            put(client, keys, node, lease, p).await?;
            pending.remove(0);
        }
        tokio::select! {
            message = events.message() => {
                let response = match message {
                    Ok(Some(r)) if !r.canceled() => r,
                    Ok(_) => return Err(CallError::Timeout("the watch of proofs ended")),
                    Err(e) => return Err(e.into()),
                };
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    // Deletions are leases running out: each node forgets proofs by its own
                    // TTL. An event type this client does not know is skipped.
                    let put = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        event.event_type()
                    }));
                    if !matches!(put, Ok(EventType::Put)) {
                        continue;
                    }
                    if hand_over(keys, node, kv.key(), kv.value(), shared).await.is_err() {
                        return Ok(());
                    }
                }
            }
            p = publish.recv() => {
                let Some(p) = p else { return Ok(()) };
                if pending.len() >= MAX_PENDING {
                    pending.remove(0);
                }
                pending.push(p);
            }
        }
    }
}

/// Hands another node's proof to detection; `Err` once detection has stopped.
async fn hand_over(
    keys: &Keys,
    node: &str,
    key: &[u8],
    value: &[u8],
    shared: &mpsc::Sender<SharedProof>,
) -> Result<(), ()> {
    match decode(keys, key, value, unix_now()) {
        Ok(proof) if proof.node == node => Ok(()),
        Ok(proof) => shared.send(proof).await.map_err(|_| ()),
        Err(why) => {
            tracing::warn!(key = %String::from_utf8_lossy(key).escape_debug(), %why, "a proven peer in etcd is not taken");
            Ok(())
        }
    }
}

async fn put(
    client: &mut Client,
    keys: &Keys,
    node: &str,
    lease: &mut Option<(i64, Instant)>,
    p: &Publish,
) -> Result<(), CallError> {
    let id = match *lease {
        Some((id, granted)) if granted.elapsed() < LEASE_EVERY => id,
        _ => {
            let ttl = (p.ttl_secs + LEASE_EVERY.as_secs()).min(i64::MAX as u64) as i64;
            let granted = within("a lease for proofs", client.lease_grant(ttl, None)).await?;
            *lease = Some((granted.id(), Instant::now()));
            granted.id()
        }
    };
    let value = serde_json::to_vec(&Value {
        at: p.at,
        how: p.how.clone(),
        node: node.to_owned(),
    })
    .unwrap_or_default();
    within(
        "writing a proof",
        client.put(
            keys.proof(&p.addr),
            value,
            Some(PutOptions::new().with_lease(id)),
        ),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_proof_with_a_canonical_key_is_taken() {
        let keys = Keys::new("/apiban/v1/");
        let good =
            br#"{"at":1000,"how":"200 to an authenticated REGISTER for 201","node":"edge-2"}"#;
        let key = keys.proof(&"198.51.100.7".parse().unwrap());
        assert_eq!(
            decode(&keys, key.as_bytes(), good, 1000),
            Ok(SharedProof {
                addr: "198.51.100.7".parse().unwrap(),
                at: 1000,
                how: "200 to an authenticated REGISTER for 201".into(),
                node: "edge-2".into(),
            })
        );
        let refused = |key: &[u8], value: &[u8]| decode(&keys, key, value, 1000).unwrap_err();
        assert_eq!(refused(b"/apiban/v1/proven/not-an-ip", good), Refused::Key);
        assert_eq!(
            refused(b"/apiban/v1/proven/2001:db8:0::1", good),
            Refused::Key,
            "not as written"
        );
        assert_eq!(refused(key.as_bytes(), b"{}"), Refused::Value);
        assert_eq!(
            refused(
                key.as_bytes(),
                br#"{"at":1000,"how":"x","node":"n","extra":1}"#
            ),
            Refused::Value
        );
        assert_eq!(
            refused(
                key.as_bytes(),
                br#"{"at":1000,"how":"a\u001b[2Jb","node":"n"}"#
            ),
            Refused::Text
        );
        let long = format!(r#"{{"at":1000,"how":"{}","node":"n"}}"#, "x".repeat(201));
        assert_eq!(refused(key.as_bytes(), long.as_bytes()), Refused::Text);
        assert_eq!(
            refused(key.as_bytes(), br#"{"at":99999,"how":"x","node":"n"}"#),
            Refused::Future(98_999)
        );
    }
}
