use super::*;
use crate::trust::MAX_COMMENT_CHARS;

fn net(s: &str) -> IpNet {
    crate::sanitise::parse_net(s).unwrap()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn temp_store(name: &str) -> (std::path::PathBuf, StateStore) {
    let dir = std::env::temp_dir().join(format!("apiban-engine-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = StateStore::open(&dir).unwrap();
    (dir, store)
}

fn settings(ttl_secs: u64) -> EngineSettings {
    EngineSettings {
        ttl: Duration::from_secs(ttl_secs),
        ..Default::default()
    }
}

#[test]
fn full_pull_then_incremental_then_reconciliation() {
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, settings(1000), 100).unwrap();
    e.begin_full_pull(100);
    let r = e.apiban_batch(
        &strings(&["1.1.1.1", "2.2.2.2", "10.0.0.1", "junk"]),
        "200".into(),
        100,
    );
    assert_eq!((r.received, r.accepted, r.applied.added), (4, 2, 2));
    assert_eq!(r.skipped[&Rejection::SpecialPurpose], 1);
    assert_eq!(r.skipped[&Rejection::Invalid], 1);
    // Protection grows with each batch, before the pull ends.
    assert_eq!(e.enforcer().deny.len(), 2);
    e.apiban_batch(&strings(&["3.3.3.3"]), "300".into(), 101);
    e.apiban_done(102);
    assert_eq!(e.apiban_cursor().next_id.as_deref(), Some("300"));
    assert_eq!(e.apiban_cursor().last_full_pull, Some(102));
    // Incremental: a new address.
    e.apiban_batch(&strings(&["4.4.4.4"]), "400".into(), 200);
    assert_eq!(e.apiban_cursor().next_id.as_deref(), Some("400"));
    // The next full pull no longer lists 1.1.1.1.
    e.begin_full_pull(300);
    e.apiban_batch(
        &strings(&["2.2.2.2", "3.3.3.3", "4.4.4.4"]),
        "500".into(),
        300,
    );
    assert!(
        e.enforcer().deny.contains(&net("1.1.1.1")),
        "still banned mid-pull"
    );
    let done = e.apiban_done(301);
    assert_eq!((done.reconciled, done.applied.removed), (1, 1));
    assert!(!e.enforcer().deny.contains(&net("1.1.1.1")));
    assert_eq!(e.enforcer().deny.len(), 3);
}

#[test]
fn an_empty_full_pull_does_not_empty_the_dataplane() {
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, settings(1000), 0).unwrap();
    e.apiban_batch(&strings(&["1.1.1.1"]), "200".into(), 0);
    e.begin_full_pull(10);
    let done = e.apiban_done(11);
    assert_eq!(done.reconciled, 0);
    assert_eq!(e.enforcer().deny.len(), 1);
}

#[test]
fn expiry_and_reactivation_with_an_injected_clock() {
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, settings(100), 0).unwrap();
    e.apiban_batch(&strings(&["1.1.1.1", "2.2.2.2"]), "2".into(), 0);
    e.apiban_batch(&strings(&["2.2.2.2"]), "3".into(), 60);
    assert_eq!(e.sweep(99).0, 0);
    let (expired, applied) = e.sweep(100);
    assert_eq!((expired, applied.removed), (1, 1));
    assert_eq!(e.enforcer().deny, BTreeSet::from([net("2.2.2.2")]));
    let r = e.apiban_batch(&strings(&["1.1.1.1"]), "4".into(), 150);
    assert_eq!((r.new, r.applied.added), (1, 1));
    assert_eq!(e.sweep(160).0, 1, "2.2.2.2 expires at 160");
    assert_eq!(e.enforcer().deny, BTreeSet::from([net("1.1.1.1")]));
}

