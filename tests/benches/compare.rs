//! `cargo xtask bench` (compare): apiban side by side with what SIP operators run today, in
//! one run on one machine. Every firewall is set up inside a network namespace created for
//! the run, so the host's own rules are never touched.
//!
//! Loading N banned addresses: apiban's map updates (one by one and batched) against
//! `iptables -A` per address into a chain jumped to from INPUT (what the official APIBAN Go
//! client does), `iptables-restore`, `ipset restore` and one `nft -f` with every element.
//! And the running agent taking 60,000 CrowdSec decisions from one stream answer (the size
//! that fills ipset's default hash and floods the firewall bouncer's nftables mode): from the
//! answer to every one enforced, and the agent's memory then.
//!
//! Dropping a flood on a veth pair. The attacker namespace generates UDP frames as xdp-trafficgen
//! does: our `bench_trafficgen` XDP program runs under BPF_PROG_TEST_RUN in live-frames mode,
//! gives each frame the next source address (9 of 10 banned, spread over the whole list, 1 of
//! 10 clean) and redirects it into the veth. The frames reach the server's veth as XDP frames,
//! without an skb, as they would come off a NIC, and the server's veth receives through NAPI
//! (GRO on), which builds an skb only for what XDP passes. The server filters with nothing,
//! apiban (XDP), iptables (one rule per address in a chain), ipset (hash:ip, one rule) or an
//! nftables set.
//!
//! The server's NAPI runs threaded, pinned to its own CPU, so everything the receive path
//! costs (XDP, skb allocation, GRO, IP, netfilter, socket delivery) is that kernel thread's
//! CPU time, read in nanoseconds from its schedstat. Divided by the packets the server
//! disposed of (XDP drops plus IP packets that reached the stack), it is the receiver's cost
//! per packet, independent of how fast the generator is.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use apiban::dataplane::loader::{self, LoadOptions};
use apiban_common::Verdict;
use apiban_common::{TRAFFICGEN_SOURCE_SLOTS, TrafficgenParams, map_names, program_names};
use aya::{
    maps::Array,
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
};
use ipnet::{IpNet, Ipv4Net};
use tests::{
    BpffsDir, Netns, Topology,
    bench_mode::{Mode, size_label, write_results},
    frame::Frame,
    in_netns, require_root, spawn_in_netns, spawn_in_netns_at,
};

#[path = "compare/veth.rs"]
mod veth;

use veth::veth_flood;

fn main() {
    require_root();
    let args: Vec<String> = std::env::args().collect();
    let mode = Mode::from_args();
    let (bulk_sizes, per_call_size, decisions): (&[usize], usize, usize) = match mode {
        Mode::Full => (&[10_000, 100_000], 10_000, 60_000),
        Mode::Quick => (&[10_000], 1_000, 6_000),
        Mode::Smoke => (&[1_000], 100, 600),
    };
    // `--filters xdp,nft_set` runs only those floods (and skips loading): for profiling one.
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--filters")
        .and_then(|i| args.get(i + 1))
        .map(|f| f.split(',').map(str::to_owned).collect());
    if let Some(only) = only {
        let veth = veth_flood(mode, Some(&only));
        println!("{veth}");
        return;
    }
    let mut json = serde_json::Map::new();
    // `--crowdsec-only`: the CrowdSec load alone.
    if args.iter().any(|a| a == "--crowdsec-only") {
        crowdsec_load(mode, decisions, &mut json);
        return;
    }
    // Each part on its own: one that fails (a tool missing, a kernel refusing) is named in
    // the results' "errors", and the others' figures still reach the reader.
    let mut errors = serde_json::Map::new();
    part("load", &mut errors, || {
        firewall_loads(mode, bulk_sizes, per_call_size, &mut json)
    });
    part("crowdsec", &mut errors, || {
        crowdsec_load(mode, decisions, &mut json)
    });
    let mut veth = serde_json::Value::Null;
    part("veth", &mut errors, || veth = veth_flood(mode, None));
    let mut out = serde_json::json!({ "load": json, "veth": veth });
    if !errors.is_empty() {
        out["errors"] = serde_json::Value::Object(errors.clone());
    }
    write_results(&out);
    if !errors.is_empty() {
        eprintln!(
            "parts of the comparison failed: {}",
            serde_json::Value::Object(errors)
        );
        std::process::exit(1);
    }
}

