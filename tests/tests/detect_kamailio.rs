//! Detection in enforce mode in front of a real registrar: Kamailio from Debian, with digest
//! authentication, on UDP, TCP and TLS (`tests::kamailio`). The attackers (SIPVicious with
//! its own User-Agent and with a phone's, SIPp floods and password guessing) are banned by
//! what they do, within two seconds of the evidence their rule needs; the office behind one
//! NAT address, its keep-alives, a phone over TLS and forged packets from the office's
//! proven address ban no one, and every one of their requests is answered.

use std::{
    net::IpAddr,
    path::Path,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use tests::{
    agent::banned,
    attackers::{Tool, sipp, sipp_scenario, sipvicious, sipvicious_with_user_agent},
    crowd::{PHONE, keep_alives, phone_users},
    kamailio::{Registrar, tls_phone},
    require_root,
    scene::Scene,
    send_udp,
};

const SERVER: &str = "10.77.0.1";
/// Kamailio's UDP and TCP port; svmap also probes the two after it, so that a scan of three
/// ports brings the three requests a signature needs.
const PORT: u16 = 5072;
const TLS_PORT: u16 = 5071;
const DETECT: [&str; 6] = [
    "--detect",
    "enforce",
    "--detect-ports",
    "5072,5073,5074",
    "--detect-tls-ports",
    "5071",
];
const PHONE_UA: &str = "Yealink SIP-T46S 66.86.0.15";

fn ttl_of(check: &serde_json::Value) -> u64 {
    let record = &check["records"][0];
    record["expires"].as_u64().unwrap_or(0) - record["first_seen"].as_u64().unwrap_or(0)
}

/// Starts `program args` from `addr` and waits for its ban; returns the time from the start
/// and the still running tool.
fn ban_of(
    scene: &Scene,
    program: &Path,
    addr: &str,
    args: &[&str],
    what: &str,
) -> (Duration, Tool) {
    let src: IpAddr = addr.parse().expect("literal");
    let started = Instant::now();
    let tool = Tool::start(
        &scene.topo.attacker,
        program,
        args,
        scene.dir.path.join(format!("{what}.log")),
    );
    let socket = scene.control_socket();
    while !banned(&socket, src) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what} from {addr} not banned after 10 s:\n{}\n{}\n{}",
            scene.agent().log_text(),
            scene.status()["agent"]["detect"],
            tool.output()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = started.elapsed();
    println!("{what} from {addr}: banned {took:?} after it started");
    (took, tool)
}

/// The rule that banned `addr`, and its TTL.
fn rule_of(scene: &Scene, addr: &str) -> (String, u64) {
    let check = scene.check_recorded(addr);
    let record = &check["records"][0];
    assert_eq!(record["source"], "detect", "{check}");
    (
        record["evidence"]["rule"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        ttl_of(&check),
    )
}

/// One attacker's run: what it is, the program and its arguments, its source, the rules
/// that may ban it and the TTL they give.
struct Run<'a> {
    what: &'a str,
    program: std::path::PathBuf,
    addr: &'a str,
    args: Vec<&'a str>,
    rules: &'a [&'a str],
    ttl: u64,
}

