//! End to end, the way an operator sees apiban work: the real `apiban` binary in a server
//! namespace, fed by the local APIBAN server, attackers sending real SIP OPTIONS over a veth
//! pair; what arrives is the ground truth. One scenario per test; every setup is a guard
//! (see `tests::scene`), so a failing test leaves no agent, namespace or pin behind.
//!
//! (`apiban ban/unban/allow` with restarts, status text, /metrics and reload are also covered,
//! through the CLI, in tests/agent.rs.)

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tests::{
    Netns, PacketSocket, SteadyTraffic, UdpReceiver,
    fake_apiban::Fault,
    frame::{Frame, TPID_8021AD, TPID_8021Q},
    require_root,
    scene::{KEY, SIP_PORT, Scene},
    send_udp, sh, unique_name, wait_until,
};

const N: usize = 20;
/// Fast syncing for tests; the server enforces the same budget.
const FAST: [&str; 4] = ["--poll-interval", "1s", "--rate-limit", "20/2s"];

mod host;

fn addrs(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix}.{}.{}", i / 250, i % 250 + 1))
        .collect()
}

#[test]
fn full_pull_over_several_batches_v4_and_v6() {
    require_root();
    let mut s = Scene::new();
    s.api.set_batch_size(100);
    s.api.set_rate_limit(Some((20, Duration::from_secs(2))));
    let mut feed = addrs("45.20", 350);
    feed.extend((1..=20).map(|i| format!("2a01:4f8:20::{i:x}")));
    feed.push("45.21.0.0/24".into());
    s.api.publish(&feed);
    let v4 = [
        s.source("45.20.0.1"),
        s.source("45.20.1.100"),
        s.source("45.21.0.33"),
    ];
    let v6 = [s.source("2a01:4f8:20::7"), s.source("2a01:4f8:20::14")];
    // Not listed, but inside the /64 where APIBAN lists twenty: banned by escalation.
    let neighbour6 = s.source("2a01:4f8:20::99");
    let clean_public = s.source("45.22.0.1");

    s.start(&FAST);
    s.wait_synced(Duration::from_secs(30));
    assert_eq!(s.probe(&v4, N), vec![0, 0, 0]);
    assert_eq!(s.probe(&v6, N), vec![0, 0]);
    assert_eq!(s.probe(&[neighbour6], N), vec![0]);
    let text = s.agent().cli_ok(&["check", "2a01:4f8:20::99"]);
    println!("{text}");
    assert!(
        text.starts_with("2a01:4f8:20::99 is BANNED")
            && text.contains(
                "derived    2a01:4f8:20::/64: 20 bans by apiban inside it (IPv6 escalation)"
            ),
        "{text}"
    );
    assert_eq!(
        s.probe(&[clean_public], N),
        vec![N],
        "not listed: delivered"
    );
    let status = s.status();
    assert_eq!(status["enforced"]["ipv4"], 351);
    // The twenty hosts and their /64.
    assert_eq!(status["enforced"]["ipv6"], 21);
    assert_eq!(status["derived_prefixes"], 1);
    let gets = s.api.requests().iter().filter(|r| r.status == 200).count();
    assert!(gets >= 4, "371 entries in batches of 100: {gets} batches");
}

#[test]
fn a_newly_published_address_is_dropped_within_a_poll_interval() {
    require_root();
    let mut s = Scene::new();
    s.api.publish(&["45.30.0.1"]);
    let newcomer = s.source("45.30.0.99");
    s.start(&["--poll-interval", "2s", "--rate-limit", "20/2s"]);
    s.wait_synced(Duration::from_secs(20));
    assert_eq!(s.probe(&[newcomer], N), vec![N]);
    s.api.publish(&["45.30.0.99"]);
    let took = s.wait_verdict(newcomer, "banned", Duration::from_secs(10));
    // One poll interval, plus the budget's jitter and a request's round trip.
    assert!(
        took <= Duration::from_millis(3_000),
        "banned after {took:?}"
    );
    assert_eq!(s.probe(&[newcomer], N), vec![0]);
}