/// Runs one part of the benchmark; a panic in it is recorded under `name` in `errors`.
fn part(name: &str, errors: &mut serde_json::Map<String, serde_json::Value>, run: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic without a message".to_owned());
        eprintln!("the {name} part failed: {message}");
        errors.insert(name.to_owned(), message.into());
    }
}

/// apiban's map loads against iptables, ipset and nftables loading the same addresses.
fn firewall_loads(
    mode: Mode,
    bulk_sizes: &[usize],
    per_call_size: usize,
    json: &mut serde_json::Map<String, serde_json::Value>,
) {
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
            json,
            "apiban, one call per address",
            "apiban_one_by_one",
            n,
            one,
        );
        report(json, "apiban, one call per batch", "apiban", n, batched);
        let t = best_of(3, || load_filter(&ns, Filter::Ipset, &addrs));
        report(
            json,
            "ipset restore (hash:ip) + 1 iptables rule",
            "ipset",
            n,
            t,
        );
        let t = best_of(3, || load_filter(&ns, Filter::NftSet, &addrs));
        report(json, "nft -f (one set, all elements)", "nft_set", n, t);
        let t = best_of(3, || load_filter(&ns, Filter::Iptables, &addrs));
        report(
            json,
            "iptables-restore (one rule per address)",
            "iptables_restore",
            n,
            t,
        );
    }
    if mode == Mode::Quick {
        // The 100k load target is apiban's own: measure it in a quick run too.
        let (one, batched) = load_apiban(&addresses(100_000));
        report(
            json,
            "apiban, one call per address",
            "apiban_one_by_one",
            100_000,
            one,
        );
        report(
            json,
            "apiban, one call per batch",
            "apiban",
            100_000,
            batched,
        );
    }
    let addrs = addresses(per_call_size);
    let t = load_iptables_per_call(&ns, &addrs);
    report(
        json,
        "iptables -A per address (the Go client)",
        "iptables_per_call",
        per_call_size,
        t,
    );
}

/// The running agent taking `n` CrowdSec decisions from one stream answer.
fn crowdsec_load(mode: Mode, n: usize, json: &mut serde_json::Map<String, serde_json::Value>) {
    let (took, rss_kib) = load_crowdsec(mode, n);
    report(
        json,
        "apiban agent, CrowdSec stream to enforced",
        "apiban_crowdsec",
        n,
        took,
    );
    println!("  the agent's resident memory then: {} MiB", rss_kib / 1024);
    json.insert(
        format!("apiban_crowdsec_rss_mib_{}", size_label(n as u64)),
        serde_json::json!(rss_kib / 1024),
    );
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

/// The release agent on a veth, reading `n` ban decisions from one CrowdSec stream answer:
/// the time from that answer being served to all of them enforced (as `status` counts), and
/// the agent's resident memory then, KiB.
fn load_crowdsec(mode: Mode, n: usize) -> (Duration, u64) {
    tests::agent::use_apiban_bin(mode.apiban_bin());
    let mut s = tests::scene::Scene::new();
    let decisions: Vec<serde_json::Value> = addresses(n)
        .iter()
        .enumerate()
        .map(|(i, a)| {
            serde_json::json!({"duration": "3h59m59.5s", "id": i + 1, "origin": "crowdsec",
                "scenario": "crowdsecurity/asterisk_bf", "scope": "Ip", "type": "ban",
                "value": a.to_string()})
        })
        .collect();
    s.api
        .set_crowdsec_startup(serde_json::json!({"deleted": null, "new": decisions}).to_string());
    let key = s.dir.path.join("crowdsec.key");
    std::fs::write(&key, "bench-bouncer-key\n").expect("write the bouncer key");
    let url = format!("http://{}", s.api.addr());
    s.start(&[
        "--crowdsec",
        &url,
        "--crowdsec-key-file",
        &key.display().to_string(),
        "--metrics-addr",
        "off",
    ]);
    let deadline = Instant::now() + Duration::from_secs(300);
    let enforced = loop {
        let status = s.status();
        if status["enforced"]["ipv4"].as_u64() == Some(n as u64) {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{n} CrowdSec decisions not enforced in 300 s: {}",
            status["enforced"]
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let served = s
        .api
        .requests()
        .into_iter()
        .find(|r| r.path.contains("startup=true"))
        .expect("the agent read the stream")
        .at;
    let rss = std::fs::read_to_string(format!("/proc/{}/status", s.agent().pid()))
        .ok()
        .and_then(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    (enforced.saturating_duration_since(served), rss)
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
        loaded.dataplane.deny_batch(&nets, false).expect("batch");
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
