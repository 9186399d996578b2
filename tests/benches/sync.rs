//! `cargo xtask bench sync`: ingesting 100k addresses (parse, sanitise, ledger, diff, apply
//! to the real XDP maps, save state) and the memory the engine holds for them.
//!
//! Memory is this process's resident set: the engine with its ledger and dataplane handles,
//! as the agent holds them, plus the benchmark's own input strings (reported separately).
//!
//! Then the real thing: the release `apiban` binary in a network namespace, pulling 100k
//! addresses from the local APIBAN server with its default settings (60 s polls, metrics on),
//! its resident memory read from /proc, and its CPU time while idle measured from the
//! scheduler's per-thread nanosecond counters over a window that includes polls. Last, a
//! flood of 1,000 `/addip` calls to its ban API from 10 clients at once, until all are
//! enforced: each change is saved before it is answered, with 100k entries in the state.

use std::time::{Duration, Instant};

use apiban::{
    dataplane::loader::{self, LoadOptions},
    engine::{Engine, EngineSettings},
    state::StateStore,
    sync::unix_now,
};
use tests::{BpffsDir, agent, require_root, scene::Scene, sync_harness::TempDir};

const N: u32 = 100_000;

fn status_kib(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    require_root();
    let bpffs = BpffsDir::new();
    let state = TempDir::new("apiban-bench-sync-");
    let rss_start = status_kib("VmRSS:");

    let loaded = loader::load(&LoadOptions {
        bpffs_dir: bpffs.path.clone(),
        ..Default::default()
    })
    .expect("load the XDP program (root, bpffs)");
    let (ebpf, dataplane) = loaded.into_parts();
    let store = StateStore::open(&state.path).expect("state dir");
    let now = unix_now();
    let (mut engine, _) =
        Engine::start(dataplane, Some(store), EngineSettings::default(), now).expect("engine");
    let rss_engine = status_kib("VmRSS:");

    // 100k distinct public addresses spread over 45.0.0.0/8, as APIBAN sends them: text.
    let addresses: Vec<String> = (0..N)
        .map(|i| {
            let a = 0x2d00_0000u32 + i * 97;
            std::net::Ipv4Addr::from(a).to_string()
        })
        .collect();
    let rss_input = status_kib("VmRSS:");

    let t = Instant::now();
    let report = engine.apiban_batch(&addresses, "1".into(), now);
    let ingest = t.elapsed();
    assert_eq!(
        report.applied.added, N as usize,
        "every address must be enforced"
    );
    let save = engine.counters().last_save_duration;

    let t = Instant::now();
    let refresh = engine.apiban_batch(&addresses, "2".into(), now + 60);
    let reingest = t.elapsed();
    assert_eq!(refresh.applied.added, 0);

    drop(addresses);
    let rss_after = status_kib("VmRSS:");
    let hwm = status_kib("VmHWM:");
    let state_bytes = std::fs::metadata(state.path.join("state.json"))
        .map(|m| m.len())
        .unwrap_or(0);

    // Restart: adopt the pinned maps, load the state, diff (nothing to change).
    drop(engine);
    drop(ebpf);
    let t = Instant::now();
    let loaded = loader::load(&LoadOptions {
        bpffs_dir: bpffs.path.clone(),
        ..Default::default()
    })
    .expect("adopt");
    let (_ebpf, dataplane) = loaded.into_parts();
    let store = StateStore::open(&state.path).expect("state dir");
    let (_engine, restart) =
        Engine::start(dataplane, Some(store), EngineSettings::default(), now + 120)
            .expect("restart");
    let restart_time = t.elapsed();
    assert_eq!(restart.restored_entries, N as usize);
    assert_eq!((restart.applied.added, restart.applied.removed), (0, 0));

    println!("sync benchmark: {N} IPv4 addresses, one feed batch, real XDP maps");
    println!(
        "  ingest new (parse, sanitise, ledger, diff, apply, save)  {:>8.1} ms   target < 1000 ms",
        ms(ingest)
    );
    println!(
        "    of which state save ({:.1} MB JSON, fsync, rename)     {:>8.1} ms",
        state_bytes as f64 / 1e6,
        ms(save)
    );
    println!(
        "  ingest again (all refreshes, nothing to apply, save)     {:>8.1} ms",
        ms(reingest)
    );
    println!(
        "  restart: adopt pins, load state, diff                    {:>8.1} ms",
        ms(restart_time)
    );
    println!(
        "  resident memory: start {:.1} MiB, engine loaded {:.1} MiB, with 100k entries {:.1} MiB (peak {:.1} MiB)   target < 50 MB",
        mib(rss_start),
        mib(rss_engine),
        mib(rss_after),
        mib(hwm)
    );
    println!(
        "    (the benchmark's own 100k input strings, freed before the reading: {:.1} MiB)",
        mib(rss_input.saturating_sub(rss_engine))
    );
    drop(_engine);
    drop(_ebpf);
    drop(bpffs);

    let quick = std::env::args().any(|a| a == "--quick");
    let footprint = agent_footprint(if quick { 65 } else { 300 });
    println!(
        "agent: release binary, {N} entries pulled from the local APIBAN server, default settings"
    );
    println!(
        "  pull of {N} entries until enforced                        {:>8.1} s",
        footprint.pull.as_secs_f64()
    );
    println!(
        "  resident memory {:.1} MiB (peak {:.1} MiB during the pull), of which {:.1} MiB its own heap and stacks          target < 50 MB",
        mib(footprint.rss_kib),
        mib(footprint.hwm_kib),
        mib(footprint.anon_kib)
    );
    println!(
        "  idle CPU: {:.3} s over {} s ({} polls): {:.1} s per hour ({:.4}% of a core)",
        footprint.idle_cpu.as_secs_f64(),
        footprint.window.as_secs(),
        footprint.polls,
        footprint.cpu_s_per_hour(),
        footprint.cpu_s_per_hour() / 36.0
    );
    println!(
        "  ban API flood: {} /addip calls from {FLOOD_CLIENTS} clients at once until all enforced {:>8.2} s",
        FLOOD_CLIENTS * FLOOD_CALLS,
        footprint.api_flood.as_secs_f64()
    );
    let st = &footprint.status;
    println!(
        "  status during {} saves of the 100k state: {} answers, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms   target < 50 ms",
        st.saves,
        st.answers,
        ms(st.p50),
        ms(st.p99),
        ms(st.max)
    );
    println!(
        "target: under 50 MB resident with 100k entries: {} ({:.1} MiB agent, {:.1} MiB peak)",
        if (footprint.rss_kib * 1024) < 50_000_000 {
            "met"
        } else {
            "MISSED"
        },
        mib(footprint.rss_kib),
        mib(footprint.hwm_kib)
    );

    if let Some(path) = json_out() {
        let out = serde_json::json!({ "sync": {
            "ingest_ms_100k": (ms(ingest) * 10.0).round() / 10.0,
            "save_ms_100k": (ms(save) * 10.0).round() / 10.0,
            "restart_ms_100k": (ms(restart_time) * 10.0).round() / 10.0,
            "engine_rss_mib_100k": (mib(rss_after) * 10.0).round() / 10.0,
        }, "agent": {
            "rss_mib_100k": (mib(footprint.rss_kib) * 10.0).round() / 10.0,
            "peak_rss_mib_100k": (mib(footprint.hwm_kib) * 10.0).round() / 10.0,
            "anon_rss_mib_100k": (mib(footprint.anon_kib) * 10.0).round() / 10.0,
            "idle_cpu_s_per_hour": (footprint.cpu_s_per_hour() * 100.0).round() / 100.0,
            "idle_window_s": footprint.window.as_secs(),
            "pull_s_100k": (footprint.pull.as_secs_f64() * 10.0).round() / 10.0,
            "status_during_save_p50_ms_100k": (ms(footprint.status.p50) * 10.0).round() / 10.0,
            "status_during_save_max_ms_100k": (ms(footprint.status.max) * 10.0).round() / 10.0,
            "ban_api_flood_s_1000": (footprint.api_flood.as_secs_f64() * 100.0).round() / 100.0,
        }});
        std::fs::write(path, out.to_string()).expect("write the JSON results");
    }
}

