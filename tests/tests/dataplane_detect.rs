//! The dataplane's side of SIP scanner detection, through BPF_PROG_TEST_RUN: which frames
//! are counted and sampled into the ring buffer, what a sample carries, the rate report
//! that goes out once per window, and what is passed over without being read as a request
//! (keep-alives, TLS, in-dialog requests for the rates, an Ethernet frame's padding).

use std::net::IpAddr;

use apiban::{
    dataplane::{
        detect::{DetectTap, PassedOver},
        loader::{self, LoadOptions, Loaded},
    },
    detect::sample::Sample,
};
use apiban_common::{DetectConfig, detect};
use tests::{
    BpffsDir,
    frame::{Frame, PROTO_TCP, PROTO_UDP, tcp_syn, udp},
    require_root,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

struct Harness {
    loaded: Loaded,
    tap: DetectTap,
    _dir: BpffsDir,
}

impl Harness {
    fn new(config: DetectConfig) -> Self {
        require_root();
        let dir = BpffsDir::new();
        let mut loaded = loader::load(&LoadOptions {
            bpffs_dir: dir.path.clone(),
            ..Default::default()
        })
        .expect("load the XDP program");
        let mut tap = DetectTap::take(loaded.ebpf_mut()).expect("the detection maps");
        tap.switches
            .set(config, &[5060], &[5061])
            .expect("set detection");
        Self {
            loaded,
            tap,
            _dir: dir,
        }
    }

    fn run(&mut self, frame: &[u8]) -> u32 {
        tests::run_frame(&mut self.loaded, frame)
    }

    /// The egress classifier's verdict on a frame leaving the host.
    fn egress(&mut self, frame: &[u8]) -> u32 {
        use aya::programs::TestRun as _;
        let prog: &mut aya::programs::SchedClassifier = self
            .loaded
            .ebpf_mut()
            .program_mut(apiban_common::program_names::EGRESS)
            .expect("the egress program")
            .try_into()
            .expect("a classifier");
        if prog.fd().is_err() {
            prog.load().expect("the verifier takes the egress program");
        }
        let mut opts = aya::programs::TestRunOptions::new();
        opts.data_in = Some(frame);
        prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
    }

    /// The XDP verdict on `repeat` runs of one frame (BPF_PROG_TEST_RUN's own repeat): many
    /// requests from one source at little cost.
    fn run_repeated(&mut self, frame: &[u8], repeat: u32) {
        use aya::programs::TestRun as _;
        let prog: &mut aya::programs::Xdp = self
            .loaded
            .ebpf_mut()
            .program_mut(apiban_common::program_names::APIBAN)
            .expect("the XDP program")
            .try_into()
            .expect("an XDP program");
        let mut opts = aya::programs::TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        let ret = prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value;
        assert_eq!(ret, XDP_PASS);
    }

    fn passed_over(&self) -> PassedOver {
        self.tap.counts.read().expect("read DETECT_COUNTS")
    }

    /// Everything in the ring buffer now.
    fn records(&mut self) -> Vec<Sample> {
        let mut out = Vec::new();
        while let Some(item) = self.tap.samples.next() {
            out.push(Sample::decode(&item).expect("a whole record"));
        }
        out
    }
}

fn on() -> DetectConfig {
    DetectConfig {
        enabled: 1,
        first_samples: 2,
        sample_every: 4,
        samples_per_sec: 1_000,
        reports_per_sec: 100,
        rate_thresholds: [5; detect::METHODS],
        responses_per_sec: 1_000,
        window_ns: 60_000_000_000,
        hash_seed: 0x5eed,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal")
}

fn sip_udp(src: &str, payload: &[u8]) -> Vec<u8> {
    let dst = if src.contains(':') {
        "2001:db8::1"
    } else {
        "192.0.2.1"
    };
    Frame::ip(ip(src), ip(dst), PROTO_UDP, udp(40000, 5060, payload)).build()
}

fn sip_tcp(src: &str, payload: &[u8]) -> Vec<u8> {
    let dst = if src.contains(':') {
        "2001:db8::1"
    } else {
        "192.0.2.1"
    };
    let mut l4 = tcp_syn(40000, 5060);
    l4.extend_from_slice(payload);
    Frame::ip(ip(src), ip(dst), PROTO_TCP, l4).build()
}

const REGISTER: &[u8] = b"REGISTER sip:192.0.2.1 SIP/2.0\r\nUser-Agent: friendly-scanner\r\n\r\n";

#[test]
fn a_new_sources_sip_request_is_sampled_with_its_payload() {
    let mut h = Harness::new(on());
    assert_eq!(h.run(&sip_udp("198.51.100.7", REGISTER)), XDP_PASS);
    let records = h.records();
    assert_eq!(records.len(), 1, "{records:?}");
    let s = &records[0];
    assert_eq!(s.kind, detect::KIND_SAMPLE);
    assert_eq!(s.addr, ip("198.51.100.7"));
    assert_eq!(s.method, detect::METHOD_REGISTER);
    assert_eq!(s.dst_port, 5060);
    assert_eq!(s.payload, REGISTER);
    assert_eq!((s.seen, s.probes, s.requests), (1, 1, [1, 0, 0, 0]));

    // TCP with payload, over IPv6.
    let options = b"OPTIONS sip:100@[2001:db8::1] SIP/2.0\r\n\r\n";
    assert_eq!(h.run(&sip_tcp("2001:db8:77::7", options)), XDP_PASS);
    let records = h.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].addr, ip("2001:db8:77::7"));
    assert_eq!(records[0].method, detect::METHOD_OPTIONS);
    assert_eq!(records[0].payload, options);
}

