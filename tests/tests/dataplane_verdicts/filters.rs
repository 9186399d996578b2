//! The filters and host tables in front of the tries: none ever hides an entry.

use super::*;

/// The bitmap in front of the deny maps answers "not banned" without a lookup, so a bit
/// cleared while an entry still needs it would let a banned source through. Every way an entry
/// comes and goes is checked against real verdicts, along with the bits themselves.
#[test]
fn the_deny_filter_never_hides_a_ban() {
    let mut h = Harness::new();
    assert!(
        !h.filtered_in("203.0.113.7"),
        "an empty filter passes everything"
    );

    // Two hosts in one /24 share a bit: removing one keeps it for the other.
    h.deny("203.0.113.7/32");
    h.deny("203.0.113.9/32");
    assert!(h.drops("203.0.113.7") && h.drops("203.0.113.9"));
    assert!(
        !h.drops("203.0.113.8"),
        "same /24, not banned: full lookup, passes"
    );
    assert!(
        !h.filtered_in("203.0.114.7"),
        "a neighbouring /24 stays clear"
    );
    h.undeny("203.0.113.7/32");
    assert!(!h.drops("203.0.113.7"));
    assert!(
        h.drops("203.0.113.9"),
        "the other host in the /24 keeps its bit"
    );
    h.undeny("203.0.113.9/32");
    assert!(
        !h.filtered_in("203.0.113.9"),
        "the last entry gone clears the bit"
    );

    // A /20 spans 16 /24s; a /8 is wider than the filter spells out and sets every bit.
    h.deny("198.51.96.0/20");
    for third in [96, 100, 111] {
        assert!(
            h.drops(&format!("198.51.{third}.200")),
            "198.51.{third}.200"
        );
    }
    assert!(!h.filtered_in("198.51.112.1") && !h.filtered_in("198.51.95.1"));
    h.deny("10.0.0.0/8");
    assert!(h.drops("10.200.3.4"));
    assert!(
        h.filtered_in("192.0.2.77"),
        "a wide entry saturates the filter"
    );
    assert!(!h.drops("192.0.2.77"), "which only costs lookups");
    h.undeny("10.0.0.0/8");
    assert!(
        !h.filtered_in("192.0.2.77"),
        "saturation ends with the wide entry"
    );
    assert!(!h.drops("10.200.3.4"));
    assert!(h.drops("198.51.100.1"), "the /20 keeps its bits through it");
    h.undeny("198.51.96.0/20");
    assert!(!h.filtered_in("198.51.100.1"));

    // IPv6: hosts and /48s are hashed by their /48; a /40 spans 256 of them.
    h.deny("2001:db8:ff00::/40");
    h.deny("2001:db8:1:2::66/128");
    assert!(h.drops("2001:db8:ff12:1::5") && h.drops("2001:db8:ffff:ffff::1"));
    assert!(h.drops("2001:db8:1:2::66") && !h.drops("2001:db8:1:2::67"));
    h.undeny("2001:db8:ff00::/40");
    assert!(!h.drops("2001:db8:ff12:1::5"));
    assert!(!h.filtered_in("2001:db8:ff12:1::5"));
    assert!(h.drops("2001:db8:1:2::66"));
    h.deny("2001:db8::/16");
    assert!(h.filtered_in("2a00:1450::1"), "wider than /32 saturates");
    h.undeny("2001:db8::/16");
    assert!(!h.filtered_in("2a00:1450::1"));
    assert!(h.drops("2001:db8:1:2::66"));

    // Batches: each host in its own /24, half of them removed again.
    let hosts: Vec<IpNet> = (0..2000u32)
        .map(|i| IpNet::new(IpAddr::V4((0x2d00_0000 + (i << 8) + 5).into()), 32).expect("net"))
        .collect();
    let added = h.loaded.dataplane.deny_batch(&hosts, false).expect("batch");
    assert_eq!(added, hosts.len());
    h.loaded
        .dataplane
        .undeny_batch(&hosts[..1000])
        .expect("batch delete");
    for n in hosts[..1000].iter().step_by(37) {
        assert!(!h.filtered_in(&n.addr().to_string()), "{n} removed");
    }
    for n in hosts[1000..].iter().step_by(37) {
        assert!(h.drops(&n.addr().to_string()), "{n} still banned");
    }

    // A restarted agent recounts from the pinned maps: nothing it did not add is lost.
    h = h.reload();
    assert!(h.loaded.adopted());
    assert!(h.drops("2001:db8:1:2::66"));
    h.loaded
        .dataplane
        .undeny_batch(&hosts[1000..1500])
        .expect("delete after reload");
    assert!(!h.filtered_in(&hosts[1000].addr().to_string()));
    assert!(h.drops(&hosts[1500].addr().to_string()));

    // An upgrade from a version without the filter: its maps are new and empty, and are
    // filled from the deny maps before the program can use them.
    for name in [
        apiban_common::map_names::DENY_V4_FILTER,
        apiban_common::map_names::DENY_V6_FILTER,
    ] {
        std::fs::remove_file(h.dir.path.join(name)).expect("remove the filter pin");
    }
    h = h.reload();
    assert!(h.drops(&hosts[1999].addr().to_string()));
    assert!(h.drops("2001:db8:1:2::66"));
    assert!(!h.filtered_in(&hosts[0].addr().to_string()));
}