#[test]
fn manual_bans_allows_and_the_allowlist() {
    let mut s = settings(100);
    s.allow = vec![net("5.5.0.0/16")];
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, s, 0).unwrap();
    assert!(e.enforcer().allow.contains(&net("5.5.0.0/16")));
    let r = e.apiban_batch(&strings(&["5.5.5.5", "6.6.6.6"]), "1".into(), 0);
    assert_eq!(r.skipped[&Rejection::Allowlisted], 1);
    // Manual bans take any prefix and survive the sweep without a TTL.
    e.ban(net("7.0.0.0/8"), None, Some("lab".into()), false, 0)
        .unwrap();
    assert!(e.ban(net("0.0.0.0/0"), None, None, true, 0).is_err());
    e.ban(
        net("8.8.8.8"),
        Some(Duration::from_secs(10)),
        None,
        false,
        0,
    )
    .unwrap();
    e.sweep(1000);
    assert_eq!(e.enforcer().deny, BTreeSet::from([net("7.0.0.0/8")]));
    // A manual allow pulls an already banned feed entry out of the maps.
    e.apiban_batch(&strings(&["6.6.6.6"]), "2".into(), 1000);
    e.allow_add(net("6.6.6.0/24"), 1000);
    assert!(!e.enforcer().deny.contains(&net("6.6.6.6")));
    assert!(e.enforcer().allow.contains(&net("6.6.6.0/24")));
    e.allow_remove(net("6.6.6.0/24"), 1001).unwrap();
    assert!(e.enforcer().deny.contains(&net("6.6.6.6")));
    assert!(
        e.allow_remove(net("5.5.0.0/16"), 1001).is_err(),
        "configured allows stay"
    );
    let (sources, applied) = e.unban(net("6.6.6.6"), 1002);
    assert_eq!((sources, applied.removed), (vec![SourceId::Apiban], 1));
}

#[test]
fn manual_bans_that_cut_the_host_off_or_do_nothing_are_refused() {
    let mut s = settings(100);
    s.allow = vec![net("192.0.2.0/24")];
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, s, 0).unwrap();
    e.set_own_addresses(vec!["203.0.113.5".parse().unwrap()], 0);
    let refused = |e: &mut Engine<MemoryEnforcer>, n: &str, force: bool| {
        e.ban(net(n), None, None, force, 0).unwrap_err().to_string()
    };
    assert!(refused(&mut e, "127.0.0.1", false).contains("loopback"));
    assert!(refused(&mut e, "::1", false).contains("loopback"));
    assert!(refused(&mut e, "127.0.0.0/4", false).contains("loopback"));
    let own = refused(&mut e, "203.0.113.0/24", false);
    assert!(
        own.contains("203.0.113.5, an address of this host"),
        "{own}"
    );
    assert!(own.contains("--force"), "{own}");
    let allowed = refused(&mut e, "192.0.2.7", false);
    assert!(
        allowed.contains("allowlist covers it (192.0.2.0/24)"),
        "{allowed}"
    );
    // Partly allowlisted is a real ban: the allowlist carves out its part.
    e.ban(net("192.0.0.0/16"), None, None, false, 0).unwrap();
    assert!(
        e.ban(
            net("1.2.3.4"),
            Some(Duration::from_millis(500)),
            None,
            false,
            0
        )
        .unwrap_err()
        .to_string()
        .contains("expires at once")
    );
    let long = "x".repeat(MAX_COMMENT_CHARS + 1);
    assert!(
        e.ban(net("1.2.3.4"), None, Some(long), false, 0)
            .unwrap_err()
            .to_string()
            .contains("at most 200")
    );
    e.ban(
        net("1.2.3.4"),
        None,
        Some("x".repeat(MAX_COMMENT_CHARS)),
        false,
        0,
    )
    .unwrap();
    // The operator insists.
    e.ban(net("203.0.113.0/24"), None, None, true, 0).unwrap();
    assert!(e.enforcer().deny.contains(&net("203.0.113.0/24")));
    assert!(refused(&mut e, "0.0.0.0/0", true).contains("whole address family"));
}

#[test]
fn a_full_map_is_counted_and_existing_bans_stay() {
    let enforcer = MemoryEnforcer {
        capacity: Some(3),
        ..Default::default()
    };
    let (mut e, _) = Engine::start(enforcer, None, settings(100), 0).unwrap();
    e.apiban_batch(&strings(&["1.1.1.1", "1.1.1.2"]), "1".into(), 0);
    let r = e.apiban_batch(&strings(&["1.1.1.3", "1.1.1.4", "1.1.1.5"]), "2".into(), 0);
    assert_eq!((r.applied.added, r.applied.not_enforced), (1, 2));
    assert_eq!(e.enforcer().deny.len(), 3);
    assert_eq!(e.counters().map_full, 1);
    // Room again after an unban: the same change enforces one that was waiting.
    let (_, applied) = e.unban(net("1.1.1.1"), 1);
    assert_eq!(
        (applied.removed, applied.added, applied.not_enforced),
        (1, 1, 1)
    );
    assert_eq!(e.enforcer().deny.len(), 3);
    assert!(!e.enforcer().deny.contains(&net("1.1.1.1")));
}

