//! CrowdSec's decisions as a feed, against Debian's own CrowdSec: a private Local API in the
//! server's namespace (tests/src/crowdsec.rs), decisions made with `cscli` as an operator or
//! CrowdSec's scenarios make them, the agent reading its stream as a bouncer (by key, or by
//! client certificate over https) and posting its detections as a machine. The fleet's test
//! uses the fake APIBAN's stream, which records which node's key read it.

use std::{net::IpAddr, time::Duration};

use tests::{
    agent::http_get,
    attackers::{SipResponder, Tool, sipvicious, sipvicious_with_user_agent},
    crowdsec::{Lapi, MACHINE},
    fleet::Fleet,
    kamailio::Registrar,
    require_root,
    scene::Scene,
    wait_until,
};

const N: usize = 5;
const PHONE_UA: &str = "Yealink SIP-T46S 66.86.0.15";

fn start_with_crowdsec(s: &mut Scene, lapi: &Lapi) {
    start_with_crowdsec_and(s, lapi, &[]);
}

/// The agent reading `lapi` every second, with `extra` flags.
fn start_with_crowdsec_and(s: &mut Scene, lapi: &Lapi, extra: &[&str]) {
    let mut args = lapi.agent_args();
    args.extend(["--crowdsec-interval".to_owned(), "1s".to_owned()]);
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    s.start(&args);
}

fn banned(s: &Scene, addr: &str) {
    s.wait_verdict(addr.parse().unwrap(), "banned", Duration::from_secs(15));
}

fn not_banned(s: &Scene, addr: &str) {
    s.wait_verdict(addr.parse().unwrap(), "not banned", Duration::from_secs(15));
}

/// Bans of an address and of ranges, both families, are dropped in XDP (a range's every
/// address, not its first only), a captcha is not, and `cscli decisions delete` lets the
/// source through again; `check` and `list` name the decision.
#[test]
fn crowdsec_bans_are_dropped_and_lifted_with_their_decisions() {
    require_root();
    let mut s = Scene::new();
    let lapi = Lapi::start(&s.topo.server);
    for args in [
        &[
            "--ip",
            "45.91.1.2",
            "--duration",
            "10m",
            "--reason",
            "ssh-bf",
        ][..],
        &["--range", "45.92.0.0/24", "--duration", "10m"],
        &["--ip", "2a0e:97c0::7", "--duration", "10m"],
        &["--range", "2a0e:97c0:1::/48", "--duration", "10m"],
        &[
            "--ip",
            "45.91.9.9",
            "--duration",
            "10m",
            "--type",
            "captcha",
        ],
    ] {
        let mut full = vec!["decisions", "add"];
        full.extend_from_slice(args);
        lapi.cscli(&full);
    }
    start_with_crowdsec(&mut s, &lapi);
    for addr in [
        "45.91.1.2",
        "45.92.0.77",
        "2a0e:97c0::7",
        "2a0e:97c0:1:5::9",
    ] {
        banned(&s, addr);
    }
    let check = s.check("45.91.1.2");
    assert_eq!(check["records"][0]["source"], "crowdsec", "{check}");
    assert_eq!(
        check["records"][0]["comment"], "ssh-bf (origin cscli)",
        "{check}"
    );
    assert_eq!(s.check("45.91.9.9")["verdict"], "not banned");
    let rows: Vec<serde_json::Value> = serde_json::from_str(
        &s.agent()
            .cli_ok(&["list", "--json", "--source", "crowdsec"]),
    )
    .unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    // Real packets: from inside the range (not its first address) and from the hosts.
    let v4: Vec<IpAddr> = ["45.92.0.77", "45.91.1.2"]
        .iter()
        .map(|a| s.source(a))
        .collect();
    assert_eq!(s.probe(&v4, N), vec![0, 0]);
    let v6: Vec<IpAddr> = ["2a0e:97c0:1:5::9", "2a0e:97c0::7"]
        .iter()
        .map(|a| s.source(a))
        .collect();
    assert_eq!(s.probe(&v6, N), vec![0, 0]);
    let captcha = s.source("45.91.9.9");
    assert_eq!(s.probe(&[captcha], N), vec![N]);

    lapi.cscli(&["decisions", "delete", "--range", "45.92.0.0/24"]);
    lapi.cscli(&["decisions", "delete", "--ip", "2a0e:97c0::7"]);
    not_banned(&s, "45.92.0.77");
    not_banned(&s, "2a0e:97c0::7");
    assert_eq!(s.probe(&v4, N), vec![N, 0]);
    assert_eq!(s.probe(&v6, N), vec![0, N]);
    let status = s.agent().cli_ok(&["status"]);
    assert!(status.contains("crowdsec      last read"), "{status}");
}

