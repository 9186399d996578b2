//! `cargo xtask demo`: apiban end to end on one machine, with no key and no internet.
//!
//! Two network namespaces joined by a veth pair stand for a SIP server and the internet. A
//! local APIBAN-compatible server publishes sample attackers; the real agent (the release
//! build) syncs from it and drops them with XDP; SIP OPTIONS are sent from listed and clean
//! addresses before and after, and a table shows what got through. Everything the demo
//! creates has a fixed name, so a leftover from a killed run is removed at the next start,
//! and Ctrl-C cleans up too.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicI32, Ordering},
    time::{Duration, Instant},
};

use tests::{
    Netns, UdpReceiver,
    agent::{AgentProcess, use_apiban_bin},
    fake_apiban::FakeApiban,
    in_netns, sh,
};

const SERVER_NS: &str = "apiban-demo-srv";
const INTERNET_NS: &str = "apiban-demo-net";
const SERVER_IF: &str = "demo-srv";
const INTERNET_IF: &str = "demo-net";
const BPFFS: &str = "/sys/fs/bpf/apiban-demo";
const WORK: &str = "/tmp/apiban-demo";
const KEY: &str = "demo-key-not-secret";
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
        addr: "10.99.0.2",
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
        let _ = apiban::dataplane::loader::detach(Path::new(BPFFS), None);
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
    sh("ip", &["netns", "add", SERVER_NS]);
    let server_ns = Netns {
        name: SERVER_NS.into(),
    };
    sh("ip", &["netns", "add", INTERNET_NS]);
    let internet_ns = Netns {
        name: INTERNET_NS.into(),
    };
    sh(
        "ip",
        &[
            "link",
            "add",
            SERVER_IF,
            "netns",
            SERVER_NS,
            "type",
            "veth",
            "peer",
            "name",
            INTERNET_IF,
            "netns",
            INTERNET_NS,
        ],
    );
    for (ns, ifname, addr) in [
        (&server_ns, SERVER_IF, "10.99.0.1/24"),
        (&internet_ns, INTERNET_IF, "10.99.0.2/24"),
    ] {
        ns.exec("ip", &["link", "set", "lo", "up"]);
        ns.exec("ip", &["addr", "add", addr, "dev", ifname]);
        ns.exec("ip", &["link", "set", ifname, "up"]);
    }
    for s in LISTED.iter().chain(&CLEAN).chain([&NEWCOMER]) {
        if s.addr == "10.99.0.2" {
            continue;
        }
        let host = format!("{}/32", s.addr);
        internet_ns.exec("ip", &["addr", "add", &host, "dev", INTERNET_IF]);
        server_ns.exec("ip", &["route", "add", &host, "via", "10.99.0.2"]);
    }
    println!("   SIP server 10.99.0.1:5060/udp; senders: 3 listed attackers, 2 clean peers");

    step("a local APIBAN-compatible server with sample data (in the server namespace)");
    let apiban_server = in_netns(&server_ns, || {
        FakeApiban::start_on(KEY, "127.0.0.1:0".parse().expect("literal"))
    });
    let mut feed: Vec<String> = (0..1_000)
        .map(|i| format!("5.188.{}.{}", 10 + i / 200, 1 + i % 200))
        .collect();
    feed.extend(["45.95.147.236", "193.107.216.27", "185.53.88.0/24"].map(String::from));
    apiban_server.publish(&feed);
    println!(
        "   {} publishes {} entries, including 45.95.147.236, 193.107.216.27 and 185.53.88.0/24",
        apiban_server.base_url(),
        feed.len()
    );

    let mut rx = UdpReceiver::bind(&server_ns, "10.99.0.1:5060".parse().expect("literal"));
    step(&format!("before apiban: {N} SIP OPTIONS from each sender"));
    let before = send_round(
        &internet_ns,
        &mut rx,
        &LISTED.iter().chain(&CLEAN).collect::<Vec<_>>(),
    );

    step("start the agent (target/release/apiban run) in the server namespace");
    std::fs::create_dir_all(WORK).expect("demo work directory");
    let sock = Path::new(WORK).join("control.sock");
    let args = [
        "--iface",
        SERVER_IF,
        "--bpffs-dir",
        BPFFS,
        "--state-dir",
        &format!("{WORK}/state"),
        "--api-url",
        &apiban_server.base_url(),
        "--poll-interval",
        "2s",
        "--metrics-addr",
        "127.0.0.1:9477",
    ]
    .map(str::to_owned);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    println!("   apiban run {}", args.join(" "));
    let agent = AgentProcess::start(Some(&server_ns), &sock, &args, &[("APIBAN_KEY", KEY)]);
    AGENT_PID.store(agent.pid(), Ordering::SeqCst);
    let t0 = Instant::now();
    wait("the first full pull", Duration::from_secs(30), || {
        agent.status_json()["sync"]["last_success"].is_u64()
    });
    let status = agent.status_json();
    println!(
        "   full pull done in {:.1}s: {} IPv4 prefixes enforced",
        t0.elapsed().as_secs_f64(),
        status["enforced"]["ipv4"]
    );

    step(&format!(
        "with apiban: {N} SIP OPTIONS from each sender again"
    ));
    let after = send_round(
        &internet_ns,
        &mut rx,
        &LISTED.iter().chain(&CLEAN).collect::<Vec<_>>(),
    );

    step("a new attacker appears in the feed while the agent runs");
    let newcomer_before = send_round(&internet_ns, &mut rx, &[&NEWCOMER, &CLEAN[1]])[0];
    apiban_server.publish(&[NEWCOMER.addr]);
    let t0 = Instant::now();
    wait(
        "the new address to be banned",
        Duration::from_secs(30),
        || {
            let out = agent.cli_ok(&["check", NEWCOMER.addr, "--json"]);
            out.contains("\"verdict\": \"banned\"")
        },
    );
    println!(
        "   {} published; banned {:.1}s later (poll interval 2s)",
        NEWCOMER.addr,
        t0.elapsed().as_secs_f64()
    );
    let newcomer_after = send_round(&internet_ns, &mut rx, &[&NEWCOMER, &CLEAN[1]])[0];

    step("what got through to the SIP server");
    println!(
        "   {:<16} {:<28} {:>10} {:>10}",
        "sender", "", "before", "after"
    );
    for (i, s) in LISTED.iter().chain(&CLEAN).enumerate() {
        println!(
            "   {:<16} {:<28} {:>10} {:>10}",
            s.addr,
            s.role,
            format!("{}/{N}", before[i]),
            format!("{}/{N}", after[i])
        );
    }
    println!(
        "   {:<16} {:<28} {:>10} {:>10}",
        NEWCOMER.addr,
        NEWCOMER.role,
        format!("{newcomer_before}/{N}"),
        format!("{newcomer_after}/{N}")
    );

    step("apiban status");
    for line in agent.cli_ok(&["status"]).lines() {
        println!("   {line}");
    }
    step(&format!("apiban check {}", LISTED[2].addr));
    for line in agent.cli_ok(&["check", LISTED[2].addr]).lines() {
        println!("   {line}");
    }

    step("stop the agent (SIGTERM): the XDP program stays attached, so no gap");
    AGENT_PID.store(0, Ordering::SeqCst);
    let code = agent.stop();
    let stopped = send_round(&internet_ns, &mut rx, &[&LISTED[0], &CLEAN[1]]);
    println!(
        "   agent exited with {:?}; {} still gets {}/{N} through, {} gets {}/{N}",
        code, LISTED[0].addr, stopped[0], CLEAN[1].addr, stopped[1]
    );
    println!(
        "   (the next `apiban run` adopts the pinned program and maps; `apiban detach` removes them)"
    );

    let ok = LISTED
        .iter()
        .enumerate()
        .all(|(i, _)| before[i] == N && after[i] == 0)
        && (0..CLEAN.len()).all(|i| after[LISTED.len() + i] == N)
        && newcomer_after == 0
        && stopped[0] == 0;
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
    drop(apiban_server);
    drop(rx);
    drop(server_ns);
    drop(internet_ns);
}

