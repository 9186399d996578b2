//! Hit bookkeeping and observe mode: what a drop records on its entry, and entries that
//! only observe.

use super::*;

/// A flood on one CPU: every hit up to `EXACT_HITS_PER_TICK` in a tick is recorded, then one
/// in `SAMPLED_HIT_EVERY`, counting for all of them; the verdict counters stay exact.
#[test]
fn hits_are_exact_at_a_readable_pace_and_sampled_in_a_flood() {
    use apiban_common::{EXACT_HITS_PER_TICK, SAMPLED_HIT_EVERY};
    use aya::programs::TestRun as _;
    let mut h = Harness::with_test_lists();
    let frame = Frame::udp(ip("203.0.113.7"), ip("192.0.2.1"), 5060).build();
    let dropped = |h: &Harness| {
        h.loaded
            .dataplane
            .stats()
            .expect("stats")
            .get(Verdict::Dropped)
            .packets
    };
    let before = dropped(&h);
    let run = |h: &mut Harness, repeat: u32| {
        let prog: &mut aya::programs::Xdp = h
            .loaded
            .ebpf_mut()
            .program_mut(apiban_common::program_names::APIBAN)
            .expect("the program")
            .try_into()
            .expect("XDP");
        let mut opts = aya::programs::TestRunOptions::new();
        opts.data_in = Some(&frame);
        opts.repeat = repeat;
        prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    };
    let hits = |h: &Harness| {
        h.loaded
            .dataplane
            .deny_hits()
            .expect("hits")
            .into_iter()
            .find(|e| e.net == net("203.0.113.7/32"))
            .expect("the host")
            .entry
            .hits
    };
    // A handful, as a scanner sends them: every one.
    run(&mut h, 40);
    assert_eq!(hits(&h), 40);
    // A flood in one call, far past a tick's exact hits: within one sample of the truth.
    let flood = 200_000u32;
    run(&mut h, flood);
    let counted = hits(&h);
    let truth = 40 + u64::from(flood);
    assert!(
        counted.abs_diff(truth) < u64::from(SAMPLED_HIT_EVERY),
        "{counted} hits for {truth} packets"
    );
    assert!(u64::from(EXACT_HITS_PER_TICK) < truth);
    assert_eq!(
        dropped(&h) - before,
        truth,
        "the verdict counters count every packet"
    );
}

#[test]
fn drops_record_hits_on_the_matching_entry() {
    let mut h = Harness::with_test_lists();
    let dst = ip("192.0.2.1");
    for _ in 0..3 {
        h.expect(
            "host",
            &Frame::udp(ip("203.0.113.7"), dst, 5060).build(),
            Verdict::Dropped,
        );
    }
    h.expect(
        "in /24",
        &Frame::udp(ip("198.51.100.1"), dst, 5060).build(),
        Verdict::Dropped,
    );
    h.expect(
        "allowed",
        &Frame::udp(ip("198.51.100.10"), dst, 5060).build(),
        Verdict::Allowed,
    );

    let hits = |h: &Harness, n: &str| {
        h.loaded
            .dataplane
            .deny_hits()
            .expect("hits")
            .into_iter()
            .find(|e| e.net == net(n))
            .unwrap_or_else(|| panic!("{n} is in the deny map"))
            .entry
    };
    let host = hits(&h, "203.0.113.7/32");
    assert_eq!(host.hits, 3);
    assert!(host.last_hit_ns > 0, "last hit time recorded");
    assert_eq!(
        hits(&h, "198.51.100.0/24").hits,
        1,
        "allowlisted packets are not hits"
    );
    assert_eq!(hits(&h, "2001:db8::66/128").hits, 0);
    assert_eq!(hits(&h, "2001:db8::66/128").last_hit_ns, 0);

    // Re-adding an entry that is already there keeps its counters.
    h.loaded
        .dataplane
        .deny(net("203.0.113.7/32"))
        .expect("deny again");
    assert_eq!(hits(&h, "203.0.113.7/32").hits, 3);

    h.loaded
        .dataplane
        .set_flag(DataplaneConfig::NO_HIT_TRACKING, true)
        .expect("flag");
    h.expect(
        "untracked",
        &Frame::udp(ip("203.0.113.7"), dst, 5060).build(),
        Verdict::Dropped,
    );
    assert_eq!(
        hits(&h, "203.0.113.7/32").hits,
        3,
        "hit tracking switched off"
    );
}

