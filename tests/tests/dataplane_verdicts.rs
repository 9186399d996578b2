//! The XDP program's verdicts, run through BPF_PROG_TEST_RUN on frames built byte by byte,
//! with the per-verdict counters and per-entry hits checked after every frame.

use std::{collections::BTreeSet, net::IpAddr};

use apiban::dataplane::{
    Scope,
    loader::{self, Capacities, LoadOptions, Loaded},
};
use apiban_common::{DataplaneConfig, Verdict};
use ipnet::IpNet;
use tests::{
    BpffsDir,
    frame::{Frame, PROTO_ICMP, PROTO_UDP, TPID_8021AD, TPID_8021Q, udp},
    require_root,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test prefix")
}

/// A loaded program with a test deny/allow set, in its own bpffs directory.
struct Harness {
    loaded: Loaded,
    dir: BpffsDir,
    capacities: Capacities,
}

impl Harness {
    fn new() -> Self {
        Self::with_capacities(Capacities::default())
    }

    fn with_capacities(capacities: Capacities) -> Self {
        require_root();
        let dir = BpffsDir::new();
        let loaded = loader::load(&LoadOptions {
            bpffs_dir: dir.path.clone(),
            capacities,
            ..Default::default()
        })
        .expect("load the XDP program");
        Self {
            loaded,
            dir,
            capacities,
        }
    }

    fn with_test_lists() -> Self {
        let mut h = Self::new();
        let dp = &mut h.loaded.dataplane;
        for n in [
            "203.0.113.7/32",
            "198.51.100.0/24",
            "2001:db8::66/128",
            "2001:db8:bad::/48",
        ] {
            dp.deny(net(n)).expect("deny");
        }
        for n in [
            "198.51.100.10/32",
            "198.51.100.128/25",
            "2001:db8:bad::1/128",
        ] {
            dp.allow(net(n)).expect("allow");
        }
        h
    }

    /// What a restarted agent does: load again over the same pins, after the old agent has
    /// gone (it holds the bpffs directory's lock).
    fn reload(self) -> Self {
        let Self {
            loaded,
            dir,
            capacities,
        } = self;
        drop(loaded);
        let loaded = loader::load(&LoadOptions {
            bpffs_dir: dir.path.clone(),
            capacities,
            ..Default::default()
        })
        .expect("load over the pins");
        Self {
            loaded,
            dir,
            capacities,
        }
    }

    fn deny(&mut self, prefix: &str) {
        self.loaded.dataplane.deny(net(prefix)).expect("deny");
    }

    fn undeny(&mut self, prefix: &str) {
        self.loaded.dataplane.undeny(net(prefix)).expect("undeny");
    }

    /// Whether a UDP datagram from `src` is dropped.
    fn drops(&mut self, src: &str) -> bool {
        let dst = if src.contains(':') {
            "2001:db8::1"
        } else {
            "192.0.2.1"
        };
        let frame = Frame::udp(ip(src), ip(dst), 5060).build();
        self.run(&frame) == XDP_DROP
    }

    /// Whether the deny filter sends a packet from `src` on to the deny maps.
    fn filtered_in(&self, src: &str) -> bool {
        let dp = &self.loaded.dataplane;
        match ip(src) {
            IpAddr::V4(a) => dp.deny_v4().filter().may_cover(a.octets()).expect("filter"),
            IpAddr::V6(a) => dp.deny_v6().filter().may_cover(a.octets()).expect("filter"),
        }
    }

    fn run(&mut self, frame: &[u8]) -> u32 {
        tests::run_frame(&mut self.loaded, frame)
    }