#[test]
fn the_allowlist_beats_the_feed_and_junk_is_ignored() {
    require_root();
    let mut s = Scene::new();
    s.api.publish(&[
        "45.40.0.7",  // allowlisted below
        "45.40.0.8",  // banned
        "10.77.0.2",  // the attacker's own RFC 1918 address: special purpose
        "fd77::2",    // ULA: special purpose
        "127.0.0.1",  // loopback
        "0.0.0.0/0",  // everything
        "45.0.0.0/8", // broader than /16
        "not-an-address",
        "999.1.1.1",
        "2a01:4f8:40::8",
    ]);
    let allowed = s.source("45.40.0.7");
    let banned = s.source("45.40.0.8");
    let banned6 = s.source("2a01:4f8:40::8");
    s.start(&["--allow", "45.40.0.7", "--poll-interval", "1s"]);
    s.wait_synced(Duration::from_secs(20));
    // probe() also requires every datagram from the clean 10.77.0.2 / fd77::2 to arrive.
    assert_eq!(s.probe(&[allowed, banned], N), vec![N, 0]);
    assert_eq!(s.probe(&[banned6], N), vec![0]);
    let status = s.status();
    let skipped = &status["engine"]["skipped"];
    assert_eq!(skipped["special_purpose"], 4, "{skipped}");
    assert_eq!(skipped["too_broad"], 1, "{skipped}");
    assert_eq!(skipped["invalid"], 2, "{skipped}");
    assert_eq!(skipped["allowlisted"], 1, "{skipped}");
    assert_eq!(status["enforced"]["ipv4"], 1);
}