fn json_out() -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == "--json-out")?;
    args.get(i + 1).cloned()
}

struct Footprint {
    /// 1,000 ban API calls until all are enforced.
    api_flood: Duration,
    pull: Duration,
    rss_kib: u64,
    hwm_kib: u64,
    /// Anonymous memory only: without the binary's mapped pages and the shared map pages.
    anon_kib: u64,
    idle_cpu: Duration,
    window: Duration,
    polls: usize,
    status: StatusUnderSaves,
}

impl Footprint {
    fn cpu_s_per_hour(&self) -> f64 {
        self.idle_cpu.as_secs_f64() * 3600.0 / self.window.as_secs_f64()
    }
}

/// Runs the release agent against 100k published addresses, waits for them to be enforced,
/// then leaves it alone for `window_s` seconds.
fn agent_footprint(window_s: u64) -> Footprint {
    // The release agent, as operators run it.
    agent::use_apiban_bin(agent::build_apiban(true));
    let mut scene = Scene::new();
    let addresses: Vec<String> = (0..N)
        .map(|i| std::net::Ipv4Addr::from(0x2d00_0000u32 + i * 97).to_string())
        .collect();
    scene.api.publish(&addresses);
    // Pages of 20,000: the pull takes a handful of requests, inside the agent's default
    // budget of 11 per 2 minutes.
    scene.api.set_batch_size(20_000);
    let t = Instant::now();
    scene.start(&["--metrics-addr", "127.0.0.1:9477", "--ban-api", BAN_API]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while scene.status()["enforced"]["ipv4"].as_u64() != Some(u64::from(N)) {
        assert!(
            Instant::now() < deadline,
            "100k entries not enforced within 120 s; status: {}\nlog:\n{}",
            scene.status(),
            scene.agent().log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pull = t.elapsed();
    let pid = scene.agent().pid();
    let requests_before = scene.api.requests().len();
    let cpu_before = cpu_time(pid);
    let window = Duration::from_secs(window_s);
    std::thread::sleep(window);
    let idle_cpu = cpu_time(pid).saturating_sub(cpu_before);
    let polls = scene.api.requests().len() - requests_before;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("a memory field of /proc/PID/status")
    };
    let status_under_saves = status_under_saves(&scene.control_socket());
    let api_flood = api_flood(&scene);
    Footprint {
        api_flood,
        status: status_under_saves,
        pull,
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        anon_kib: field("RssAnon:"),
        idle_cpu,
        window,
        polls,
    }
}

const BAN_API: &str = "127.0.0.1:18085";
const FLOOD_CLIENTS: u32 = 10;
const FLOOD_CALLS: u32 = 100;

/// `FLOOD_CLIENTS` clients, each from its own loopback address (each within the API's
/// per-client burst), make `FLOOD_CALLS` `/addip` calls each at once; how long until the
/// agent enforces every one.
fn api_flood(scene: &Scene) -> Duration {
    let before = scene.status()["enforced"]["ipv4"].as_u64().unwrap_or(0);
    let total = u64::from(FLOOD_CLIENTS * FLOOD_CALLS);
    let t = Instant::now();
    let clients: Vec<_> = (0..FLOOD_CLIENTS)
        .map(|c| {
            tests::spawn_in_netns(&scene.topo.server, move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                runtime.block_on(async move {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    let source: std::net::SocketAddr =
                        format!("127.0.0.{}:0", 10 + c).parse().expect("literal");
                    for k in 0..FLOOD_CALLS {
                        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
                        socket.bind(source).expect("bind a loopback source");
                        let mut stream = socket
                            .connect(BAN_API.parse().expect("literal"))
                            .await
                            .expect("connect to the ban API");
                        let addr = std::net::Ipv4Addr::from(0x2e50_0000u32 + c * 1000 + k);
                        let request = format!(
                            "GET /addip/{addr} HTTP/1.1\r\nHost: {BAN_API}\r\nConnection: close\r\n\r\n"
                        );
                        stream.write_all(request.as_bytes()).await.expect("send");
                        let mut answer = String::new();
                        stream.read_to_string(&mut answer).await.expect("read");
                        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
                    }
                })
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a flood client");
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while scene.status()["enforced"]["ipv4"].as_u64().unwrap_or(0) < before + total {
        assert!(
            Instant::now() < deadline,
            "the flood's bans not enforced in 300 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

/// CPU time of every thread of `pid`, from /proc/PID/task/*/schedstat (nanoseconds, unlike
/// the 10 ms ticks of /proc/PID/stat, which would round an idle agent to zero).
fn cpu_time(pid: i32) -> Duration {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the agent's threads");
    let ns: u64 = tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// How long `status` takes while the agent saves its 100k-entry state over and over.
struct StatusUnderSaves {
    saves: usize,
    answers: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

/// One request on the control socket that the agent must accept; the answer's length.
fn control_request(socket: &std::path::Path, request: &str) -> usize {
    let answer = agent::control_request(socket, request);
    assert!(
        answer.starts_with("{\"ok\""),
        "the agent refused {request}: {answer}"
    );
    answer.len()
}

/// Bans and unbans one address 40 times (each change saves the whole state file) from one
/// thread while this one asks for `status` every 5 ms, and reports how long the answers took.
fn status_under_saves(socket: &std::path::Path) -> StatusUnderSaves {
    const CHANGES: usize = 40;
    let writer = {
        let socket = socket.to_path_buf();
        std::thread::spawn(move || {
            for i in 0..CHANGES {
                let op = if i % 2 == 0 { "ban" } else { "unban" };
                control_request(
                    &socket,
                    &format!(
                        r#"{{"op":"{op}","net":"198.51.100.7/32","ttl_secs":null,"comment":null}}"#
                    ),
                );
            }
        })
    };
    let mut latencies = Vec::new();
    while !writer.is_finished() {
        let t = Instant::now();
        control_request(socket, r#"{"op":"status"}"#);
        latencies.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    writer.join().expect("the writer thread");
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    StatusUnderSaves {
        saves: CHANGES,
        answers: latencies.len(),
        p50: at(0.5),
        p99: at(0.99),
        max: *latencies.last().expect("at least one answer"),
    }
}