    /// Runs `frame` and asserts the action and that exactly one counter moved, by one
    /// packet and the frame's length in bytes.
    fn expect(&mut self, case: &str, frame: &[u8], verdict: Verdict) {
        let before = self.loaded.dataplane.stats().expect("stats");
        let action = self.run(frame);
        let after = self.loaded.dataplane.stats().expect("stats");
        let want_action = if verdict == Verdict::Dropped {
            XDP_DROP
        } else {
            XDP_PASS
        };
        assert_eq!(action, want_action, "{case}: XDP action");
        for v in Verdict::ALL {
            let (b, a) = (before.get(v), after.get(v));
            let (dp, db) = (a.packets - b.packets, a.bytes - b.bytes);
            if v == verdict {
                assert_eq!(
                    (dp, db),
                    (1, frame.len() as u64),
                    "{case}: {} counter",
                    v.name()
                );
            } else {
                assert_eq!((dp, db), (0, 0), "{case}: {} counter moved", v.name());
            }
        }
    }
}

#[test]
fn verdicts_when_scope_is_all() {
    let mut h = Harness::with_test_lists();
    let dst4 = ip("192.0.2.1");
    let dst6 = ip("2001:db8::1");
    let cases: Vec<(&str, Vec<u8>, Verdict)> = vec![
        (
            "v4 banned host",
            Frame::udp(ip("203.0.113.7"), dst4, 5060).build(),
            Verdict::Dropped,
        ),
        (
            "v4 clean host",
            Frame::udp(ip("203.0.113.8"), dst4, 5060).build(),
            Verdict::Passed,
        ),
        (
            "v4 inside banned /24",
            Frame::udp(ip("198.51.100.77"), dst4, 53).build(),
            Verdict::Dropped,
        ),
        (
            "v4 allow /32 beats deny /24",
            Frame::udp(ip("198.51.100.10"), dst4, 5060).build(),
            Verdict::Allowed,
        ),
        (
            "v4 allow /25 beats deny /24",
            Frame::udp(ip("198.51.100.200"), dst4, 5060).build(),
            Verdict::Allowed,
        ),
        (
            "v4 banned TCP",
            Frame::tcp(ip("203.0.113.7"), dst4, 22).build(),
            Verdict::Dropped,
        ),
        (
            "v6 banned host",
            Frame::udp(ip("2001:db8::66"), dst6, 5060).build(),
            Verdict::Dropped,
        ),
        (
            "v6 inside banned /48",
            Frame::udp(ip("2001:db8:bad::99"), dst6, 5060).build(),
            Verdict::Dropped,
        ),
        (
            "v6 allow beats deny",
            Frame::udp(ip("2001:db8:bad::1"), dst6, 5060).build(),
            Verdict::Allowed,
        ),
        (
            "v6 clean host",
            Frame::udp(ip("2001:db8::67"), dst6, 5060).build(),
            Verdict::Passed,
        ),
        (
            "802.1Q banned",
            Frame::udp(ip("203.0.113.7"), dst4, 5060)
                .vlan(TPID_8021Q)
                .build(),
            Verdict::Dropped,
        ),
        (
            "802.1Q clean",
            Frame::udp(ip("203.0.113.9"), dst4, 5060)
                .vlan(TPID_8021Q)
                .build(),
            Verdict::Passed,
        ),
        (
            "QinQ banned",
            Frame::udp(ip("203.0.113.7"), dst4, 5060)
                .vlan(TPID_8021AD)
                .vlan(TPID_8021Q)
                .build(),
            Verdict::Dropped,
        ),
        (
            "QinQ clean",
            Frame::udp(ip("203.0.113.9"), dst4, 5060)
                .vlan(TPID_8021AD)
                .vlan(TPID_8021Q)
                .build(),
            Verdict::Passed,
        ),
        (
            "double 802.1Q v6 banned",
            Frame::udp(ip("2001:db8::66"), dst6, 5060)
                .vlan(TPID_8021Q)
                .vlan(TPID_8021Q)
                .build(),
            Verdict::Dropped,
        ),
        (
            "three tags are not parsed",
            Frame::udp(ip("203.0.113.7"), dst4, 5060)
                .vlan(TPID_8021AD)
                .vlan(TPID_8021Q)
                .vlan(TPID_8021Q)
                .build(),
            Verdict::NotIp,
        ),
        ("ARP", Frame::arp().build(), Verdict::NotIp),
        (
            "LLDP",
            Frame::raw(0x88CC, vec![0; 46]).build(),
            Verdict::NotIp,
        ),
        (
            "banned first fragment",
            Frame::udp(ip("203.0.113.7"), dst4, 5060)
                .fragment(0, true)
                .build(),
            Verdict::Dropped,
        ),
        (
            "banned later fragment",
            Frame::ip(ip("203.0.113.7"), dst4, PROTO_UDP, vec![0xab; 64])
                .fragment(185, false)
                .build(),
            Verdict::Dropped,
        ),
        (
            "clean later fragment",
            Frame::ip(ip("203.0.113.9"), dst4, PROTO_UDP, vec![0xab; 64])
                .fragment(185, false)
                .build(),
            Verdict::Passed,
        ),
    ];
    for (case, frame, verdict) in &cases {
        h.expect(case, frame, *verdict);
    }
}

