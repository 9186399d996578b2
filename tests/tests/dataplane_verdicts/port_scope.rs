//! Port scope: only the scoped destination ports are enforced, and IPv6 extension headers
//! cannot carry a banned source past it.

use super::*;

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
