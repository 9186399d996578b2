//! A fleet of real agents on a real three-member etcd cluster: one poller for one key, bans
//! that reach every node, a leader that dies and one that takes over within the budget.
//! Packets go from each node's attacker namespace to its server namespace, through XDP.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use tests::{fleet::Fleet, require_root, wait_until};

/// Datagrams per source per probe.
const N: usize = 20;

mod outages;

fn sources(f: &Fleet, node: usize, addrs: &[&str]) -> Vec<IpAddr> {
    addrs
        .iter()
        .map(|a| f.nodes[node].scene.source(a))
        .collect()
}

/// Requests node `i`'s agent says it sent to APIBAN.
fn requests_sent(f: &Fleet, i: usize) -> u64 {
    let status = f.nodes[i].scene.status();
    status["sync"]["requests"]
        .as_object()
        .map_or(0, |m| m.values().filter_map(|v| v.as_u64()).sum())
}

#[test]
fn three_nodes_one_key_only_the_leader_polls_and_all_drop_the_same_sources() {
    require_root();
    let mut f = Fleet::new(3);
    let listed = ["45.60.0.1", "45.60.0.2", "45.60.0.3"];
    f.api.publish(&listed);
    for i in 0..3 {
        // Each node's /metrics is on the loopback of its own namespace.
        f.start(
            i,
            &[
                "--poll-interval",
                "1s",
                "--rate-limit",
                "5/10s",
                "--metrics-addr",
                "127.0.0.1:9477",
            ],
        );
    }
    let leader = f.wait_leader(Duration::from_secs(20));
    for node in &f.nodes {
        for a in listed {
            node.scene.wait_verdict(
                a.parse().expect("literal"),
                "banned",
                Duration::from_secs(20),
            );
        }
    }
    // A later listing reaches every node through the one poller.
    f.api.publish(&["45.60.0.4"]);
    for node in &f.nodes {
        node.scene.wait_verdict(
            "45.60.0.4".parse().expect("literal"),
            "banned",
            Duration::from_secs(20),
        );
    }
    for i in 0..3 {
        let banned = sources(&f, i, &["45.60.0.1", "45.60.0.4"]);
        let got = f.nodes[i].scene.probe(&banned, N);
        assert_eq!(
            got,
            vec![0, 0],
            "{} let banned sources through",
            f.nodes[i].name
        );
    }
    // Polling goes on for a few windows' worth of polls.
    std::thread::sleep(Duration::from_secs(12));
    for i in 0..3 {
        let sent = requests_sent(&f, i);
        if i == leader {
            assert!(sent > 0, "the leader {} never polled", f.nodes[i].name);
        } else {
            assert_eq!(
                sent, 0,
                "{} polled while {} leads",
                f.nodes[i].name, f.nodes[leader].name
            );
        }
    }
    let max = f.api.max_in_window(Duration::from_secs(10));
    assert!(
        max <= 5,
        "the fleet sent {max} requests in one 10 s window with a budget of 5:\n{}",
        f.api.log_table()
    );
    // Each node says which it is, and its metrics agree.
    for i in 0..3 {
        let node = &f.nodes[i];
        let text = node.scene.agent().cli_ok(&["status"]);
        assert!(
            text.contains(&format!("node         {}", node.name)),
            "{text}"
        );
        assert_eq!(text.contains("(leads"), i == leader, "{text}");
        assert!(text.contains("etcd         watching"), "{text}");
        let (code, body) = tests::agent::http_get(
            Some(&node.scene.topo.server),
            "127.0.0.1:9477".parse().expect("literal"),
            "/metrics",
        );
        assert_eq!(code, 200);
        let leads = format!(
            "apiban_cluster_leader{{node=\"{}\"}} {}",
            node.name,
            u8::from(i == leader)
        );
        assert!(body.contains(&leads), "{body}");
        assert!(body.contains("apiban_cluster_watching 1"), "{body}");
        assert!(body.contains("apiban_cluster_pending_changes 0"), "{body}");
    }
    // Any node lists the whole fleet from the heartbeats.
    let fleet = fleet_of(&f, (leader + 1) % 3);
    let names: Vec<&str> = fleet
        .iter()
        .map(|n| n["node"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["node-a", "node-b", "node-c"], "{fleet:?}");
    for (i, n) in fleet.iter().enumerate() {
        assert_eq!(n["leader"], i == leader, "{fleet:?}");
        assert_eq!(n["enforced_v4"], 4, "{fleet:?}");
    }
    let text = f.nodes[0].scene.agent().cli_ok(&["status", "--fleet"]);
    assert!(text.contains("polls") && text.contains("node-c"), "{text}");
}

/// `apiban status --fleet --json` on node `i`: the nodes' heartbeats.
fn fleet_of(f: &Fleet, i: usize) -> Vec<serde_json::Value> {
    let out = f.nodes[i]
        .scene
        .agent()
        .cli_ok(&["status", "--fleet", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("fleet answers JSON");
    v["nodes"].as_array().cloned().unwrap_or_default()
}

#[test]
fn a_manual_ban_on_one_node_is_dropped_on_the_others() {
    require_root();
    let mut f = Fleet::new(3);
    for i in 0..3 {
        f.start(i, &[]);
    }
    f.wait_leader(Duration::from_secs(20));
    let mut delays = Vec::new();
    for (k, addr) in ["45.61.0.1", "45.61.0.2", "45.61.0.3"].iter().enumerate() {
        let from = k % 3;
        let at = Instant::now();
        f.nodes[from]
            .scene
            .agent()
            .cli_ok(&["ban", addr, "--comment", "fleet test"]);
        for (i, node) in f.nodes.iter().enumerate() {
            if i != from {
                node.scene.wait_verdict(
                    addr.parse().expect("literal"),
                    "banned",
                    Duration::from_secs(5),
                );
            }
        }
        delays.push(at.elapsed());
    }
    println!("manual ban on one node, banned on the two others after: {delays:?}");
    for i in 0..3 {
        let banned = sources(&f, i, &["45.61.0.1", "45.61.0.2", "45.61.0.3"]);
        assert_eq!(f.nodes[i].scene.probe(&banned, N), vec![0, 0, 0]);
    }
    // And an unban, from yet another node, reaches all of them.
    f.nodes[2].scene.agent().cli_ok(&["unban", "45.61.0.1"]);
    for node in &f.nodes {
        node.scene.wait_verdict(
            "45.61.0.1".parse().expect("literal"),
            "not banned",
            Duration::from_secs(5),
        );
    }
    let check = f.nodes[1].scene.check("45.61.0.2");
    assert_eq!(check["records"][0]["source"], "manual");
    assert_eq!(check["records"][0]["comment"], "fleet test");
}

#[test]
fn killing_the_leader_hands_polling_to_another_within_the_budget() {
    require_root();
    let mut f = Fleet::new(3);
    f.api.publish(&["45.62.0.1"]);
    let fast = ["--poll-interval", "1s", "--rate-limit", "4/20s"];
    for i in 0..3 {
        f.start(i, &fast);
    }
    let first = f.wait_leader(Duration::from_secs(20));
    for node in &f.nodes {
        node.scene.wait_verdict(
            "45.62.0.1".parse().expect("literal"),
            "banned",
            Duration::from_secs(20),
        );
    }
    // Let the leader spend its budget, then kill it without a chance to say anything.
    wait_until(
        "the leader spending the budget",
        Duration::from_secs(20),
        || f.api.requests().len() >= 4,
    );
    let killed_at = Instant::now();
    f.nodes[first].scene.kill9();
    let next = f.wait_leader(Duration::from_secs(15));
    let took = killed_at.elapsed();
    assert_ne!(next, first);
    println!("a new leader took over {took:?} after the old one was killed");
    assert!(
        took <= Duration::from_secs(10),
        "the lease is 5 s; a new leader after {took:?}"
    );
    // The new leader polls from where the fleet was: what APIBAN lists now reaches the two
    // nodes left, and no earlier ID is asked for again.
    f.api.publish(&["45.62.0.2"]);
    for (i, node) in f.nodes.iter().enumerate() {
        if i != first {
            node.scene.wait_verdict(
                "45.62.0.2".parse().expect("literal"),
                "banned",
                Duration::from_secs(40),
            );
        }
    }
    let ids: Vec<u64> = f
        .api
        .requests()
        .iter()
        .filter_map(|r| r.id.as_deref()?.parse().ok())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] <= w[1]),
        "an ID was fetched again after the handover:\n{}",
        f.api.log_table()
    );
    let max = f.api.max_in_window(Duration::from_secs(20));
    assert!(
        max <= 4,
        "{max} requests in one 20 s window across the handover, budget 4:\n{}",
        f.api.log_table()
    );
    // The killed node drops out of the fleet once its heartbeat's lease runs out.
    let dead = f.nodes[first].name.clone();
    wait_until(
        "the killed node to drop out",
        Duration::from_secs(20),
        || {
            let fleet = fleet_of(&f, next);
            fleet.len() == 2 && fleet.iter().all(|n| n["node"] != dead.as_str())
        },
    );
}