#[test]
fn restart_restores_before_any_request_and_resumes_the_pull() {
    let (dir, store) = temp_store("restart");
    let (mut e, _) =
        Engine::start(MemoryEnforcer::default(), Some(store), settings(1000), 0).unwrap();
    e.begin_full_pull(0);
    e.apiban_batch(&strings(&["1.1.1.1", "2a01:4f8::1"]), "250".into(), 0);
    e.ban(net("9.9.9.0/24"), None, Some("ops".into()), false, 0)
        .unwrap();
    e.allow_add(net("3.3.3.3"), 0);
    drop(e);
    // A new process: empty maps (a reboot), the state file only.
    let store = StateStore::open(&dir).unwrap();
    let (e, report) =
        Engine::start(MemoryEnforcer::default(), Some(store), settings(1000), 5).unwrap();
    assert_eq!(report.restored_entries, 3);
    assert_eq!(report.applied.added, 3);
    assert!(e.enforcer().allow.contains(&net("3.3.3.3")));
    let pull = e.apiban_cursor().full_pull.clone().unwrap();
    assert_eq!((pull.next_id.as_str(), pull.seen), ("250", 2));
    drop(e);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Maps that fill up and, read back, hold more than the engine put there.
#[derive(Default)]
struct CrowdedMaps {
    deny: BTreeSet<IpNet>,
}

impl Enforcer for CrowdedMaps {
    fn denied(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        Ok(self.deny.clone())
    }
    fn allowed(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        Ok(BTreeSet::new())
    }
    fn observed(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        Ok(BTreeSet::new())
    }
    fn mark(&mut self, _: &[IpNet], _: bool) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn deny(&mut self, nets: &[IpNet], _: bool) -> Result<(), DataplaneError> {
        // Half goes in, then the map is full; meanwhile a previous agent's program put
        // three entries of its own there.
        self.deny.extend(nets.iter().take(nets.len() / 2).copied());
        self.deny
            .extend(["9.9.9.1", "9.9.9.2", "9.9.9.3"].iter().map(|s| net(s)));
        Err(DataplaneError::MapFull {
            list: crate::dataplane::List::Deny,
            family: crate::dataplane::Family::V4,
            capacity: 4,
        })
    }
    fn undeny(&mut self, nets: &[IpNet]) -> Result<(), DataplaneError> {
        for n in nets {
            self.deny.remove(n);
        }
        Ok(())
    }
    fn allow(&mut self, _: IpNet) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn unallow(&mut self, _: IpNet) -> Result<(), DataplaneError> {
        Ok(())
    }
}

#[test]
fn a_full_map_holding_foreign_entries_does_not_break_the_count() {
    let (mut e, _) = Engine::start(CrowdedMaps::default(), None, settings(100), 0).unwrap();
    let r = e.apiban_batch(&strings(&["1.1.1.1", "1.1.1.2"]), "1".into(), 0);
    assert_eq!((r.applied.added, r.applied.not_enforced), (1, 1));
    assert_eq!(e.counters().map_full, 1);
}

#[test]
fn pinned_bans_without_state_are_kept_until_a_pull_settles_them() {
    let pinned = MemoryEnforcer {
        deny: BTreeSet::from([net("1.1.1.1"), net("2.2.2.2")]),
        ..Default::default()
    };
    let (mut e, report) = Engine::start(pinned, None, settings(1000), 50).unwrap();
    assert_eq!(report.applied.removed, 0);
    assert_eq!(e.enforcer().deny.len(), 2);
    e.begin_full_pull(50);
    e.apiban_batch(&strings(&["2.2.2.2"]), "9".into(), 50);
    e.apiban_done(51);
    assert_eq!(e.enforcer().deny, BTreeSet::from([net("2.2.2.2")]));
}

fn observing(sources: &[SourceId]) -> EngineSettings {
    EngineSettings {
        observe: sources.iter().cloned().collect(),
        ..settings(1000)
    }
}

#[test]
fn a_source_in_observe_mode_is_matched_not_enforced_until_it_is_switched() {
    let trial = SourceId::List("voipbl".into());
    let (mut e, _) = Engine::start(
        MemoryEnforcer::default(),
        None,
        observing(std::slice::from_ref(&trial)),
        10,
    )
    .unwrap();
    e.list_snapshot("voipbl", &["1.1.1.1", "5.5.5.0/24"], 10);
    e.apiban_batch(&strings(&["2.2.2.2", "1.1.1.1"]), "1".into(), 10);
    let dp = e.enforcer();
    assert_eq!(dp.deny.len(), 3);
    // 1.1.1.1 is APIBAN's too, and APIBAN enforces.
    assert_eq!(dp.observed, BTreeSet::from([net("5.5.5.0/24")]));
    assert_eq!(e.shared().observed.len(), 1);

    // Switched to enforce: the entry stays and only loses its mark; nothing is re-added.
    let applied = e.reconfigure(settings(1000), 11);
    assert_eq!(
        (applied.added, applied.removed, applied.switched),
        (0, 0, 1)
    );
    assert!(e.enforcer().observed.is_empty());
    assert_eq!(e.enforcer().deny.len(), 3);

    // And back: what APIBAN also bans keeps enforcing.
    let applied = e.reconfigure(observing(&[trial, SourceId::Apiban]), 12);
    assert_eq!(applied.switched, 3);
    assert_eq!(e.enforcer().observed.len(), 3);
}

#[test]
fn an_observed_entry_inside_an_enforced_prefix_enforces_so_the_wider_ban_holds() {
    let (mut e, _) = Engine::start(
        MemoryEnforcer::default(),
        None,
        observing(&[SourceId::Apiban]),
        10,
    )
    .unwrap();
    e.apiban_batch(&strings(&["7.7.7.7", "8.8.4.4"]), "1".into(), 10);
    e.list_snapshot("local", &["7.7.7.0/24"], 10);
    // The program stops at the /32: were it observed, 7.7.7.7 would pass despite the /24.
    assert_eq!(e.enforcer().observed, BTreeSet::from([net("8.8.4.4")]));
    // The /24 leaves the list: 7.7.7.7 observes again.
    e.list_snapshot("local", &["9.9.9.0/24"], 11);
    assert_eq!(
        e.enforcer().observed,
        BTreeSet::from([net("7.7.7.7"), net("8.8.4.4")])
    );
}

#[test]
fn four_ipv6_bans_of_one_source_in_a_64_ban_the_64_while_they_last() {
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, settings(100), 10).unwrap();
    let block = net("2a01:4f8:7::/64");
    e.apiban_batch(
        &strings(&["2a01:4f8:7::1", "2a01:4f8:7::2", "2a01:4f8:7::3"]),
        "1".into(),
        10,
    );
    assert!(!e.enforcer().deny.contains(&block), "three are not enough");
    // Another source's ban in the block does not count towards APIBAN's.
    e.list_snapshot("other", &["2a01:4f8:7::9"], 10);
    assert!(!e.enforcer().deny.contains(&block));
    e.apiban_batch(&strings(&["2a01:4f8:7::4"]), "2".into(), 50);
    assert!(
        e.enforcer().deny.contains(&block),
        "the fourth bans the /64"
    );
    let derived = e.shared().derived;
    assert_eq!(derived.len(), 1);
    assert_eq!(
        (derived[0].net, derived[0].from, derived[0].expires),
        (block, 4, Some(150)),
        "the longest remaining expiry"
    );
    // Three expire at 110: the block goes with them; the fourth stays.
    e.sweep(111);
    assert!(!e.enforcer().deny.contains(&block));
    assert!(e.enforcer().deny.contains(&net("2a01:4f8:7::4")));
    assert!(e.shared().derived.is_empty());
}

