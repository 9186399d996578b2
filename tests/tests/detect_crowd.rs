//! Detection in enforce mode against the legitimate crowd of a SIP edge, all at once in one
//! scene for a minute: a trunk peer calling at 30 calls a second, an office of 60 phones
//! behind one NAT address re-registering through digest challenges after an outage, their
//! keep-alives, a SIP client over TLS, and forged scanner packets from the trunk's address
//! (listed as a proven peer) and from the office's (proven by the registrar's answers, seen
//! on egress). None of them may be banned; a forged address nobody vouches for is, briefly.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use tests::{
    agent::control_request,
    attackers::{Tool, sipp},
    crowd::{PHONE, REGISTRAR, TlsSipServer, keep_alives, phone_users, tls_client},
    require_root,
    scene::Scene,
    send_udp, wait_until,
};

const SERVER: &str = "10.77.0.1";
const TRUNK: &str = "45.85.0.1";
const OFFICE: &str = "45.85.0.2";
const TLS_CLIENT: &str = "45.85.0.3";
const FORGED: &str = "45.85.0.9";
/// SIPp's registrar and the trunk's callee, beside the scene's receiver on 5060.
const REGISTRAR_PORT: &str = "5067";
const CALLEE_PORT: &str = "5066";
const RUN: Duration = Duration::from_secs(60);