#[test]
fn only_sip_requests_from_sources_no_list_knows_are_watched() {
    let mut h = Harness::new(on());
    h.loaded
        .dataplane
        .deny("203.0.113.7/32".parse().expect("literal"))
        .expect("deny");
    h.loaded
        .dataplane
        .deny("203.0.113.8/32".parse().expect("literal"))
        .expect("deny");
    h.loaded
        .dataplane
        .allow("203.0.113.8/32".parse().expect("literal"))
        .expect("allow");
    // Banned: dropped, not watched. Allowed: passed, not watched.
    assert_eq!(h.run(&sip_udp("203.0.113.7", REGISTER)), XDP_DROP);
    assert_eq!(h.run(&sip_udp("203.0.113.8", REGISTER)), XDP_PASS);
    // Not a SIP port; a TCP segment without payload; a response (sent by a server).
    let other_port = Frame::ip(
        ip("198.51.100.9"),
        ip("192.0.2.1"),
        PROTO_UDP,
        udp(40000, 80, REGISTER),
    )
    .build();
    assert_eq!(h.run(&other_port), XDP_PASS);
    let syn = Frame::tcp(ip("198.51.100.9"), ip("192.0.2.1"), 5060).build();
    assert_eq!(h.run(&syn), XDP_PASS);
    assert_eq!(
        h.run(&sip_udp("198.51.100.9", b"SIP/2.0 200 OK\r\n\r\n")),
        XDP_PASS
    );
    assert_eq!(h.records(), Vec::new());
}

#[test]
fn the_first_requests_then_one_in_n_are_sampled_and_a_rate_report_goes_once() {
    let mut h = Harness::new(on());
    for _ in 0..12 {
        assert_eq!(h.run(&sip_udp("198.51.100.10", REGISTER)), XDP_PASS);
    }
    let records = h.records();
    let sampled: Vec<u32> = records
        .iter()
        .filter(|r| r.kind == detect::KIND_SAMPLE)
        .map(|r| r.seen)
        .collect();
    // The first 2, then every 4th.
    assert_eq!(sampled, [1, 2, 4, 8, 12]);
    let reports: Vec<&Sample> = records
        .iter()
        .filter(|r| r.kind == detect::KIND_RATE)
        .collect();
    assert_eq!(reports.len(), 1, "{records:?}");
    // At the threshold of 5 REGISTERs within the window, no payload.
    assert_eq!(reports[0].requests[usize::from(detect::METHOD_REGISTER)], 5);
    assert!(reports[0].payload.is_empty());
}

