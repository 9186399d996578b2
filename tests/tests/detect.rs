//! SIP scanner detection against real attackers and a real customer: SIPVicious and SIPp in
//! the attacker namespace, the agent's XDP program on the server side, real datagrams.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use tests::{
    agent::{banned, http_get},
    attackers::{SipResponder, Tool, sipp, sipp_scenario, sipvicious, sipvicious_with_user_agent},
    require_root,
    scene::Scene,
    wait_until,
};

const SERVER: &str = "10.77.0.1";

/// The SIP server the scanners talk to: a port of its own, so that the scene's receiver
/// keeps 5060; the agent is told it is a SIP port, and so are the two after it, which svmap
/// probes too (5061 is the TLS port, counted and never read).
const PBX_PORT: &str = "5062";
const DETECT_PORTS: [&str; 2] = ["--detect-ports", "5060,5062,5063,5064"];
/// svmap probes each port once. A signature needs three requests (one forged datagram must
/// not ban its source), so it scans three ports of the server, as it does a range.
const SVMAP_PORTS: &str = "5062-5064";

/// Makes `addr` the attacker's source towards the server: SIPVicious binds its socket to
/// `-b` but some of its tools send from the route's source address.
fn attack_from(scene: &Scene, addr: &str) -> IpAddr {
    scene.source_by_route(addr, SERVER)
}

/// Runs `tool args` from `addr` and times its ban from the moment its first request
/// reached the server.
fn time_to_ban(
    scene: &Scene,
    pbx: &SipResponder,
    tool: &str,
    addr: &str,
    args: &[&str],
) -> (Duration, Tool) {
    time_to_ban_of(scene, pbx, tool, &sipvicious(tool), addr, args)
}