/// IPv4 addresses (as prefixes) whose home bucket in a host table of `buckets` is `home`.
fn same_home(buckets: u32, home: u32, count: usize) -> Vec<String> {
    use apiban_common::host_table;
    (0x0b00_0001u32..)
        .map(std::net::Ipv4Addr::from)
        .filter(|a| {
            let hash = host_table::v4_hash(u32::from_ne_bytes(a.octets()));
            host_table::home(hash, buckets) == home
        })
        .take(count)
        .map(|a| format!("{a}/32"))
        .collect()
}

/// A host whose probe window is full goes to the trie, where the program still finds it; a
/// freed slot takes the next host and starts it from zero hits.
#[test]
fn the_host_table_overflows_into_the_trie_and_reuses_slots_clean() {
    use apiban_common::host_table;
    let mut h = Harness::with_capacities(Capacities {
        deny_v4: 1_000,
        ..Capacities::default()
    });
    let buckets = h.loaded.dataplane.deny_v4().host_buckets();
    assert_eq!(buckets, host_table::buckets(1_000, host_table::V4_SLOTS));
    let window = (host_table::PROBE_BUCKETS * host_table::V4_SLOTS) as usize;
    let hosts = same_home(buckets, 7, window + 1);
    for n in &hosts {
        h.deny(n);
    }
    let dp = &h.loaded.dataplane;
    assert_eq!(dp.deny_v4().hosts_in_table(), window, "the window is full");
    assert_eq!(
        dp.deny_v4().count(),
        window + 1,
        "one host went to the trie"
    );
    let overflowed = &hosts[window];
    for n in &hosts {
        assert!(h.drops(n.trim_end_matches("/32")), "{n} dropped");
    }
    assert!(
        h.loaded
            .dataplane
            .is_denied(net(overflowed))
            .expect("contains")
    );
    let hits_of = |h: &Harness, n: &str| {
        h.loaded
            .dataplane
            .deny_match(net(n).addr())
            .expect("match")
            .map(|m| (m.net, m.entry.hits))
    };
    assert_eq!(hits_of(&h, overflowed), Some((net(overflowed), 1)));

    // Hit a table host, free its slot, and refill the window: the overflowed host's
    // replacement must not inherit the hits.
    let first = &hosts[0];
    for _ in 0..2 {
        assert!(h.drops(first.trim_end_matches("/32")));
    }
    assert_eq!(hits_of(&h, first), Some((net(first), 3)));
    h.undeny(first);
    h.undeny(overflowed);
    assert!(!h.drops(first.trim_end_matches("/32")));
    assert!(!h.drops(overflowed.trim_end_matches("/32")));
    assert_eq!(h.loaded.dataplane.deny_v4().count(), window - 1);
    h.deny(overflowed);
    assert_eq!(
        h.loaded.dataplane.deny_v4().hosts_in_table(),
        window,
        "the freed slot takes the next host"
    );
    assert_eq!(hits_of(&h, overflowed), Some((net(overflowed), 0)));
    assert!(h.drops(overflowed.trim_end_matches("/32")));

    // Batches and a restart see the same placement.
    let more = same_home(buckets, 40, 70);
    let more: Vec<IpNet> = more.iter().map(|n| net(n)).collect();
    assert_eq!(
        h.loaded.dataplane.deny_batch(&more, false).expect("batch"),
        70
    );
    h = h.reload();
    let dp = &h.loaded.dataplane;
    assert_eq!(dp.deny_v4().count(), window + 70);
    assert_eq!(dp.deny_v4().hosts_in_table(), 2 * window);
    assert_eq!(h.loaded.dataplane.undeny_batch(&more).expect("batch"), 70);
    for n in more.iter().step_by(9) {
        assert!(!h.drops(&n.addr().to_string()), "{n} removed");
    }
    assert!(h.drops(overflowed.trim_end_matches("/32")));
}

