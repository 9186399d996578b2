//! `cargo xtask bench` (compare): apiban side by side with what SIP operators run today, in
//! one run on one machine. Every firewall is set up inside a network namespace created for
//! the run, so the host's own rules are never touched.
//!
//! Loading N banned addresses: apiban's map updates (one by one and batched) against
//! `iptables -A` per address into a chain jumped to from INPUT (what the official APIBAN Go
//! client does), `iptables-restore`, `ipset restore` and one `nft -f` with every element.
//!
//! Dropping a flood on a veth pair: the attacker namespace sends raw UDP frames with
//! sendmmsg on a packet socket, 9 of 10 from banned sources spread over the whole list and 1
//! of 10 from a clean address, to the server namespace, which filters with nothing, apiban
//! (XDP), iptables (one rule per address in a chain), ipset (hash:ip, one rule) or an
//! nftables set. On veth the receive path runs as softirq on the sending CPU, so the
//! receiver's cost is the softirq time in /proc/stat over the packets the server disposed of
//! (IP packets that reached the stack, plus what XDP dropped before it).

use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use apiban::dataplane::loader::{self, LoadOptions};
use apiban_common::Verdict;
use ipnet::{IpNet, Ipv4Net};
use tests::{
    BpffsDir, Netns, PacketSocket, Topology, frame::Frame, in_netns, require_root, spawn_in_netns,
};

fn main() {
    require_root();
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json_out = args
        .iter()
        .position(|a| a == "--json-out")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let (bulk_sizes, per_call_size): (&[usize], usize) = if quick {
        (&[10_000], 1_000)
    } else {
        (&[10_000, 100_000], 10_000)
    };
    // `--filters xdp,nft_set` runs only those floods (and skips loading): for profiling one.
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--filters")
        .and_then(|i| args.get(i + 1))
        .map(|f| f.split(',').map(str::to_owned).collect());
    if let Some(only) = only {
        let veth = veth_flood(quick, Some(&only));
        println!("{veth}");
        return;
    }
    let mut json = serde_json::Map::new();

    println!("loading banned IPv4 addresses into an empty filter (ms, best of 3 for bulk)");
    println!(
        "{:<44} {:>9} {:>10} {:>10}",
        "method", "entries", "ms", "us/entry"
    );
    let ns = Netns::new("apbbench");
    for &n in bulk_sizes {
        let addrs = addresses(n);
        let (one, batched) = load_apiban(&addrs);
        report(
            &mut json,
            "apiban, one by one (BPF_MAP_UPDATE_ELEM)",
            "apiban_one_by_one",
            n,
            one,
        );
        report(
            &mut json,
            "apiban, batched (BPF_MAP_UPDATE_BATCH)",
            "apiban",
            n,
            batched,
        );
        let t = best_of(3, || load_filter(&ns, Filter::Ipset, &addrs));
        report(
            &mut json,
            "ipset restore (hash:ip) + 1 iptables rule",
            "ipset",
            n,
            t,
        );
        let t = best_of(3, || load_filter(&ns, Filter::NftSet, &addrs));
        report(&mut json, "nft -f (one set, all elements)", "nft_set", n, t);
        let t = best_of(3, || load_filter(&ns, Filter::Iptables, &addrs));
        report(
            &mut json,
            "iptables-restore (one rule per address)",
            "iptables_restore",
            n,
            t,
        );
    }
    if !bulk_sizes.contains(&100_000) {
        // The 100k load target is apiban's own: measure it in a quick run too.
        let (one, batched) = load_apiban(&addresses(100_000));
        report(
            &mut json,
            "apiban, one by one (BPF_MAP_UPDATE_ELEM)",
            "apiban_one_by_one",
            100_000,
            one,
        );
        report(
            &mut json,
            "apiban, batched (BPF_MAP_UPDATE_BATCH)",
            "apiban",
            100_000,
            batched,
        );
    }
    let addrs = addresses(per_call_size);
    let t = load_iptables_per_call(&ns, &addrs);
    report(
        &mut json,
        "iptables -A per address (the Go client)",
        "iptables_per_call",
        per_call_size,
        t,
    );

    drop(ns);

    let veth = veth_flood(quick, None);
    let out = serde_json::json!({ "load": json, "veth": veth });
    if let Some(path) = json_out {
        std::fs::write(&path, out.to_string()).expect("write the JSON results");
    }
}