#[test]
fn what_cannot_be_parsed_passes_and_is_counted() {
    let mut h = Harness::with_test_lists();
    let banned_v4 = Frame::udp(ip("203.0.113.7"), ip("192.0.2.1"), 5060);
    let banned_v6 = Frame::udp(ip("2001:db8::66"), ip("2001:db8::1"), 5060);
    let tagged = banned_v4.clone().vlan(TPID_8021Q);
    let full_v4 = banned_v4.build();
    let full_v6 = banned_v6.build();
    let full_tagged = tagged.build();

    // BPF_PROG_TEST_RUN (like every driver) rejects frames shorter than an Ethernet header,
    // so the shortest frames here are a bare Ethernet header with nothing behind it.
    h.expect(
        "Ethernet header only, IPv4 ethertype",
        &full_v4[..14],
        Verdict::Malformed,
    );
    h.expect(
        "Ethernet header only, VLAN ethertype",
        &full_tagged[..14],
        Verdict::Malformed,
    );
    h.expect(
        "IPv4 header cut at 10 bytes",
        &full_v4[..14 + 10],
        Verdict::Malformed,
    );
    h.expect(
        "IPv4 header cut before source",
        &full_v4[..14 + 15],
        Verdict::Malformed,
    );
    h.expect(
        "IPv6 header cut at 20 bytes",
        &full_v6[..14 + 20],
        Verdict::Malformed,
    );
    h.expect("VLAN tag cut short", &full_tagged[..16], Verdict::Malformed);
    h.expect(
        "IPv4 after tag cut short",
        &full_tagged[..18 + 12],
        Verdict::Malformed,
    );

    let mut bad_ihl = full_v4.clone();
    bad_ihl[14] = 0x44;
    h.expect("IHL below 5", &bad_ihl, Verdict::Malformed);
    let mut wrong_version = full_v4.clone();
    wrong_version[14] = 0x65;
    h.expect(
        "version 6 in an IPv4 ethertype",
        &wrong_version,
        Verdict::Malformed,
    );
    let mut v6_wrong_version = full_v6.clone();
    v6_wrong_version[14] = 0x40;
    h.expect(
        "version 4 in an IPv6 ethertype",
        &v6_wrong_version,
        Verdict::Malformed,
    );
}

