//! The fleet's contract under faults (docs/fleet.md): an operator's change accepted on
//! any node ends in the same state everywhere, its own or a later one, even when the node
//! never heard etcd's answer to its write, or was killed before it did.

use std::time::Duration;

use tests::{fleet::Fleet, require_root, wait_until};

/// etcd's value of `source`'s record of `addr` and the revision that last changed it; None
/// when there is no key.
fn record(f: &Fleet, source: &str, addr: &str) -> Option<(serde_json::Value, i64)> {
    let key = format!("{}ledger/records/{source}/{addr}/32", f.prefix);
    f.etcd_client(async move |c| {
        let answer = c.get(key, None).await.expect("read a record");
        answer.kvs().first().map(|kv| {
            let value = serde_json::from_slice(kv.value()).expect("a JSON value");
            (value, kv.mod_revision())
        })
    })
}

/// etcd's value of `source`'s record of `addr`: None when there is no key.
fn record_value(f: &Fleet, source: &str, addr: &str) -> Option<serde_json::Value> {
    record(f, source, addr).map(|(value, _)| value)
}

/// The etcd revision that last changed `source`'s record of `addr`.
fn record_revision(f: &Fleet, source: &str, addr: &str) -> i64 {
    record(f, source, addr).expect("the key is there").1
}

/// Whether etcd holds a live ban (not a tombstone) of `addr` by an operator.
fn banned_in_etcd(f: &Fleet, addr: &str) -> bool {
    record_value(f, "manual", addr).is_some_and(|v| v["removed"] != true)
}

/// Has node `i` write an unrelated ban and waits until etcd holds it: the node's writer
/// then holds a connection to etcd, and its next write goes out on it at once.
fn warm_writer(f: &Fleet, i: usize, addr: &str) {
    f.nodes[i].scene.agent().cli_ok(&["ban", addr]);
    wait_until(
        "a first write to reach etcd",
        Duration::from_secs(10),
        || banned_in_etcd(f, addr),
    );
}

fn wait_everywhere(f: &Fleet, addr: &str, verdict: &str) {
    for node in &f.nodes {
        node.scene.wait_verdict(
            addr.parse().expect("literal"),
            verdict,
            Duration::from_secs(30),
        );
    }
}