/// Every record key under the fleet's prefix, as etcd holds them.
fn records_in_etcd(f: &Fleet) -> Vec<String> {
    let prefix = format!("{}ledger/records/", f.prefix);
    let mut keys: Vec<String> = f.etcd_client(async move |c| {
        c.get(
            prefix,
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .expect("read the records")
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
    });
    keys.sort();
    keys
}

/// `apiban list` of node `i`: prefix and source, sorted.
fn ledger_of(f: &Fleet, i: usize) -> Vec<(String, String)> {
    let out = f.nodes[i].scene.agent().cli_ok(&["list", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&out).expect("list answers JSON");
    let mut rows: Vec<(String, String)> = rows
        .as_array()
        .expect("a list")
        .iter()
        .map(|r| {
            (
                r["net"].as_str().unwrap_or_default().to_owned(),
                r["source"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    rows.sort();
    rows
}

/// etcd as production runs it: TLS with client certificates, and auth with a password read
/// from a file. A ban still reaches every node, and the password is never logged.
#[test]
fn a_fleet_on_an_etcd_with_tls_and_a_password() {
    require_root();
    let mut f = Fleet::secured(2);
    for i in 0..2 {
        f.start(i, &[]);
    }
    f.wait_leader(Duration::from_secs(20));
    f.nodes[0].scene.agent().cli_ok(&["ban", "45.68.0.1"]);
    f.nodes[1].scene.wait_verdict(
        "45.68.0.1".parse().expect("literal"),
        "banned",
        Duration::from_secs(5),
    );
    let banned = sources(&f, 1, &["45.68.0.1"]);
    assert_eq!(f.nodes[1].scene.probe(&banned, N), vec![0]);
    let password = f.security.as_ref().expect("secured").password.clone();
    for node in &f.nodes {
        let log = node.scene.agent().log_text();
        assert!(
            !log.contains(&password),
            "the password is in the log:\n{log}"
        );
        let status = node.scene.agent().cli_ok(&["status", "--json"]);
        assert!(!status.contains(&password));
    }
    assert_eq!(records_in_etcd(&f).len(), 1);
}

/// A leader stopped as systemd stops it (SIGTERM) resigns: another node polls at once, not
/// after the 5 s lease runs out.
#[test]
fn a_leader_that_is_stopped_hands_over_at_once() {
    require_root();
    let mut f = Fleet::new(2);
    for i in 0..2 {
        f.start(i, &[]);
    }
    let first = f.wait_leader(Duration::from_secs(20));
    let stopped_at = Instant::now();
    let (code, log) = f.nodes[first].scene.stop_with_log();
    assert_eq!(code, Some(0));
    assert!(log.contains("resigning"), "{log}");
    let next = f.wait_leader(Duration::from_secs(10));
    assert_ne!(next, first);
    let took = stopped_at.elapsed();
    println!("the next leader polls {took:?} after SIGTERM to the last one");
    assert!(
        took < Duration::from_secs(3),
        "the stopped leader did not resign: a new one after {took:?}"
    );
}

/// Puts records straight into etcd, as a node that died before deleting them would leave
/// them: `(source, prefix, expires)`.
fn put_records(f: &Fleet, records: &[(&str, &str, Option<u64>)]) {
    let prefix = f.prefix.clone();
    let records: Vec<(String, String)> = records
        .iter()
        .map(|(source, net, expires)| {
            let value = serde_json::json!({"first_seen": 1, "last_seen": 1, "expires": expires});
            (
                format!("{prefix}ledger/records/{source}/{net}"),
                value.to_string(),
            )
        })
        .collect();
    f.etcd_client(async move |c| {
        for (key, value) in records {
            c.put(key, value, None).await.expect("put a record");
        }
    });
}

#[test]
fn expired_records_left_in_etcd_are_deleted_by_each_new_leader() {
    require_root();
    let mut f = Fleet::new(2);
    let past = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
        - 60;
    put_records(
        &f,
        &[
            ("manual", "45.70.0.1/32", Some(past)),
            ("apiban", "45.70.0.2/32", Some(past)),
            ("manual", "45.70.0.3/32", None),
            ("apiban", "45.70.0.4/32", Some(past + 86_400)),
        ],
    );
    for i in 0..2 {
        f.start(i, &[]);
    }
    let first = f.wait_leader(Duration::from_secs(20));
    let live = vec![
        format!("{}ledger/records/apiban/45.70.0.4/32", f.prefix),
        format!("{}ledger/records/manual/45.70.0.3/32", f.prefix),
    ];
    wait_until(
        "the leader deletes the expired records",
        Duration::from_secs(10),
        || records_in_etcd(&f) == live,
    );
    for i in 0..2 {
        let held: Vec<String> = ledger_of(&f, i).into_iter().map(|(net, _)| net).collect();
        assert_eq!(held, ["45.70.0.3/32", "45.70.0.4/32"], "node {i}");
    }
    let status = f.nodes[first].scene.status();
    assert_eq!(status["agent"]["cluster"]["expired_deleted"], 2, "{status}");

    // One more left behind while the first leader leads: the next leader's pass finds it.
    put_records(&f, &[("manual", "45.70.0.5/32", Some(past))]);
    let (code, _) = f.nodes[first].scene.stop_with_log();
    assert_eq!(code, Some(0));
    let next = f.wait_leader(Duration::from_secs(10));
    assert_ne!(next, first);
    wait_until(
        "the next leader deletes the expired record",
        Duration::from_secs(10),
        || records_in_etcd(&f) == live,
    );
    assert!(
        f.nodes[next]
            .scene
            .agent()
            .log_text()
            .contains("deleted expired records from etcd"),
        "{}",
        f.logs()
    );
}

#[test]
fn a_list_the_leader_drops_from_its_config_leaves_every_node() {
    require_root();
    let mut f = Fleet::new(2);
    f.api.set_list("partner.txt", "45.72.0.1\n45.72.0.2\n");
    let mut configs = Vec::new();
    for i in 0..2 {
        let config = f.nodes[i].scene.state_dir().with_file_name("config.toml");
        let url = format!(
            "http://{}:{}/lists/partner.txt",
            f.nodes[i].hub_ip,
            f.api.addr().port()
        );
        std::fs::write(
            &config,
            format!("[[list]]\nname = \"partner\"\nlocation = \"{url}\"\nrefresh = \"1s\"\n"),
        )
        .expect("write the config");
        f.start(i, &["--config", &config.display().to_string()]);
        configs.push(config);
    }
    let leader = f.wait_leader(Duration::from_secs(20));
    let standby = 1 - leader;
    let listed: Vec<IpAddr> = ["45.72.0.1", "45.72.0.2"]
        .iter()
        .map(|a| a.parse().expect("literal"))
        .collect();
    let from: Vec<Vec<IpAddr>> = (0..2)
        .map(|i| sources(&f, i, &["45.72.0.1", "45.72.0.2"]))
        .collect();
    for node in &f.nodes {
        for addr in &listed {
            node.scene
                .wait_verdict(*addr, "banned", Duration::from_secs(10));
        }
    }
    let partner_keys = |f: &Fleet| {
        records_in_etcd(f)
            .iter()
            .filter(|k| k.contains("partner"))
            .count()
    };
    assert_eq!(partner_keys(&f), 2);

    // The standby's config does not speak for the fleet: dropping the list there changes
    // nothing.
    std::fs::write(&configs[standby], "").expect("write the config");
    f.nodes[standby].scene.agent().signal(libc::SIGHUP);
    wait_until("the standby's reload", Duration::from_secs(10), || {
        f.nodes[standby]
            .scene
            .agent()
            .log_text()
            .contains("configuration reloaded")
    });
    assert_eq!(partner_keys(&f), 2);
    assert_eq!(f.nodes[standby].scene.probe(&from[standby], N), vec![0, 0]);

    // The leader's does: its records leave etcd and every node.
    std::fs::write(&configs[leader], "").expect("write the config");
    f.nodes[leader].scene.agent().signal(libc::SIGHUP);
    wait_until("the list leaves etcd", Duration::from_secs(10), || {
        partner_keys(&f) == 0
    });
    for node in &f.nodes {
        for addr in &listed {
            node.scene
                .wait_verdict(*addr, "not banned", Duration::from_secs(5));
        }
    }
    for (i, from) in from.iter().enumerate() {
        assert_eq!(f.nodes[i].scene.probe(from, N), vec![N, N], "node {i}");
    }
}