/// Sends N SIP OPTIONS from each source (in order; the last must be clean) and returns how
/// many of each reached the server. The last source's datagrams arrive after everything sent
/// before them on the same veth, so once they are in, the count is final.
fn send_round(ns: &Netns, rx: &mut UdpReceiver, sources: &[&Source]) -> Vec<usize> {
    let dst: SocketAddr = "10.99.0.1:5060".parse().expect("literal");
    rx.drain();
    let before: Vec<usize> = sources.iter().map(|s| rx.count(ip(s.addr))).collect();
    for s in sources {
        let src = ip(s.addr);
        in_netns(ns, move || {
            let socket = UdpSocket::bind(SocketAddr::new(src, 5060)).expect("bind the sender");
            for i in 0..N {
                let msg = format!(
                    "OPTIONS sip:10.99.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {src}:5060;branch=z9hG4bK-demo{i}\r\n\
                     Max-Forwards: 70\r\nFrom: <sip:scan@{src}>;tag=demo\r\nTo: <sip:10.99.0.1>\r\n\
                     Call-ID: demo-{i}@{src}\r\nCSeq: 1 OPTIONS\r\nUser-Agent: friendly-scanner\r\n\
                     Content-Length: 0\r\n\r\n"
                );
                socket.send_to(msg.as_bytes(), dst).expect("send");
            }
        });
        // Read as we go: a whole round at once would overflow the receive buffer.
        std::thread::sleep(Duration::from_millis(20));
        rx.drain();
    }
    let last = ip(sources[sources.len() - 1].addr);
    let want = before[sources.len() - 1] + N;
    rx.wait_for(last, want, Duration::from_secs(10));
    sources
        .iter()
        .zip(before)
        .map(|(s, b)| rx.count(ip(s.addr)) - b)
        .collect()
}

fn wait(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