#[test]
fn the_sample_budget_caps_a_flood_of_new_sources() {
    let mut h = Harness::new(DetectConfig {
        samples_per_sec: 10,
        ..on()
    });
    for i in 0..100u32 {
        let src = format!("198.51.{}.{}", 100 + i / 250, 1 + i % 250);
        h.run(&sip_udp(&src, REGISTER));
    }
    let n = h.records().len();
    // Ten a second; a run that crosses a second boundary may take ten more.
    assert!((10..=20).contains(&n), "{n} samples");
}

#[test]
fn detection_off_sends_nothing() {
    let mut h = Harness::new(DetectConfig::default());
    for _ in 0..10 {
        assert_eq!(h.run(&sip_udp("198.51.100.11", REGISTER)), XDP_PASS);
    }
    assert_eq!(h.records(), Vec::new());
}

/// `frame` padded with zeros to Ethernet's 60-byte minimum, as a NIC delivers a short frame:
/// the IP header's length still says where the packet ends.
fn padded(mut frame: Vec<u8>) -> Vec<u8> {
    if frame.len() < 60 {
        frame.resize(60, 0);
    }
    frame
}

#[test]
fn keep_alives_and_tls_are_counted_and_never_sampled() {
    let mut h = Harness::new(on());
    let stun_binding = [
        0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ];
    for _ in 0..10 {
        for payload in [&b"\r\n\r\n"[..], b"\r\n", &stun_binding] {
            assert_eq!(h.run(&padded(sip_udp("198.51.100.20", payload))), XDP_PASS);
        }
        // RFC 5626's keep-alive over TCP.
        assert_eq!(h.run(&sip_tcp("198.51.100.20", b"\r\n\r\n")), XDP_PASS);
    }
    let client_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage";
    for _ in 0..7 {
        let tls = Frame::ip(
            ip("198.51.100.21"),
            ip("192.0.2.1"),
            PROTO_TCP,
            [tcp_syn(40000, 5061), client_hello.to_vec()].concat(),
        )
        .build();
        assert_eq!(h.run(&tls), XDP_PASS);
    }
    assert_eq!(h.records(), Vec::new(), "nothing sampled, nothing reported");
    assert_eq!(
        h.passed_over(),
        PassedOver {
            keepalives: 40,
            tls: 7,
            untracked: 0,
        }
    );
}

#[test]
fn padding_is_not_payload() {
    let mut h = Harness::new(on());
    // An empty TCP segment (an ACK) in a padded frame: no payload, nothing looked at.
    let ack = padded(sip_tcp("198.51.100.22", b""));
    assert_eq!(h.run(&ack), XDP_PASS);
    assert_eq!(h.records(), Vec::new());
    assert_eq!(h.passed_over(), PassedOver::default());
    // A short request: the sample holds its bytes and not the zeros after them.
    let short = b"ACK a SIP/2.0\r\n";
    let frame = padded(sip_udp("198.51.100.22", short));
    assert!(
        frame.len() > 14 + 20 + 8 + short.len(),
        "the frame is padded"
    );
    assert_eq!(h.run(&frame), XDP_PASS);
    let records = h.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].payload, short);
}