/// The dataplane's verdict on `addr`, through the control socket.
fn banned(socket: &std::path::Path, addr: &str) -> bool {
    control_request(socket, &format!(r#"{{"op":"check","addr":"{addr}"}}"#))
        .contains(r#""verdict":"banned""#)
}

#[test]
fn the_legitimate_crowd_is_never_banned_in_enforce_mode() {
    require_root();
    let mut scene = Scene::new();
    scene.start(&[
        "--detect",
        "enforce",
        "--detect-ports",
        "5060,5066,5067",
        "--detect-exempt",
        &format!("{TRUNK}/32"),
    ]);
    let peers: Vec<IpAddr> = [TRUNK, OFFICE, TLS_CLIENT, FORGED]
        .iter()
        .map(|a| scene.source(a))
        .collect();
    // The TLS client connects from the route's source address; the others bind theirs.
    scene.source_by_route(TLS_CLIENT, SERVER);
    let dir = &scene.dir.path;
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write a SIPp file");
        path.display().to_string()
    };
    let registrar_xml = file("registrar.xml", REGISTRAR);
    let phone_xml = file("phone.xml", PHONE);
    let users = file("users.csv", &phone_users(60));
    let tool = |ns, args: &[&str], log: &str| Tool::start(ns, &sipp(), args, dir.join(log));

    // The trunk's calls: INVITE, 100, 180, 200, ACK, BYE, 200; 30 a second for a minute.
    let calls = (30 * RUN.as_secs()).to_string();
    let callee = tool(
        &scene.topo.server,
        &["-sn", "uas", "-i", SERVER, "-p", CALLEE_PORT, "-nostdin"],
        "sipp-callee.log",
    );
    let mut trunk = tool(
        &scene.topo.attacker,
        &[
            "-sn",
            "uac",
            "-i",
            TRUNK,
            "-p",
            "5081",
            "-r",
            "30",
            "-d",
            "500",
            "-m",
            &calls,
            "-nostdin",
            &format!("{SERVER}:{CALLEE_PORT}"),
        ],
        "sipp-trunk.log",
    );
    // The office after a power cut: 60 phones register within about 5 s, each through a
    // challenge.
    let mut registrar = tool(
        &scene.topo.server,
        &[
            "-sf",
            &registrar_xml,
            "-i",
            SERVER,
            "-p",
            REGISTRAR_PORT,
            "-m",
            "60",
            "-nostdin",
        ],
        "sipp-registrar.log",
    );
    let mut office = tool(
        &scene.topo.attacker,
        &[
            "-sf",
            &phone_xml,
            "-inf",
            &users,
            "-i",
            OFFICE,
            "-p",
            "5082",
            "-r",
            "12",
            "-m",
            "60",
            "-nostdin",
            &format!("{SERVER}:{REGISTRAR_PORT}"),
        ],
        "sipp-office.log",
    );
    // Six phones' keep-alives, each every 100 ms, to the server's 5060.
    let stop = Arc::new(AtomicBool::new(false));
    let keep_alive_dst = scene.rx.local_addr();
    let keeping = keep_alives(
        &scene.topo.attacker,
        OFFICE.parse().expect("literal"),
        keep_alive_dst,
        6,
        Duration::from_millis(100),
        stop.clone(),
    );
    // SIP over TLS on 5061, a request every 250 ms.
    let tls_server = TlsSipServer::start(
        &scene.topo.server,
        SocketAddr::new(SERVER.parse().expect("literal"), 5061),
    );
    let tls = tls_client(
        &scene.topo.attacker,
        SocketAddr::new(SERVER.parse().expect("literal"), 5061),
        tls_server.cert.clone(),
        Duration::from_millis(250),
        RUN - Duration::from_secs(5),
    );

    let socket = scene.control_socket();
    let started = Instant::now();
    let mut forged = false;
    while started.elapsed() < RUN {
        scene.rx.drain();
        for addr in [TRUNK, OFFICE, TLS_CLIENT] {
            assert!(
                !banned(&socket, addr),
                "{addr} was banned after {:?}:\n{}",
                started.elapsed(),
                scene.agent().log_text()
            );
        }
        if !forged && started.elapsed() > Duration::from_secs(10) {
            // Forged: a scanner's User-Agent from the trunk's address, and from one no
            // operator vouches for. The trunk's address has sent thousands of requests, so
            // only one in eight is sampled: 40 carry the three samples a signature needs.
            // The new address's first eight are all sampled: five are enough.
            // The office's address has sent 120 REGISTERs: 40 forged carry three samples too.
            let dst = scene.rx.local_addr();
            send_udp(&scene.topo.attacker, peers[0], dst, 40);
            send_udp(&scene.topo.attacker, peers[1], dst, 40);
            send_udp(&scene.topo.attacker, peers[3], dst, 5);
            forged = true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent_keep_alives = keeping.join().expect("the keep-alive thread");
    let tls_answers = tls.join().expect("the TLS client");
    let tls_served = tls_server.join();
    let trunk_exit = trunk.wait(Duration::from_secs(30));
    let office_exit = office.wait(Duration::from_secs(30));
    let _ = registrar.wait(Duration::from_secs(10));
    callee.signal(libc::SIGTERM);
    scene.rx.drain();
    println!("{}", scene.agent().cli_ok(&["status"]));

    // Everyone's traffic got through whole.
    assert_eq!(
        trunk_exit,
        Some(0),
        "every call completes:\n{}",
        trunk.output()
    );
    assert_eq!(
        office_exit,
        Some(0),
        "every phone registers:\n{}",
        office.output()
    );
    assert!(
        tls_answers >= 200 && tls_answers == tls_served,
        "{tls_answers} TLS answers, {tls_served} served"
    );
    assert_eq!(
        scene.rx.count(peers[1]),
        sent_keep_alives + 40,
        "every keep-alive, and the 40 forged in the office's name"
    );
    for addr in [TRUNK, OFFICE, TLS_CLIENT] {
        assert_eq!(scene.check(addr)["verdict"], "not banned", "{addr}");
    }

    // The forged scanner from nowhere is banned, for the short first TTL; the trunk's and
    // the office's addresses are spared and the would-be bans shown.
    let check = scene.check(FORGED);
    assert_eq!(check["verdict"], "banned", "{check}");
    let record = &check["records"][0];
    assert_eq!(record["evidence"]["rule"], "scanner-user-agent", "{check}");
    let ttl = record["expires"].as_u64().unwrap_or(0) - record["first_seen"].as_u64().unwrap_or(0);
    assert_eq!(ttl, 600, "{check}");
    let status = scene.status();
    let detect = &status["agent"]["detect"];
    assert_eq!(detect["bans"], 1, "only the forged address: {status}");
    assert_eq!(detect["exempted"], 2, "{status}");
    let spared = |addr: &str, why: &str| {
        detect["recent"].as_array().is_some_and(|r| {
            r.iter().any(|d| {
                d["addr"] == addr
                    && d["outcome"]
                        .as_str()
                        .is_some_and(|o| o.starts_with(&format!("not banned: proven peer ({why}")))
            })
        })
    };
    assert!(spared(TRUNK, "--detect-exempt"), "{status}");
    assert!(
        spared(OFFICE, "200 to an authenticated REGISTER for 2"),
        "the registrar's answers proved the office: {status}"
    );
    // The egress classifier runs beside the XDP program and saw the answers.
    assert_eq!(
        status["agent"]["interfaces"][0]["egress"], "tcx",
        "{status}"
    );
    assert!(detect["responses"].as_u64().unwrap_or(0) > 0, "{status}");
    assert!(detect["proven"].as_u64().unwrap_or(0) >= 1, "{status}");
    // The program's counts reach status within a second.
    wait_until("every keep-alive counted", Duration::from_secs(5), || {
        scene.status()["agent"]["detect"]["keepalives"]
            .as_u64()
            .is_some_and(|n| n == sent_keep_alives as u64)
    });
    assert!(detect["tls_packets"].as_u64().unwrap_or(0) > 0, "{status}");
    assert_eq!(detect["unreadable"], 0, "{status}");
}
