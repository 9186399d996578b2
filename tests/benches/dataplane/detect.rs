//! What SIP scanner detection costs, in the dataplane benchmark's run.
//!
//! Detection runs only for clean SIP traffic (the drop path never reaches it), so it is
//! measured on OPTIONS to 5060 from sources that are not banned, with detection off and on
//! in alternation within each round; the ratio is the median of the rounds' ratios. The
//! sources rotate: with 65,536 of them every packet is a new source to detection's
//! per-source table (a flood from spoofed or many sources), and the sample budget runs out
//! at once. The egress classifier runs beside a bare classifier (`bench_tc_floor`) on a
//! packet that is no SIP response (the cost every other packet leaving the host pays) and on
//! a final response to a followed source.

use std::net::{IpAddr, Ipv4Addr};

use apiban::{
    dataplane::{detect::DetectTap, loader::Loaded},
    detect::{DetectMode, DetectSettings},
};
use apiban_common::{DetectConfig, program_names};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use tests::frame::{Frame, PROTO_TCP, PROTO_UDP, tcp_syn, udp};

use super::{Config, Measured, median, program, round, row, set_params};

type Json = serde_json::Map<String, serde_json::Value>;

/// The rows, and their keys in `json`.
pub(super) fn detection(
    loaded: &mut Loaded,
    frame: &[u8],
    config: &Config,
    inserted: u32,
    json: &mut Json,
) {
    let mut tap = DetectTap::take(loaded.ebpf_mut()).expect("the detection maps");
    let on = DetectSettings {
        mode: DetectMode::Enforce,
        ..Default::default()
    };
    let mut switch = |config: DetectConfig| {
        tap.switches
            .set(config, &on.ports, &on.tls_ports)
            .expect("switch detection");
    };
    println!();
    println!(
        "clean SIP traffic (OPTIONS to 5060) with SIP scanner detection off and on, {inserted} \
         entries; x off is the median of each round's ratio"
    );
    println!(
        "{:<34} {:>9} {:>9} {:>8} {:>8}",
        "program", "entries", "sources", "ns/pkt", "x off"
    );
    for sources in [1_024u32, 65_536] {
        set_params(loaded, inserted, sources - 1);
        let mut run = |config: DetectConfig, repeat: u32| {
            switch(config);
            xdp_ns(loaded, program_names::BENCH_CYCLE, frame, repeat)
        };
        run(DetectConfig::default(), config.repeat / 10);
        run(on.dataplane_config(), config.repeat / 10);
        let (mut off_ns, mut on_ns, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..config.rounds {
            let off = run(DetectConfig::default(), config.repeat);
            let with = run(on.dataplane_config(), config.repeat);
            off_ns.push(off);
            on_ns.push(with);
            ratios.push(with / off);
        }
        let (off, with, ratio) = (median(off_ns), median(on_ns), median(ratios));
        row(
            "  detection off",
            Some(inserted),
            sources,
            Measured {
                ns: off,
                x_floor: 1.0,
            },
        );
        row(
            "  detection on",
            Some(inserted),
            sources,
            Measured {
                ns: with,
                x_floor: ratio,
            },
        );
        json.insert(format!("detect_off_ns_{sources}_sources"), round(off));
        json.insert(format!("detect_on_ns_{sources}_sources"), round(with));
        json.insert(format!("detect_on_x_off_{sources}"), round(ratio));
    }

    // The egress program follows only sources the XDP side saw: one request makes the
    // response's destination one.
    switch(on.dataplane_config());
    let client = Ipv4Addr::new(198, 51, 100, 9);
    let server = Ipv4Addr::new(192, 0, 2, 1);
    let request = Frame::udp(IpAddr::V4(client), IpAddr::V4(server), 5060).build();
    tests::run_frame(loaded, &request);
    let response = Frame::ip(
        IpAddr::V4(server),
        IpAddr::V4(client),
        PROTO_UDP,
        udp(
            5060,
            40000,
            b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 198.51.100.9:40000\r\nCSeq: 1 OPTIONS\r\n\
              Call-ID: bench\r\nContent-Length: 0\r\n\r\n",
        ),
    )
    .build();
    // HTTPS leaving the host: what nearly every packet on a SIP server's uplink is not,
    // but what the program must let by at the cost of a port check.
    let mut https = tcp_syn(443, 40000);
    https.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x20]);
    let non_sip = Frame::ip(IpAddr::V4(server), IpAddr::V4(client), PROTO_TCP, https).build();
    for name in [program_names::BENCH_TC_FLOOR, program_names::EGRESS] {
        classifier(loaded, name);
    }
    let mut run = |name: &str, frame: &[u8], repeat: u32| tc_ns(loaded, name, frame, repeat);
    for frame in [&non_sip, &response] {
        run(program_names::BENCH_TC_FLOOR, frame, config.repeat / 10);
        run(program_names::EGRESS, frame, config.repeat / 10);
    }
    let (mut non_sip_over, mut floors, mut non_sip_ns, mut response_ns) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..config.rounds {
        let floor = run(program_names::BENCH_TC_FLOOR, &non_sip, config.repeat);
        let egress = run(program_names::EGRESS, &non_sip, config.repeat);
        floors.push(floor);
        non_sip_ns.push(egress);
        non_sip_over.push(egress - floor);
        response_ns.push(run(program_names::EGRESS, &response, config.repeat));
    }
    let (floor, non_sip, over, response) = (
        median(floors),
        median(non_sip_ns),
        median(non_sip_over),
        median(response_ns),
    );
    switch(DetectConfig::default());
    println!();
    println!("the egress classifier (detection on), ns per packet; over is against the floor");
    println!("{:<34} {:>8} {:>8}", "program", "ns/pkt", "over");
    println!("{:<34} {floor:>8.1} {:>8}", "bare TC_ACT_OK (floor)", "-");
    println!(
        "{:<34} {non_sip:>8.1} {over:>8.1}",
        "  egress, HTTPS packet"
    );
    println!(
        "{:<34} {response:>8.1} {:>8.1}",
        "  egress, SIP 200 to a followed source",
        response - floor
    );
    json.insert("egress_floor_ns".into(), round(floor));
    json.insert("egress_non_sip_ns_over".into(), round(over));
    json.insert("egress_sip_response_ns".into(), round(response));
}

/// The kernel's mean ns of one run of the XDP program `name` on `frame`.
fn xdp_ns(loaded: &mut Loaded, name: &str, frame: &[u8], repeat: u32) -> f64 {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.repeat = repeat;
    program(loaded, name)
        .test_run(opts)
        .expect("test run")
        .duration
        .as_nanos() as f64
}

fn classifier<'a>(loaded: &'a mut Loaded, name: &str) -> &'a mut SchedClassifier {
    let prog: &mut SchedClassifier = loaded
        .ebpf_mut()
        .program_mut(name)
        .expect("classifier in object")
        .try_into()
        .expect("a classifier");
    if prog.fd().is_err() {
        prog.load().expect("load the classifier");
    }
    prog
}

/// The same for the classifier `name`.
fn tc_ns(loaded: &mut Loaded, name: &str, frame: &[u8], repeat: u32) -> f64 {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.repeat = repeat;
    classifier(loaded, name)
        .test_run(opts)
        .expect("test run")
        .duration
        .as_nanos() as f64
}
