//! This host as its operator sees it: two interfaces under one agent, its own addresses never
//! banned, its operator's bans and refusals, status, and detach leaving nothing behind.

use super::*;

#[test]
fn one_agent_protects_two_interfaces() {
    require_root();
    let mut s = Scene::new();
    // A second link into the server namespace, from a second "internet".
    let far = Netns::new("apbf");
    let (srv2, far_if) = (unique_name("apb2s"), unique_name("apb2f"));
    sh(
        "ip",
        &[
            "link",
            "add",
            &srv2,
            "netns",
            &s.topo.server.name,
            "type",
            "veth",
            "peer",
            "name",
            &far_if,
            "netns",
            &far.name,
        ],
    );
    s.topo
        .server
        .exec("ip", &["addr", "add", "10.78.0.1/24", "dev", &srv2]);
    s.topo.server.exec("ip", &["link", "set", &srv2, "up"]);
    far.exec("ip", &["addr", "add", "10.78.0.2/24", "dev", &far_if]);
    far.exec("ip", &["addr", "add", "45.93.0.2/32", "dev", &far_if]);
    far.exec("ip", &["link", "set", &far_if, "up"]);
    s.topo
        .server
        .exec("ip", &["route", "add", "45.93.0.2/32", "via", "10.78.0.2"]);
    let mut rx2 = UdpReceiver::bind(&s.topo.server, "10.78.0.1:5060".parse().unwrap());
    s.api.publish(&["45.93.0.1", "45.93.0.2"]);
    let near = s.source("45.93.0.1");
    s.extra_ifaces.push(srv2.clone());
    s.start(&FAST);
    s.wait_synced(Duration::from_secs(20));
    assert_eq!(s.probe(&[near], N), vec![0]);
    let far_src: IpAddr = "45.93.0.2".parse().unwrap();
    let far_clean: IpAddr = "10.78.0.2".parse().unwrap();
    let dst2: SocketAddr = "10.78.0.1:5060".parse().unwrap();
    send_udp(&far, far_src, dst2, N);
    send_udp(&far, far_clean, dst2, N);
    rx2.wait_for(far_clean, N, Duration::from_secs(10));
    assert_eq!(rx2.count(far_src), 0);
    let status = s.status();
    let interfaces = status["agent"]["interfaces"].as_array().unwrap();
    assert_eq!(interfaces.len(), 2);
    assert_eq!(
        status["traffic"][&s.topo.server_if]["dropped"]["packets"],
        N
    );
    assert_eq!(status["traffic"][&srv2]["dropped"]["packets"], N);
    drop(s);
    drop(far);
}

