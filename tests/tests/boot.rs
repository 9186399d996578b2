//! After a reboot: no program attached, no pins, the interface still down, APIBAN out of
//! reach. The saved bans must be enforced from the first packet the link carries, an
//! interface that appears late must be waited for, and one that never does must be named.

use std::time::Duration;

use tests::{
    SteadyTraffic,
    agent::apiban_in,
    in_netns, require_root,
    scene::{KEY, Scene},
    sh, unique_name, wait_until,
};

#[test]
fn saved_bans_are_enforced_the_moment_the_link_comes_up() {
    require_root();
    let mut s = Scene::new();
    s.api.publish(&["45.72.0.1", "45.72.8.0/24"]);
    let banned = s.source("45.72.0.1");
    let banned_manual = s.source("45.72.2.9");
    let clean = s.source("45.72.1.2");
    s.start(&["--poll-interval", "1s"]);
    s.wait_synced(Duration::from_secs(20));
    s.agent().cli_ok(&["ban", "45.72.2.0/24"]);
    let saved = s.status()["enforced"].clone();
    assert_eq!(s.stop(), Some(0));

    // The reboot: nothing attached, nothing pinned; the state file is all that is left.
    s.detach();
    assert!(!s.bpffs.path.exists());
    s.topo
        .server
        .exec("ip", &["link", "set", &s.topo.server_if, "down"]);
    // APIBAN out of reach: nothing listens there.
    s.api_url = Some("http://127.0.0.1:9/api/".into());

    s.start(&["--poll-interval", "1s"]);
    let log = s.agent().log_text();
    assert!(
        log.contains("down: enforcing from the moment it comes up"),
        "{log}"
    );
    assert_eq!(
        s.status()["enforced"],
        saved,
        "the saved bans, before any request"
    );
    // Attackers send from before the link comes up.
    let traffic = SteadyTraffic::start(&s.topo, banned, clean, 5072);
    let manual = SteadyTraffic::start(&s.topo, banned_manual, s.clean(banned), 5073);
    std::thread::sleep(Duration::from_millis(300));
    s.topo
        .server
        .exec("ip", &["link", "set", &s.topo.server_if, "up"]);
    std::thread::sleep(Duration::from_millis(1500));
    let delivered = traffic.finish();
    let delivered_manual = manual.finish();
    assert!(
        delivered.clean > 100,
        "the link came up, clean traffic must flow: {delivered:?}"
    );
    assert_eq!(delivered.banned, 0, "{delivered:?}");
    assert_eq!(delivered_manual.banned, 0, "{delivered_manual:?}");
    let status = s.status();
    assert!(
        status["sync"]["requests"]["transport_error"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "APIBAN is tried and fails: {}",
        status["sync"]
    );
}

#[test]
fn an_interface_that_appears_late_is_waited_for() {
    require_root();
    let mut s = Scene::new();
    // Built before the clock starts: the interface must appear after the agent has started.
    tests::agent::apiban_bin();
    let late = unique_name("apbl");
    let peer = unique_name("apbp");
    s.extra_ifaces.push(late.clone());
    let server = s.topo.server.name.clone();
    let creator = {
        let (late, peer) = (late.clone(), peer.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            sh(
                "ip",
                &[
                    "-n", &server, "link", "add", &late, "type", "veth", "peer", "name", &peer,
                ],
            );
        })
    };
    s.start(&["--iface-wait", "20s"]);
    creator.join().unwrap();
    let log = s.agent().log_text();
    assert!(log.contains("waiting up to 20s"), "{log}");
    let status = s.status();
    let names: Vec<&str> = status["agent"]["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&late.as_str()), "{names:?}");
    let late_ = late.clone();
    let attached = in_netns(&s.topo.server, move || {
        let index = apiban::dataplane::loader::ifindex(&late_).expect("created");
        apiban::dataplane::netlink::link(index)
            .unwrap()
            .and_then(|l| l.xdp)
    });
    assert!(attached.is_some(), "the late interface runs the program");
}

#[test]
fn an_interface_that_never_appears_is_named() {
    require_root();
    let s = Scene::new();
    let state = s.state_dir().display().to_string();
    let sock = s.control_socket().display().to_string();
    let dir = s.bpffs.path.display().to_string();
    let started = std::time::Instant::now();
    let out = apiban_in(
        &s.topo.server,
        &[
            "run",
            "--iface",
            "apbnever0",
            "--iface-wait",
            "1s",
            "--state-dir",
            &state,
            "--control-socket",
            &sock,
            "--bpffs-dir",
            &dir,
            "--metrics-addr",
            "off",
            "--api-key",
            KEY,
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("interface apbnever0 did not appear within 1s (--iface-wait)"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    wait_until("nothing listening", Duration::from_secs(1), || {
        !s.control_socket().exists()
    });
}
