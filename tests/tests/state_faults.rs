//! The state directory full (a small tmpfs) or read-only under the running agent:
//! enforcement goes on, each failed save is logged once and counted, the operator is told a
//! change was not saved, no state file is ever left truncated, and the next start with room
//! again loads the last good state.

use std::{net::SocketAddr, time::Duration};

use tests::{Tmpfs, agent::http_get, require_root, scene::Scene, wait_until};

const N: usize = 20;
const FAST: [&str; 4] = ["--poll-interval", "1s", "--rate-limit", "20/2s"];

fn metric(s: &Scene, name: &str) -> f64 {
    let (_, body) = http_get(
        Some(&s.topo.server),
        "127.0.0.1:9477".parse::<SocketAddr>().unwrap(),
        "/metrics",
    );
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the scrape:\n{body}"))
}

fn save_errors(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("ERROR") && l.contains("cannot save state"))
        .count()
}

#[test]
fn a_full_state_directory_stops_saves_not_enforcement() {
    require_root();
    let mut s = Scene::new();
    let fs = Tmpfs::mount(&s.state_dir(), "256k");
    s.api.publish(&["45.73.0.1"]);
    let banned = s.source("45.73.5.7");
    s.start(&[&FAST[..], &["--metrics-addr", "127.0.0.1:9477"]].concat());
    s.wait_synced(Duration::from_secs(20));
    let state_file = s.state_dir().join("state.json");
    let good = std::fs::read(&state_file).expect("a saved state");

    let filler = fs.fill();
    let answer = s
        .agent()
        .cli_ok(&["ban", "45.73.5.0/24", "--comment", "INVITE flood"]);
    assert!(
        answer.contains("WARNING: the state file could not be saved"),
        "{answer}"
    );
    assert_eq!(s.probe(&[banned], N), vec![0], "enforced without a save");
    let status = s.status();
    assert_eq!(status["engine"]["unsaved"], true, "{}", status["engine"]);
    assert!(metric(&s, "apiban_state_save_failures_total") >= 1.0);
    assert_eq!(metric(&s, "apiban_state_unsaved"), 1.0);
    assert_eq!(
        std::fs::read(&state_file).unwrap(),
        good,
        "the last good state"
    );
    assert!(
        !s.state_dir().join("state.json.tmp").exists(),
        "a partial file was left"
    );

    // The owner retries quietly: one error for the one change.
    std::thread::sleep(Duration::from_secs(11));
    assert_eq!(
        save_errors(&s.agent().log_text()),
        1,
        "{}",
        s.agent().log_text()
    );
    assert!(
        metric(&s, "apiban_state_save_failures_total") >= 2.0,
        "retried"
    );

    // Room again: the next retry brings the file up to date.
    std::fs::remove_file(filler).unwrap();
    wait_until("a successful save", Duration::from_secs(15), || {
        s.status()["engine"]["unsaved"] == false
    });
    let saved = std::fs::read_to_string(&state_file).unwrap();
    let state: serde_json::Value = serde_json::from_str(&saved).expect("whole JSON");
    assert!(saved.contains("45.73.5.0/24"), "{state}");
    assert!(s.agent().log_text().contains("state saved again"));
    assert_eq!(s.stop(), Some(0));

    // The next start loads it.
    s.start(&FAST);
    assert_eq!(s.check("45.73.5.7")["verdict"], "banned");
    drop(s);
    drop(fs);
}

#[test]
fn a_read_only_state_directory_keeps_the_last_good_state() {
    require_root();
    let mut s = Scene::new();
    let fs = Tmpfs::mount(&s.state_dir(), "1m");
    s.api.publish(&["45.74.0.1"]);
    let kept = s.source("45.74.1.1");
    let lost = s.source("45.74.2.1");
    s.start(&FAST);
    s.wait_synced(Duration::from_secs(20));
    s.agent().cli_ok(&["ban", "45.74.1.1"]);

    fs.remount("ro");
    let answer = s.agent().cli_ok(&["ban", "45.74.2.1"]);
    assert!(answer.contains("could not be saved"), "{answer}");
    assert_eq!(s.probe(&[kept, lost], N), vec![0, 0]);
    let state = std::fs::read_to_string(s.state_dir().join("state.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&state).expect("whole JSON");
    assert!(state.contains("45.74.1.1") && !state.contains("45.74.2.1"));
    let (code, log) = s.stop_with_log();
    assert_eq!(code, Some(0), "{log}");

    // Started on a read-only directory: it enforces what the file holds, the last good
    // state, and says that nothing will be saved.
    s.start(&FAST);
    assert!(
        s.agent()
            .log_text()
            .contains("the state directory is read-only"),
        "{}",
        s.agent().log_text()
    );
    assert_eq!(s.check("45.74.1.1")["verdict"], "banned");
    assert_eq!(s.check("45.74.2.1")["verdict"], "not banned");
    assert_eq!(s.probe(&[kept, lost], N), vec![0, N]);

    fs.remount("rw");
    let answer = s.agent().cli_ok(&["ban", "45.74.2.1"]);
    assert!(!answer.contains("WARNING"), "{answer}");
    assert_eq!(s.status()["engine"]["unsaved"], false);
    drop(s);
    drop(fs);
}