#[test]
fn port_scope_drops_only_scoped_ports() {
    let mut h = Harness::with_test_lists();
    h.loaded
        .dataplane
        .set_scope(&Scope::Ports(BTreeSet::from([5060, 5061])))
        .expect("set scope");
    assert_eq!(
        h.loaded.dataplane.scope().expect("scope"),
        Scope::Ports(BTreeSet::from([5060, 5061]))
    );
    let (banned4, clean4, dst4) = (ip("203.0.113.7"), ip("203.0.113.8"), ip("192.0.2.1"));
    let (banned6, dst6) = (ip("2001:db8::66"), ip("2001:db8::1"));
    // A destination-options header (6 bytes of PadN body) before UDP.
    let dest_opts = vec![1, 4, 0, 0, 0, 0];
    // A fragment header body for a non-first fragment (offset 185 * 8 bytes).
    let later_fragment = {
        let off = (185u16 << 3).to_be_bytes();
        vec![off[0], off[1], 0, 0, 0x12, 0x34]
    };
    let cases: Vec<(&str, Vec<u8>, Verdict)> = vec![
        (
            "banned UDP 5060",
            Frame::udp(banned4, dst4, 5060).build(),
            Verdict::Dropped,
        ),
        (
            "banned TCP 5061",
            Frame::tcp(banned4, dst4, 5061).build(),
            Verdict::Dropped,
        ),
        (
            "banned UDP 53",
            Frame::udp(banned4, dst4, 53).build(),
            Verdict::Passed,
        ),
        (
            "banned TCP 443",
            Frame::tcp(banned4, dst4, 443).build(),
            Verdict::Passed,
        ),
        (
            "banned ICMP",
            Frame::ip(banned4, dst4, PROTO_ICMP, vec![8, 0, 0, 0, 0, 0, 0, 0]).build(),
            Verdict::Passed,
        ),
        (
            "clean UDP 5060",
            Frame::udp(clean4, dst4, 5060).build(),
            Verdict::Passed,
        ),
        (
            "allowed UDP 5060",
            Frame::udp(ip("198.51.100.10"), dst4, 5060).build(),
            Verdict::Allowed,
        ),
        (
            "banned first fragment to 5060",
            Frame::udp(banned4, dst4, 5060).fragment(0, true).build(),
            Verdict::Dropped,
        ),
        (
            "banned first fragment to 80",
            Frame::udp(banned4, dst4, 80).fragment(0, true).build(),
            Verdict::Passed,
        ),
        (
            "banned later fragment (no port to see)",
            Frame::ip(banned4, dst4, PROTO_UDP, vec![0; 64])
                .fragment(185, false)
                .build(),
            Verdict::Dropped,
        ),
        (
            "banned UDP 5060 behind QinQ",
            Frame::udp(banned4, dst4, 5060)
                .vlan(TPID_8021AD)
                .vlan(TPID_8021Q)
                .build(),
            Verdict::Dropped,
        ),
        (
            "v6 banned UDP 5060",
            Frame::udp(banned6, dst6, 5060).build(),
            Verdict::Dropped,
        ),
        (
            "v6 banned UDP 53",
            Frame::udp(banned6, dst6, 53).build(),
            Verdict::Passed,
        ),
        (
            "v6 banned UDP 5060 after destination options",
            Frame::ip(banned6, dst6, PROTO_UDP, udp(4000, 5060, b"x"))
                .ipv6_ext(60, dest_opts.clone())
                .build(),
            Verdict::Dropped,
        ),
        (
            "v6 banned UDP 53 after destination options",
            Frame::ip(banned6, dst6, PROTO_UDP, udp(4000, 53, b"x"))
                .ipv6_ext(60, dest_opts)
                .build(),
            Verdict::Passed,
        ),
        (
            "v6 banned later fragment",
            Frame::ip(banned6, dst6, PROTO_UDP, vec![0; 32])
                .ipv6_ext(44, later_fragment)
                .build(),
            Verdict::Dropped,
        ),
    ];
    for (case, frame, verdict) in &cases {
        h.expect(case, frame, *verdict);
    }
    let udp_header_cut = Frame::udp(banned4, dst4, 5060).build();
    h.expect(
        "banned, UDP header cut short",
        &udp_header_cut[..14 + 20 + 2],
        Verdict::Malformed,
    );

    h.loaded
        .dataplane
        .set_scope(&Scope::All)
        .expect("scope all");
    h.expect(
        "banned UDP 53 with scope all",
        &Frame::udp(banned4, dst4, 53).build(),
        Verdict::Dropped,
    );
}