#[test]
fn sipvicious_at_kamailio_over_udp_is_banned_by_what_it_does() {
    require_root();
    let mut scene = Scene::new();
    scene.start(&DETECT);
    let probe = scene.source("45.86.0.100");
    let registrar = Registrar::start(
        &scene.topo.server,
        &scene.dir.path,
        SERVER.parse().expect("literal"),
        PORT,
        TLS_PORT,
        &scene.topo.attacker,
        probe,
    );
    let port = PORT.to_string();
    let dir = scene.dir.path.clone();
    // With its own User-Agent, a signature; with a phone's, what it does. svmap with a phone's sends one
    // OPTIONS a port, as a phone's keep-alive does: nothing to tell it apart by, so it is
    // not in the list.
    let runs = [
        Run {
            what: "svmap",
            program: sipvicious("svmap"),
            addr: "45.86.0.1",
            args: vec!["-p", "5072-5074", SERVER],
            rules: &["scanner-user-agent"],
            ttl: 600,
        },
        Run {
            what: "svwar",
            program: sipvicious("svwar"),
            addr: "45.86.0.2",
            args: vec!["-p", port.as_str(), "--force", "-e", "100-400", SERVER],
            rules: &["scanner-user-agent"],
            ttl: 600,
        },
        Run {
            what: "svcrack",
            program: sipvicious("svcrack"),
            addr: "45.86.0.3",
            args: vec!["-p", port.as_str(), "-u", "200", "-r", "1000-1400", SERVER],
            rules: &["scanner-user-agent"],
            ttl: 600,
        },
        // Most of the users it walks do not exist: Kamailio's 404s, or the walk itself.
        // Over UDP a forger could bring either, so ten minutes.
        Run {
            what: "svwar as a phone",
            program: sipvicious_with_user_agent(&dir, "svwar", PHONE_UA),
            addr: "45.86.0.4",
            args: vec!["-p", port.as_str(), "--force", "-e", "100-400", SERVER],
            rules: &["unknown-users", "extension-enumeration"],
            ttl: 600,
        },
        // Each guess answers a challenge whose nonce went to its address only, and is
        // refused: evidence no forger can bring, so a day.
        Run {
            what: "svcrack as a phone",
            program: sipvicious_with_user_agent(&dir, "svcrack", PHONE_UA),
            addr: "45.86.0.5",
            args: vec!["-p", port.as_str(), "-u", "200", "-r", "1000-1400", SERVER],
            rules: &["auth-failure"],
            ttl: 86_400,
        },
    ];
    for Run {
        what,
        program,
        addr,
        mut args,
        rules,
        ttl,
    } in runs
    {
        // SIPVicious sends from the route's source address, whatever its -b.
        scene.source_by_route(addr, SERVER);
        let mut full = vec!["-b", addr];
        full.append(&mut args);
        let (took, tool) = ban_of(&scene, &program, addr, &full, what);
        let (rule, got_ttl) = rule_of(&scene, addr);
        assert!(rules.contains(&rule.as_str()), "{what}: banned by {rule}");
        assert_eq!(got_ttl, ttl, "{what}: {rule}");
        // Within two seconds of the evidence its rule needs: three requests, or ten to
        // twenty answers, which each tool sends in well under a second.
        assert!(took < Duration::from_secs(2), "{what}: {took:?}");
        drop(tool);
    }
    // A REGISTER flood with a phone's User-Agent: the rate rule (300 a 10 s).
    let scenario = dir.join("flood.xml");
    std::fs::write(&scenario, sipp_scenario("REGISTER", "250", PHONE_UA, None))
        .expect("write the scenario");
    let flooder = scene.source("45.86.0.6");
    let target = format!("{SERVER}:{PORT}");
    let (took, _flood) = ban_of(
        &scene,
        &sipp(),
        "45.86.0.6",
        &[
            "-sf",
            &scenario.display().to_string(),
            "-i",
            "45.86.0.6",
            "-p",
            "5090",
            "-r",
            "1000",
            "-m",
            "5000",
            "-nostdin",
            &target,
        ],
        "a REGISTER flood as a phone",
    );
    assert_eq!(rule_of(&scene, &flooder.to_string()).0, "request-rate");
    assert!(took < Duration::from_secs(2), "{took:?}");
    println!("{}", scene.agent().cli_ok(&["check", "45.86.0.5"]));
    drop(registrar);
}