#[test]
fn status_counts_agree_with_what_arrived() {
    require_root();
    let mut s = Scene::new();
    s.api.publish(&["45.94.0.1", "45.94.0.2", "45.94.0.0/24"]);
    let banned: Vec<IpAddr> = ["45.94.0.1", "45.94.0.2", "45.94.0.77"]
        .iter()
        .map(|a| s.source(a))
        .collect();
    s.start(&FAST);
    s.wait_synced(Duration::from_secs(20));
    let n = 25;
    assert_eq!(s.probe(&banned, n), vec![0, 0, 0]);
    let status = s.status();
    let traffic = &status["traffic"][&s.topo.server_if];
    assert_eq!(traffic["dropped"]["packets"], 3 * n, "{traffic}");
    assert!(traffic["passed"]["packets"].as_u64().unwrap() >= n as u64);
    assert_eq!(s.check("45.94.0.1")["hits"], n);
    assert_eq!(s.check("45.94.0.77")["hits"], n, "the /24's own count");
    let top: Vec<&str> = status["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["net"].as_str().unwrap())
        .collect();
    assert_eq!(top.len(), 3, "{top:?}");
}

/// The egress classifiers (tcx) on the server's interface, as the kernel lists them.
fn egress_programs(s: &Scene) -> Vec<String> {
    let iface = s.topo.server_if.clone();
    tests::in_netns(&s.topo.server, move || {
        let index = apiban::dataplane::loader::ifindex(&iface).expect("the interface");
        let (_, programs) =
            aya::programs::SchedClassifier::query_tcx(index, aya::programs::TcAttachType::Egress)
                .expect("query tcx");
        programs
            .iter()
            .map(|p| p.name_as_str().unwrap_or_default().to_owned())
            .collect()
    })
}

#[test]
fn detach_leaves_nothing_behind() {
    require_root();
    let mut s = Scene::new();
    s.api.publish(&["45.95.0.1"]);
    let banned = s.source("45.95.0.1");
    s.start(&FAST);
    s.wait_synced(Duration::from_secs(20));
    assert_eq!(s.stop(), Some(0));
    assert_eq!(s.probe(&[banned], N), vec![0], "still enforced after stop");
    // The egress classifier stays too, and the next agent swaps its own in through the
    // same link rather than adding a second.
    assert_eq!(egress_programs(&s), ["apiban_egress"]);
    s.start(&FAST);
    assert_eq!(s.status()["agent"]["interfaces"][0]["egress"], "tcx");
    assert_eq!(s.stop(), Some(0));
    assert_eq!(egress_programs(&s), ["apiban_egress"]);
    s.detach();
    assert_eq!(egress_programs(&s), Vec::<String>::new());
    assert!(
        !s.bpffs.path.exists(),
        "pins left in {}",
        s.bpffs.path.display()
    );
    let link = s
        .topo
        .server
        .exec("ip", &["-d", "link", "show", &s.topo.server_if]);
    assert!(!link.contains("xdp"), "{link}");
    assert_eq!(s.probe(&[banned], N), vec![N]);
}

#[test]
fn an_address_the_host_gains_is_never_banned_by_a_feed() {
    require_root();
    let mut s = Scene::new();
    s.api.publish(&["45.77.0.0/24"]);
    s.start(&FAST);
    s.wait_synced(Duration::from_secs(20));
    assert_eq!(s.check("45.77.0.9")["verdict"], "banned");
    // A failover VIP moves in: the feed's ban that covers it must go.
    s.topo.server.exec(
        "ip",
        &["addr", "add", "45.77.0.9/32", "dev", &s.topo.server_if],
    );
    s.wait_verdict(
        "45.77.0.9".parse().unwrap(),
        "not banned",
        Duration::from_secs(5),
    );
    assert!(
        s.agent()
            .log_text()
            .contains("dropped a feed's ban that covers one of this host's addresses")
    );
    // An address added later is refused when the feed lists it.
    s.topo.server.exec(
        "ip",
        &["addr", "add", "45.77.1.5/32", "dev", &s.topo.server_if],
    );
    std::thread::sleep(Duration::from_millis(500));
    s.api.publish(&["45.77.1.5", "45.77.1.6"]);
    s.wait_verdict(
        "45.77.1.6".parse().unwrap(),
        "banned",
        Duration::from_secs(10),
    );
    assert_eq!(s.check("45.77.1.5")["verdict"], "not banned");
    // `check` reads the maps, which the owner writes before it publishes its counters.
    wait_until(
        "both own-address refusals counted",
        Duration::from_secs(5),
        || s.status()["engine"]["skipped"]["own_address"].as_u64() >= Some(2),
    );
}

#[test]
fn manual_changes_take_effect_at_once_and_survive_a_restart() {
    require_root();
    let mut s = Scene::new();
    s.api.publish(&["45.92.0.1"]);
    let feed = s.source("45.92.0.1");
    let manual = s.source("45.92.0.2");
    s.start(&FAST);
    s.wait_synced(Duration::from_secs(20));
    s.agent()
        .cli_ok(&["ban", "45.92.0.2", "--comment", "INVITE flood"]);
    assert_eq!(s.probe(&[feed, manual], N), vec![0, 0]);
    s.agent().cli_ok(&["allow", "add", "45.92.0.1"]);
    assert_eq!(s.probe(&[feed, manual], N), vec![N, 0]);
    assert_eq!(s.stop(), Some(0));
    s.start(&FAST);
    assert_eq!(s.probe(&[feed, manual], N), vec![N, 0], "after a restart");
    s.agent().cli_ok(&["unban", "45.92.0.2"]);
    s.agent().cli_ok(&["allow", "remove", "45.92.0.1"]);
    assert_eq!(s.probe(&[feed, manual], N), vec![0, N]);
}

#[test]
fn manual_bans_that_would_cut_the_host_off_are_refused_unless_forced() {
    require_root();
    let mut s = Scene::new();
    s.start(&["--allow", "45.79.0.0/24"]);
    let ban = |s: &Scene, args: &[&str]| {
        let out = s.agent().cli(&[&["ban"][..], args].concat());
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    for (target, why) in [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.77.0.0/24", "10.77.0.1, an address of this host"),
        ("fd77::1", "an address of this host"),
        ("45.79.0.7", "allowlist covers it (45.79.0.0/24)"),
    ] {
        let (code, text) = ban(&s, &[target]);
        assert_eq!(code, Some(2), "{target}: {text}");
        assert!(text.contains(why), "{target}: {text}");
        assert_eq!(
            s.check(target.split('/').next().unwrap())["verdict"],
            "not banned"
        );
    }
    let (code, text) = ban(&s, &["45.79.1.0/24", "--ttl", "0s"]);
    assert_eq!(code, Some(2), "{text}");
    // Partly allowlisted is a real ban (the allowlist carves out its part); forced, the
    // host's own prefix is banned as asked.
    let (code, text) = ban(&s, &["45.79.0.0/16"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(s.check("45.79.1.1")["verdict"], "banned");
    assert_eq!(s.check("45.79.0.7")["verdict"], "allowed");
    let comment = "c".repeat(200);
    let (code, text) = ban(&s, &["10.77.0.0/24", "--force", "--comment", &comment]);
    assert_eq!(code, Some(0), "{text}");
    let check = s.check("10.77.0.9");
    assert_eq!(check["verdict"], "banned");
    assert_eq!(check["records"][0]["comment"], comment.as_str());
}
