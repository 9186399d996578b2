//! `cargo xtask demo`: apiban end to end on one machine, with no key and no internet.
//!
//! Two network namespaces joined by a veth pair stand for a SIP server and the internet. A
//! local APIBAN-compatible server publishes sample attackers; the real agent (the release
//! build) syncs from it and drops them with XDP; SIP OPTIONS are sent from listed and clean
//! addresses before and after, and a table shows what got through. Everything the demo
//! creates has a fixed name, so a leftover from a killed run is removed at the next start,
//! and Ctrl-C cleans up too.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicI32, Ordering},
    time::{Duration, Instant},
};

use tests::{BpffsDir, Topology, agent::use_apiban_bin, scene::Scene, sync_harness::TempDir};

const SERVER_NS: &str = "apiban-demo-srv";
const INTERNET_NS: &str = "apiban-demo-net";
const SERVER_IF: &str = "demo-srv";
const INTERNET_IF: &str = "demo-net";
const BPFFS: &str = "/sys/fs/bpf/apiban-demo";
const WORK: &str = "/tmp/apiban-demo";
const N: usize = 50;

static AGENT_PID: AtomicI32 = AtomicI32::new(0);

struct Source {
    addr: &'static str,
    role: &'static str,
}

const LISTED: [Source; 3] = [
    Source {
        addr: "45.95.147.236",
        role: "listed by APIBAN",
    },
    Source {
        addr: "193.107.216.27",
        role: "listed by APIBAN",
    },
    Source {
        addr: "185.53.88.41",
        role: "in a listed /24",
    },
];
const CLEAN: [Source; 2] = [
    Source {
        addr: "81.2.69.160",
        role: "clean: a customer PBX",
    },
    Source {
        addr: "10.77.0.2",
        role: "clean: the carrier SBC",
    },
];
const NEWCOMER: Source = Source {
    addr: "141.98.11.77",
    role: "published during the demo",
};

fn main() {
    let mut args = std::env::args().skip(1);
    let agent = match (args.next().as_deref(), args.next()) {
        (Some("--agent"), Some(path)) => PathBuf::from(path),
        _ => {
            eprintln!("usage: apiban-demo --agent PATH (run it with `cargo xtask demo`)");
            std::process::exit(2);
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "the demo creates network namespaces and attaches XDP: run it as root \
             (this machine has no sudo: use a root shell)"
        );
        std::process::exit(1);
    }
    use_apiban_bin(agent);
    cleanup();
    on_interrupt_clean_up();
    let outcome = std::panic::catch_unwind(demo);
    cleanup();
    match outcome {
        Ok(()) => println!(
            "\nDone: namespaces, the XDP program, its pins and the demo's files are removed."
        ),
        Err(_) => {
            eprintln!("the demo failed (see above); everything it created is removed");
            std::process::exit(1);
        }
    }
}

/// Removes whatever a demo run created, finished or not.
fn cleanup() {
    let pid = AGENT_PID.swap(0, Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if Path::new(BPFFS).exists() {
        let _ = apiban::dataplane::loader::detach(Path::new(BPFFS), None, true);
    }
    for ns in [SERVER_NS, INTERNET_NS] {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
    let _ = std::fs::remove_dir_all(WORK);
}

/// Ctrl-C (or SIGTERM, SIGHUP) cleans up before exiting. The signals are blocked in every
/// thread and taken by one that waits for them; children get a clean mask from std.
fn on_interrupt_clean_up() {
    // SAFETY: plain libc signal-set calls on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: set is a valid signal set; sig a valid out pointer.
        unsafe { libc::sigwait(&set, &mut sig) };
        eprintln!("\ninterrupted: cleaning up");
        cleanup();
        std::process::exit(130);
    });
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal address")
}

fn step(text: &str) {
    println!("\n== {text}");
}

