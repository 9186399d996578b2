//! What a party that can write to etcd can make a node do (docs/fleet.md): each node
//! checks what etcd holds with its own policy, as it checks a feed's entries, so a `/0`, a
//! special-purpose range, the etcd member's own address, an unprintable comment or a value
//! it cannot read changes nothing it enforces; each refusal is counted by reason.

use std::time::Duration;

use tests::{fleet::Fleet, require_root, wait_until};

fn put(f: &Fleet, entries: Vec<(String, String)>) {
    f.etcd_client(async move |c| {
        for (key, value) in entries {
            c.put(key, value, None).await.expect("put into etcd");
        }
    });
}

fn record(comment: Option<&str>) -> String {
    serde_json::json!({"first_seen": 1, "last_seen": 1, "expires": null, "comment": comment})
        .to_string()
}

fn refused(f: &Fleet, i: usize, reason: &str) -> u64 {
    f.nodes[i].scene.status()["agent"]["cluster"]["records_refused"][reason]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn what_one_party_writes_to_etcd_bans_nothing_a_feed_could_not() {
    require_root();
    let mut f = Fleet::new(2);
    for i in 0..2 {
        f.start(i, &[]);
    }
    f.wait_leader(Duration::from_secs(20));
    let kept = "45.76.0.2";
    let overwritten = "45.76.0.1";
    for addr in [kept, overwritten] {
        f.nodes[0].scene.agent().cli_ok(&["ban", addr]);
    }
    for node in &f.nodes {
        node.scene.wait_verdict(
            overwritten.parse().expect("literal"),
            "banned",
            Duration::from_secs(10),
        );
    }
    let p = |key: &str| format!("{}ledger/{key}", f.prefix);
    // The etcd member's address as node 0 reaches it.
    let etcd = f.nodes[0].hub_ip.to_string();
    put(
        &f,
        vec![
            (p("records/manual/0.0.0.0/0"), record(None)),
            (p("allow/0.0.0.0/0"), "{}".to_owned()),
            (p("records/apiban/127.0.0.0/8"), record(None)),
            (p(&format!("records/manual/{etcd}/32")), record(None)),
            (
                p("records/manual/45.76.0.3/32"),
                record(Some("\u{1b}]0;pwned\u{7}")),
            ),
            (
                p(&format!("records/manual/{overwritten}/32")),
                "not JSON".to_owned(),
            ),
        ],
    );
    for (i, node) in f.nodes.iter().enumerate() {
        wait_until(
            "the refusals to be counted",
            Duration::from_secs(10),
            || refused(&f, i, "undecodable") >= 1,
        );
        for (reason, at_least) in [
            ("special_purpose", 3),
            ("too_broad", 1),
            ("comment", 1),
            ("undecodable", 1),
        ] {
            assert!(
                refused(&f, i, reason) >= at_least,
                "{}: {reason}: {}",
                node.name,
                node.scene.status()["agent"]["cluster"]
            );
        }
        for (addr, verdict) in [
            ("45.77.0.1", "not banned"),
            (etcd.as_str(), "not banned"),
            ("127.0.0.1", "not banned"),
            ("45.76.0.3", "not banned"),
            (kept, "banned"),
            // A value the node cannot read holds no ban.
            (overwritten, "not banned"),
        ] {
            assert_eq!(
                node.scene.check(addr)["verdict"],
                verdict,
                "{} on {addr}:\n{}",
                node.name,
                node.scene.agent().log_text()
            );
        }
        let log = node.scene.agent().log_text();
        assert!(
            log.contains("refuses an entry in etcd") && log.contains("records/manual/0.0.0.0/0"),
            "{}: the refusal is logged with its key:\n{log}",
            node.name
        );
        assert!(
            !log.contains('\u{1b}'),
            "{}: an escape byte reached the log",
            node.name
        );
    }
    // The fleet still works: etcd was never cut off.
    let after = "45.76.0.9";
    f.nodes[1].scene.agent().cli_ok(&["ban", after]);
    f.nodes[0].scene.wait_verdict(
        after.parse().expect("literal"),
        "banned",
        Duration::from_secs(10),
    );
    let metrics = f.nodes[0].scene.agent().cli_ok(&["status"]);
    assert!(metrics.contains("refused"), "{metrics}");
}

/// Each node's proxies own their bans through the ban API (source `api:<node>`): every node
/// enforces them, and one node's `/flushchain` (a Kamailio that flushes at start) lifts its
/// own node's bans only, not the fleet's.
#[test]
fn one_nodes_flushchain_leaves_the_other_nodes_api_bans() {
    require_root();
    const API: &str = "127.0.0.1:18090";
    let mut f = Fleet::new(2);
    for i in 0..2 {
        f.start(i, &["--ban-api", API]);
    }
    f.wait_leader(Duration::from_secs(20));
    let api: std::net::SocketAddr = API.parse().expect("literal");
    let get = |f: &Fleet, i: usize, path: &str| {
        tests::agent::http_get(Some(&f.nodes[i].scene.topo.server), api, path)
    };
    let (a_ban, b_ban) = ("45.78.0.1", "45.78.0.2");
    assert_eq!(get(&f, 0, &format!("/addip/{a_ban}")).0, 200);
    assert_eq!(get(&f, 1, &format!("/addip/{b_ban}")).0, 200);
    for node in &f.nodes {
        for addr in [a_ban, b_ban] {
            node.scene.wait_verdict(
                addr.parse().expect("literal"),
                "banned",
                Duration::from_secs(10),
            );
        }
    }
    let said = f.nodes[1].scene.check(b_ban);
    assert_eq!(said["records"][0]["source"], "api:node-b", "{said}");
    assert_eq!(get(&f, 0, "/flushchain").0, 200);
    for node in &f.nodes {
        node.scene.wait_verdict(
            a_ban.parse().expect("literal"),
            "not banned",
            Duration::from_secs(10),
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    for node in &f.nodes {
        assert_eq!(
            node.scene.check(b_ban)["verdict"],
            "banned",
            "{}: node-a's flush lifted node-b's proxy's ban",
            node.name
        );
    }
}

/// Each node's heartbeat carries its own addresses, and no other node bans them: neither
/// an operator's unforced ban nor a record put into etcd.
#[test]
fn a_fleet_nodes_own_address_is_banned_by_no_other_node() {
    require_root();
    let mut f = Fleet::new(2);
    // Node b's public address, as another node (or an attacker's forged packets) would
    // see it.
    let member = "45.79.0.1";
    f.nodes[1]
        .scene
        .topo
        .server
        .exec("ip", &["addr", "add", &format!("{member}/32"), "dev", "lo"]);
    for i in 0..2 {
        f.start(i, &[]);
    }
    f.wait_leader(Duration::from_secs(20));
    let a = f.nodes[0].scene.agent();
    wait_until(
        "node b's heartbeat to reach node a",
        Duration::from_secs(15),
        || {
            let out = a.cli(&["ban", member]);
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("a node of this fleet")
        },
    );
    put(
        &f,
        vec![(
            format!("{}ledger/records/apiban/{member}/32", f.prefix),
            record(None),
        )],
    );
    wait_until("the record to be refused", Duration::from_secs(10), || {
        refused(&f, 0, "fleet_infrastructure") >= 1
    });
    assert_eq!(f.nodes[0].scene.check(member)["verdict"], "not banned");
    // The operator who means it still can.
    a.cli_ok(&["ban", member, "--force"]);
    assert_eq!(f.nodes[0].scene.check(member)["verdict"], "banned");
}
