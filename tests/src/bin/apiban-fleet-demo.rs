//! `cargo xtask demo --fleet`: a fleet of three agents on one machine, with no key and no
//! internet.
//!
//! A three-member etcd cluster and a local APIBAN-compatible server sit in a hub namespace;
//! each of three nodes is a server namespace (XDP on its interface to its own attacker
//! namespace) linked to the hub. The demo shows the elected poller, a ban made on node 1
//! dropped on nodes 2 and 3 with the measured delay, the poller killed and another taking
//! over, and `apiban status --fleet`. Everything it creates is a guard: it is removed when
//! the demo ends, fails or is interrupted (Ctrl-C is noticed between steps).

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use tests::{agent::use_apiban_bin, fleet::Fleet};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
const N: usize = 50;

extern "C" fn interrupted(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Stops the demo between steps after Ctrl-C; the guards clean up as it unwinds.
fn step(title: &str) {
    assert!(
        !INTERRUPTED.load(Ordering::SeqCst),
        "interrupted: cleaning up"
    );
    println!("\n== {title}");
}

fn main() {
    let mut args = std::env::args().skip(1);
    let agent = match (args.next().as_deref(), args.next()) {
        (Some("--agent"), Some(path)) => PathBuf::from(path),
        _ => {
            eprintln!(
                "usage: apiban-fleet-demo --agent PATH (run it with `cargo xtask demo --fleet`)"
            );
            std::process::exit(2);
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the demo creates network namespaces and attaches XDP: run it as root");
        std::process::exit(1);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, interrupted as *const () as libc::sighandler_t);
        libc::signal(
            libc::SIGTERM,
            interrupted as *const () as libc::sighandler_t,
        );
    }
    use_apiban_bin(agent);
    match std::panic::catch_unwind(demo) {
        Ok(()) => {
            println!("\nDone: namespaces, etcd, the XDP programs and their pins are removed.")
        }
        Err(_) => {
            eprintln!("the demo stopped (see above); everything it created is removed");
            std::process::exit(1);
        }
    }
}

fn demo() {
    step("a three-member etcd cluster, a local APIBAN server, three nodes in namespaces");
    let mut f = Fleet::new(3);
    f.api.publish(&["45.95.147.236", "193.107.216.27"]);
    for i in 0..3 {
        f.start(i, &["--poll-interval", "2s"]);
        println!(
            "  {} started: apiban run --cluster {} ...",
            f.nodes[i].name,
            f.nodes[i].endpoints()
        );
    }
    let leader = f.wait_leader(Duration::from_secs(20));
    println!(
        "  elected to poll APIBAN for the fleet: {}",
        f.nodes[leader].name
    );
    for node in &f.nodes {
        node.scene.wait_verdict(
            "45.95.147.236".parse().expect("literal"),
            "banned",
            Duration::from_secs(30),
        );
    }
    println!("  every node enforces what the one poller fetched");

    step("a ban made on node-a, dropped on node-b and node-c");
    let at = Instant::now();
    f.nodes[0]
        .scene
        .agent()
        .cli_ok(&["ban", "141.98.11.77", "--comment", "seen scanning node-a"]);
    for node in &f.nodes[1..] {
        node.scene.wait_verdict(
            "141.98.11.77".parse().expect("literal"),
            "banned",
            Duration::from_secs(10),
        );
    }
    println!(
        "  apiban ban 141.98.11.77 on node-a: banned on node-b and node-c {:.0} ms later",
        at.elapsed().as_secs_f64() * 1000.0
    );
    for i in 1..3 {
        let src: IpAddr = f.nodes[i].scene.source("141.98.11.77");
        let got = f.nodes[i].scene.probe(&[src], N);
        println!(
            "  {}: {}/{N} SIP OPTIONS from 141.98.11.77 got through",
            f.nodes[i].name, got[0]
        );
    }

    step("apiban status --fleet (on node-b), from the heartbeats every node keeps in etcd");
    // Heartbeats go out every 2 s: wait for one that follows the ban.
    std::thread::sleep(Duration::from_secs(3));
    print!(
        "{}",
        f.nodes[1].scene.agent().cli_ok(&["status", "--fleet"])
    );

    step("the poller is killed (SIGKILL); another node takes over");
    let killed = Instant::now();
    f.nodes[leader].scene.kill9();
    let next = f.wait_leader(Duration::from_secs(20));
    println!(
        "  {} killed; {} polls now, {:.1} s later (the leader lease is 5 s)",
        f.nodes[leader].name,
        f.nodes[next].name,
        killed.elapsed().as_secs_f64()
    );
    f.api.publish(&["185.53.88.41"]);
    f.nodes[next].scene.wait_verdict(
        "185.53.88.41".parse().expect("literal"),
        "banned",
        Duration::from_secs(30),
    );
    println!("  a newly listed address reaches the fleet through the new poller");

    step("apiban status --fleet (on the new poller)");
    std::thread::sleep(Duration::from_secs(3));
    print!(
        "{}",
        f.nodes[next].scene.agent().cli_ok(&["status", "--fleet"])
    );
    println!(
        "  ({} keeps enforcing what it had; its heartbeat drops out 10 s after it died)",
        f.nodes[leader].name
    );
}