/// A decision ends when CrowdSec says it does: LAPI reports its expiry in the stream.
#[test]
fn a_crowdsec_decision_ends_with_its_duration() {
    require_root();
    let mut s = Scene::new();
    let lapi = Lapi::start(&s.topo.server);
    start_with_crowdsec(&mut s, &lapi);
    // Added once the agent runs: its start on a busy machine must not outlast the decision.
    // Measured on the wall clock, the one LAPI and the agent end decisions by: a VM's clock
    // stepped forward (a restored snapshot) ends the decision early for both, and that is
    // CrowdSec's duration kept, not cut short.
    let added = std::time::SystemTime::now();
    lapi.cscli(&["decisions", "add", "--ip", "45.91.3.3", "--duration", "15s"]);
    banned(&s, "45.91.3.3");
    s.wait_verdict(
        "45.91.3.3".parse().unwrap(),
        "not banned",
        Duration::from_secs(40),
    );
    let lasted = added.elapsed().unwrap_or_default();
    assert!(
        lasted >= Duration::from_secs(14),
        "lifted after {lasted:?}, before its decision ended; LAPI holds:\n{}\nthe agent's log:\n{}",
        lapi.cscli(&["decisions", "list", "-a", "-o", "raw"]),
        s.agent().log_text()
    );
}

/// Restarted while LAPI is down, the agent enforces CrowdSec's bans from its state at once
/// and says LAPI fails; once LAPI is back, a decision deleted meanwhile goes and one added
/// meanwhile comes.
#[test]
fn a_restart_with_crowdsec_down_keeps_its_bans_and_catches_up() {
    require_root();
    let mut s = Scene::new();
    let mut lapi = Lapi::start(&s.topo.server);
    for ip in ["45.91.4.1", "45.91.4.2"] {
        lapi.cscli(&["decisions", "add", "--ip", ip, "--duration", "1h"]);
    }
    start_with_crowdsec(&mut s, &lapi);
    banned(&s, "45.91.4.1");
    banned(&s, "45.91.4.2");
    s.stop();
    lapi.stop();
    start_with_crowdsec(&mut s, &lapi);
    for ip in ["45.91.4.1", "45.91.4.2"] {
        assert_eq!(s.check(ip)["verdict"], "banned", "{ip} after the restart");
    }
    wait_until(
        "the agent to say that LAPI fails",
        Duration::from_secs(15),
        || s.status()["sync"]["crowdsec"]["last_error"].is_string(),
    );
    lapi.run();
    lapi.cscli(&["decisions", "delete", "--ip", "45.91.4.2"]);
    lapi.cscli(&["decisions", "add", "--ip", "45.91.4.3", "--duration", "1h"]);
    // The retry backs off from 2 s: within a minute.
    s.wait_verdict(
        "45.91.4.3".parse().unwrap(),
        "banned",
        Duration::from_secs(60),
    );
    not_banned(&s, "45.91.4.2");
    assert_eq!(s.check("45.91.4.1")["verdict"], "banned");
    assert!(s.status()["sync"]["crowdsec"]["last_error"].is_null());
}