#[test]
fn over_tcp_a_password_guesser_and_a_flood_are_banned_and_the_office_is_not() {
    require_root();
    let mut scene = Scene::new();
    scene.start(&DETECT);
    let office = scene.source("45.87.0.1");
    let guesser = scene.source("45.87.0.2");
    let flooder = scene.source("45.87.0.3");
    let registrar = Registrar::start(
        &scene.topo.server,
        &scene.dir.path,
        SERVER.parse().expect("literal"),
        PORT,
        TLS_PORT,
        &scene.topo.attacker,
        office,
    );
    let dir = &scene.dir.path;
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write a SIPp file");
        path.display().to_string()
    };
    let phone = write("phone.xml", PHONE);
    // 60 phones, each on a connection of its own, register at once through challenges.
    let users = write("users.csv", &phone_users(60));
    let target = format!("{SERVER}:{PORT}");
    let mut phones = Tool::start(
        &scene.topo.attacker,
        &sipp(),
        &[
            "-sf",
            &phone,
            "-inf",
            &users,
            "-t",
            "tn",
            "-max_socket",
            "100",
            "-i",
            "45.87.0.1",
            "-r",
            "30",
            "-m",
            "60",
            "-nostdin",
            &target,
        ],
        dir.join("sipp-office.log"),
    );
    assert_eq!(
        phones.wait(Duration::from_secs(30)),
        Some(0),
        "every phone registers:\n{}",
        phones.output()
    );
    // Proven over TCP too: 200s to REGISTERs that answered Kamailio's challenges.
    let detect = scene.status()["agent"]["detect"].clone();
    assert_eq!(detect["proven"], 1, "{detect}");
    // A guesser over TCP: the same phone, the same user each time, a wrong password.
    let guesses: String = std::iter::once("SEQUENTIAL\n".to_owned())
        .chain((0..50).map(|n| format!("200;[authentication username=200 password=guess{n}]\n")))
        .collect();
    let guesses = write("guesses.csv", &guesses);
    let (took, _guessing) = ban_of(
        &scene,
        &sipp(),
        "45.87.0.2",
        &[
            "-sf",
            &phone,
            "-inf",
            &guesses,
            "-t",
            "t1",
            "-i",
            "45.87.0.2",
            "-r",
            "40",
            "-m",
            "200",
            "-nostdin",
            &target,
        ],
        "a password guesser over TCP",
    );
    let (rule, ttl) = rule_of(&scene, &guesser.to_string());
    assert_eq!((rule.as_str(), ttl), ("auth-failure", 86_400));
    // The rule needs ten refused guesses seen; the program samples the first eight
    // requests of a source and then one in eight, and half of the guesser's are the
    // challenged first REGISTER of each call: about 150 requests, 2 s at 40 guesses a second.
    assert!(took < Duration::from_secs(4), "{took:?}");
    // A REGISTER flood over TCP with a phone's User-Agent.
    let flood = write(
        "flood.xml",
        &sipp_scenario("REGISTER", "250", PHONE_UA, None),
    );
    let (took, _flood) = ban_of(
        &scene,
        &sipp(),
        "45.87.0.3",
        &[
            "-sf",
            &flood,
            "-t",
            "t1",
            "-i",
            "45.87.0.3",
            "-r",
            "1000",
            "-m",
            "5000",
            "-nostdin",
            &target,
        ],
        "a REGISTER flood over TCP",
    );
    assert_eq!(rule_of(&scene, &flooder.to_string()).0, "request-rate");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(
        phones.wait(Duration::from_secs(30)),
        Some(0),
        "every phone registers:\n{}",
        phones.output()
    );
    assert!(!banned(&scene.control_socket(), office), "the office");
    drop(registrar);
}