/// Port scope must not be bypassed by stacking IPv6 extension headers: whatever the chain's
/// length, a banned source's UDP to a scoped port is dropped, and beyond the headers the
/// program walks, anything from a banned source is (fail closed), while a clean source's
/// packets always pass.
#[test]
fn stacked_ipv6_extension_headers_do_not_bypass_port_scope() {
    let mut h = Harness::with_test_lists();
    h.loaded
        .dataplane
        .set_scope(&Scope::Ports(BTreeSet::from([5060])))
        .expect("set scope");
    let (banned6, clean6, dst6) = (ip("2001:db8::66"), ip("2001:db8::67"), ip("2001:db8::1"));
    let dest_opts = vec![1, 4, 0, 0, 0, 0];
    for headers in 0..=8 {
        let frame = |src, port| {
            let mut f = Frame::ip(src, dst6, PROTO_UDP, udp(4000, port, b"REGISTER"));
            for _ in 0..headers {
                f = f.ipv6_ext(60, dest_opts.clone());
            }
            f.build()
        };
        h.expect(
            &format!("banned UDP 5060 behind {headers} destination-options headers"),
            &frame(banned6, 5060),
            Verdict::Dropped,
        );
        h.expect(
            &format!("clean UDP 5060 behind {headers} destination-options headers"),
            &frame(clean6, 5060),
            Verdict::Passed,
        );
        // Within the walk, another port is out of scope; past it, it cannot be told.
        let beyond_walk = headers > 4;
        h.expect(
            &format!("banned UDP 53 behind {headers} destination-options headers"),
            &frame(banned6, 53),
            if beyond_walk {
                Verdict::Dropped
            } else {
                Verdict::Passed
            },
        );
    }
}

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
fn map_api_insert_remove_contains_and_lookup() {
    let mut h = Harness::new();
    let dp = &mut h.loaded.dataplane;
    for n in ["203.0.113.0/24", "2001:db8:1::/48"] {
        let n = net(n);
        assert!(!dp.is_denied(n).expect("contains"));
        dp.deny(n).expect("deny");
        assert!(dp.is_denied(n).expect("contains"));
    }
    // contains is exact: a covered host or a wider prefix is not "present".
    assert!(!dp.is_denied(net("203.0.113.5/32")).expect("contains"));
    assert!(!dp.is_denied(net("203.0.0.0/16")).expect("contains"));
    // Host bits are cleared: 203.0.113.99/24 is the same prefix.
    assert!(dp.is_denied(net("203.0.113.99/24")).expect("contains"));

    assert_eq!(
        dp.verdict_for(ip("203.0.113.5")).expect("verdict"),
        (Verdict::Dropped, Some(net("203.0.113.0/24")))
    );
    assert_eq!(
        dp.verdict_for(ip("2001:db8:1::5")).expect("verdict"),
        (Verdict::Dropped, Some(net("2001:db8:1::/48")))
    );
    dp.deny(net("203.0.113.5/32")).expect("deny host");
    assert_eq!(
        dp.verdict_for(ip("203.0.113.5")).expect("verdict").1,
        Some(net("203.0.113.5/32")),
        "the longest prefix matches"
    );
    dp.allow(net("203.0.113.5/32")).expect("allow");
    assert!(dp.is_allowed(net("203.0.113.5/32")).expect("allowed"));
    assert_eq!(
        dp.verdict_for(ip("203.0.113.5")).expect("verdict").0,
        Verdict::Allowed
    );
    dp.unallow(net("203.0.113.5/32")).expect("unallow");
    assert!(!dp.is_allowed(net("203.0.113.5/32")).expect("allowed"));

    dp.undeny(net("203.0.113.0/24")).expect("undeny");
    dp.undeny(net("203.0.113.0/24"))
        .expect("undeny twice is fine");
    assert!(!dp.is_denied(net("203.0.113.0/24")).expect("contains"));
    assert_eq!(
        dp.verdict_for(ip("203.0.113.6")).expect("verdict"),
        (Verdict::Passed, None)
    );
    assert_eq!(dp.deny_v4().count(), 1);
}