/// The allow trie has a filter of its own: a bit cleared while an allow entry still needs it
/// would drop a source the operator allowed.
#[test]
fn the_allow_filter_never_hides_an_allow_entry() {
    let mut h = Harness::new();
    let allow_bit = |h: &Harness, src: &str| {
        let dp = &h.loaded.dataplane;
        match ip(src) {
            IpAddr::V4(a) => dp
                .allow_v4()
                .filter()
                .may_cover(a.octets())
                .expect("filter"),
            IpAddr::V6(a) => dp
                .allow_v6()
                .filter()
                .may_cover(a.octets())
                .expect("filter"),
        }
    };
    let allow = |h: &mut Harness, n: &str| h.loaded.dataplane.allow(net(n)).expect("allow");
    let unallow = |h: &mut Harness, n: &str| h.loaded.dataplane.unallow(net(n)).expect("unallow");

    h.deny("198.51.100.0/24");
    h.deny("2001:db8:bad::/48");
    assert!(
        !allow_bit(&h, "198.51.100.10"),
        "an empty allowlist sets no bits"
    );
    let listed = |h: &Harness| {
        let flags = h.loaded.dataplane.config().expect("config").flags;
        (
            flags & DataplaneConfig::ALLOW_V4_LISTED != 0,
            flags & DataplaneConfig::ALLOW_V6_LISTED != 0,
        )
    };
    assert_eq!(listed(&h), (false, false));
    allow(&mut h, "198.51.100.10/32");
    allow(&mut h, "198.51.100.20/32");
    allow(&mut h, "2001:db8:bad::1/128");
    assert!(!h.drops("198.51.100.10") && !h.drops("198.51.100.20"));
    assert!(h.drops("198.51.100.11"), "same block, not allowed");
    assert!(!h.drops("2001:db8:bad::1") && h.drops("2001:db8:bad::2"));
    assert_eq!(listed(&h), (true, true));
    unallow(&mut h, "198.51.100.10/32");
    assert!(h.drops("198.51.100.10"));
    assert!(
        allow_bit(&h, "198.51.100.10"),
        "the other entry keeps the block's bit"
    );
    assert!(!h.drops("198.51.100.20"));

    // A /8 is wider than the filter spells out: it sets every bit while listed.
    h.deny("10.1.2.3/32");
    allow(&mut h, "10.0.0.0/8");
    assert!(!h.drops("10.1.2.3"));
    assert!(
        allow_bit(&h, "192.0.2.1"),
        "a wide entry saturates the filter"
    );
    unallow(&mut h, "10.0.0.0/8");
    assert!(h.drops("10.1.2.3"));
    assert!(
        !allow_bit(&h, "192.0.2.1"),
        "saturation ends with the wide entry"
    );
    assert!(!h.drops("198.51.100.20"));

    // A restart recounts; an upgrade from a version without the allow filter refills it.
    h = h.reload();
    unallow(&mut h, "198.51.100.20/32");
    assert!(h.drops("198.51.100.20"));
    assert!(!allow_bit(&h, "198.51.100.20"));
    assert_eq!(
        listed(&h),
        (false, true),
        "the last IPv4 entry clears its switch"
    );
    // A version without the switches left them clear over a non-empty allowlist.
    h.loaded
        .dataplane
        .set_flag(DataplaneConfig::ALLOW_V6_LISTED, false)
        .expect("clear the switch");
    assert!(
        h.drops("2001:db8:bad::1"),
        "the switch gates the allow lookup"
    );
    for name in [
        apiban_common::map_names::ALLOW_V4_FILTER,
        apiban_common::map_names::ALLOW_V6_FILTER,
    ] {
        std::fs::remove_file(h.dir.path.join(name)).expect("remove the filter pin");
    }
    h = h.reload();
    assert!(
        !h.drops("2001:db8:bad::1"),
        "still allowed after the upgrade"
    );
    assert!(h.drops("2001:db8:bad::2"));
}
