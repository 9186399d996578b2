use super::*;

fn net(s: &str) -> IpNet {
    crate::sanitise::parse_net(s).unwrap()
}

const DAY: u64 = 86_400;

#[test]
fn seen_again_extends_expiry_and_sweep_removes_the_rest() {
    let mut l = Ledger::new();
    let src = SourceId::Apiban;
    assert!(l.observe(net("1.1.1.1"), &src, 1000, Some(7 * DAY), None));
    assert!(l.observe(net("2.2.2.2"), &src, 1000, Some(7 * DAY), None));
    assert!(!l.observe(net("1.1.1.1"), &src, 1000 + 3 * DAY, Some(7 * DAY), None));
    let r = l.record(&net("1.1.1.1"), &src).unwrap();
    assert_eq!(
        (r.first_seen, r.last_seen, r.expires),
        (1000, 1000 + 3 * DAY, Some(1000 + 10 * DAY))
    );

    let at = 1000 + 8 * DAY;
    assert_eq!(
        l.desired(at, &AllowList::default()),
        BTreeSet::from([net("1.1.1.1")])
    );
    assert_eq!(l.sweep(at), 1);
    assert!(l.get(&net("2.2.2.2")).is_none());
    // Reactivation after expiry starts a new record.
    assert!(l.observe(net("2.2.2.2"), &src, at, Some(7 * DAY), None));
    assert_eq!(l.record(&net("2.2.2.2"), &src).unwrap().first_seen, at);
}

#[test]
fn a_prefix_stays_banned_while_any_source_holds_it() {
    let mut l = Ledger::new();
    let list = SourceId::List("voipbl".into());
    l.observe(net("3.3.3.3"), &SourceId::Apiban, 10, Some(100), None);
    l.observe(net("3.3.3.3"), &list, 10, Some(1000), None);
    assert_eq!(l.sweep(200), 1);
    assert!(
        l.desired(200, &AllowList::default())
            .contains(&net("3.3.3.3"))
    );
    assert!(l.remove(&net("3.3.3.3"), &list));
    assert!(l.desired(200, &AllowList::default()).is_empty());
    assert!(l.is_empty());
}

#[test]
fn reconcile_removes_only_what_left_that_sources_list() {
    let mut l = Ledger::new();
    let list = SourceId::List("x".into());
    l.observe(net("4.4.4.4"), &SourceId::Apiban, 10, Some(DAY), None);
    l.observe(net("5.5.5.5"), &SourceId::Apiban, 10, Some(DAY), None);
    l.observe(net("6.6.6.6"), &list, 10, Some(DAY), None);
    // A full pull starts at 50 and sees only 5.5.5.5.
    l.observe(net("5.5.5.5"), &SourceId::Apiban, 50, Some(DAY), None);
    assert_eq!(l.reconcile(&SourceId::Apiban, 50), 1);
    let d = l.desired(60, &AllowList::default());
    assert_eq!(d, BTreeSet::from([net("5.5.5.5"), net("6.6.6.6")]));
}

#[test]
fn allowlist_beats_remote_bans_not_manual_ones() {
    let mut l = Ledger::new();
    l.observe(net("7.7.7.7"), &SourceId::Apiban, 0, Some(DAY), None);
    l.observe(
        net("8.8.8.0/24"),
        &SourceId::Manual,
        0,
        None,
        Some("lab".into()),
    );
    let allow = AllowList::new([net("7.7.0.0/16"), net("8.8.8.8")]);
    assert_eq!(l.desired(1, &allow), BTreeSet::from([net("8.8.8.0/24")]));
    assert_eq!(
        l.longest_match("8.8.8.9".parse().unwrap()).unwrap().0,
        &net("8.8.8.0/24")
    );
}