fn demo() {
    let started = Instant::now();
    step(
        "network: namespace `apiban-demo-srv` (the SIP server) <-veth-> `apiban-demo-net` (the internet)",
    );
    let mut scene = Scene::build(
        Topology::named(SERVER_NS, INTERNET_NS, SERVER_IF, INTERNET_IF),
        BpffsDir::at(PathBuf::from(BPFFS)),
        TempDir::at(PathBuf::from(WORK)),
    );
    for s in LISTED.iter().chain(&CLEAN).chain([&NEWCOMER]) {
        if s.addr != "10.77.0.2" {
            scene.source(s.addr);
        }
    }
    println!("   SIP server 10.77.0.1:5060/udp; senders: 3 listed attackers, 2 clean peers");

    step("a local APIBAN-compatible server with sample data (in the server namespace)");
    let mut feed: Vec<String> = (0..1_000)
        .map(|i| format!("5.188.{}.{}", 10 + i / 200, 1 + i % 200))
        .collect();
    feed.extend(["45.95.147.236", "193.107.216.27", "185.53.88.0/24"].map(String::from));
    scene.api.publish(&feed);
    println!(
        "   {} publishes {} entries, including 45.95.147.236, 193.107.216.27 and 185.53.88.0/24",
        scene.api.base_url(),
        feed.len()
    );

    let everyone: Vec<IpAddr> = LISTED
        .iter()
        .chain(&CLEAN[..1])
        .map(|s| ip(s.addr))
        .collect();
    step(&format!("before apiban: {N} SIP OPTIONS from each sender"));
    let before = scene.probe(&everyone, N);

    step("start the agent (target/release/apiban run) in the server namespace");
    let extra = ["--poll-interval", "2s", "--metrics-addr", "127.0.0.1:9477"];
    println!(
        "   apiban run {} {}",
        scene.base_args().join(" "),
        extra.join(" ")
    );
    scene.start(&extra);
    AGENT_PID.store(scene.agent().pid(), Ordering::SeqCst);
    let t0 = Instant::now();
    scene.wait_synced(Duration::from_secs(30));
    println!(
        "   full pull done in {:.1}s: {} IPv4 prefixes enforced",
        t0.elapsed().as_secs_f64(),
        scene.status()["enforced"]["ipv4"]
    );

    step(&format!(
        "with apiban: {N} SIP OPTIONS from each sender again"
    ));
    let after = scene.probe(&everyone, N);

    step("a new attacker appears in the feed while the agent runs");
    let newcomer = ip(NEWCOMER.addr);
    let newcomer_before = scene.probe(&[newcomer], N)[0];
    scene.api.publish(&[NEWCOMER.addr]);
    let took = scene.wait_verdict(newcomer, "banned", Duration::from_secs(30));
    println!(
        "   {} published; banned {:.1}s later (poll interval 2s)",
        NEWCOMER.addr,
        took.as_secs_f64()
    );
    let newcomer_after = scene.probe(&[newcomer], N)[0];

    step("what got through to the SIP server");
    println!(
        "   {:<16} {:<28} {:>10} {:>10}",
        "sender", "", "before", "after"
    );
    let row = |s: &Source, b: usize, a: usize| {
        println!(
            "   {:<16} {:<28} {:>10} {:>10}",
            s.addr,
            s.role,
            format!("{b}/{N}"),
            format!("{a}/{N}")
        )
    };
    for (i, s) in LISTED.iter().chain(&CLEAN[..1]).enumerate() {
        row(s, before[i], after[i]);
    }
    // The probe's last sender is the attacker's own clean address: all of its datagrams
    // arrived every round, or the probe would have failed.
    row(&CLEAN[1], N, N);
    row(&NEWCOMER, newcomer_before, newcomer_after);

    step("apiban status");
    for line in scene.agent().cli_ok(&["status"]).lines() {
        println!("   {line}");
    }
    step(&format!("apiban check {}", LISTED[2].addr));
    for line in scene.agent().cli_ok(&["check", LISTED[2].addr]).lines() {
        println!("   {line}");
    }

    step("stop the agent (SIGTERM): the XDP program stays attached, so no gap");
    AGENT_PID.store(0, Ordering::SeqCst);
    let code = scene.stop();
    let stopped = scene.probe(&[ip(LISTED[0].addr)], N)[0];
    println!(
        "   agent exited with {code:?}; {} still gets {stopped}/{N} through, {} all {N}",
        LISTED[0].addr, CLEAN[1].addr
    );
    println!("   (the next `apiban run` adopts the program's maps; `apiban detach` removes it)");

    let ok = (0..LISTED.len()).all(|i| before[i] == N && after[i] == 0)
        && before[LISTED.len()] == N
        && after[LISTED.len()] == N
        && newcomer_after == 0
        && stopped == 0;
    println!(
        "\n{} in {:.0}s",
        if ok {
            "listed attackers dropped, clean peers untouched"
        } else {
            "UNEXPECTED RESULT: see the table above"
        },
        started.elapsed().as_secs_f64()
    );
    assert!(ok, "the demo's outcome was not the expected one");
}
