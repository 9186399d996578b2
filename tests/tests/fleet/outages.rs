//! etcd unreachable, restarted, compacted or absent, as one node lives through it: it keeps
//! enforcing what it has and catches up with the fleet, losing no change.

use super::*;

#[test]
fn killing_the_etcd_leader_loses_no_change() {
    require_root();
    let mut f = Fleet::new(3);
    for i in 0..3 {
        f.start(i, &[]);
    }
    f.wait_leader(Duration::from_secs(20));
    let before = ["45.63.0.1", "45.63.0.2", "45.63.0.3"];
    for a in before {
        f.nodes[0].scene.agent().cli_ok(&["ban", a]);
    }
    let member = f.etcd_leader();
    f.etcd[member].kill();
    // Changes made while etcd elects its next leader wait for it, then land.
    let during = ["45.63.0.4", "45.63.0.5", "45.63.0.6"];
    for a in during {
        f.nodes[1].scene.agent().cli_ok(&["ban", a]);
    }
    for node in &f.nodes {
        for a in before.iter().chain(&during) {
            node.scene.wait_verdict(
                a.parse().expect("literal"),
                "banned",
                Duration::from_secs(20),
            );
        }
    }
    let in_etcd = records_in_etcd(&f);
    assert_eq!(in_etcd.len(), 6, "{in_etcd:?}");
    let first = ledger_of(&f, 0);
    assert_eq!(first.len(), 6, "{first:?}");
    for i in 1..3 {
        assert_eq!(
            ledger_of(&f, i),
            first,
            "{} differs from node-a",
            f.nodes[i].name
        );
    }
}

#[test]
fn a_node_cut_off_from_etcd_keeps_enforcing_and_catches_up_by_watch() {
    require_root();
    let mut f = Fleet::new(3);
    // A short feed TTL sweeps every second, so that a short manual ban expires on time.
    for i in 0..3 {
        f.start(i, &["--ttl", "10s"]);
    }
    let leader = f.wait_leader(Duration::from_secs(20));
    let (a, c) = ((leader + 1) % 3, (leader + 2) % 3);
    f.nodes[a].scene.agent().cli_ok(&["ban", "45.64.0.1"]);
    f.nodes[a]
        .scene
        .agent()
        .cli_ok(&["ban", "45.64.0.2", "--ttl", "6s"]);
    for addr in ["45.64.0.1", "45.64.0.2"] {
        f.nodes[c].scene.wait_verdict(
            addr.parse().expect("literal"),
            "banned",
            Duration::from_secs(5),
        );
    }
    f.nodes[c].set_hub_link(false);
    // Cut off, C still drops what it has, expires on its own clock, and takes bans.
    f.nodes[c].scene.agent().cli_ok(&["ban", "45.64.0.3"]);
    f.nodes[a].scene.agent().cli_ok(&["ban", "45.64.0.4"]);
    let banned = sources(&f, c, &["45.64.0.1", "45.64.0.3"]);
    assert_eq!(f.nodes[c].scene.probe(&banned, N), vec![0, 0]);
    f.nodes[c].scene.wait_verdict(
        "45.64.0.2".parse().expect("literal"),
        "not banned",
        Duration::from_secs(10),
    );
    wait_until("C to say etcd is away", Duration::from_secs(15), || {
        let log = f.nodes[c].scene.agent().log_text();
        log.contains("this node keeps enforcing what it has")
    });
    f.nodes[c].set_hub_link(true);
    // What C banned reaches the others; what they banned meanwhile reaches C.
    for i in 0..3 {
        for addr in ["45.64.0.3", "45.64.0.4"] {
            f.nodes[i].scene.wait_verdict(
                addr.parse().expect("literal"),
                "banned",
                Duration::from_secs(30),
            );
        }
    }
    let log = f.nodes[c].scene.agent().log_text();
    assert_eq!(
        log.matches("read the fleet's whole ledger").count(),
        1,
        "C read everything again instead of catching up by watch:\n{log}"
    );
    assert!(log.contains("catching up by watch"), "{log}");
}