#[test]
fn diff_is_adds_and_removes_only() {
    let applied = BTreeSet::from([net("1.0.0.1"), net("1.0.0.2")]);
    let desired = BTreeSet::from([net("1.0.0.2"), net("1.0.0.3")]);
    let d = Diff::between(&applied, &desired);
    assert_eq!(d.add, vec![net("1.0.0.3")]);
    assert_eq!(d.remove, vec![net("1.0.0.1")]);
    assert!(Diff::between(&desired, &desired).is_empty());
}

#[test]
fn source_names_round_trip() {
    for s in [
        SourceId::Apiban,
        SourceId::Manual,
        SourceId::List("voipbl".into()),
    ] {
        assert_eq!(s.to_string().parse::<SourceId>(), Ok(s));
    }
    assert!("list:".parse::<SourceId>().is_err());
    assert!("nope".parse::<SourceId>().is_err());
}

/// The counts kept as records come and go equal a count over the records.
#[test]
fn counts_follow_every_way_records_come_and_go() {
    let recount = |l: &Ledger| {
        let mut out = BTreeMap::new();
        for (net, records) in l.iter() {
            for (source, _) in records {
                *out.entry((source.clone(), matches!(net, IpNet::V6(_))))
                    .or_default() += 1;
            }
        }
        out
    };
    let list = SourceId::List("voip".into());
    let mut l = Ledger::new();
    for i in 0..50u32 {
        let v4 = net(&format!("192.0.2.{i}"));
        let v6 = net(&format!("2001:db8::{i:x}"));
        l.observe(v4, &SourceId::Apiban, 100, Some(DAY), None);
        l.observe(v6, &list, 100 + u64::from(i), Some(u64::from(i)), None);
        if i % 3 == 0 {
            l.observe(v4, &list, 100, None, None);
            l.observe(v4, &list, 200, None, None);
        }
    }
    l.insert_record(
        net("198.51.100.0/24"),
        SourceId::Manual,
        Record {
            first_seen: 1,
            last_seen: 1,
            expires: None,
            comment: None,
            evidence: None,
        },
    );
    assert_eq!(*l.counts(), recount(&l));
    assert_eq!(l.counts()[&(SourceId::Apiban, false)], 50);
    l.remove(&net("192.0.2.3"), &list);
    l.remove(&net("192.0.2.3"), &list);
    assert_eq!(*l.counts(), recount(&l));
    l.sweep(125);
    assert_eq!(*l.counts(), recount(&l));
    l.reconcile(&SourceId::Apiban, 150);
    assert_eq!(*l.counts(), recount(&l));
    l.remove_where(|n, _| n.prefix_len() == 24);
    assert_eq!(*l.counts(), recount(&l));
    l.remove_source(&list);
    assert!(l.counts().is_empty() && l.is_empty(), "{:?}", l.counts());
}

#[test]
fn longest_match_is_the_most_specific_covering_prefix() {
    fn found(l: &Ledger, a: &str) -> Option<String> {
        l.longest_match(a.parse().unwrap())
            .map(|(n, _)| n.to_string())
    }
    let mut l = Ledger::new();
    for n in ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3", "2001:db8::/32"] {
        l.observe(net(n), &SourceId::Manual, 1, None, None);
    }
    assert_eq!(found(&l, "10.1.2.3").as_deref(), Some("10.1.2.3/32"));
    assert_eq!(found(&l, "10.1.2.4").as_deref(), Some("10.1.0.0/16"));
    assert_eq!(found(&l, "10.2.0.1").as_deref(), Some("10.0.0.0/8"));
    assert_eq!(found(&l, "2001:db8::1").as_deref(), Some("2001:db8::/32"));
    assert_eq!(found(&l, "192.0.2.1"), None);
    // A key written untruncated (an edited state file) is stored truncated.
    l.insert_record(
        "172.16.9.9/12".parse().unwrap(),
        SourceId::Manual,
        Record {
            first_seen: 1,
            last_seen: 1,
            expires: None,
            comment: None,
            evidence: None,
        },
    );
    assert_eq!(found(&l, "172.20.0.1").as_deref(), Some("172.16.0.0/12"));
}