#[test]
fn only_requests_that_open_a_transaction_count_against_the_rates() {
    // Every request sampled, so that each one's method shows.
    let mut h = Harness::new(DetectConfig {
        first_samples: 100,
        ..on()
    });
    // A trunk's calls: each INVITE brings an ACK and a BYE; 4 INVITEs stay under 5.
    for _ in 0..4 {
        for request in [
            &b"INVITE sip:100@192.0.2.1 SIP/2.0\r\n\r\n"[..],
            b"ACK sip:100@192.0.2.1 SIP/2.0\r\n\r\n",
            b"BYE sip:100@192.0.2.1 SIP/2.0\r\n\r\n",
            b"CANCEL sip:100@192.0.2.1 SIP/2.0\r\n\r\n",
            b"\x16\x03\x01 a TLS record on a port of SIP in the clear\r\n",
        ] {
            assert_eq!(h.run(&sip_udp("198.51.100.23", request)), XDP_PASS);
        }
    }
    let records = h.records();
    assert!(
        records.iter().all(|r| r.kind == detect::KIND_SAMPLE),
        "no rate report: {records:?}"
    );
    let last = records.last().expect("samples");
    assert_eq!(last.requests, [0, 4, 0, 0], "{records:?}");
    let methods: Vec<u8> = records.iter().take(5).map(|r| r.method).collect();
    assert_eq!(
        methods,
        [
            detect::METHOD_INVITE,
            detect::METHOD_IN_DIALOG,
            detect::METHOD_IN_DIALOG,
            detect::METHOD_IN_DIALOG,
            detect::METHOD_UNKNOWN
        ]
    );
    // A SUBSCRIBE storm is counted as `other`, on its own threshold.
    for _ in 0..5 {
        h.run(&sip_udp(
            "198.51.100.24",
            b"SUBSCRIBE sip:201@192.0.2.1 SIP/2.0\r\n\r\n",
        ));
    }
    let reports: Vec<Sample> = h
        .records()
        .into_iter()
        .filter(|r| r.kind == detect::KIND_RATE)
        .collect();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].method, detect::METHOD_OTHER);
    assert_eq!(reports[0].requests, [0, 0, 0, 5]);
}

/// A response from the server's `port` to `to`:40000.
fn response_to(to: &str, port: u16, payload: &[u8]) -> Vec<u8> {
    let from = if to.contains(':') {
        "2001:db8::1"
    } else {
        "192.0.2.1"
    };
    Frame::ip(ip(from), ip(to), PROTO_UDP, udp(port, 40000, payload)).build()
}

const TC_ACT_OK: u32 = 0;

#[test]
fn the_egress_program_reports_final_responses_to_followed_sources_only() {
    let mut h = Harness::new(on());
    let challenge = b"SIP/2.0 401 Unauthorized\r\nCall-ID: c1\r\nCSeq: 1 REGISTER\r\nWWW-Authenticate: Digest realm=\"r\", nonce=\"n1\"\r\n\r\n";
    // Not followed yet: detection has seen no request from it.
    assert_eq!(
        h.egress(&response_to("198.51.100.60", 5060, challenge)),
        TC_ACT_OK
    );
    assert_eq!(h.records(), Vec::new());
    assert_eq!(h.run(&sip_udp("198.51.100.60", REGISTER)), XDP_PASS);
    assert_eq!(h.records().len(), 1, "the request's sample");
    // A provisional answer, another port, the TLS port, a request the server sends: none.
    for frame in [
        response_to("198.51.100.60", 5060, b"SIP/2.0 100 Trying\r\n\r\n"),
        response_to("198.51.100.60", 80, challenge),
        response_to("198.51.100.60", 5061, challenge),
        response_to("198.51.100.60", 5060, b"OPTIONS sip:a SIP/2.0\r\n\r\n"),
    ] {
        assert_eq!(h.egress(&frame), TC_ACT_OK);
    }
    assert_eq!(h.records(), Vec::new());
    // The challenge, whole, padding excluded.
    let padded = {
        let mut f = response_to("198.51.100.60", 5060, challenge);
        f.extend_from_slice(&[0; 8]);
        f
    };
    assert_eq!(h.egress(&padded), TC_ACT_OK);
    let records = h.records();
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r.kind, detect::KIND_RESPONSE);
    assert_eq!(r.addr, ip("198.51.100.60"), "the source it went to");
    assert_eq!(r.dst_port, 5060, "the server's port");
    assert_eq!(r.payload, challenge);
    // IPv6, and TCP.
    assert_eq!(h.run(&sip_tcp("2001:db8:77::60", REGISTER)), XDP_PASS);
    let _ = h.records();
    let mut tcp = tcp_syn(5060, 40000);
    tcp.extend_from_slice(b"SIP/2.0 404 Not Found\r\n\r\n");
    let v6 = Frame::ip(ip("2001:db8::1"), ip("2001:db8:77::60"), PROTO_TCP, tcp).build();
    assert_eq!(h.egress(&v6), TC_ACT_OK);
    let records = h.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].addr, ip("2001:db8:77::60"));
    assert_eq!(records[0].payload, b"SIP/2.0 404 Not Found\r\n\r\n");
}