#[test]
fn batched_updates_match_one_by_one() {
    let mut h = Harness::new();
    let nets: Vec<IpNet> = (0..5000u32)
        .map(|i| IpNet::new(IpAddr::V4((0x2d00_0000 + i * 7).into()), 32).expect("net"))
        .chain((0..100u128).map(|i| {
            IpNet::new(
                IpAddr::V6((0x2001_0db8_0000_0000_0000_0000_0000_0000u128 + (i << 64)).into()),
                64,
            )
            .expect("net")
        }))
        .collect();
    let dp = &mut h.loaded.dataplane;
    assert_eq!(
        dp.deny_batch(&nets, false).expect("batch insert"),
        nets.len()
    );
    assert_eq!(dp.deny_v4().count(), 5000);
    assert_eq!(dp.deny_v6().count(), 100);
    for n in nets.iter().step_by(97) {
        assert!(
            dp.is_denied(*n).expect("contains"),
            "{n} present after batch"
        );
    }
    assert_eq!(dp.undeny_batch(&nets[..2500]).expect("batch delete"), 2500);
    assert_eq!(dp.deny_v4().count(), 2500);
    assert!(!dp.is_denied(nets[0]).expect("contains"));
    assert!(dp.is_denied(nets[2500]).expect("contains"));
}

#[test]
fn a_full_map_is_reported_and_keeps_existing_bans() {
    let mut h = Harness::with_capacities(Capacities {
        deny_v4: 4,
        ..Capacities::default()
    });
    let dp = &mut h.loaded.dataplane;
    for i in 1..=4u8 {
        dp.deny(net(&format!("203.0.113.{i}/32"))).expect("fits");
    }
    let err = dp
        .deny(net("203.0.113.5/32"))
        .expect_err("fifth entry does not fit");
    assert!(
        matches!(
            err,
            apiban::dataplane::DataplaneError::MapFull { capacity: 4, .. }
        ),
        "{err}"
    );
    let batch: Vec<IpNet> = (6..=9u8)
        .map(|i| net(&format!("203.0.113.{i}/32")))
        .collect();
    assert!(matches!(
        dp.deny_batch(&batch, false),
        Err(apiban::dataplane::DataplaneError::MapFull { .. })
    ));
    for i in 1..=4u8 {
        assert!(
            dp.is_denied(net(&format!("203.0.113.{i}/32")))
                .expect("contains")
        );
    }
}

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

/// Versions before the host tables kept hosts in pinned BPF hashes. An upgraded agent moves
/// them, hit counts included, into the tables before its program runs, and drops the pins.
#[test]
fn an_upgrade_moves_the_legacy_host_hashes_into_the_tables() {
    let mut h = Harness::new();
    let v4 = legacy::hash(
        4,
        &[
            ([203, 0, 113, 9].to_vec(), 7),
            ([203, 0, 113, 10].to_vec(), 0),
        ],
    );
    let v6: std::net::Ipv6Addr = "2001:db8:5::9".parse().expect("v6");
    let v6 = legacy::hash(16, &[(v6.octets().to_vec(), 2)]);
    let v4_pin = h
        .dir
        .path
        .join(apiban_common::map_names::LEGACY_DENY_V4_HOSTS);
    let v6_pin = h
        .dir
        .path
        .join(apiban_common::map_names::LEGACY_DENY_V6_HOSTS);
    legacy::pin(&v4, &v4_pin);
    legacy::pin(&v6, &v6_pin);
    h = h.reload();
    assert!(
        !v4_pin.exists() && !v6_pin.exists(),
        "legacy pins are removed"
    );
    let hits: Vec<(IpNet, u64)> = h
        .loaded
        .dataplane
        .deny_hits()
        .expect("hits")
        .into_iter()
        .map(|e| (e.net, e.entry.hits))
        .collect();
    for expected in [
        (net("203.0.113.9/32"), 7),
        (net("203.0.113.10/32"), 0),
        (net("2001:db8:5::9/128"), 2),
    ] {
        assert!(hits.contains(&expected), "{expected:?} in {hits:?}");
    }
    assert!(h.drops("203.0.113.9") && h.drops("203.0.113.10"));
    assert!(h.drops("2001:db8:5::9"));
    assert!(!h.drops("203.0.113.11"));
}

/// Builds a BPF hash laid out like the legacy host hashes, with raw syscalls: aya creates maps
/// only from an object file.
mod legacy {
    use std::{
        ffi::CString,
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        path::Path,
    };

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_F_NO_PREALLOC: u32 = 1;

    fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> i64 {
        // SAFETY: `attr` is a zeroed bpf_attr of 128 bytes with the fields this command reads.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128u32) }
    }

    /// A hash of `key_len`-octet addresses to `DenyEntry`, holding `(address, hits)`.
    pub fn hash(key_len: u32, entries: &[(Vec<u8>, u64)]) -> OwnedFd {
        let mut attr = [0u64; 16];
        attr[0] = u64::from(BPF_MAP_TYPE_HASH) | u64::from(key_len) << 32;
        let value_size = size_of::<apiban_common::DenyEntry>() as u64;
        attr[1] = value_size | 1024 << 32;
        attr[2] = u64::from(BPF_F_NO_PREALLOC);
        let fd = bpf(BPF_MAP_CREATE, &mut attr);
        assert!(
            fd >= 0,
            "create a legacy hash: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a descriptor the kernel just returned to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        for (key, hits) in entries {
            let value = apiban_common::DenyEntry {
                hits: *hits,
                last_hit_ns: if *hits > 0 { 1_000 } else { 0 },
                prefix_len: key_len * 8,
                _reserved: 0,
            };
            let mut attr = [0u64; 16];
            attr[0] = fd.as_raw_fd() as u64;
            attr[1] = key.as_ptr() as u64;
            attr[2] = (&raw const value) as u64;
            assert_eq!(
                bpf(BPF_MAP_UPDATE_ELEM, &mut attr),
                0,
                "fill the legacy hash"
            );
        }
        fd
    }

    pub fn pin(fd: &OwnedFd, path: &Path) {
        let path = CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
        let mut attr = [0u64; 16];
        attr[0] = path.as_ptr() as u64;
        attr[1] = fd.as_raw_fd() as u64;
        assert_eq!(
            bpf(BPF_OBJ_PIN, &mut attr),
            0,
            "pin the legacy hash: {}",
            std::io::Error::last_os_error()
        );
    }
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

/// The kernel reads `count` keys of the map's own key size (and values of its value size)
/// from a batch call's arrays: elements of another size must be refused before it does.
#[test]
fn batch_calls_refuse_elements_of_the_wrong_size() {
    use apiban::dataplane::batch;
    use apiban_common::{DenyEntry, map_names};
    use aya::maps::lpm_trie::Key;
    use std::os::fd::AsFd as _;
    let h = Harness::new();
    let map = aya::maps::MapData::from_pin(h.dir.path.join(map_names::DENY_V4))
        .expect("the pinned IPv4 trie");
    let fd = map.fd().as_fd();
    let refused = |outcome: batch::BatchOutcome, what: &str| {
        assert_eq!(outcome.done, 0, "{what}");
        let err = outcome.error.unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::InvalidInput,
            "{what}: {err}"
        );
        err.to_string()
    };
    let entry = DenyEntry {
        prefix_len: 24,
        ..Default::default()
    };
    let text = refused(batch::update(fd, &[[198u8, 18, 0]], &[entry]), "short keys");
    assert!(text.contains("key of 3 bytes"), "{text}");
    let text = refused(
        batch::update(fd, &[Key::new(24, [198u8, 18, 0, 0])], &[0u8]),
        "short values",
    );
    assert!(text.contains("value of 1 bytes"), "{text}");
    let text = refused(
        batch::update(
            fd,
            &[
                Key::new(24, [198u8, 18, 0, 0]),
                Key::new(24, [198u8, 18, 1, 0]),
            ],
            &[entry],
        ),
        "fewer values than keys",
    );
    assert!(text.contains("2 keys and 1 values"), "{text}");
    refused(batch::delete(fd, &[[0u8; 16]]), "long keys to delete");
    let ok = batch::update(fd, &[Key::new(24, [198u8, 18, 0, 0])], &[entry]);
    assert!(ok.error.is_none() && ok.done == 1, "{ok:?}");
    let ok = batch::delete(fd, &[Key::new(24, [198u8, 18, 0, 0])]);
    assert!(ok.error.is_none() && ok.done == 1, "{ok:?}");
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