/// As [`time_to_ban`], running `program` as `tool`.
fn time_to_ban_of(
    scene: &Scene,
    pbx: &SipResponder,
    tool: &str,
    program: &Path,
    addr: &str,
    args: &[&str],
) -> (Duration, Tool) {
    let src = attack_from(scene, addr);
    let ports = if tool == "svmap" {
        SVMAP_PORTS
    } else {
        PBX_PORT
    };
    let mut full = vec!["-b", addr, "-p", ports];
    full.extend_from_slice(args);
    let log = scene.dir.path.join(format!("{tool}.log"));
    let tool_run = Tool::start(&scene.topo.attacker, program, &full, log);
    let socket = scene.control_socket();
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        if pbx.count(src) > 0 {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{tool} sent nothing in 20 s:\n{}",
            tool_run.output()
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    while !banned(&socket, src) {
        assert!(
            first.elapsed() < Duration::from_secs(5),
            "{tool} from {addr} not banned 5 s after its first packet:\n{}\n{}\n{}",
            scene.agent().log_text(),
            scene.status()["agent"]["detect"],
            tool_run.output()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    (first.elapsed(), tool_run)
}

#[test]
fn sipvicious_is_banned_within_a_second_of_its_first_packets() {
    require_root();
    let mut scene = Scene::new();
    let mut args = vec!["--detect", "enforce"];
    args.extend(DETECT_PORTS);
    scene.start(&args);
    let pbx = SipResponder::start(
        &scene.topo.server,
        format!("{SERVER}:{PBX_PORT}").parse().expect("literal"),
    );
    let runs: [(&str, &str, &[&str]); 3] = [
        ("svmap", "45.81.0.1", &[SERVER]),
        ("svwar", "45.81.0.2", &["--force", "-e", "100-400", SERVER]),
        (
            "svcrack",
            "45.81.0.3",
            &["-u", "100", "-r", "1000-1400", SERVER],
        ),
    ];
    for (tool, addr, args) in runs {
        let (took, mut run) = time_to_ban(&scene, &pbx, tool, addr, args);
        println!("{tool} from {addr}: banned {took:?} after its first request reached the server");
        assert!(took <= Duration::from_secs(1), "{tool}: {took:?}");
        let check = scene.check_recorded(addr);
        let record = &check["records"][0];
        assert_eq!(record["source"], "detect", "{check}");
        assert_eq!(record["evidence"]["rule"], "scanner-user-agent", "{check}");
        assert!(
            record["evidence"]["line"]
                .as_str()
                .is_some_and(|l| l.contains("friendly-scanner")),
            "{check}"
        );
        // Ten minutes, the default for a first offence: a forged source could bring the
        // same evidence.
        let ttl =
            record["expires"].as_u64().unwrap_or(0) - record["first_seen"].as_u64().unwrap_or(0);
        assert_eq!(ttl, 600, "{check}");
        // The ban holds: the tool gives up without answers, having reached the server only
        // with what it sent before the ban.
        let _ = run.wait(Duration::from_secs(60));
        let reached = pbx.count(addr.parse().expect("literal"));
        println!("  {reached} of its requests reached the server");
        if tool != "svmap" {
            assert!(reached < 100, "{tool}: {reached} requests got through");
        }
    }
    println!("{}", scene.agent().cli_ok(&["check", "45.81.0.2"]));
    println!("{}", scene.agent().cli_ok(&["status"]));
    let status = scene.status();
    let dropped = status["traffic"][&scene.topo.server_if]["dropped"]["packets"]
        .as_u64()
        .unwrap_or(0);
    assert!(dropped > 0, "nothing dropped: {status}");
    assert_eq!(status["agent"]["detect"]["bans"], 3, "{status}");
}

#[test]
fn observe_mode_drops_nothing_and_reports_the_would_be_ban() {
    require_root();
    let mut scene = Scene::new();
    let metrics: SocketAddr = "127.0.0.1:19481".parse().expect("literal");
    // No --detect: observe is the default until an operator chooses.
    let mut args = vec!["--metrics-addr", "127.0.0.1:19481"];
    args.extend(DETECT_PORTS);
    scene.start(&args);
    let pbx = SipResponder::start(
        &scene.topo.server,
        format!("{SERVER}:{PBX_PORT}").parse().expect("literal"),
    );
    let src = attack_from(&scene, "45.81.0.4");
    let log = scene.dir.path.join("svwar.log");
    let mut tool = Tool::start(
        &scene.topo.attacker,
        &sipvicious("svwar"),
        &[
            "-b",
            "45.81.0.4",
            "-p",
            PBX_PORT,
            "--force",
            "-e",
            "100-160",
            SERVER,
        ],
        log,
    );
    let socket = scene.control_socket();
    wait_until("the would-be ban", Duration::from_secs(20), || {
        scene.status()["agent"]["detect"]["recent"]
            .as_array()
            .is_some_and(|r| r.iter().any(|d| d["addr"] == "45.81.0.4"))
    });
    let _ = tool.wait(Duration::from_secs(60));
    assert!(!banned(&socket, src));
    let status = scene.status();
    let recent = &status["agent"]["detect"]["recent"][0];
    assert_eq!(recent["mode"], "observe", "{status}");
    assert_eq!(recent["rule"], "scanner-user-agent", "{status}");
    assert_eq!(recent["outcome"], "would ban (observe mode)", "{status}");
    let iface = &status["traffic"][&scene.topo.server_if];
    assert_eq!(iface["dropped"]["packets"], 0, "{status}");
    // Every extension svwar tried reached the server.
    let reached = pbx.count(src);
    assert!(
        reached >= 61,
        "{reached} requests reached the server:\n{}",
        tool.output()
    );
    let (code, body) = http_get(Some(&scene.topo.server), metrics, "/metrics");
    assert_eq!(code, 200);
    assert!(
        body.contains(r#"apiban_detect_matches_total{rule="scanner-user-agent",mode="observe"} 1"#),
        "{body}"
    );
    assert!(
        body.contains(r#"apiban_detect_matches_total{rule="scanner-user-agent",mode="enforce"} 0"#),
        "{body}"
    );
    let text = scene.agent().cli_ok(&["status"]);
    assert!(text.contains("would ban (observe mode)"), "{text}");
}

#[test]
fn a_register_flood_with_a_normal_user_agent_is_banned_by_the_rate_rule() {
    require_root();
    let mut scene = Scene::new();
    scene.start(&["--detect", "enforce"]);
    let src = scene.source("45.82.0.1");
    let scenario = scene.dir.path.join("flood.xml");
    std::fs::write(
        &scenario,
        sipp_scenario("REGISTER", "1000", "Grandstream GXP2170 1.0.11.23", None),
    )
    .expect("write the scenario");
    let log = scene.dir.path.join("sipp-flood.log");
    let started = Instant::now();
    let mut flood = Tool::start(
        &scene.topo.attacker,
        &sipp(),
        &[
            "-sf",
            &scenario.display().to_string(),
            "-i",
            "45.82.0.1",
            "-p",
            "5070",
            "-r",
            "300",
            "-m",
            "3000",
            "-nostdin",
            &format!("{SERVER}:5060"),
        ],
        log,
    );
    let socket = scene.control_socket();
    while !banned(&socket, src) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the flood is not banned after 10 s:\n{}\n{}",
            flood.output(),
            scene.agent().log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "REGISTER flood at 300/s banned {:?} after SIPp started",
        started.elapsed()
    );
    let check = scene.check_recorded("45.82.0.1");
    let evidence = &check["records"][0]["evidence"];
    assert_eq!(evidence["rule"], "request-rate", "{check}");
    assert!(
        evidence["counts"]
            .as_str()
            .is_some_and(|c| c.contains("REGISTER")),
        "{check}"
    );
    let _ = flood.wait(Duration::from_secs(30));
    scene.rx.drain();
    let arrived = scene.rx.count(src);
    assert!(
        arrived < 3000 / 2,
        "{arrived} of 3000 REGISTERs arrived: the ban did not hold"
    );
}

#[test]
fn a_customer_pbx_at_a_normal_pace_is_never_banned() {
    require_root();
    let mut scene = Scene::new();
    scene.start(&["--detect", "enforce"]);
    let src = scene.source("45.83.0.1");
    let register = scene.dir.path.join("register.xml");
    let invite = scene.dir.path.join("invite.xml");
    // Registered at the start and again 60 s later, as a PBX refreshes its registration.
    std::fs::write(
        &register,
        sipp_scenario("REGISTER", "pbx", "Asterisk PBX 20.5.0", Some(60_000)),
    )
    .expect("write the scenario");
    // A call to a different number each time, as a PBX's outbound calls go.
    std::fs::write(
        &invite,
        sipp_scenario(
            "INVITE",
            "0049301234[call_number]",
            "Asterisk PBX 20.5.0",
            None,
        ),
    )
    .expect("write the scenario");
    let sipp_args = |scenario: &Path, port: &str, rate: &[&str], calls: &str| -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-sf".into(),
            scenario.display().to_string(),
            "-i".into(),
            "45.83.0.1".into(),
            "-p".into(),
            port.into(),
        ];
        a.extend(rate.iter().map(|s| (*s).to_owned()));
        a.extend([
            "-m".into(),
            calls.into(),
            "-nostdin".into(),
            format!("{SERVER}:5060"),
        ]);
        a
    };
    let reg_args = sipp_args(&register, "5071", &["-r", "1"], "1");
    let inv_args = sipp_args(&invite, "5072", &["-r", "3"], "186");
    let started = Instant::now();
    let mut registrations = Tool::start(
        &scene.topo.attacker,
        &sipp(),
        &reg_args.iter().map(String::as_str).collect::<Vec<_>>(),
        scene.dir.path.join("sipp-register.log"),
    );
    let mut calls = Tool::start(
        &scene.topo.attacker,
        &sipp(),
        &inv_args.iter().map(String::as_str).collect::<Vec<_>>(),
        scene.dir.path.join("sipp-invite.log"),
    );
    let socket = scene.control_socket();
    while started.elapsed() < Duration::from_secs(61) {
        // Read as they come: 188 datagrams would overflow the socket's buffer.
        scene.rx.drain();
        assert!(
            !banned(&socket, src),
            "the PBX was banned after {:?}:\n{}",
            started.elapsed(),
            scene.agent().log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while calls.running() || registrations.running() {
        assert!(
            Instant::now() < deadline,
            "SIPp did not finish:\n{}",
            calls.output()
        );
        scene.rx.drain();
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("customer PBX ran {:?} without a ban", started.elapsed());
    scene.rx.drain();
    assert_eq!(
        scene.rx.count(src),
        188,
        "every request arrives:\n{}",
        calls.output()
    );
    let status = scene.status();
    let detect = &status["agent"]["detect"];
    assert!(detect["samples"].as_u64().unwrap_or(0) > 0, "{status}");
    assert!(
        detect["recent"].as_array().is_some_and(|r| r.is_empty()),
        "{status}"
    );
}

#[test]
fn a_scanner_back_after_its_ban_expired_is_banned_for_twice_as_long() {
    require_root();
    let mut scene = Scene::new();
    let mut args = vec![
        "--detect",
        "enforce",
        "--detect-forgeable-ttl",
        "3s",
        "--detect-forgeable-ttl-max",
        "8s",
    ];
    args.extend(DETECT_PORTS);
    scene.start(&args);
    let pbx = SipResponder::start(
        &scene.topo.server,
        format!("{SERVER}:{PBX_PORT}").parse().expect("literal"),
    );
    let addr = "45.81.0.5";
    let src: IpAddr = addr.parse().expect("literal");
    let mut ttls = Vec::new();
    for round in 0..3 {
        let (_, mut run) = time_to_ban(&scene, &pbx, "svmap", addr, &[SERVER]);
        let check = scene.check_recorded(addr);
        let record = &check["records"][0];
        let ttl =
            record["expires"].as_u64().unwrap_or(0) - record["first_seen"].as_u64().unwrap_or(0);
        assert_eq!(record["evidence"]["offence"], round + 1, "{check}");
        ttls.push(ttl);
        let _ = run.wait(Duration::from_secs(30));
        scene.wait_verdict(src, "not banned", Duration::from_secs(15));
        if round == 0 {
            // The count outlives the agent: saved within 5 s, read at the next start.
            std::thread::sleep(Duration::from_secs(6));
            assert_eq!(scene.stop(), Some(0));
            scene.start(&args);
        }
    }
    // 3 s, doubled to 6 s (after a restart), then capped at 8 s.
    assert_eq!(ttls, [3, 6, 8]);
}

#[test]
fn an_extension_walk_with_a_normal_user_agent_is_banned_as_enumeration() {
    require_root();
    let mut scene = Scene::new();
    scene.start(&["--detect", "enforce"]);
    let src = scene.source("45.84.0.1");
    let scenario = scene.dir.path.join("walk.xml");
    // One REGISTER per extension, 5 a second: under the rate rule's 100 in 10 s.
    std::fs::write(
        &scenario,
        sipp_scenario("REGISTER", "[call_number]", "Zoiper rv2.10.20.3", None),
    )
    .expect("write the scenario");
    let started = Instant::now();
    let walk = Tool::start(
        &scene.topo.attacker,
        &sipp(),
        &[
            "-sf",
            &scenario.display().to_string(),
            "-i",
            "45.84.0.1",
            "-p",
            "5073",
            "-r",
            "5",
            "-m",
            "200",
            "-nostdin",
            &format!("{SERVER}:5060"),
        ],
        scene.dir.path.join("sipp-walk.log"),
    );
    let socket = scene.control_socket();
    while !banned(&socket, src) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the walk is not banned after 30 s:\n{}\n{}",
            walk.output(),
            scene.agent().log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "extension walk at 5/s banned {:?} after SIPp started",
        started.elapsed()
    );
    let check = scene.check_recorded("45.84.0.1");
    let evidence = &check["records"][0]["evidence"];
    assert_eq!(evidence["rule"], "extension-enumeration", "{check}");
    // It took about the threshold's 20 extensions, not the 200 of the walk.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// The ban's TTL in seconds, from `check`'s first record.
fn ttl_of(check: &serde_json::Value) -> u64 {
    let record = &check["records"][0];
    record["expires"].as_u64().unwrap_or(0) - record["first_seen"].as_u64().unwrap_or(0)
}

#[test]
fn sipvicious_with_a_phones_user_agent_is_banned_by_what_it_does() {
    require_root();
    let mut scene = Scene::new();
    let mut args = vec!["--detect", "enforce"];
    args.extend(DETECT_PORTS);
    scene.start(&args);
    let pbx = SipResponder::start(
        &scene.topo.server,
        format!("{SERVER}:{PBX_PORT}").parse().expect("literal"),
    );
    const PHONE: &str = "Yealink SIP-T46S 66.86.0.15";
    // svwar walks extensions without ever answering a challenge, and most do not exist:
    // evidence a forger could bring over UDP, so ten minutes.
    let svwar = sipvicious_with_user_agent(&scene.dir.path, "svwar", PHONE);
    let (took, svwar_run) = time_to_ban_of(
        &scene,
        &pbx,
        "svwar",
        &svwar,
        "45.81.0.6",
        &["--force", "-e", "100-400", SERVER],
    );
    println!("svwar as a phone: banned {took:?} after its first request");
    // Whichever of its two marks is counted first: target users without credentials, or
    // the PBX's 404s to it (over UDP, a forger's request gets one too).
    let check = scene.check_recorded("45.81.0.6");
    let evidence = &check["records"][0]["evidence"];
    assert!(
        evidence["rule"] == "extension-enumeration" || evidence["rule"] == "unknown-users",
        "{check}"
    );
    assert_eq!(ttl_of(&check), 600, "{check}");
    // Stopped before the route's source changes: svwar sends from it, whatever its -b.
    drop(svwar_run);
    // svcrack guesses the password of an extension that exists: each guess answers the
    // PBX's challenge, whose nonce went to svcrack's address only (seen on egress), and is
    // refused: auth-failure, which no forger can bring, so a day.
    let svcrack = sipvicious_with_user_agent(&scene.dir.path, "svcrack", PHONE);
    let (took, _svcrack) = time_to_ban_of(
        &scene,
        &pbx,
        "svcrack",
        &svcrack,
        "45.81.0.7",
        &["-u", "100", "-r", "1000-1200", SERVER],
    );
    println!("svcrack as a phone: banned {took:?} after its first request");
    let check = scene.check_recorded("45.81.0.7");
    let evidence = &check["records"][0]["evidence"];
    assert_eq!(evidence["rule"], "auth-failure", "{check}");
    assert_eq!(evidence["unforgeable"], true, "{check}");
    assert_eq!(ttl_of(&check), 86_400, "{check}");
    println!("{}", scene.agent().cli_ok(&["check", "45.81.0.7"]));
}