/// Over https, known by a client certificate (mTLS, no key), the agent reads CrowdSec's
/// decisions; with `--crowdsec-post-forgeable`, a SIPVicious scan that detection bans on
/// its User-Agent reaches CrowdSec as an alert with its ban decision, scenario
/// apiban/<rule>, so that CrowdSec's other bouncers ban the scanner too. A certificate of an
/// OU LAPI does not take is refused, and `status` says what to check.
#[test]
fn over_https_a_client_certificate_reads_decisions_and_a_scan_is_posted_when_asked() {
    require_root();
    const SERVER: &str = "10.77.0.1";
    let mut s = Scene::new();
    let lapi = Lapi::start_tls(&s.topo.server);
    lapi.cscli(&["decisions", "add", "--ip", "45.91.6.1", "--duration", "1h"]);
    let password = lapi.password_file().display().to_string();
    start_with_crowdsec_and(
        &mut s,
        &lapi,
        &[
            "--crowdsec-machine",
            MACHINE,
            "--crowdsec-password-file",
            &password,
            "--crowdsec-post-forgeable",
            "--detect",
            "enforce",
            "--detect-ports",
            "5060,5062,5063,5064",
        ],
    );
    banned(&s, "45.91.6.1");
    let bouncers = lapi.cscli(&["bouncers", "list", "-o", "raw"]);
    assert!(
        bouncers
            .lines()
            .any(|l| l.starts_with("apiban-test@") && l.ends_with(",tls")),
        "LAPI knows the agent by its certificate:\n{bouncers}"
    );
    let _pbx = SipResponder::start(
        &s.topo.server,
        format!("{SERVER}:5062").parse().expect("literal"),
    );
    let scanner = "45.81.0.1";
    s.source_by_route(scanner, SERVER);
    let log = s.dir.path.join("svmap.log");
    let _scan = Tool::start(
        &s.topo.attacker,
        &sipvicious("svmap"),
        &["-b", scanner, "-p", "5062-5064", SERVER],
        log,
    );
    s.wait_verdict(scanner.parse().unwrap(), "banned", Duration::from_secs(20));
    posted(&lapi, scanner, "apiban/scanner-user-agent");
    let status = s.status();
    assert_eq!(status["sync"]["crowdsec"]["alerts_posted"], 1, "{status}");
    // CrowdSec's stream brings its decision back: the ban is now both sources'.
    wait_until(
        "CrowdSec's decision in the agent's ledger",
        Duration::from_secs(15),
        || {
            let sources = sources_of(&s, scanner);
            sources.contains(&"detect".to_owned()) && sources.contains(&"crowdsec".to_owned())
        },
    );

    // Another OU: LAPI refuses it, the agent keeps what it has and says what to check.
    s.stop();
    let args: Vec<String> = lapi
        .agent_args()
        .into_iter()
        .map(|a| a.replace("bouncer", "stranger"))
        .collect();
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--crowdsec-interval", "1s"]);
    s.start(&args);
    wait_until(
        "the agent to say LAPI refused its certificate",
        Duration::from_secs(15),
        || {
            s.status()["sync"]["crowdsec"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("bouncers_allowed_ou"))
        },
    );
    assert_eq!(s.check("45.91.6.1")["verdict"], "banned");
}

/// By default only detection's bans on evidence no forged source address can bring go to
/// CrowdSec: in front of Kamailio (digest authentication), a password guesser with a
/// phone's User-Agent (auth-failure: refused answers to challenges only its address saw) is
/// posted; a SIPVicious scan banned on its User-Agent, which anyone can send under any
/// address, is banned here and not posted, and `status` counts it.
#[test]
fn only_unforgeable_detections_are_posted_by_default() {
    require_root();
    const SERVER: &str = "10.77.0.1";
    const PORT: u16 = 5072;
    const METRICS: &str = "127.0.0.1:9811";
    let mut s = Scene::new();
    let lapi = Lapi::start(&s.topo.server);
    let password = lapi.password_file().display().to_string();
    start_with_crowdsec_and(
        &mut s,
        &lapi,
        &[
            "--crowdsec-machine",
            MACHINE,
            "--crowdsec-password-file",
            &password,
            "--detect",
            "enforce",
            "--detect-ports",
            "5072,5073,5074",
            "--detect-tls-ports",
            "5071",
            "--metrics-addr",
            METRICS,
        ],
    );
    let probe = s.source("45.86.0.100");
    let _registrar = Registrar::start(
        &s.topo.server,
        &s.dir.path,
        SERVER.parse().expect("literal"),
        PORT,
        5071,
        &s.topo.attacker,
        probe,
    );
    let port = PORT.to_string();
    let scanner = "45.86.0.1";
    s.source_by_route(scanner, SERVER);
    let _scan = Tool::start(
        &s.topo.attacker,
        &sipvicious("svmap"),
        &["-b", scanner, "-p", "5072-5074", SERVER],
        s.dir.path.join("svmap.log"),
    );
    s.wait_verdict(scanner.parse().unwrap(), "banned", Duration::from_secs(20));
    let guesser = "45.86.0.5";
    s.source_by_route(guesser, SERVER);
    let _guess = Tool::start(
        &s.topo.attacker,
        &sipvicious_with_user_agent(&s.dir.path, "svcrack", PHONE_UA),
        &[
            "-b",
            guesser,
            "-p",
            &port,
            "-u",
            "200",
            "-r",
            "1000-1400",
            SERVER,
        ],
        s.dir.path.join("svcrack.log"),
    );
    s.wait_verdict(guesser.parse().unwrap(), "banned", Duration::from_secs(20));
    assert_eq!(
        s.check_recorded(guesser)["records"][0]["evidence"]["rule"],
        "auth-failure"
    );
    posted(&lapi, guesser, "apiban/auth-failure");
    let alerts = lapi.cscli(&["alerts", "list", "-a", "-o", "raw"]);
    assert!(!alerts.contains(scanner), "the scan was posted:\n{alerts}");
    let status = s.status();
    let c = &status["sync"]["crowdsec"];
    assert_eq!(
        (&c["alerts_posted"], &c["alerts_forgeable"]),
        (&1.into(), &1.into()),
        "{status}"
    );
    let (_, metrics) = http_get(
        Some(&s.topo.server),
        METRICS.parse().expect("literal"),
        "/metrics",
    );
    assert!(
        metrics.contains("apiban_crowdsec_alerts_total{outcome=\"forgeable\"} 1"),
        "{metrics}"
    );
}

