//! A fleet node's engine: what it takes from etcd, what it spares, what it saves for etcd.

use super::*;

#[test]
fn another_nodes_detection_ban_of_a_proven_peer_is_not_enforced_here() {
    use crate::{
        engine::cluster::RemoteChange,
        ledger::{Record, SourceId},
    };
    let proven = EngineSettings {
        detect_exempt: vec![net("45.113.0.0/24")],
        ..settings(100)
    };
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, proven, 10).unwrap();
    e.join_cluster("/apiban/", 60);
    // Proven by this node's server's answers until 100; its detection holds the set.
    let view = crate::proven_view::ProvenView::default();
    view.replace(std::collections::HashMap::from([(
        "45.2.0.77".parse().unwrap(),
        100,
    )]));
    e.set_proven_view(view);
    let record = Record {
        first_seen: 10,
        last_seen: 10,
        expires: Some(610),
        comment: None,
        evidence: None,
    };
    let change = |addr: &str, source: SourceId| RemoteChange::Record {
        net: net(addr),
        source,
        record: Some(record.clone()),
    };
    e.apply_cluster_changes(
        vec![
            change("45.113.0.7/32", SourceId::Detect),
            change("45.51.100.7/32", SourceId::Detect),
            change("45.2.0.77/32", SourceId::Detect),
            // Only detection's word is weighed: an operator's ban of a peer stands.
            change("45.113.0.8/32", SourceId::Manual),
        ],
        5,
        11,
    );
    let deny = &e.enforcer().deny;
    assert!(!deny.contains(&net("45.113.0.7/32")), "a proven peer");
    assert!(
        !deny.contains(&net("45.2.0.77/32")),
        "proven by the server here"
    );
    assert!(deny.contains(&net("45.51.100.7/32")));
    assert!(deny.contains(&net("45.113.0.8/32")));
}

/// An operator's change in a fleet is on disk together with its note for etcd, from one
/// save: a kill after that save cannot leave a ban that no node but this one ever hears of.
#[test]
fn an_operators_change_and_its_pending_note_are_saved_together() {
    use crate::state::{PendingKey, STATE_FILE, State};
    let (dir, store) = temp_store("pending-together");
    let (mut e, _) =
        Engine::start(MemoryEnforcer::default(), Some(store), settings(100), 10).unwrap();
    e.join_cluster("/apiban/", 60);
    e.saw_fleet_clock(u64::MAX / 4);
    e.expect_fleet_change(None);
    e.ban(net("198.51.100.7/32"), None, None, false, 11)
        .unwrap();
    // What is on disk now, before the owner has sent anything anywhere.
    let saved = State::parse(&std::fs::read(dir.join(STATE_FILE)).unwrap()).unwrap();
    let key = PendingKey::Record {
        net: net("198.51.100.7/32"),
        source: SourceId::Manual,
    };
    assert!(
        saved
            .entries
            .iter()
            .any(|s| s.net == net("198.51.100.7/32")),
        "the ban is saved"
    );
    let cluster = saved.cluster.as_ref().expect("a fleet node's cursor");
    let pending = cluster.pending.iter().find(|p| p.key == key);
    // Stamped after everything the node had seen of the fleet, whatever its clock says.
    let first = pending.expect("noted pending in the same save").stamp_ms;
    assert_eq!(first, u64::MAX / 4 + 1);
    assert_eq!(cluster.clock_ms, first, "the fleet clock is saved with it");
    let change = e.end_fleet_change().expect("an applied change");
    assert_eq!((change.stamp_ms, change.records.len()), (first, 1));

    // The same key changed again: still one note, with the later stamp.
    e.expect_fleet_change(None);
    e.unban(net("198.51.100.7/32"), 12);
    let second = e.end_fleet_change().expect("an applied change").stamp_ms;
    assert!(second > first);
    let pending = e.pending_changes();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].0.stamp_ms, second);

    // A refused change notes nothing and sends nothing.
    e.expect_fleet_change(Some((net("192.0.2.0/24"), false)));
    assert!(e.allow_remove(net("192.0.2.0/24"), 13).is_err());
    assert!(e.end_fleet_change().is_none());
    assert_eq!(e.pending_changes().len(), 1);
    let _ = std::fs::remove_dir_all(dir);
}