#[test]
fn the_egress_programs_cap_holds_and_detection_off_silences_it() {
    let mut h = Harness::new(DetectConfig {
        responses_per_sec: 5,
        ..on()
    });
    assert_eq!(h.run(&sip_udp("198.51.100.61", REGISTER)), XDP_PASS);
    let _ = h.records();
    for _ in 0..50 {
        h.egress(&response_to(
            "198.51.100.61",
            5060,
            b"SIP/2.0 404 Not Found\r\n\r\n",
        ));
    }
    let n = h.records().len();
    // Five a second; a run that crosses a second boundary may take five more.
    assert!((5..=10).contains(&n), "{n} responses");
    h.tap
        .switches
        .set(DetectConfig::default(), &[5060], &[5061])
        .expect("detection off");
    h.egress(&response_to(
        "198.51.100.61",
        5060,
        b"SIP/2.0 404 Not Found\r\n\r\n",
    ));
    assert_eq!(h.records(), Vec::new());
}

/// `n` IPv4 sources in 10.0.0.0/8 that share `of`'s bucket in the program's source table
/// under `on()`'s seed.
fn bucket_mates(of: &str, n: usize) -> Vec<String> {
    let slot = |addr: std::net::Ipv4Addr| {
        let mapped = addr.to_ipv6_mapped().octets();
        detect::bucket_slot(detect::source_hash(
            &detect::address_words(&mapped),
            on().hash_seed,
        ))
    };
    let home = slot(of.parse().expect("an IPv4 literal"));
    (0u32..1 << 24)
        .map(|i| std::net::Ipv4Addr::from(0x0a00_0000 | i))
        .filter(|a| slot(*a) == home)
        .take(n)
        .map(|a| a.to_string())
        .collect()
}

#[test]
fn a_flood_of_one_packet_sources_in_its_bucket_leaves_a_busy_sources_counts_alone() {
    let mut h = Harness::new(on());
    let busy = "198.51.100.70";
    let mates = bucket_mates(busy, 40);
    for _ in 0..3 {
        h.run(&sip_udp(busy, REGISTER));
    }
    // Forty new sources, one request each, all into the busy source's bucket: each takes
    // the other way from the one before it.
    for mate in &mates {
        h.run(&sip_udp(mate, REGISTER));
    }
    let _ = h.records();
    for _ in 0..2 {
        h.run(&sip_udp(busy, REGISTER));
    }
    let reports: Vec<Sample> = h
        .records()
        .into_iter()
        .filter(|r| r.kind == detect::KIND_RATE)
        .collect();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].addr, ip(busy));
    assert_eq!(reports[0].requests[usize::from(detect::METHOD_REGISTER)], 5);
    assert_eq!(h.passed_over().untracked, 0);
}

#[test]
fn a_newcomer_to_a_bucket_of_two_busy_sources_is_sampled_not_rated() {
    let mut h = Harness::new(DetectConfig {
        sample_every: 0,
        rate_thresholds: [1_000_000; detect::METHODS],
        ..on()
    });
    let mates = bucket_mates("198.51.100.71", 3);
    // Two sources with 100,000 requests each this window: a newcomer takes one of their
    // slots with a chance of 1 in 100,000.
    for busy in &mates[..2] {
        h.run_repeated(&sip_udp(busy, REGISTER), 100_000);
    }
    let _ = h.records();
    h.run(&sip_udp(&mates[2], REGISTER));
    let records = h.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].addr, ip(&mates[2]));
    assert_eq!(records[0].kind, detect::KIND_SAMPLE);
    assert_eq!(records[0].seen, 0, "no counts: it has no slot");
    assert_eq!(h.passed_over().untracked, 1);
    // The busy ones keep theirs: the next request of each is counted on.
    h.run_repeated(&sip_udp(&mates[0], REGISTER), 1);
    assert_eq!(h.passed_over().untracked, 1);
}