#[test]
fn observed_entries_pass_counted_and_switch_in_place_both_ways() {
    let mut h = Harness::with_test_lists();
    let dp = &mut h.loaded.dataplane;
    let trial = [
        net("192.0.2.77/32"),
        net("203.0.112.0/24"),
        net("2001:db8::77/128"),
        net("2001:db8:77::/48"),
        // Inside the allowlist's 198.51.100.128/25: the allowlist still wins.
        net("198.51.100.200/32"),
    ];
    dp.deny_batch(&trial, true).expect("observed bans");
    assert_ne!(
        dp.config().expect("config").flags & DataplaneConfig::OBSERVED_LISTED,
        0,
        "the program reads the mark"
    );
    let hits = |h: &Harness, n: &str| {
        h.loaded
            .dataplane
            .deny_hits()
            .expect("hits")
            .into_iter()
            .find(|e| e.net == net(n))
            .unwrap_or_else(|| panic!("{n} is in the deny map"))
    };
    let cases = [
        ("observed v4 host", "192.0.2.77", "192.0.2.77/32"),
        ("observed v4 prefix", "203.0.112.9", "203.0.112.0/24"),
        ("observed v6 host", "2001:db8::77", "2001:db8::77/128"),
        ("observed v6 prefix", "2001:db8:77::5", "2001:db8:77::/48"),
    ];
    for (case, src, entry) in cases {
        let dst = if src.contains(':') {
            "2001:db8::1"
        } else {
            "192.0.2.1"
        };
        let frame = Frame::udp(ip(src), ip(dst), 5060).build();
        h.expect(case, &frame, Verdict::Observed);
        let e = hits(&h, entry);
        assert!(e.observed, "{case}: marked");
        assert_eq!(e.entry.hits, 1, "{case}: the count leaves the mark out");
        assert_eq!(
            h.loaded.dataplane.verdict_for(ip(src)).expect("verdict").0,
            Verdict::Observed,
            "{case}: what check reports"
        );
    }
    h.expect(
        "allowlisted, observed",
        &Frame::udp(ip("198.51.100.200"), ip("192.0.2.1"), 5060).build(),
        Verdict::Allowed,
    );
    // Enforced entries beside them still drop.
    h.expect(
        "enforced host",
        &Frame::udp(ip("203.0.113.7"), ip("192.0.2.1"), 5060).build(),
        Verdict::Dropped,
    );

    // Observe -> enforce, in place: the next packet drops, the count goes on.
    h.loaded
        .dataplane
        .mark_batch(&trial, false)
        .expect("enforce");
    for (case, src, entry) in cases {
        let dst = if src.contains(':') {
            "2001:db8::1"
        } else {
            "192.0.2.1"
        };
        let frame = Frame::udp(ip(src), ip(dst), 5060).build();
        h.expect(case, &frame, Verdict::Dropped);
        let e = hits(&h, entry);
        assert!(!e.observed, "{case}: unmarked");
        assert_eq!(e.entry.hits, 2, "{case}: the count survived the switch");
    }
    // And back.
    h.loaded
        .dataplane
        .mark_batch(&trial[..1], true)
        .expect("observe");
    h.expect(
        "observed again",
        &Frame::udp(ip("192.0.2.77"), ip("192.0.2.1"), 5060).build(),
        Verdict::Observed,
    );
    // With the switch off the mark is not read: what the owner does once nothing observes.
    h.loaded.dataplane.set_observing(false).expect("switch");
    h.expect(
        "switch off",
        &Frame::udp(ip("192.0.2.77"), ip("192.0.2.1"), 5060).build(),
        Verdict::Dropped,
    );
    // A removed observed host leaves a clean slot: a new ban there enforces.
    h.loaded.dataplane.set_observing(true).expect("switch");
    h.undeny("192.0.2.77/32");
    h.deny("192.0.2.77/32");
    h.expect(
        "re-banned, enforcing",
        &Frame::udp(ip("192.0.2.77"), ip("192.0.2.1"), 5060).build(),
        Verdict::Dropped,
    );
}