#[test]
fn vlan_tagged_frames_from_a_banned_source_are_dropped() {
    require_root();
    let mut s = Scene::new();
    s.api.publish(&["45.50.0.5", "2a01:4f8:50::5"]);
    s.start(&["--poll-interval", "1s"]);
    s.wait_synced(Duration::from_secs(20));
    let server_mac = s.topo.server_mac();
    let tx = PacketSocket::open(&s.topo.attacker, &s.topo.attacker_if);
    let rx = PacketSocket::open(&s.topo.server, &s.topo.server_if);
    let banned4: IpAddr = "45.50.0.5".parse().unwrap();
    let banned6: IpAddr = "2a01:4f8:50::5".parse().unwrap();
    let clean4: IpAddr = "45.50.0.6".parse().unwrap();
    let clean6: IpAddr = "2a01:4f8:50::6".parse().unwrap();
    let server4: IpAddr = s.topo.server_v4.into();
    let server6: IpAddr = s.topo.server_v6.into();
    let mut counts = HashMap::new();
    for tags in [vec![TPID_8021Q], vec![TPID_8021AD, TPID_8021Q]] {
        counts.clear();
        rx.drain_into(&mut HashMap::new());
        for (src, dst) in [
            (banned4, server4),
            (banned6, server6),
            (clean4, server4),
            (clean6, server6),
        ] {
            let mut frame = Frame::udp(src, dst, SIP_PORT);
            frame.dst_mac = server_mac;
            for tpid in &tags {
                frame = frame.vlan(*tpid);
            }
            let bytes = frame.build();
            for _ in 0..N {
                tx.send(&bytes);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while counts.get(&clean6).copied().unwrap_or(0) < N {
            assert!(
                Instant::now() < deadline,
                "clean tagged frames did not arrive: {counts:?}"
            );
            rx.drain_into(&mut counts);
        }
        let got = |a: &IpAddr| counts.get(a).copied().unwrap_or(0);
        assert_eq!(
            (got(&banned4), got(&banned6), got(&clean4), got(&clean6)),
            (0, 0, N, N),
            "{} tag(s)",
            tags.len()
        );
    }
}

#[test]
fn api_faults_do_not_stop_enforcement_and_the_budget_holds() {
    require_root();
    let mut s = Scene::new();
    let limit = (20, Duration::from_secs(2));
    s.api.set_rate_limit(Some(limit));
    s.api.publish(&["45.60.0.1"]);
    let first = s.source("45.60.0.1");
    let key_file = s.dir.path.join("key");
    std::fs::write(&key_file, KEY).unwrap();
    let key_arg = key_file.display().to_string();
    s.start_with_env(
        &[
            &FAST[..],
            &["--api-timeout", "2s", "--api-key-file", &key_arg],
        ]
        .concat(),
        &[],
    );
    s.wait_synced(Duration::from_secs(20));
    let faults = [
        (Fault::RateLimited, 5),
        (Fault::RateLimited400, 2),
        (Fault::ServerError, 1),
        (Fault::Hang, 1),
        (Fault::NonJson, 1),
        (Fault::Truncated, 1),
        (Fault::WrongShape, 1),
        (Fault::Huge, 1),
    ];
    for (i, (fault, times)) in faults.into_iter().enumerate() {
        let next = format!("45.60.1.{}", i + 1);
        s.api.fail_next(fault, times);
        s.api.publish(&[next.as_str()]);
        // Still up and still enforcing while the API misbehaves...
        assert_eq!(s.probe(&[first], N), vec![0], "during {fault:?}");
        // ...and caught up once it recovers.
        s.wait_verdict(next.parse().unwrap(), "banned", Duration::from_secs(30));
    }
    // A revoked key (403): enforcement goes on; a new key and a reload bring it back.
    std::fs::write(&key_file, "revokedKey").unwrap();
    s.agent().signal(libc::SIGHUP);
    wait_until("a 403", Duration::from_secs(15), || {
        s.api.requests().iter().any(|r| r.status == 403)
    });
    s.api.publish(&["45.60.2.1"]);
    assert_eq!(s.probe(&[first], N), vec![0], "with the key rejected");
    assert_eq!(s.check("45.60.2.1")["verdict"], "not banned");
    std::fs::write(&key_file, KEY).unwrap();
    s.agent().signal(libc::SIGHUP);
    s.wait_verdict(
        "45.60.2.1".parse().unwrap(),
        "banned",
        Duration::from_secs(15),
    );
    let worst = s.api.max_in_window(limit.1);
    assert!(
        worst <= limit.0,
        "{worst} requests in one {:?} window",
        limit.1
    );
    assert!(
        !s.agent().log_text().contains(KEY),
        "the key appeared in the log"
    );
}

#[test]
fn a_restart_opens_no_gap_even_with_the_api_down() {
    require_root();
    let mut s = Scene::new();
    s.api.publish(&["45.70.0.1"]);
    let banned = s.source("45.70.0.1");
    let clean = s.source("45.70.0.2");
    s.start(&FAST);
    s.wait_synced(Duration::from_secs(20));

    let traffic = SteadyTraffic::start(&s.topo, banned, clean, 5070);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.stop(), Some(0));
    s.api.set_fault(Some(Fault::ServerError));
    std::thread::sleep(Duration::from_millis(300));
    s.start(&FAST);
    wait_until(
        "a failed request after the restart",
        Duration::from_secs(15),
        || s.api.requests().iter().any(|r| r.status == 500),
    );
    std::thread::sleep(Duration::from_millis(300));
    let delivered = traffic.finish();
    assert!(delivered.sent > 200, "only {} sent", delivered.sent);
    assert_eq!(
        delivered.banned, 0,
        "a banned datagram got through the restart"
    );
    // Packets were flowing the whole time (allow for ones still in flight at the end).
    assert!(
        delivered.clean + 5 >= delivered.sent,
        "{} of {} clean arrived",
        delivered.clean,
        delivered.sent
    );
    assert_eq!(s.check("45.70.0.1")["verdict"], "banned");
}

#[test]
fn kill_9_mid_pull_loses_nothing_and_the_pull_resumes() {
    require_root();
    let mut s = Scene::new();
    let limit = (4, Duration::from_secs(1));
    s.api.set_rate_limit(Some(limit));
    s.api.set_batch_size(100);
    let feed = addrs("45.80", 2_000);
    s.api.publish(&feed);
    let early = s.source("45.80.0.1");
    // The fourth request, the last the budget allows in the first second, never gets an
    // answer: the agent dies with the whole budget spent and one request that no batch has
    // recorded, and the next agent must count it all.
    s.api.fail_after(3, Fault::Hang);
    s.start(&["--poll-interval", "1s", "--rate-limit", "4/1s"]);
    wait_until("a request in flight", Duration::from_secs(20), || {
        s.api.faults_pending() == 0
    });
    wait_until("part of the pull", Duration::from_secs(20), || {
        s.status()["enforced"]["ipv4"].as_u64().unwrap_or(0) >= 300
    });
    s.kill9();
    let applied = {
        let text = std::fs::read_to_string(s.state_dir().join("state.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    };
    let resume_id = applied["apiban"]["full_pull"]["next_id"]
        .as_str()
        .expect("a full pull was in progress")
        .to_owned();
    let saved_entries = applied["entries"].as_array().map_or(0, Vec::len);
    assert!(saved_entries >= 300, "{saved_entries} saved");
    let before_restart = s.api.requests().len();

    // Restart with the API down: what was applied is enforced before any request succeeds.
    s.api.set_fault(Some(Fault::ServerError));
    s.start(&["--poll-interval", "1s", "--rate-limit", "4/1s"]);
    let enforced = s.status()["enforced"]["ipv4"].as_u64().unwrap_or(0) as usize;
    assert!(
        enforced >= saved_entries,
        "{enforced} enforced, {saved_entries} saved"
    );
    assert_eq!(s.probe(&[early], N), vec![0]);
    s.api.set_fault(None);
    wait_until("the rest of the pull", Duration::from_secs(40), || {
        s.status()["enforced"]["ipv4"] == 2_000
    });
    let log = s.api.requests();
    assert_eq!(
        log[before_restart].id.as_deref(),
        Some(resume_id.as_str()),
        "the pull resumed from the saved ID"
    );
    assert!(
        s.api.max_in_window(limit.1) <= limit.0,
        "over the limit; restarted after request {before_restart}:\n{}",
        s.api.log_table()
    );
}

#[test]
fn entries_expire_unless_seen_again() {
    require_root();
    let mut s = Scene::new();
    s.api.publish(&["45.90.0.1", "45.90.0.2"]);
    let gone = s.source("45.90.0.1");
    let kept = s.source("45.90.0.2");
    s.start(&[
        "--ttl",
        "4s",
        "--poll-interval",
        "1s",
        "--rate-limit",
        "20/2s",
    ]);
    s.wait_synced(Duration::from_secs(20));
    assert_eq!(s.probe(&[gone, kept], N), vec![0, 0]);
    // Keep re-publishing one (a reactivation gets a new ID, so polls see it again).
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.check("45.90.0.1")["verdict"] == "banned" {
        assert!(Instant::now() < deadline, "45.90.0.1 never expired");
        s.api.publish(&["45.90.0.2"]);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(s.probe(&[gone, kept], N), vec![N, 0]);
}

#[test]
fn reconciliation_removes_what_left_the_list() {
    require_root();
    let mut s = Scene::new();
    s.api.publish(&["45.91.0.1", "45.91.0.2"]);
    let left = s.source("45.91.0.1");
    let stays = s.source("45.91.0.2");
    s.start(&[
        "--resync-interval",
        "3s",
        "--poll-interval",
        "1s",
        "--rate-limit",
        "20/2s",
    ]);
    s.wait_synced(Duration::from_secs(20));
    assert_eq!(s.probe(&[left, stays], N), vec![0, 0]);
    s.api.unpublish(&["45.91.0.1"]);
    s.wait_verdict(left, "not banned", Duration::from_secs(20));
    assert_eq!(s.probe(&[left, stays], N), vec![N, 0]);
}
