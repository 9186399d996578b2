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

mod filters;
mod hits;
mod maps;
mod port_scope;

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