#[test]
fn escalation_yields_to_the_allowlist_this_host_and_its_off_switch() {
    let allowing = EngineSettings {
        allow: vec![net("2a01:4f8:8::/64")],
        ..settings(100)
    };
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, allowing, 10).unwrap();
    e.set_own_addresses(vec!["2a01:4f8:9::1".parse().unwrap()], 10);
    let hosts = |p: &str| -> Vec<String> { (11..=14).map(|i| format!("{p}::{i}")).collect() };
    e.apiban_batch(&hosts("2a01:4f8:8"), "1".into(), 10);
    e.apiban_batch(&hosts("2a01:4f8:9"), "2".into(), 10);
    // The allowlist wins twice: its hosts are refused, and so would be the block.
    assert!(
        !e.enforcer().deny.contains(&net("2a01:4f8:8::/64")),
        "allowlisted"
    );
    assert!(
        !e.enforcer().deny.contains(&net("2a01:4f8:9::/64")),
        "holds this host"
    );
    e.apiban_batch(&hosts("2a01:4f8:a"), "3".into(), 10);
    assert!(e.enforcer().deny.contains(&net("2a01:4f8:a::/64")));
    let off = EngineSettings {
        v6_escalation_threshold: 0,
        ..settings(100)
    };
    e.reconfigure(off, 11);
    assert!(!e.enforcer().deny.contains(&net("2a01:4f8:a::/64")), "off");
}

