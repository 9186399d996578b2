//! APIBAN answering 403, as the real agent meets it: a WAF or a maintenance window that
//! passes in seconds must not stall sync for half an hour, a key that stays rejected must
//! cost ever fewer requests (never more than the budget), and a fixed key, a reload or
//! `apiban reload` must retry at once.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tests::{
    agent::http_get,
    fake_apiban::Fault,
    require_root,
    scene::{KEY, Scene},
    wait_until,
};

const N: usize = 20;

fn rejected_requests(s: &Scene, from: usize) -> Vec<Instant> {
    s.api.requests()[from..]
        .iter()
        .filter(|r| r.status == 403)
        .map(|r| r.at)
        .collect()
}

#[test]
fn a_transient_403_does_not_stall_sync() {
    require_root();
    let mut s = Scene::new();
    s.api.set_rate_limit(Some((20, Duration::from_secs(2))));
    s.api.publish(&["45.61.0.1"]);
    let newcomer = s.source("45.61.0.2");
    let metrics: SocketAddr = "127.0.0.1:9477".parse().unwrap();
    s.start(&[
        "--poll-interval",
        "1s",
        "--rate-limit",
        "20/2s",
        "--metrics-addr",
        "127.0.0.1:9477",
    ]);
    s.wait_synced(Duration::from_secs(20));

    s.api.set_fault(Some(Fault::Forbidden));
    wait_until("a 403", Duration::from_secs(5), || {
        s.api.requests().iter().any(|r| r.status == 403)
    });
    std::thread::sleep(Duration::from_secs(5));
    let status = s.status();
    assert!(
        status["sync"]["key_rejected_since"].is_u64(),
        "{}",
        status["sync"]
    );
    let text = s.agent().cli_ok(&["status"]);
    assert!(text.contains("REJECTED (403) since"), "{text}");
    assert!(
        text.contains("next try in ") || text.contains("next try now"),
        "{text}"
    );
    let (_, body) = http_get(Some(&s.topo.server), metrics, "/metrics");
    let since = body
        .lines()
        .find_map(|l| l.strip_prefix("apiban_api_key_rejected_since_timestamp_seconds "))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("the rejected-since gauge");
    assert!(since > 0, "{body}");
    assert!(body.contains("apiban_api_next_request_timestamp_seconds "));

    // The WAF lets requests through again; something new is published right then.
    s.api.set_fault(None);
    s.api.publish(&["45.61.0.2"]);
    let recovered = Instant::now();
    s.wait_verdict(newcomer, "banned", Duration::from_secs(20));
    let took = recovered.elapsed();
    assert!(
        took <= Duration::from_secs(3),
        "banned {took:?} after APIBAN recovered: more than 3 poll intervals\n{}",
        s.api.log_table()
    );
    assert_eq!(s.probe(&[newcomer], N), vec![0]);
    assert_eq!(
        s.status()["sync"]["key_rejected_since"],
        serde_json::Value::Null
    );
    assert!(s.api.max_in_window(Duration::from_secs(2)) <= 20);
}

#[test]
fn a_persistent_403_backs_off_within_the_budget_and_a_reload_retries_at_once() {
    require_root();
    let mut s = Scene::new();
    let limit = (20, Duration::from_secs(2));
    s.api.set_rate_limit(Some(limit));
    s.api.publish(&["45.62.0.1"]);
    let banned = s.source("45.62.0.1");
    let later = s.source("45.62.0.2");
    s.start(&[
        "--poll-interval",
        "1s",
        "--rate-limit",
        "20/2s",
        "--key-retry-max",
        "4s",
    ]);
    s.wait_synced(Duration::from_secs(20));
    let from = s.api.requests().len();
    s.api.set_fault(Some(Fault::Forbidden));
    std::thread::sleep(Duration::from_millis(13_500));
    let times = rejected_requests(&s, from);
    let gaps: Vec<f64> = times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_secs_f64())
        .collect();
    // From the poll interval (1 s) doubling to the cap (4 s), each wait 80-100% of its step:
    // about 1, 2, 4, 4 s after the first 403.
    assert!(
        (4..=7).contains(&times.len()),
        "{} requests in 13.5 s of 403s; gaps {gaps:?}",
        times.len()
    );
    assert!((0.7..=1.3).contains(&gaps[0]), "first retry: {gaps:?}");
    assert!(gaps[1] >= 1.5 && gaps[1] <= 2.3, "second retry: {gaps:?}");
    assert!(gaps[2] >= 3.0 && gaps[2] <= 4.3, "third retry: {gaps:?}");
    assert!(gaps.iter().all(|g| *g <= 4.3), "over the cap: {gaps:?}");
    assert!(s.api.max_in_window(limit.1) <= limit.0);
    assert_eq!(s.probe(&[banned], N), vec![0], "enforcing while rejected");

    // `apiban reload` cuts the wait short, even though nothing in the config changed.
    let before = s.api.requests().len();
    let asked = Instant::now();
    s.agent().cli_ok(&["reload"]);
    wait_until(
        "a retry after `apiban reload`",
        Duration::from_secs(2),
        || s.api.requests().len() > before,
    );
    assert!(asked.elapsed() < Duration::from_secs(2));

    // The key works again: a reload retries at once and the pull catches up.
    s.api.set_fault(None);
    s.api.publish(&["45.62.0.2"]);
    std::thread::sleep(Duration::from_millis(200));
    let asked = Instant::now();
    s.agent().signal(libc::SIGHUP);
    s.wait_verdict(later, "banned", Duration::from_secs(10));
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "banned {:?} after SIGHUP",
        asked.elapsed()
    );
    assert!(s.api.max_in_window(limit.1) <= limit.0);
    let log = s.agent().log_text();
    let errors = log
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("403"))
        .count();
    assert_eq!(errors, 1, "the rejection is logged once an hour:\n{log}");
    assert!(log.contains("API key accepted again"), "{log}");
}

#[test]
fn a_new_key_in_the_key_file_is_used_without_a_reload() {
    require_root();
    let mut s = Scene::new();
    s.api.publish(&["45.63.0.1"]);
    let banned = s.source("45.63.0.1");
    let key_file = s.dir.path.join("key");
    std::fs::write(&key_file, "revokedKey\n").unwrap();
    let key_arg = key_file.display().to_string();
    s.start_with_env(
        &[
            "--poll-interval",
            "1s",
            "--rate-limit",
            "20/2s",
            "--api-key-file",
            &key_arg,
        ],
        &[],
    );
    wait_until("a 403", Duration::from_secs(10), || {
        s.api.requests().iter().any(|r| r.status == 403)
    });
    assert_eq!(s.check("45.63.0.1")["verdict"], "not banned");
    // The operator puts the right key in place (as a credential refresh would).
    let tmp = s.dir.path.join("key.new");
    std::fs::write(&tmp, format!("{KEY}\n")).unwrap();
    std::fs::rename(&tmp, &key_file).unwrap();
    s.wait_verdict(banned, "banned", Duration::from_secs(6));
    assert_eq!(s.probe(&[banned], N), vec![0]);
    assert!(
        !s.agent().log_text().contains(KEY),
        "the key appeared in the log"
    );
}