fn addresses(n: usize) -> Vec<Ipv4Addr> {
    // Spread over the space like a real feed, never in a special-purpose range.
    (0..n as u32)
        .map(|i| Ipv4Addr::from(0x2D00_0000u32 + i.wrapping_mul(2_654_435_761) % 0x00FF_FFFF))
        .collect()
}

fn report(
    json: &mut serde_json::Map<String, serde_json::Value>,
    what: &str,
    key: &str,
    n: usize,
    took: Duration,
) {
    let ms = took.as_secs_f64() * 1e3;
    println!("{what:<44} {n:>9} {ms:>10.1} {:>10.2}", ms * 1e3 / n as f64);
    let size = if n >= 1_000 && n.is_multiple_of(1_000) {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    };
    json.insert(
        format!("{key}_ms_{size}"),
        serde_json::json!((ms * 10.0).round() / 10.0),
    );
}

fn best_of(runs: usize, mut f: impl FnMut() -> Duration) -> Duration {
    (0..runs).map(|_| f()).min().expect("at least one run")
}

fn load_apiban(addrs: &[Ipv4Addr]) -> (Duration, Duration) {
    let dir = BpffsDir::new();
    let mut loaded = loader::load(&LoadOptions {
        bpffs_dir: dir.path.clone(),
        ..Default::default()
    })
    .expect("load the XDP program");
    let nets: Vec<IpNet> = addrs
        .iter()
        .map(|a| IpNet::V4(Ipv4Net::new(*a, 32).expect("/32")))
        .collect();
    let start = Instant::now();
    for n in &nets {
        loaded.dataplane.deny(*n).expect("insert");
    }
    let one = start.elapsed();
    loaded.dataplane.undeny_batch(&nets).expect("clear");
    let batched = best_of(3, || {
        let start = Instant::now();
        loaded.dataplane.deny_batch(&nets).expect("batch");
        let took = start.elapsed();
        loaded.dataplane.undeny_batch(&nets).expect("clear");
        took
    });
    (one, batched)
}