#[test]
fn only_unforgeable_detection_bans_escalate_to_a_block() {
    // Four of one /64 banned on requests alone: each rests on what someone forging
    // addresses could have sent from another network's /64, so the block stays open. Four
    // banned on the server's answers (auth-failure) widen as a feed's would.
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, settings(100), 10).unwrap();
    for (block, unforgeable) in [("2a01:4f8:b", false), ("2a01:4f8:c", true)] {
        for i in 11..=14 {
            let evidence = crate::ledger::Evidence {
                rule: if unforgeable {
                    "auth-failure"
                } else {
                    "scanner-user-agent"
                }
                .into(),
                counts: "what the rule counted".into(),
                line: "User-Agent: friendly-scanner".into(),
                at: 10,
                offence: 1,
                unforgeable,
            };
            let addr = format!("{block}::{i}").parse().unwrap();
            e.detected(addr, std::time::Duration::from_secs(600), evidence, 10)
                .unwrap();
        }
    }
    assert!(e.enforcer().deny.contains(&net("2a01:4f8:b::14")));
    assert!(!e.enforcer().deny.contains(&net("2a01:4f8:b::/64")));
    assert!(e.enforcer().deny.contains(&net("2a01:4f8:c::/64")));
    assert_eq!(e.shared().derived.len(), 1);
}

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

/// A comment reaches an operator's terminal in `list` and `check`: control characters
/// (escape sequences, BEL) are refused from every source that makes one.
#[test]
fn a_comment_with_control_characters_is_refused() {
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, settings(100), 10).unwrap();
    let esc = Some("\u{1b}]0;pwned\u{7}".to_owned());
    let manual = e.ban(net("45.3.3.3/32"), None, esc.clone(), false, 11);
    assert!(
        manual
            .unwrap_err()
            .to_string()
            .contains("control character"),
        "the CLI's ban"
    );
    let api = e.api_ban(net("45.3.3.4/32"), Duration::from_secs(60), esc, 11);
    assert!(api.unwrap_err().to_string().contains("control character"));
    e.ban(
        net("45.3.3.5/32"),
        None,
        Some("ordinary: ÄÖ ✓".into()),
        false,
        11,
    )
    .unwrap();
}

/// A batch of ban API calls is applied to the dataplane and saved once, at its end: a
/// flood of calls costs one diff and one save per batch, not per call.
#[test]
fn a_batch_of_api_bans_is_applied_and_saved_once() {
    let (dir, store) = temp_store("api-batch");
    let (mut e, _) =
        Engine::start(MemoryEnforcer::default(), Some(store), settings(100), 10).unwrap();
    let saves = e.shared().counters.saves;
    e.begin_batch();
    for k in 1..=3 {
        let applied = e
            .api_ban(
                net(&format!("45.4.4.{k}/32")),
                Duration::from_secs(60),
                None,
                11,
            )
            .unwrap();
        assert!(applied.batched);
    }
    assert!(
        e.enforcer().deny.is_empty(),
        "nothing applied before the batch ends"
    );
    let applied = e.end_batch(11);
    assert_eq!(applied.added, 3);
    assert_eq!(e.enforcer().deny.len(), 3);
    assert_eq!(
        e.shared().counters.saves,
        saves + 1,
        "one save for the batch"
    );
    // Outside a batch, each change applies and saves at once again.
    e.api_ban(net("45.4.4.9/32"), Duration::from_secs(60), None, 12)
        .unwrap();
    assert_eq!(e.enforcer().deny.len(), 4);
    assert_eq!(e.shared().counters.saves, saves + 2);
    let _ = std::fs::remove_dir_all(dir);
}
