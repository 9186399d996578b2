//! `cargo xtask bench fleet`: three release agents on a three-member etcd cluster in network
//! namespaces (see `tests::fleet`).
//!
//! - propagation: a manual ban made on one node, until both others answer `check` with
//!   "banned" on their control sockets (polled every millisecond), over 200 bans;
//! - a new node's initial sync: N records written straight into etcd, then a node with no
//!   state started, until its `status` enforces all of them; with its RSS and the etcd
//!   members' RSS;
//! - catch-up: that node stopped, 10k more records written, started again, until it
//!   enforces them (by watch from its saved revision, not a full read);
//! - 200 simulated watchers: 200 more etcd clients, each on its own connection, watching
//!   `ledger/` as a node does; the propagation bans again, timed to the two nodes and until
//!   every watcher has the event, with the etcd members' RSS.
//!
//! - time without a leader: the member that leads etcd's Raft group killed (quorum intact;
//!   target: none, at most 1 s), and the polling node SIGKILLed (the lease, 5 s, plus a
//!   second at most), each node's `status` sampled every 20 ms.
//!
//! `--quick` measures at 100k only; without it, at 100k and 1M. `--smoke` runs every part
//! small: 20 bans, 20 watchers, 10k records and 1k more, the tests' debug agent.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tests::{
    agent::{self, control_request as control},
    bench_mode::{Mode, size_label, write_results},
    fleet::Fleet,
    require_root,
};

/// How much of each part runs.
struct Sizes {
    /// Manual bans timed, without and with the watchers.
    bans: usize,
    /// Extra watchers on etcd.
    watchers: usize,
    /// Records written while a node is stopped, for its catch-up.
    catch_up: u32,
    /// The initial syncs' sizes.
    records: Vec<u32>,
}

impl Sizes {
    fn of(mode: Mode) -> Self {
        match mode {
            Mode::Full => Sizes {
                bans: 200,
                watchers: 200,
                catch_up: 10_000,
                records: vec![100_000, 1_000_000],
            },
            Mode::Quick => Sizes {
                bans: 200,
                watchers: 200,
                catch_up: 10_000,
                records: vec![100_000],
            },
            Mode::Smoke => Sizes {
                bans: 20,
                watchers: 20,
                catch_up: 1_000,
                records: vec![10_000],
            },
        }
    }
}

