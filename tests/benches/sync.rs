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
use tests::{
    BpffsDir, agent,
    bench_mode::{Mode, size_label, write_results},
    require_root,
    scene::Scene,
    sync_harness::TempDir,
};

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
    let mode = Mode::from_args();
    // 100k, the size the targets name; a smoke run, 10k.
    let n: u32 = if mode == Mode::Smoke { 10_000 } else { 100_000 };
    let size = size_label(u64::from(n));
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
    let addresses: Vec<String> = (0..n)
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
        report.applied.added, n as usize,
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
    assert_eq!(restart.restored_entries, n as usize);
    assert_eq!((restart.applied.added, restart.applied.removed), (0, 0));

    println!("sync benchmark: {n} IPv4 addresses, one feed batch, real XDP maps");
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

    let window = match mode {
        Mode::Full => 300,
        Mode::Quick => 65,
        Mode::Smoke => 2,
    };
    let footprint = agent_footprint(mode, n, window);
    println!(
        "agent: {} binary, {n} entries pulled from the local APIBAN server, default settings",
        if mode == Mode::Smoke {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "  pull of {n} entries until enforced                        {:>8.1} s",
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
    if mode == Mode::Smoke {
        println!("(a smoke run: every part ran; its figures are not measurements)");
    } else {
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
    }

    let r1 = |x: f64| (x * 10.0).round() / 10.0;
    let mut sync = serde_json::Map::new();
    let mut agent = serde_json::Map::new();
    for (key, value) in [
        ("ingest_ms", r1(ms(ingest))),
        ("save_ms", r1(ms(save))),
        ("restart_ms", r1(ms(restart_time))),
        ("engine_rss_mib", r1(mib(rss_after))),
    ] {
        sync.insert(format!("{key}_{size}"), value.into());
    }
    for (key, value) in [
        ("rss_mib", r1(mib(footprint.rss_kib))),
        ("peak_rss_mib", r1(mib(footprint.hwm_kib))),
        ("anon_rss_mib", r1(mib(footprint.anon_kib))),
        ("pull_s", r1(footprint.pull.as_secs_f64())),
        ("status_during_save_p50_ms", r1(ms(footprint.status.p50))),
        ("status_during_save_max_ms", r1(ms(footprint.status.max))),
    ] {
        agent.insert(format!("{key}_{size}"), value.into());
    }
    agent.insert(
        "idle_cpu_s_per_hour".into(),
        ((footprint.cpu_s_per_hour() * 100.0).round() / 100.0).into(),
    );
    agent.insert("idle_window_s".into(), footprint.window.as_secs().into());
    agent.insert(
        "ban_api_flood_s_1000".into(),
        ((footprint.api_flood.as_secs_f64() * 100.0).round() / 100.0).into(),
    );
    write_results(&serde_json::json!({ "sync": sync, "agent": agent }));
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
fn agent_footprint(mode: Mode, n: u32, window_s: u64) -> Footprint {
    // The release agent, as operators run it (a smoke run takes the tests' debug build).
    agent::use_apiban_bin(mode.apiban_bin());
    let mut scene = Scene::new();
    let addresses: Vec<String> = (0..n)
        .map(|i| std::net::Ipv4Addr::from(0x2d00_0000u32 + i * 97).to_string())
        .collect();
    scene.api.publish(&addresses);
    // Pages of 20,000: the pull takes a handful of requests, inside the agent's default
    // budget of 11 per 2 minutes.
    scene.api.set_batch_size(20_000);
    let t = Instant::now();
    scene.start(&["--metrics-addr", "127.0.0.1:9477", "--ban-api", BAN_API]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while scene.status()["enforced"]["ipv4"].as_u64() != Some(u64::from(n)) {
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