#[test]
fn the_office_its_keep_alives_a_tls_phone_and_forgeries_from_its_address_ban_no_one() {
    require_root();
    let mut scene = Scene::new();
    scene.start(&DETECT);
    let office = scene.source("45.88.0.1");
    let tls_src = "45.88.0.2";
    let forged_new = scene.source("45.88.0.9");
    let registrar = Registrar::start(
        &scene.topo.server,
        &scene.dir.path,
        SERVER.parse().expect("literal"),
        PORT,
        TLS_PORT,
        &scene.topo.attacker,
        office,
    );
    let dir = &scene.dir.path;
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write a SIPp file");
        path.display().to_string()
    };
    let phone = write("phone.xml", PHONE);
    let users = write("users.csv", &phone_users(60));
    let target = format!("{SERVER}:{PORT}");
    let register = |rate: &str, log: &str| {
        Tool::start(
            &scene.topo.attacker,
            &sipp(),
            &[
                "-sf",
                &phone,
                "-inf",
                &users,
                "-i",
                "45.88.0.1",
                "-p",
                "5091",
                "-r",
                rate,
                "-m",
                "60",
                "-nostdin",
                &target,
            ],
            dir.join(log),
        )
    };
    // After a power cut: 60 phones register within about 2 s, each through a challenge.
    let mut burst = register("30", "sipp-burst.log");
    // Their keep-alives (CRLF and STUN, every 100 ms from six sockets), and a phone over
    // TLS sending an OPTIONS every 250 ms, for the whole run.
    let stop = Arc::new(AtomicBool::new(false));
    let keeping = keep_alives(
        &scene.topo.attacker,
        office,
        registrar.addr,
        6,
        Duration::from_millis(100),
        stop.clone(),
    );
    scene.source_by_route(tls_src, SERVER);
    let run = Duration::from_secs(60);
    let tls = tls_phone(
        &scene.topo.attacker,
        &registrar,
        Duration::from_millis(250),
        run - Duration::from_secs(5),
    );
    assert_eq!(
        burst.wait(Duration::from_secs(30)),
        Some(0),
        "every phone registers after the outage:\n{}",
        burst.output()
    );
    let socket = scene.control_socket();
    let started = Instant::now();
    let mut cycle = None;
    let mut forged = false;
    while started.elapsed() < run {
        for addr in [office, tls_src.parse().expect("literal")] {
            assert!(
                !banned(&socket, addr),
                "{addr} was banned after {:?}:\n{}",
                started.elapsed(),
                scene.agent().log_text()
            );
        }
        if cycle.is_none() && started.elapsed() > Duration::from_secs(5) {
            // The normal cycle: the same phones re-register, one a second.
            cycle = Some(register("1", "sipp-cycle.log"));
        }
        if !forged && started.elapsed() > Duration::from_secs(10) {
            // Forged: a scanner's User-Agent from the office's address, proven by
            // Kamailio's 200s to its authenticated REGISTERs; 40 carry the three samples a
            // signature needs. And five from an address no one vouches for.
            send_udp(&scene.topo.attacker, office, registrar.addr, 40);
            send_udp(&scene.topo.attacker, forged_new, registrar.addr, 5);
            forged = true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent_keep_alives = keeping.join().expect("the keep-alive thread");
    let (tls_sent, tls_answered) = tls.join().expect("the TLS phone");
    let mut cycle = cycle.expect("the cycle started");
    assert_eq!(
        cycle.wait(Duration::from_secs(30)),
        Some(0),
        "every phone re-registers:\n{}",
        cycle.output()
    );
    println!("{}", scene.agent().cli_ok(&["status"]));
    println!("{sent_keep_alives} keep-alives; TLS: {tls_answered} of {tls_sent} OPTIONS answered");
    assert!(sent_keep_alives > 1_000, "{sent_keep_alives}");
    assert!(tls_sent > 100, "{tls_sent}");
    assert_eq!(tls_answered, tls_sent, "every OPTIONS over TLS is answered");
    let status = scene.status();
    let detect = &status["agent"]["detect"];
    assert!(detect["proven"].as_u64().unwrap_or(0) >= 1, "{detect}");
    assert!(detect["tls_packets"].as_u64().unwrap_or(0) > 0, "{detect}");
    assert!(
        detect["keepalives"].as_u64().unwrap_or(0) > 1_000,
        "{detect}"
    );
    assert_eq!(detect["unreadable"], 0, "{detect}");
    // The office's forgeries were reported, not enforced; the new address's were, briefly.
    assert!(!banned(&socket, office));
    let (rule, ttl) = rule_of(&scene, &forged_new.to_string());
    assert_eq!((rule.as_str(), ttl), ("scanner-user-agent", 600));
    drop(registrar);
}