/// Waits until LAPI holds a decision on `addr` of `scenario`, and its alert.
fn posted(lapi: &Lapi, addr: &str, scenario: &str) {
    wait_until(
        "the detection to reach CrowdSec's decisions",
        Duration::from_secs(20),
        || {
            lapi.cscli(&["decisions", "list", "-a", "-o", "raw"])
                .lines()
                .any(|l| l.contains(&format!("Ip:{addr}")) && l.contains(scenario))
        },
    );
    let alerts = lapi.cscli(&["alerts", "list", "-a", "-o", "raw"]);
    assert!(
        alerts.contains(scenario) && alerts.contains(addr),
        "{alerts}"
    );
}

/// The sources of `addr`'s records in the ledger.
fn sources_of(s: &Scene, addr: &str) -> Vec<String> {
    let check = s.check(addr);
    check["records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["source"].as_str().map(str::to_owned))
        .collect()
}

/// In a fleet only the leader reads CrowdSec (as it alone polls APIBAN): each node has its
/// own bouncer key, LAPI's stream (the fake APIBAN's, which records the key) sees the
/// leader's only, and every node enforces its decision. A stopped leader hands the stream
/// to the next, whose first read is the whole list.
#[test]
fn in_a_fleet_only_the_leader_reads_crowdsec_and_every_node_enforces() {
    require_root();
    let mut f = Fleet::new(3);
    f.api.set_crowdsec_startup(
        serde_json::json!({"deleted": null, "new": [{
            "duration": "1h", "id": 1, "origin": "cscli", "scenario": "fleet test",
            "scope": "Ip", "type": "ban", "value": "45.72.0.1",
        }]})
        .to_string(),
    );
    for i in 0..3 {
        let key = f.nodes[i].scene.dir.path.join("crowdsec.key");
        std::fs::write(&key, format!("key-of-node-{i}\n")).expect("key file");
        let url = format!("http://{}:{}", f.nodes[i].hub_ip, f.api.addr().port());
        let key = key.display().to_string();
        f.start(
            i,
            &[
                "--crowdsec",
                &url,
                "--crowdsec-key-file",
                &key,
                "--crowdsec-interval",
                "1s",
            ],
        );
    }
    let leader = f.wait_leader(Duration::from_secs(20));
    for node in &f.nodes {
        node.scene.wait_verdict(
            "45.72.0.1".parse().expect("literal"),
            "banned",
            Duration::from_secs(30),
        );
    }
    let readers = || -> Vec<(String, bool)> {
        f.api
            .requests()
            .into_iter()
            .filter(|r| r.path.starts_with("/v1/decisions/stream"))
            .map(|r| {
                (
                    r.bouncer.unwrap_or_default(),
                    r.path.contains("startup=true"),
                )
            })
            .collect()
    };
    // A few reads, all the leader's.
    std::thread::sleep(Duration::from_secs(3));
    let read = readers();
    let leaders_key = format!("key-of-node-{leader}");
    assert!(read.len() >= 3, "{read:?}");
    assert!(read.iter().all(|(k, _)| *k == leaders_key), "{read:?}");
    let before = read.len();
    f.nodes[leader].scene.stop();
    let next = f.wait_leader(Duration::from_secs(20));
    let next_key = format!("key-of-node-{next}");
    wait_until(
        "the next leader to read the whole list",
        Duration::from_secs(15),
        || {
            readers()[before..]
                .iter()
                .any(|(k, startup)| *k == next_key && *startup)
        },
    );
    let after = readers();
    assert!(
        after[before..]
            .iter()
            .all(|(k, _)| *k == next_key || *k == leaders_key),
        "{after:?}"
    );
    for (i, node) in f.nodes.iter().enumerate().filter(|(i, _)| *i != leader) {
        assert_eq!(
            node.scene.check("45.72.0.1")["verdict"],
            "banned",
            "node {i}"
        );
    }
}