/// Runs a command inside `ns` (a child forked from a thread in the namespace inherits it:
/// no `ip netns exec` cost in the timing), feeding it `input`.
fn run_in(ns: &Netns, program: &str, args: &[&str], input: Option<String>) {
    let program = program.to_owned();
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    in_netns(ns, move || {
        let mut child = Command::new(&program)
            .args(&args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e} (cargo xtask bench installs it)"));
        if let Some(text) = input {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("feed");
        }
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

fn timed(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

fn flush_iptables(ns: &Netns) {
    run_in(ns, "iptables", &["-F"], None);
    run_in(ns, "iptables", &["-X"], None);
}

fn load_iptables_per_call(ns: &Netns, addrs: &[Ipv4Addr]) -> Duration {
    flush_iptables(ns);
    run_in(ns, "iptables", &["-N", "APIBAN"], None);
    run_in(ns, "iptables", &["-I", "INPUT", "-j", "APIBAN"], None);
    let took = timed(|| {
        for a in addrs {
            run_in(
                ns,
                "iptables",
                &["-A", "APIBAN", "-s", &a.to_string(), "-j", "DROP"],
                None,
            );
        }
    });
    flush_iptables(ns);
    took
}

/// Times installing `filter` with `addrs` (commands prepared beforehand), then removes it.
fn load_filter(ns: &Netns, filter: Filter, addrs: &[Ipv4Addr]) -> Duration {
    teardown_filter(ns, filter);
    let steps = filter_steps(filter, addrs);
    let took = timed(|| run_steps(ns, steps));
    teardown_filter(ns, filter);
    took
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Filter {
    Nothing,
    Xdp,
    Iptables,
    Ipset,
    NftSet,
}

impl Filter {
    fn name(self) -> &'static str {
        match self {
            Filter::Nothing => "nothing",
            Filter::Xdp => "apiban (XDP)",
            Filter::Iptables => "iptables, rule per address",
            Filter::Ipset => "ipset hash:ip + 1 rule",
            Filter::NftSet => "nftables set",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Filter::Nothing => "nothing",
            Filter::Xdp => "xdp",
            Filter::Iptables => "iptables",
            Filter::Ipset => "ipset",
            Filter::NftSet => "nft_set",
        }
    }
}

struct FloodResult {
    /// Packets the server disposed of: dropped by the filter or delivered to the stack.
    disposed: u64,
    softirq_s: f64,
    elapsed_s: f64,
    clean_sent: u64,
    clean_delivered: u64,
}

impl FloodResult {
    fn ns_per_packet(&self) -> f64 {
        self.softirq_s * 1e9 / self.disposed.max(1) as f64
    }

    fn pps(&self) -> f64 {
        self.disposed as f64 / self.elapsed_s
    }

    /// Packets per second one CPU of receive path could dispose of.
    fn capacity(&self) -> f64 {
        self.disposed as f64 / self.softirq_s.max(1e-9)
    }
}

/// Softirq time of all CPUs, seconds (USER_HZ ticks in /proc/stat).
fn softirq_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let line = stat.lines().next().expect("cpu line");
    let ticks: u64 = line
        .split_whitespace()
        .nth(7)
        .and_then(|t| t.parse().ok())
        .expect("softirq column");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// IP packets that reached the server's stack (InReceives counts before netfilter).
fn ip_in_receives(ns: &Netns) -> u64 {
    in_netns(ns, || {
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("snmp");
        let mut lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
        let names: Vec<&str> = lines
            .next()
            .expect("Ip header")
            .split_whitespace()
            .collect();
        let values: Vec<&str> = lines
            .next()
            .expect("Ip values")
            .split_whitespace()
            .collect();
        let i = names
            .iter()
            .position(|n| *n == "InReceives")
            .expect("InReceives");
        values[i].parse().expect("a number")
    })
}

fn veth_flood(quick: bool, only: Option<&[String]>) -> serde_json::Value {
    let (sizes, packets, max_time): (&[usize], u64, Duration) = if quick {
        (&[10_000], 400_000, Duration::from_secs(5))
    } else {
        (
            &[1_000, 10_000, 100_000],
            2_000_000,
            Duration::from_secs(15),
        )
    };
    let topo = Topology::new();
    let server_mac = topo.server_mac();
    let clean: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    let server: Ipv4Addr = topo.server_v4;
    let sink = std::net::SocketAddr::new(server.into(), 5060);
    println!();
    println!(
        "dropping a flood on a veth pair: {packets} UDP frames per run (at most {}s), 9 of 10 from banned sources",
        max_time.as_secs()
    );
    println!(
        "{:<30} {:>8} {:>10} {:>12} {:>14} {:>10}",
        "receiver filter", "entries", "ns/packet", "pkts/s seen", "pkts/s per CPU", "clean in"
    );
    let mut json = serde_json::Map::new();
    let mut results = std::collections::BTreeMap::new();
    if only.is_none_or(|o| o.iter().any(|k| k == "nothing")) {
        let baseline_frames = frames(&addresses(1_000), clean, server, server_mac);
        let base = flood(
            &topo,
            Filter::Nothing,
            &baseline_frames,
            packets,
            max_time,
            sink,
            None,
        );
        print_row(Filter::Nothing, 0, &base);
        json.insert("nothing_ns_per_packet".into(), round(base.ns_per_packet()));
    }
    for &n in sizes {
        let addrs = addresses(n);
        let frames = frames(&addrs, clean, server, server_mac);
        for filter in [Filter::Xdp, Filter::Iptables, Filter::Ipset, Filter::NftSet] {
            if only.is_some_and(|o| !o.iter().any(|k| k == filter.key())) {
                continue;
            }
            setup_filter(&topo.server, filter, &addrs);
            let bpffs = (filter == Filter::Xdp).then(|| {
                let dir = BpffsDir::new();
                attach_xdp(&topo, &dir, &addrs);
                dir
            });
            let r = flood(
                &topo,
                filter,
                &frames,
                packets,
                max_time,
                sink,
                bpffs.as_ref(),
            );
            drop(bpffs);
            teardown_filter(&topo.server, filter);
            print_row(filter, n, &r);
            let size = format!("{}k", n / 1_000);
            json.insert(
                format!("{}_ns_per_packet_{size}", filter.key()),
                round(r.ns_per_packet()),
            );
            json.insert(
                format!("{}_pps_per_cpu_{size}", filter.key()),
                round(r.capacity()),
            );
            json.insert(
                format!("{}_clean_delivered_{size}", filter.key()),
                serde_json::json!(r.clean_delivered as f64 / r.clean_sent.max(1) as f64),
            );
            results.insert((filter.key(), n), r);
        }
    }
    if let (Some(x), Some(ipt), Some(nft)) = (
        results.get(&("xdp", 10_000)),
        results.get(&("iptables", 10_000)),
        results.get(&("nft_set", 10_000)),
    ) {
        let cpu = |other: &FloodResult| round(other.ns_per_packet() / x.ns_per_packet());
        let pps = |other: &FloodResult| round(x.capacity() / other.capacity());
        json.insert("xdp_vs_iptables".into(), cpu(ipt));
        json.insert("xdp_vs_nft_set".into(), cpu(nft));
        json.insert("pps_xdp_vs_iptables".into(), pps(ipt));
        json.insert("pps_xdp_vs_nft_set".into(), pps(nft));
        println!();
        println!(
            "at 10k entries apiban needs {}x less receive CPU per packet than iptables (target >= 5x) \
             and {}x less than an nftables set (target >= 1.5x)",
            cpu(ipt),
            cpu(nft)
        );
    }
    serde_json::Value::Object(json)
}

fn round(x: f64) -> serde_json::Value {
    serde_json::json!((x * 100.0).round() / 100.0)
}

fn print_row(filter: Filter, n: usize, r: &FloodResult) {
    println!(
        "{:<30} {:>8} {:>10.0} {:>12.0} {:>14.0} {:>9.0}%",
        filter.name(),
        n,
        r.ns_per_packet(),
        r.pps(),
        r.capacity(),
        100.0 * r.clean_delivered as f64 / r.clean_sent.max(1) as f64
    );
}

/// 4,096 frames: 9 of 10 from banned addresses sampled evenly over the list (so a linear
/// rule chain is walked half way on average), 1 of 10 from the clean address.
fn frames(banned: &[Ipv4Addr], clean: Ipv4Addr, server: Ipv4Addr, mac: [u8; 6]) -> Vec<Vec<u8>> {
    (0..4_096usize)
        .map(|i| {
            let src = if i % 10 == 9 {
                clean
            } else {
                banned[(i * 7_919) % banned.len()]
            };
            let mut f = Frame::udp(src.into(), server.into(), 5060);
            f.dst_mac = mac;
            f.build()
        })
        .collect()
}

fn flood(
    topo: &Topology,
    _filter: Filter,
    frames: &[Vec<u8>],
    packets: u64,
    max_time: Duration,
    sink: std::net::SocketAddr,
    bpffs: Option<&BpffsDir>,
) -> FloodResult {
    // The clean stream's receiver, read on its own thread until the flood ends.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver = {
        let stop = stop.clone();
        spawn_in_netns(&topo.server, move || {
            let socket = std::net::UdpSocket::bind(sink).expect("bind the sink");
            socket
                .set_read_timeout(Some(Duration::from_millis(20)))
                .expect("timeout");
            let clean: std::net::IpAddr = Ipv4Addr::new(10, 77, 0, 2).into();
            let mut got = 0u64;
            let mut buf = [0u8; 2048];
            loop {
                match socket.recv_from(&mut buf) {
                    Ok((_, from)) if from.ip() == clean => got += 1,
                    Ok(_) => {}
                    Err(_) if stop.load(std::sync::atomic::Ordering::Relaxed) => return got,
                    Err(_) => {}
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let tx = PacketSocket::sender(&topo.attacker, &topo.attacker_if);
    let xdp_before = bpffs.map(xdp_dropped).unwrap_or(0);
    let ip_before = ip_in_receives(&topo.server);
    let soft_before = softirq_seconds();
    let start = Instant::now();
    let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    let mut sent = 0u64;
    let mut i = 0usize;
    while sent < packets && start.elapsed() < max_time {
        let end = (i + 64).min(refs.len());
        sent += tx.send_batch(&refs[i..end]) as u64;
        i = if end == refs.len() { 0 } else { end };
    }
    let elapsed = start.elapsed();
    std::thread::sleep(Duration::from_millis(100));
    let soft = softirq_seconds() - soft_before;
    let ip = ip_in_receives(&topo.server) - ip_before;
    let xdp = bpffs.map(xdp_dropped).unwrap_or(0) - xdp_before;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let clean_delivered = receiver.join().expect("receiver");
    FloodResult {
        disposed: ip + xdp,
        softirq_s: soft,
        elapsed_s: elapsed.as_secs_f64(),
        clean_sent: sent / 10,
        clean_delivered,
    }
}

fn xdp_dropped(dir: &BpffsDir) -> u64 {
    let loaded = loader::load(&LoadOptions {
        bpffs_dir: dir.path.clone(),
        ..Default::default()
    })
    .expect("adopt the pinned maps");
    loaded
        .dataplane
        .stats()
        .expect("stats")
        .get(Verdict::Dropped)
        .packets
}

fn attach_xdp(topo: &Topology, dir: &BpffsDir, addrs: &[Ipv4Addr]) {
    let path = dir.path.clone();
    let iface = topo.server_if.clone();
    let nets: Vec<IpNet> = addrs
        .iter()
        .map(|a| IpNet::V4(Ipv4Net::new(*a, 32).expect("/32")))
        .collect();
    in_netns(&topo.server, move || {
        let mut loaded = loader::load(&LoadOptions {
            bpffs_dir: path,
            ..Default::default()
        })
        .expect("load the XDP program");
        loaded
            .attach(&iface, loader::AttachMode::Native)
            .expect("attach native XDP to the veth");
        loaded.dataplane.deny_batch(&nets).expect("load the bans");
        // Dropping the object leaves the pinned link and maps enforcing.
    });
}

/// One command that installs part of a filter.
struct Step {
    program: &'static str,
    args: Vec<&'static str>,
    input: Option<String>,
}

/// The commands that install `filter` for `addrs` inside a namespace, in order.
fn filter_steps(filter: Filter, addrs: &[Ipv4Addr]) -> Vec<Step> {
    let set_rule = vec![
        "-I",
        "INPUT",
        "-m",
        "set",
        "--match-set",
        "apiban",
        "src",
        "-j",
        "DROP",
    ];
    match filter {
        Filter::Nothing | Filter::Xdp => Vec::new(),
        Filter::Iptables => {
            let mut text = String::from("*filter\n:APIBAN - [0:0]\n-A INPUT -j APIBAN\n");
            for a in addrs {
                text.push_str(&format!("-A APIBAN -s {a} -j DROP\n"));
            }
            text.push_str("COMMIT\n");
            vec![Step {
                program: "iptables-restore",
                args: vec!["--noflush"],
                input: Some(text),
            }]
        }
        Filter::Ipset => {
            let mut text = format!(
                "create apiban hash:ip maxelem {}\n",
                addrs.len().max(65_536) * 2
            );
            for a in addrs {
                text.push_str(&format!("add apiban {a}\n"));
            }
            vec![
                Step {
                    program: "ipset",
                    args: vec!["restore"],
                    input: Some(text),
                },
                Step {
                    program: "iptables",
                    args: set_rule,
                    input: None,
                },
            ]
        }
        Filter::NftSet => {
            let mut text = String::from(
                "table inet apiban {\n  set banned { type ipv4_addr; size 1048576; }\n  chain input { type filter hook input priority 0; ip saddr @banned drop; }\n}\nadd element inet apiban banned { ",
            );
            for (i, a) in addrs.iter().enumerate() {
                if i > 0 {
                    text.push_str(", ");
                }
                text.push_str(&a.to_string());
            }
            text.push_str(" }\n");
            vec![Step {
                program: "nft",
                args: vec!["-f", "-"],
                input: Some(text),
            }]
        }
    }
}

fn run_steps(ns: &Netns, steps: Vec<Step>) {
    for step in steps {
        run_in(ns, step.program, &step.args, step.input);
    }
}

fn setup_filter(ns: &Netns, filter: Filter, addrs: &[Ipv4Addr]) {
    teardown_filter(ns, filter);
    run_steps(ns, filter_steps(filter, addrs));
}

/// Removes whatever `filter` installed; nothing there is not an error.
fn teardown_filter(ns: &Netns, filter: Filter) {
    let quiet = |program: &'static str, args: &'static [&'static str]| {
        let _ = in_netns(ns, move || Command::new(program).args(args).output());
    };
    match filter {
        Filter::Nothing | Filter::Xdp => {}
        Filter::Iptables => flush_iptables(ns),
        Filter::Ipset => {
            flush_iptables(ns);
            quiet("ipset", &["destroy", "apiban"]);
        }
        Filter::NftSet => quiet("nft", &["delete", "table", "inet", "apiban"]),
    }
}