#[test]
fn a_node_whose_revision_was_compacted_away_reads_everything_and_matches() {
    require_root();
    let mut f = Fleet::new(3);
    for i in 0..3 {
        f.start(i, &[]);
    }
    f.wait_leader(Duration::from_secs(20));
    f.nodes[0].scene.agent().cli_ok(&["ban", "45.65.0.1"]);
    f.nodes[2].scene.wait_verdict(
        "45.65.0.1".parse().expect("literal"),
        "banned",
        Duration::from_secs(5),
    );
    assert_eq!(f.nodes[2].scene.stop(), Some(0));
    for a in ["45.65.0.2", "45.65.0.3"] {
        f.nodes[0].scene.agent().cli_ok(&["ban", a]);
    }
    f.nodes[0].scene.agent().cli_ok(&["unban", "45.65.0.1"]);
    f.compact();
    f.start(2, &[]);
    for a in ["45.65.0.2", "45.65.0.3"] {
        f.nodes[2].scene.wait_verdict(
            a.parse().expect("literal"),
            "banned",
            Duration::from_secs(15),
        );
    }
    f.nodes[2].scene.wait_verdict(
        "45.65.0.1".parse().expect("literal"),
        "not banned",
        Duration::from_secs(5),
    );
    let log = f.nodes[2].scene.agent().log_text();
    assert!(log.contains("no longer has the changes since"), "{log}");
    assert_eq!(ledger_of(&f, 2), ledger_of(&f, 0));
    let banned = sources(&f, 2, &["45.65.0.2", "45.65.0.3"]);
    assert_eq!(f.nodes[2].scene.probe(&banned, N), vec![0, 0]);
}

#[test]
fn a_node_started_without_etcd_enforces_its_saved_state_at_once() {
    require_root();
    let mut f = Fleet::new(1);
    f.start(0, &[]);
    f.wait_leader(Duration::from_secs(20));
    f.nodes[0].scene.agent().cli_ok(&["ban", "45.66.0.1"]);
    assert_eq!(f.nodes[0].scene.stop(), Some(0));
    for member in &mut f.etcd {
        member.kill();
    }
    let started = Instant::now();
    f.start(0, &[]);
    let check = f.nodes[0].scene.check("45.66.0.1");
    assert_eq!(check["verdict"], "banned", "{check}");
    let banned = sources(&f, 0, &["45.66.0.1"]);
    assert_eq!(f.nodes[0].scene.probe(&banned, N), vec![0]);
    println!(
        "enforcing the saved state {:?} after the start",
        started.elapsed()
    );
    wait_until(
        "the agent to say etcd is away",
        Duration::from_secs(15),
        || {
            f.nodes[0]
                .scene
                .agent()
                .log_text()
                .contains("this node keeps enforcing what it has")
        },
    );
}

/// The conflict rule: a change made on a node cut off from etcd is written when etcd is back,
/// even across a restart, unless another node changed the same key in etcd meanwhile; then
/// etcd's newer change wins everywhere.
#[test]
fn changes_made_while_cut_off_survive_a_restart_and_the_newer_change_wins() {
    require_root();
    let mut f = Fleet::new(3);
    for i in 0..3 {
        f.start(i, &[]);
    }
    let leader = f.wait_leader(Duration::from_secs(20));
    let (a, c) = ((leader + 1) % 3, (leader + 2) % 3);
    f.nodes[c].set_hub_link(false);
    f.nodes[c]
        .scene
        .agent()
        .cli_ok(&["ban", "45.67.0.1", "--comment", "from C, cut off"]);
    f.nodes[c]
        .scene
        .agent()
        .cli_ok(&["ban", "45.67.0.2", "--comment", "from C, cut off"]);
    f.nodes[a]
        .scene
        .agent()
        .cli_ok(&["ban", "45.67.0.2", "--comment", "from A, later"]);
    // C restarts before etcd is back: its changes are in its state file.
    assert_eq!(f.nodes[c].scene.stop(), Some(0));
    f.start(c, &[]);
    assert_eq!(
        f.nodes[c].scene.check("45.67.0.1")["verdict"],
        "banned",
        "C enforces its own change across the restart"
    );
    f.nodes[c].set_hub_link(true);
    for node in &f.nodes {
        node.scene.wait_verdict(
            "45.67.0.1".parse().expect("literal"),
            "banned",
            Duration::from_secs(30),
        );
    }
    let comment_of = |i: usize, addr: &str| {
        f.nodes[i].scene.check(addr)["records"][0]["comment"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    wait_until(
        "every node to hold A's newer change",
        Duration::from_secs(30),
        || (0..3).all(|i| comment_of(i, "45.67.0.2") == "from A, later"),
    );
    assert_eq!(comment_of(a, "45.67.0.1"), "from C, cut off");
    let log = f.nodes[c].scene.agent().log_text();
    assert!(log.contains("its later change wins"), "{log}");
    assert!(log.contains("has not confirmed yet"), "{log}");
}