fn banned_at(socket: &Path, addr: &str) -> bool {
    control(socket, &format!(r#"{{"op":"check","addr":"{addr}"}}"#))
        .contains(r#""verdict":"banned""#)
}

fn enforced_v4(socket: &Path) -> u64 {
    let answer: serde_json::Value =
        serde_json::from_str(&control(socket, r#"{"op":"status"}"#)).expect("status JSON");
    answer["ok"]["enforced"]["ipv4"].as_u64().unwrap_or(0)
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q) as usize]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// Writes `n` APIBAN records, starting at address index `from`, straight into etcd.
fn write_records(f: &Fleet, from: u32, n: u32) {
    let prefix = format!("{}ledger/records/apiban/", f.prefix);
    f.etcd_client(async move |c| {
        let now = apiban::sync::unix_now();
        let value = format!(
            r#"{{"first_seen":{now},"last_seen":{now},"expires":{}}}"#,
            now + 7 * 86_400
        );
        let mut i = from;
        while i < from + n {
            let end = (i + 127).min(from + n);
            let ops: Vec<etcd_client::TxnOp> = (i..end)
                .map(|k| {
                    let addr = std::net::Ipv4Addr::from(0x2e00_0000u32 + k);
                    etcd_client::TxnOp::put(format!("{prefix}{addr}/32"), value.clone(), None)
                })
                .collect();
            c.txn(etcd_client::Txn::new().and_then(ops))
                .await
                .expect("write records");
            i = end;
        }
    });
}

struct Sync {
    initial: Duration,
    catch_up: Duration,
    agent_rss_mib: f64,
    etcd_rss_mib: f64,
}

/// A new node's initial sync at `n` records, then its catch-up after `catch_up` more.
fn new_node_sync(n: u32, catch_up: u32) -> Sync {
    let mut f = Fleet::new(1);
    write_records(&f, 0, n);
    let started = Instant::now();
    f.start(0, &[]);
    let socket = f.nodes[0].scene.control_socket();
    let deadline = Instant::now() + Duration::from_secs(600);
    while enforced_v4(&socket) < u64::from(n) {
        assert!(
            Instant::now() < deadline,
            "{n} records not enforced in 600 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let initial = started.elapsed();
    let agent_rss_mib = rss_mib(f.nodes[0].scene.agent().pid() as u32);
    let etcd_rss_mib = etcd_rss_mib(&f);
    assert_eq!(f.nodes[0].scene.stop(), Some(0));
    write_records(&f, n, catch_up);
    let started = Instant::now();
    f.start(0, &[]);
    while enforced_v4(&socket) < u64::from(n + catch_up) {
        assert!(Instant::now() < deadline, "the catch-up took over 600 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let catch_up = started.elapsed();
    let log = f.nodes[0].scene.agent().log_text();
    assert!(
        !log.contains("read the fleet's whole ledger"),
        "the restarted node read everything instead of catching up by watch"
    );
    Sync {
        initial,
        catch_up,
        agent_rss_mib,
        etcd_rss_mib,
    }
}

/// The largest etcd member's RSS.
fn etcd_rss_mib(f: &Fleet) -> f64 {
    f.etcd
        .iter()
        .filter_map(|m| m.pid())
        .map(rss_mib)
        .fold(0.0, f64::max)
}

/// `bans` manual bans, each made on one node in turn, from address index `first`: how long
/// each took until both other nodes enforce it. With `watchers`, each ban's start is noted
/// so that its arrival at every watcher can be timed too.
fn propagation(f: &Fleet, bans: usize, first: u32, watchers: Option<&Watchers>) -> Vec<Duration> {
    let sockets: Vec<_> = f.nodes.iter().map(|n| n.scene.control_socket()).collect();
    let mut delays = Vec::with_capacity(bans);
    for k in 0..bans {
        let from = k % 3;
        let addr = std::net::Ipv4Addr::from(0x2d40_0000u32 + first + k as u32).to_string();
        let request = format!(r#"{{"op":"ban","net":"{addr}/32","ttl_secs":null,"comment":null}}"#);
        let at = Instant::now();
        if let Some(w) = watchers {
            w.expect(&addr, at);
        }
        let answer = control(&sockets[from], &request);
        assert!(answer.starts_with(r#"{"ok""#), "{answer}");
        for (i, socket) in sockets.iter().enumerate() {
            if i == from {
                continue;
            }
            while !banned_at(socket, &addr) {
                assert!(
                    at.elapsed() < Duration::from_secs(10),
                    "{addr} never reached node {i}"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        delays.push(at.elapsed());
    }
    delays
}

/// Whether the node behind `socket` says it leads.
fn leads(socket: &Path) -> bool {
    let answer: serde_json::Value =
        serde_json::from_str(&control(socket, r#"{"op":"status"}"#)).unwrap_or_default();
    answer["ok"]["agent"]["cluster"]["leader"] == true
}

/// Samples every node for `time`, or until one of `nodes` leads if `until_led`: the
/// longest stretch in which none of them led.
fn leaderless(sockets: &[&Path], time: Duration, until_led: bool) -> Duration {
    let start = Instant::now();
    let (mut longest, mut since) = (Duration::ZERO, None::<Instant>);
    while start.elapsed() < time {
        let led = sockets.iter().any(|s| leads(s));
        let now = Instant::now();
        match (led, since) {
            (true, Some(s)) => {
                longest = longest.max(now - s);
                since = None;
                if until_led {
                    return longest;
                }
            }
            (false, None) => since = Some(now),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    since.map_or(longest, |s| longest.max(s.elapsed()))
}

/// The fleet's time without a leader: (after the Raft leader member is killed, after the
/// polling node is SIGKILLed).
fn leaderless_times(f: &mut Fleet) -> (Duration, Duration) {
    let sockets: Vec<_> = f.nodes.iter().map(|n| n.scene.control_socket()).collect();
    let all: Vec<&Path> = sockets.iter().map(|s| s.as_path()).collect();
    let member = f.etcd_leader();
    f.etcd[member].kill();
    // Longer than the lease: a lease kept only through the dead member runs out within it.
    let raft = leaderless(&all, Duration::from_secs(8), false);
    f.etcd[member].restart();
    std::thread::sleep(Duration::from_secs(3));
    let poller = f.wait_leader(Duration::from_secs(20));
    f.nodes[poller].scene.kill9();
    let others: Vec<&Path> = (0..3).filter(|&i| i != poller).map(|i| all[i]).collect();
    let killed = leaderless(&others, Duration::from_secs(30), true);
    (raft, killed)
}

/// Per banned address: when its ban was made, and when each watcher saw it.
type Arrivals = Arc<Mutex<HashMap<String, (Instant, Vec<Instant>)>>>;

/// Simulated fleet nodes: etcd clients in the hub namespace, each on its own connection to
/// one member (spread over the three), each watching `ledger/` as a node does.
struct Watchers {
    seen: Arrivals,
    stop: tokio::sync::watch::Sender<bool>,
    thread: std::thread::JoinHandle<()>,
    n: usize,
}

impl Watchers {
    fn start(f: &Fleet, n: usize) -> Self {
        let endpoints = f.hub_endpoints();
        let prefix = format!("{}ledger/", f.prefix);
        let seen: Arrivals = Arc::default();
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = tests::spawn_in_netns(&f.hub, {
            let seen = seen.clone();
            move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a runtime");
                runtime.block_on(async move {
                    let mut tasks = Vec::with_capacity(n);
                    for i in 0..n {
                        let endpoint = endpoints[i % endpoints.len()].clone();
                        let mut client = etcd_client::Client::connect([endpoint], None)
                            .await
                            .expect("a watcher connects");
                        let mut stream = client
                            .watch(
                                prefix.clone(),
                                Some(etcd_client::WatchOptions::new().with_prefix()),
                            )
                            .await
                            .expect("a watch");
                        let seen = seen.clone();
                        let mut stopping = stopping.clone();
                        tasks.push(tokio::spawn(async move {
                            let _keep = client;
                            loop {
                                let message = tokio::select! {
                                    m = stream.message() => m,
                                    _ = stopping.wait_for(|s| *s) => return,
                                };
                                let Ok(Some(answer)) = message else { return };
                                let now = Instant::now();
                                let mut seen = seen.lock().expect("not poisoned");
                                for event in answer.events() {
                                    let Some(kv) = event.kv() else { continue };
                                    let key = String::from_utf8_lossy(kv.key());
                                    // `.../manual/<addr>/32`: the address is the second-last part.
                                    let addr = key.rsplit('/').nth(1).unwrap_or_default();
                                    if let Some((_, at)) = seen.get_mut(addr) {
                                        at.push(now);
                                    }
                                }
                            }
                        }));
                    }
                    let _ = ready_tx.send(());
                    for t in tasks {
                        let _ = t.await;
                    }
                });
            }
        });
        ready
            .recv_timeout(Duration::from_secs(60))
            .expect("the watchers are up");
        Self {
            seen,
            stop,
            thread,
            n,
        }
    }

    fn expect(&self, addr: &str, at: Instant) {
        self.seen
            .lock()
            .expect("not poisoned")
            .insert(addr.to_owned(), (at, Vec::new()));
    }

    /// Stops the watchers once every one has seen every ban; each ban's time until the last
    /// watcher had it.
    fn stop(self) -> Vec<Duration> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let done = self
                .seen
                .lock()
                .expect("not poisoned")
                .values()
                .all(|(_, at)| at.len() >= self.n);
            if done {
                break;
            }
            assert!(Instant::now() < deadline, "a watcher missed a ban");
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.stop.send(true);
        let _ = self.thread.join();
        let seen = self.seen.lock().expect("not poisoned");
        seen.values()
            .map(|(made, at)| at.iter().max().map_or(Duration::ZERO, |last| *last - *made))
            .collect()
    }
}

fn main() {
    require_root();
    let mode = Mode::from_args();
    let sizes = Sizes::of(mode);
    agent::use_apiban_bin(mode.apiban_bin());

    let mut f = Fleet::new(3);
    for i in 0..3 {
        f.start(i, &[]);
    }
    f.wait_leader(Duration::from_secs(20));
    let mut delays = propagation(&f, sizes.bans, 0, None);
    let watchers = Watchers::start(&f, sizes.watchers);
    let mut with_watchers = propagation(&f, sizes.bans, sizes.bans as u32, Some(&watchers));
    let etcd_rss_watched = etcd_rss_mib(&f);
    let mut to_watchers = watchers.stop();
    let (raft_killed, poller_killed) = leaderless_times(&mut f);
    drop(f);
    delays.sort();
    with_watchers.sort();
    to_watchers.sort();
    let (p50, p99) = (percentile(&delays, 0.5), percentile(&delays, 0.99));
    let (bans, watching) = (sizes.bans, sizes.watchers);
    println!(
        "fleet benchmark: 3 {} agents, a 3-member etcd cluster, namespaces on one host",
        if mode == Mode::Smoke {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "  manual ban on one node until both others enforce it, {bans} bans: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms   target p99 <= 1000 ms",
        ms(p50),
        ms(p99),
        ms(*delays.last().expect("bans"))
    );
    println!(
        "  with {watching} more watchers on etcd: to both nodes p50 {:.1} ms, p99 {:.1} ms; to all {watching} watchers p50 {:.1} ms, p99 {:.1} ms; largest etcd member {:.1} MiB",
        ms(percentile(&with_watchers, 0.5)),
        ms(percentile(&with_watchers, 0.99)),
        ms(percentile(&to_watchers, 0.5)),
        ms(percentile(&to_watchers, 0.99)),
        etcd_rss_watched
    );
    println!(
        "  time without a leader: Raft leader member killed {:.1} ms (target <= 1000 ms); polling node SIGKILLed {:.2} s (lease 5 s; target <= 6 s)",
        ms(raft_killed),
        poller_killed.as_secs_f64()
    );
    let mut results = Vec::new();
    for &n in &sizes.records {
        let s = new_node_sync(n, sizes.catch_up);
        println!(
            "  {n} records: a new node enforces them after {:.1} s; after {} more while stopped, it catches up in {:.1} s; agent {:.1} MiB, largest etcd member {:.1} MiB",
            s.initial.as_secs_f64(),
            sizes.catch_up,
            s.catch_up.as_secs_f64(),
            s.agent_rss_mib,
            s.etcd_rss_mib
        );
        results.push((n, s));
    }
    let mut fleet = serde_json::json!({
        "propagation_p50_ms": ms(p50),
        "propagation_p99_ms": ms(p99),
        format!("propagation_p99_ms_{watching}_watchers"): ms(percentile(&with_watchers, 0.99)),
        format!("watchers_{watching}_p99_ms"): ms(percentile(&to_watchers, 0.99)),
        format!("etcd_rss_mib_{watching}_watchers"): (etcd_rss_watched * 10.0).round() / 10.0,
        "leaderless_ms_raft_leader_killed": ms(raft_killed),
        "leaderless_s_poller_killed": (poller_killed.as_secs_f64() * 100.0).round() / 100.0,
    });
    let round = |x: f64| (x * 10.0).round() / 10.0;
    for (i, (n, s)) in results.iter().enumerate() {
        let size = size_label(u64::from(*n));
        fleet[format!("new_node_sync_s_{size}")] = round(s.initial.as_secs_f64()).into();
        if i == 0 {
            let catch_up = size_label(u64::from(sizes.catch_up));
            fleet[format!("catch_up_s_{catch_up}")] = round(s.catch_up.as_secs_f64()).into();
        } else {
            fleet[format!("etcd_rss_mib_{size}")] = round(s.etcd_rss_mib).into();
            fleet[format!("agent_rss_mib_{size}")] = round(s.agent_rss_mib).into();
        }
    }
    write_results(&serde_json::json!({ "fleet": fleet }));
}