/// What etcd holds passes this node's checks like a feed's entry, an operator's ban
/// included: whoever writes etcd is an outside party to the node. Refused entries are
/// counted by reason, and one refused over a ban the node held removes that ban.
#[test]
fn records_and_allow_entries_from_etcd_pass_this_nodes_checks() {
    use crate::{
        engine::cluster::RemoteChange,
        ledger::{Record, SourceId},
    };
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, settings(100), 10).unwrap();
    e.join_cluster("/apiban/", 60);
    e.set_own_addresses(vec!["45.1.1.1".parse().unwrap()], 10);
    e.set_fleet_addresses(vec!["45.2.2.2".parse().unwrap()], 10);
    let record = |comment: Option<&str>| Record {
        first_seen: 10,
        last_seen: 10,
        expires: None,
        comment: comment.map(str::to_owned),
        evidence: None,
    };
    let ban = |addr: &str, comment: Option<&str>| RemoteChange::Record {
        net: net(addr),
        source: SourceId::Manual,
        record: Some(record(comment)),
    };
    let allow = |addr: &str| RemoteChange::Allow {
        net: net(addr),
        present: true,
    };
    e.apply_cluster_changes(
        vec![
            ban("45.9.9.9/32", Some("a fine comment")),
            ban("0.0.0.0/0", None),
            ban("10.0.0.0/8", None),
            ban("127.0.0.0/8", None),
            ban("45.0.0.0/8", None),
            ban("45.1.1.0/24", None),
            ban("45.2.2.2/32", None),
            ban("45.3.3.3/32", Some("\u{1b}[2Jgone")),
            allow("0.0.0.0/0"),
            allow("45.0.0.0/8"),
            allow("10.0.0.0/8"),
        ],
        5,
        11,
    );
    let deny = &e.enforcer().deny;
    assert_eq!(
        deny.iter().collect::<Vec<_>>(),
        vec![&net("45.9.9.9/32")],
        "only the ordinary ban is enforced"
    );
    assert_eq!(
        e.manual_allow.iter().collect::<Vec<_>>(),
        vec![&net("10.0.0.0/8")],
        "only the allow entry inside a special-purpose range is taken"
    );
    let refused = &e.shared().counters.fleet_refused;
    assert_eq!(refused.get("special_purpose"), Some(&3), "{refused:?}");
    assert_eq!(refused.get("too_broad"), Some(&3), "{refused:?}");
    assert_eq!(refused.get("own_address"), Some(&1), "{refused:?}");
    assert_eq!(refused.get("fleet_infrastructure"), Some(&1), "{refused:?}");
    assert_eq!(refused.get("comment"), Some(&1), "{refused:?}");

    // A value refused over a ban the node held: the node no longer holds it.
    e.apply_cluster_changes(vec![ban("45.9.9.9/32", Some("\u{7}"))], 6, 12);
    assert!(e.enforcer().deny.is_empty());
    // A whole read refuses the same.
    e.replace_from_cluster(
        vec![
            (net("0.0.0.0/0"), SourceId::Manual, record(None)),
            (net("45.8.8.8/32"), SourceId::Manual, record(None)),
        ],
        vec![net("0.0.0.0/0")],
        (1, 7),
        13,
    );
    assert_eq!(
        e.enforcer().deny.iter().collect::<Vec<_>>(),
        vec![&net("45.8.8.8/32")]
    );
    assert!(e.manual_allow.is_empty());
}

/// The fleet's etcd endpoints are refused as bans from every source but a forced manual
/// ban, like this host's own addresses: a ban of etcd cuts every node off.
#[test]
fn the_fleets_etcd_endpoints_cannot_be_banned_without_force() {
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, settings(100), 10).unwrap();
    e.set_fleet_addresses(vec!["45.2.2.2".parse().unwrap()], 10);
    let refused = e
        .ban(net("45.2.2.0/24"), None, None, false, 11)
        .unwrap_err();
    assert!(refused.to_string().contains("etcd endpoint"), "{refused}");
    e.ban(net("45.2.2.0/24"), None, None, true, 11).unwrap();
    assert!(e.enforcer().deny.contains(&net("45.2.2.0/24")));
    // In a fleet, etcd's echo of that forced ban does not undo it on its own node.
    e.join_cluster("/apiban/", 60);
    let echo = crate::engine::cluster::RemoteChange::Record {
        net: net("45.2.2.0/24"),
        source: SourceId::Manual,
        record: e
            .ledger
            .record(&net("45.2.2.0/24"), &SourceId::Manual)
            .cloned(),
    };
    e.apply_cluster_changes(vec![echo], 3, 12);
    assert!(e.enforcer().deny.contains(&net("45.2.2.0/24")));
}
