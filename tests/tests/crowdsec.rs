//! CrowdSec's decisions as a feed, against Debian's own CrowdSec: a private Local API in the
//! server's namespace (tests/src/crowdsec.rs), decisions made with `cscli` as an operator or
//! CrowdSec's scenarios make them, the agent reading its stream as a bouncer.

use std::{net::IpAddr, time::Duration};

use tests::{
    attackers::{SipResponder, Tool, sipvicious},
    crowdsec::{Lapi, MACHINE},
    require_root,
    scene::Scene,
    wait_until,
};

const N: usize = 5;

fn start_with_crowdsec(s: &mut Scene, lapi: &Lapi) {
    start_with_crowdsec_and(s, lapi, &[]);
}

/// The agent reading `lapi` every second, with `extra` flags.
fn start_with_crowdsec_and(s: &mut Scene, lapi: &Lapi, extra: &[&str]) {
    let key = lapi.key_file().display().to_string();
    let url = lapi.url();
    let mut args = vec![
        "--crowdsec",
        &url,
        "--crowdsec-key-file",
        &key,
        "--crowdsec-interval",
        "1s",
    ];
    args.extend_from_slice(extra);
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

/// A SIPVicious scan that detection bans reaches CrowdSec as an alert with its ban decision,
/// scenario apiban/<rule>, so that CrowdSec's other bouncers ban the scanner too.
#[test]
fn a_scanner_detection_bans_is_posted_to_crowdsec() {
    require_root();
    const SERVER: &str = "10.77.0.1";
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
            "5060,5062,5063,5064",
        ],
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
    wait_until(
        "the detection to reach CrowdSec's decisions",
        Duration::from_secs(20),
        || {
            lapi.cscli(&["decisions", "list", "-a", "-o", "raw"])
                .lines()
                .any(|l| {
                    l.contains(&format!("Ip:{scanner}")) && l.contains("apiban/scanner-user-agent")
                })
        },
    );
    let alerts = lapi.cscli(&["alerts", "list", "-a", "-o", "raw"]);
    assert!(
        alerts.contains("apiban/scanner-user-agent") && alerts.contains(scanner),
        "{alerts}"
    );
    let status = s.status();
    assert_eq!(status["sync"]["crowdsec"]["alerts_posted"], 1, "{status}");
    // CrowdSec's stream brings its decision back: the ban is now both sources'.
    wait_until(
        "CrowdSec's decision in the agent's ledger",
        Duration::from_secs(15),
        || {
            let check = s.check(scanner);
            let sources: Vec<String> = check["records"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["source"].as_str().map(str::to_owned))
                .collect();
            sources.contains(&"detect".to_owned()) && sources.contains(&"crowdsec".to_owned())
        },
    );
}
