//! Restarts the way operators cause them, with the agent started the ways they start it:
//! `ip netns exec` (a private mount namespace whose /sys has no bpffs of the host's),
//! `unshare --mount`, and plain setns (what a unit with NetworkNamespacePath= does). A
//! banned source sends every millisecond through a SIGTERM and a kill -9 with APIBAN down:
//! not one datagram may arrive, the clean source must keep arriving, the next agent must
//! adopt what the last one enforced, and the stop message must say what the kernel says.

use std::time::Duration;

use apiban::dataplane::{loader, netlink};
use tests::{
    SteadyTraffic,
    fake_apiban::Fault,
    in_netns, require_root,
    scene::{Launcher, Scene},
};

const FAST: [&str; 4] = ["--poll-interval", "1s", "--rate-limit", "20/2s"];

/// The XDP program on the scene's server interface, as the kernel reports it.
fn attached(s: &Scene) -> Option<netlink::XdpProgram> {
    let iface = s.topo.server_if.clone();
    in_netns(&s.topo.server, move || {
        netlink::link(loader::ifindex(&iface).expect("the server veth"))
            .expect("rtnetlink")
            .and_then(|l| l.xdp)
    })
}

/// What the agent enforces, as `apiban list --json` and `status` show it: it must be the
/// same before and after a restart with APIBAN down.
fn enforced_state(s: &Scene) -> (serde_json::Value, serde_json::Value) {
    let list: serde_json::Value =
        serde_json::from_str(&s.agent().cli_ok(&["list", "--json"])).expect("list is JSON");
    (list, s.status()["enforced"].clone())
}

fn restarts_leave_no_gap(launcher: Launcher) {
    require_root();
    let mut s = Scene::new();
    s.api
        .publish(&["45.71.0.1", "45.71.9.0/24", "2a01:4f8:71::1"]);
    let banned = s.source("45.71.0.1");
    let clean = s.source("45.71.1.2");
    s.start_via(launcher, &FAST, &[("APIBAN_KEY", tests::scene::KEY)]);
    s.wait_synced(Duration::from_secs(20));
    s.agent()
        .cli_ok(&["ban", "45.71.2.0/24", "--comment", "REGISTER flood"]);
    let traffic = SteadyTraffic::start(&s.topo, banned, clean, 5071);
    std::thread::sleep(Duration::from_millis(300));
    let before = enforced_state(&s);
    let first = attached(&s).expect("the program runs");
    let hits_before = s.check("45.71.0.1")["hits"].as_u64().expect("hits");
    assert!(hits_before > 0, "the steady traffic is being dropped");

    // SIGTERM: a clean stop, and the stop message comes from asking the kernel.
    let (code, log) = s.stop_with_log();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("checked with the kernel: the XDP program stays attached to"),
        "{log}"
    );
    assert!(!log.contains("WARN"), "a warning on a clean stop:\n{log}");
    assert_eq!(attached(&s), Some(first), "still attached with no agent");
    s.api.set_fault(Some(Fault::ServerError));
    std::thread::sleep(Duration::from_millis(300));

    // The next agent adopts what the last one enforced, with APIBAN down.
    s.start_via(launcher, &FAST, &[("APIBAN_KEY", tests::scene::KEY)]);
    let second = attached(&s).expect("the program runs");
    assert_ne!(
        second.id, first.id,
        "the new agent's program was swapped in"
    );
    assert_eq!(second.mode, first.mode);
    assert_eq!(enforced_state(&s), before, "what is enforced after SIGTERM");
    let hits = s.check("45.71.0.1")["hits"].as_u64().expect("hits");
    assert!(
        hits > hits_before,
        "the hit counts came with the maps: {hits}"
    );
    assert!(
        s.agent().log_text().contains("adopted"),
        "{}",
        s.agent().log_text()
    );

    // kill -9: nothing saved at exit, nothing detached either.
    s.kill9();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(attached(&s), Some(second), "still attached after kill -9");
    s.start_via(launcher, &FAST, &[("APIBAN_KEY", tests::scene::KEY)]);
    assert_eq!(enforced_state(&s), before, "what is enforced after kill -9");
    std::thread::sleep(Duration::from_millis(300));

    let delivered = traffic.finish();
    assert!(delivered.sent > 500, "only {} sent", delivered.sent);
    assert_eq!(
        delivered.banned, 0,
        "banned datagrams got through the restarts: {delivered:?}"
    );
    assert!(
        delivered.clean + 5 >= delivered.sent,
        "clean traffic was held up: {delivered:?}"
    );

    // `apiban detach` from the agent's network namespace finds the program even when the
    // agent's pins went with its mount namespace.
    drop(s.stop_with_log());
    s.detach();
    assert_eq!(attached(&s), None, "detached");
}

#[test]
fn restarts_under_ip_netns_exec_leave_no_gap() {
    restarts_leave_no_gap(Launcher::IpNetnsExec);
}

#[test]
fn restarts_under_unshare_mount_leave_no_gap() {
    restarts_leave_no_gap(Launcher::UnshareMount);
}

#[test]
fn restarts_in_the_hosts_mount_namespace_leave_no_gap() {
    restarts_leave_no_gap(Launcher::Setns);
}