/// Holds for `time`: no node bans `addr`, and etcd holds no live ban of it.
fn stays_unbanned(f: &Fleet, addr: &str, time: Duration) {
    let until = std::time::Instant::now() + time;
    while std::time::Instant::now() < until {
        for node in &f.nodes {
            assert_eq!(
                node.scene.check(addr)["verdict"],
                "not banned",
                "{} bans {addr} again:\n{}",
                node.name,
                f.logs()
            );
        }
        assert!(!banned_in_etcd(f, addr), "etcd bans {addr} again");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A node's ban reaches etcd but etcd's answer does not reach the node; the operator then
/// unbans on the same node. The unban must win: the late "other" change in etcd is the
/// node's own ban.
#[test]
fn an_unban_after_a_ban_whose_answer_was_lost_is_not_lost() {
    require_root();
    let mut f = Fleet::new(3);
    for i in 0..3 {
        f.start(i, &[]);
    }
    let leader = f.wait_leader(Duration::from_secs(20));
    let c = (leader + 1) % 3;
    let addr = "45.70.0.1";
    warm_writer(&f, c, "45.70.1.1");
    f.set_answers_to(c, false);
    f.nodes[c].scene.agent().cli_ok(&["ban", addr]);
    wait_until(
        "C's ban to reach etcd, one way",
        Duration::from_secs(10),
        || banned_in_etcd(&f, addr),
    );
    f.nodes[c].scene.agent().cli_ok(&["unban", addr]);
    assert_eq!(f.nodes[c].scene.check(addr)["verdict"], "not banned");
    // Until the ban's answer is given up for lost: a link back within the call's timeout
    // would bring it late, and the node would know the write was its own.
    wait_until(
        "C to give up waiting for etcd's answer",
        Duration::from_secs(20),
        || {
            f.nodes[c]
                .scene
                .agent()
                .log_text()
                .contains("this node's changes wait for it")
        },
    );
    f.set_answers_to(c, true);
    wait_until("C's unban to reach etcd", Duration::from_secs(30), || {
        !banned_in_etcd(&f, addr)
    });
    wait_everywhere(&f, addr, "not banned");
    stays_unbanned(&f, addr, Duration::from_secs(3));
    let tombstone = record_value(&f, "manual", addr).expect("the unban is a tombstone");
    assert_eq!(tombstone["by"], f.nodes[c].name.as_str(), "{tombstone}");
}

/// Node B's ban reaches etcd, B is killed before it hears so, node C unbans it, B comes
/// back and sends its unconfirmed ban again: C's later unban wins; the ban does not come
/// back.
#[test]
fn a_restarted_node_does_not_resurrect_a_ban_another_node_removed() {
    require_root();
    let mut f = Fleet::new(3);
    for i in 0..3 {
        f.start(i, &[]);
    }
    let leader = f.wait_leader(Duration::from_secs(20));
    let (b, c) = ((leader + 1) % 3, (leader + 2) % 3);
    let addr = "45.70.0.2";
    warm_writer(&f, b, "45.70.1.2");
    f.set_answers_to(b, false);
    f.nodes[b].scene.agent().cli_ok(&["ban", addr]);
    wait_until(
        "B's ban to reach etcd, one way",
        Duration::from_secs(10),
        || banned_in_etcd(&f, addr),
    );
    f.nodes[b].scene.kill9();
    f.nodes[c].scene.wait_verdict(
        addr.parse().expect("literal"),
        "banned",
        Duration::from_secs(10),
    );
    f.nodes[c].scene.agent().cli_ok(&["unban", addr]);
    wait_until("C's unban to reach etcd", Duration::from_secs(10), || {
        !banned_in_etcd(&f, addr)
    });
    f.set_answers_to(b, true);
    f.start(b, &[]);
    wait_until(
        "B to send its unconfirmed change",
        Duration::from_secs(30),
        || {
            f.nodes[b]
                .scene
                .agent()
                .log_text()
                .contains("has not confirmed yet")
        },
    );
    // Until B has read etcd up to C's unban, it enforces what it saved before its kill:
    // no gap on a restart, at the cost of a ban a moment too long.
    let unbanned_at = record_revision(&f, "manual", addr);
    wait_until(
        "B to read etcd up to C's unban",
        Duration::from_secs(10),
        || {
            f.nodes[b].scene.status()["agent"]["cluster"]["applied_revision"]
                .as_i64()
                .is_some_and(|r| r >= unbanned_at)
        },
    );
    stays_unbanned(&f, addr, Duration::from_secs(3));
    let log = f.nodes[b].scene.agent().log_text();
    assert!(log.contains("its later change wins"), "{log}");
    wait_until("B to hold nothing pending", Duration::from_secs(5), || {
        f.nodes[b].scene.status()["agent"]["cluster"]["pending_changes"] == 0
    });
}

/// One etcd member down, quorum intact, whichever member it is: the fleet keeps its
/// leader (its lease is renewed through another member), APIBAN is still polled, and a ban
/// made meanwhile reaches every node.
#[test]
fn one_etcd_member_down_costs_the_fleet_no_leader() {
    require_root();
    let mut f = Fleet::new(3);
    for i in 0..3 {
        f.start(i, &["--poll-interval", "1s", "--rate-limit", "5/10s"]);
    }
    let leader = f.wait_leader(Duration::from_secs(20));
    let other = (leader + 1) % 3;
    for member in 0..tests::fleet::MEMBERS {
        f.etcd[member].kill();
        let polled = f.api.requests().len();
        let addr = format!("45.71.0.{}", member + 1);
        f.nodes[other].scene.agent().cli_ok(&["ban", &addr]);
        wait_everywhere(&f, &addr, "banned");
        // Longer than the leader's lease: a lease kept only through the dead member would
        // have run out by now.
        std::thread::sleep(Duration::from_secs(7));
        let log = f.nodes[leader].scene.agent().log_text();
        assert!(
            !log.contains("no longer leads"),
            "the leader lost its lease with member {member} down:\n{log}"
        );
        assert_eq!(f.leader(), Some(leader), "{}", f.logs());
        assert!(
            f.api.requests().len() > polled,
            "APIBAN was not polled with member {member} down:\n{}\n{}",
            f.api.log_table(),
            f.logs()
        );
        f.etcd[member].restart();
        let port = format!(":{}", f.etcd[member].client_port);
        for node in &f.nodes {
            wait_until(
                "every node to say the member answers again",
                Duration::from_secs(15),
                || {
                    node.scene
                        .agent()
                        .log_text()
                        .lines()
                        .any(|l| l.contains("member answers again") && l.contains(&port))
                },
            );
            let log = node.scene.agent().log_text();
            let said = |what: &str| {
                log.lines()
                    .filter(|l| l.contains(what) && l.contains(&port))
                    .count()
            };
            assert_eq!(
                (said("member does not answer"), said("member answers again")),
                (1, 1),
                "{} says once that member {member} is down and once that it is back:\n{log}",
                node.name
            );
        }
    }
    // Nothing else: one member down is no outage, and no node said it was.
    for node in &f.nodes {
        let log = node.scene.agent().log_text();
        for alarm in [
            "keeps enforcing what it has",
            "changes wait for it",
            "no longer leads",
        ] {
            assert!(!log.contains(alarm), "{}: {alarm}\n{log}", node.name);
        }
    }
}

/// etcd replaced by a new cluster (another ID, revisions from 1): a node does not wait for
/// the new etcd's revisions to pass the one it saved; it reads the whole ledger again and
/// follows the new etcd from there.
#[test]
fn a_node_notices_a_replaced_etcd_and_reads_it_whole() {
    require_root();
    let mut f = Fleet::new(2);
    for i in 0..2 {
        f.start(i, &[]);
    }
    f.wait_leader(Duration::from_secs(20));
    // Revisions well past where the new etcd will be.
    for k in 1..=12 {
        f.nodes[1]
            .scene
            .agent()
            .cli_ok(&["ban", &format!("45.72.0.{k}")]);
    }
    f.nodes[0].scene.wait_verdict(
        "45.72.0.12".parse().expect("literal"),
        "banned",
        Duration::from_secs(10),
    );
    f.replace_etcd();
    f.wait_leader(Duration::from_secs(30));
    f.nodes[1].scene.agent().cli_ok(&["ban", "45.72.1.1"]);
    f.nodes[0].scene.wait_verdict(
        "45.72.1.1".parse().expect("literal"),
        "banned",
        Duration::from_secs(30),
    );
    let log = f.nodes[0].scene.agent().log_text();
    assert!(
        log.contains("etcd is not the one this node followed"),
        "{log}"
    );
    // The ledger is what the new etcd holds: the same on both nodes.
    let list = |i: usize| f.nodes[i].scene.agent().cli_ok(&["list"]);
    wait_until(
        "both nodes to hold the same ledger",
        Duration::from_secs(10),
        || list(0) == list(1),
    );
}

/// Node `i`'s fleet status: its clock's offset and judgement among it.
fn clock(f: &Fleet, i: usize) -> serde_json::Value {
    f.nodes[i].scene.status()["agent"]["cluster"].clone()
}

/// Whether etcd holds the feed's record of `addr`.
fn listed_in_etcd(f: &Fleet, addr: &str) -> bool {
    record_value(f, "apiban", addr).is_some()
}

/// A node whose clock is days fast would find every APIBAN ban (7 days) expired, and as
/// leader delete them from etcd for the whole fleet. It measures its clock against the
/// others', says it is off, and neither leads nor deletes; one hours slow likewise.
#[test]
fn a_node_days_fast_or_hours_slow_neither_leads_nor_deletes() {
    require_root();
    let mut f = Fleet::new(3);
    let listed = ["45.73.0.1", "45.73.0.2"];
    f.api.publish(&listed);
    for i in [1, 2] {
        f.start(i, &["--poll-interval", "1s"]);
    }
    let leader = f.wait_leader(Duration::from_secs(20));
    for a in listed {
        wait_until("APIBAN's list in etcd", Duration::from_secs(20), || {
            listed_in_etcd(&f, a)
        });
    }
    f.start_with_clock(0, &["--poll-interval", "1s"], "+8d");
    wait_until(
        "node A to find its clock off",
        Duration::from_secs(20),
        || clock(&f, 0)["clock_off"] == true,
    );
    let offset_s = clock(&f, 0)["clock_offset_ms"].as_i64().unwrap_or(0) / 1000;
    assert!(
        (8 * 86_400 - 60..8 * 86_400 + 60).contains(&offset_s),
        "A measures itself {offset_s}s ahead"
    );
    for i in [1, 2] {
        assert_eq!(clock(&f, i)["clock_off"], false, "{}", clock(&f, i));
    }
    // The leader goes; the node left with A has no majority for its clock either: nobody
    // leads, nothing is deleted, everything stays enforced where clocks are right.
    let good = if leader == 1 { 2 } else { 1 };
    f.nodes[leader].scene.stop();
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(f.leader(), None, "{}", f.logs());
    for a in listed {
        assert!(listed_in_etcd(&f, a), "{a} was deleted from etcd");
        assert_eq!(f.nodes[good].scene.check(a)["verdict"], "banned");
    }
    let log = f.nodes[0].scene.agent().log_text();
    assert_eq!(
        log.matches("clock is off from the fleet's").count(),
        1,
        "A says it once:\n{log}"
    );
    assert!(!log.contains("this node leads the fleet"), "{log}");
    // The leader back: one of the two right clocks leads again (A still off), and A,
    // restarted hours slow, is off too.
    f.start(leader, &["--poll-interval", "1s"]);
    assert_ne!(f.wait_leader(Duration::from_secs(20)), 0);
    assert_eq!(f.nodes[0].scene.stop(), Some(0));
    f.start_with_clock(0, &["--poll-interval", "1s"], "-3h");
    wait_until(
        "A, slow, to find its clock off",
        Duration::from_secs(20),
        || clock(&f, 0)["clock_off"] == true,
    );
    let offset_s = clock(&f, 0)["clock_offset_ms"].as_i64().unwrap_or(0) / 1000;
    assert!(
        (-3 * 3600 - 60..-3 * 3600 + 60).contains(&offset_s),
        "A measures itself {offset_s}s behind"
    );
    for a in listed {
        assert!(listed_in_etcd(&f, a), "{a} was deleted from etcd");
    }
}

/// Fills etcd's quota from outside the fleet's prefix, as any other user of that etcd might,
/// and waits until every node names the NOSPACE alarm.
fn fill_etcd(f: &Fleet) {
    let full = f.etcd_client(async |c| {
        let filler = vec![b'x'; 256 * 1024];
        for k in 0..64 {
            if let Err(e) = c.put(format!("/filler/{k}"), filler.clone(), None).await {
                return e.to_string();
            }
        }
        String::new()
    });
    assert!(
        full.contains("space"),
        "etcd took 16 MiB on a 2 MiB quota: {full}"
    );
    for i in 0..f.nodes.len() {
        if !f.nodes[i].scene.agent_running() {
            continue;
        }
        wait_until(
            "every node to name the alarm",
            Duration::from_secs(15),
            || f.nodes[i].scene.status()["agent"]["cluster"]["etcd_nospace"] == true,
        );
    }
}

/// docs/fleet.md's fix: delete what filled it, then disarm the alarm.
fn fix_etcd(f: &Fleet) {
    f.etcd_client(async |c| {
        c.delete(
            "/filler/",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .expect("delete the filler");
    });
    f.clear_nospace();
}

/// etcd's quota full: it refuses every write and raises NOSPACE. Every node says so once,
/// with the fix; enforcement and APIBAN polling go on; an operator's change made meanwhile
/// waits, and reaches every node once the operator has done what docs/fleet.md says.
#[test]
fn an_etcd_out_of_space_is_named_and_its_fix_lets_changes_through() {
    require_root();
    let mut f = Fleet::new(2);
    f.set_etcd_quota(2 * 1024 * 1024);
    for i in 0..2 {
        f.start(i, &["--poll-interval", "1s", "--rate-limit", "5/10s"]);
    }
    let leader = f.wait_leader(Duration::from_secs(20));
    f.nodes[0].scene.agent().cli_ok(&["ban", "45.74.0.1"]);
    fill_etcd(&f);
    let cluster = |i: usize| f.nodes[i].scene.status()["agent"]["cluster"].clone();
    let text = f.nodes[1].scene.agent().cli_ok(&["status"]);
    assert!(text.contains("NOSPACE"), "{text}");
    // Still enforcing; a change made now waits for etcd.
    assert_eq!(f.nodes[1].scene.check("45.74.0.1")["verdict"], "banned");
    f.nodes[1].scene.agent().cli_ok(&["ban", "45.74.0.2"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(cluster(1)["pending_changes"], 1, "{}", cluster(1));
    assert_eq!(f.nodes[0].scene.check("45.74.0.2")["verdict"], "not banned");
    // APIBAN is still polled, within the budget, on the leader's own count.
    let polled = f.api.requests().len();
    wait_until("a poll while etcd is full", Duration::from_secs(15), || {
        f.api.requests().len() > polled
    });
    assert!(
        f.api.max_in_window(Duration::from_secs(10)) <= 5,
        "{}",
        f.api.log_table()
    );
    let log = f.nodes[leader].scene.agent().log_text();
    assert!(log.contains("on this node's own budget"), "{log}");
    fix_etcd(&f);
    f.nodes[0].scene.wait_verdict(
        "45.74.0.2".parse().expect("literal"),
        "banned",
        Duration::from_secs(30),
    );
    for i in 0..2 {
        wait_until("the alarm to clear", Duration::from_secs(15), || {
            cluster(i)["etcd_nospace"] == false
        });
        let log = f.nodes[i].scene.agent().log_text();
        assert_eq!(
            log.matches("NOSPACE alarm):").count(),
            1,
            "said once:\n{log}"
        );
        assert!(log.contains("NOSPACE alarm is cleared"), "{log}");
    }
}

/// A node cut off from etcd while its operators make more changes than its queue to etcd
/// holds: the queue stays bounded, what it could not take is sent from the ledger once etcd
/// is back, and every change reaches etcd and the other node.
#[test]
fn a_node_cut_off_queues_a_bounded_number_of_changes_and_loses_none() {
    require_root();
    const BANS: u32 = 400;
    let mut f = Fleet::new(2);
    for i in 0..2 {
        f.start(i, &[]);
    }
    f.wait_leader(Duration::from_secs(20));
    warm_writer(&f, 1, "45.75.1.1");
    f.nodes[1].set_hub_link(false);
    let socket = f.nodes[1].scene.control_socket();
    for k in 0..BANS {
        let addr = std::net::Ipv4Addr::from(0x2d4b_0200u32 + k);
        let answer = tests::agent::control_request(
            &socket,
            &format!(r#"{{"op":"ban","net":"{addr}/32","ttl_secs":null,"comment":null}}"#),
        );
        assert!(answer.starts_with(r#"{"ok""#), "{answer}");
    }
    let cluster = &f.nodes[1].scene.status()["agent"]["cluster"];
    let queued = cluster["outbox_queued"].as_u64().expect("outbox_queued");
    let shed = cluster["outbox_shed"].as_u64().expect("outbox_shed");
    assert!(queued <= 256, "{queued} changes queued for etcd: {cluster}");
    // The writer holds one more, the one it keeps trying.
    assert!(
        queued + shed + 1 >= u64::from(BANS) && shed > 0,
        "queued {queued} + shed {shed}"
    );
    assert_eq!(cluster["pending_changes"], BANS, "{cluster}");
    f.nodes[1].set_hub_link(true);
    let last = std::net::Ipv4Addr::from(0x2d4b_0200u32 + BANS - 1).to_string();
    wait_until(
        "every change to reach etcd",
        Duration::from_secs(60),
        || f.nodes[1].scene.status()["agent"]["cluster"]["pending_changes"] == 0,
    );
    let prefix = format!("{}ledger/records/manual/45.75.", f.prefix);
    let in_etcd = f.etcd_client(async move |c| {
        let options = etcd_client::GetOptions::new()
            .with_prefix()
            .with_count_only();
        c.get(prefix, Some(options)).await.expect("count").count()
    });
    assert_eq!(in_etcd, i64::from(BANS) + 1, "the node's bans in etcd");
    wait_everywhere(&f, &last, "banned");
}

/// A leader that polls APIBAN on its own count while etcd is full, then dies: etcd's record
/// of the fleet's requests lacks what it sent meanwhile, and its successor, elected once the
/// alarm is cleared, must not spend that budget again.
#[test]
fn a_leader_dying_while_etcd_is_full_leaves_its_successor_a_full_count() {
    require_root();
    const WINDOW: Duration = Duration::from_secs(30);
    let mut f = Fleet::new(2);
    f.set_etcd_quota(2 * 1024 * 1024);
    for i in 0..2 {
        f.start(i, &["--poll-interval", "1s", "--rate-limit", "4/30s"]);
    }
    let leader = f.wait_leader(Duration::from_secs(20));
    fill_etcd(&f);
    wait_until(
        "the leader to poll on its own count",
        Duration::from_secs(45),
        || {
            f.nodes[leader]
                .scene
                .agent()
                .log_text()
                .contains("on this node's own budget")
        },
    );
    // Its window fills within seconds at one poll a second.
    std::thread::sleep(Duration::from_secs(5));
    f.nodes[leader].scene.kill9();
    let polled = f.api.requests().len();
    fix_etcd(&f);
    let successor = 1 - leader;
    wait_until("the other node to lead", Duration::from_secs(30), || {
        f.leader() == Some(successor)
    });
    wait_until("the new leader to poll", Duration::from_secs(60), || {
        f.api.requests().len() > polled
    });
    assert!(
        f.api.max_in_window(WINDOW) <= 4,
        "the fleet sent more than 4 requests in 30 s:\n{}",
        f.api.log_table()
    );
    let log = f.nodes[successor].scene.agent().log_text();
    assert!(
        log.contains("counting the whole budget as spent then"),
        "{log}"
    );
}
