//! `cargo xtask bench sync`: ingesting 100k addresses (parse, sanitise, ledger, diff, apply
//! to the real XDP maps, save state) and the memory the engine holds for them.
//!
//! Memory is this process's resident set: the engine with its ledger and dataplane handles,
//! as the agent holds them, plus the benchmark's own input strings (reported separately).

use std::time::{Duration, Instant};

use apiban::{
    dataplane::loader::{self, LoadOptions},
    engine::{Engine, EngineSettings},
    state::StateStore,
    sync::unix_now,
};
use tests::{BpffsDir, require_root, sync_harness::TempDir};

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
    if let Some(path) = json_out() {
        let out = serde_json::json!({ "sync": {
            "ingest_ms_100k": (ms(ingest) * 10.0).round() / 10.0,
            "save_ms_100k": (ms(save) * 10.0).round() / 10.0,
            "restart_ms_100k": (ms(restart_time) * 10.0).round() / 10.0,
            "engine_rss_mib_100k": (mib(rss_after) * 10.0).round() / 10.0,
        }});
        std::fs::write(path, out.to_string()).expect("write the JSON results");
    }
}

fn json_out() -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == "--json-out")?;
    args.get(i + 1).cloned()
}
