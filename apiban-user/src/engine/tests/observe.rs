//! Sources on trial (observe mode) and the blocks derived from many bans (IPv6 escalation).

use super::*;

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
