//! `cargo xtask bench dataplane`: what the XDP program costs per packet, measured under
//! BPF_PROG_TEST_RUN, and how long loading bans into the maps takes.
//!
//! The floor is a bare XDP_DROP program: the cost of running any XDP program here. Ours runs
//! as `bench_cycle`, which rewrites the source address on every repeat so lookups walk many
//! distinct keys spread over the address space (`apiban_common::bench_address`) instead of
//! one hot cache line; its rewrite costs a few instructions that the floor does not pay.
//!
//! From 10k bans on, the same frames also go through yardsticks that carry over between
//! machines, in the same paired rounds: the physical limit (`bench_limit_1`: the same rewrite
//! and parse, then one dependent random load from an array the size of the host table;
//! `bench_limit_2`: and a second, dependent load from one the size of its hit counts), and
//! the peers, holding the same bans: a BPF hash of hosts (`bench_hash`, as xdp-filter) and a
//! single LPM trie (`bench_lpm`).

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use apiban::dataplane::loader::{self, LoadOptions, Loaded};
use apiban_common::{BenchParams, DataplaneConfig, bench_address, map_names, program_names};
use aya::{
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use ipnet::{IpNet, Ipv4Net};
use tests::{
    BpffsDir,
    bench_mode::{Mode, write_results},
    frame::Frame,
    require_root,
};

#[path = "dataplane/detect.rs"]
mod detect;
#[path = "dataplane/prototypes.rs"]
mod prototypes;

use prototypes::prototypes;

struct Config {
    repeat: u32,
    rounds: usize,
    sizes: Vec<u32>,
    load_sizes: Vec<u32>,
}

fn main() {
    require_root();
    let mode = Mode::from_args();
    let config = match mode {
        Mode::Quick => Config {
            repeat: 200_000,
            rounds: 9,
            sizes: vec![0, 1_000, 10_000, 100_000],
            // Loading is cheap to measure, and the 100k target deserves a check in every run.
            load_sizes: vec![10_000, 100_000],
        },
        Mode::Full => Config {
            repeat: 500_000,
            rounds: 25,
            sizes: vec![0, 1_000, 10_000, 100_000, 1_000_000],
            load_sizes: vec![10_000, 100_000],
        },
        // Every part, the peers and the prototypes (which need 100k bans) included.
        Mode::Smoke => Config {
            repeat: 1_000,
            rounds: 3,
            sizes: vec![0, 100_000],
            load_sizes: vec![10_000],
        },
    };
    let dir = BpffsDir::new();
    let mut loaded = loader::load(&LoadOptions {
        bpffs_dir: dir.path.clone(),
        ..Default::default()
    })
    .expect("load the XDP program (root, bpffs)");
    for name in [
        program_names::BENCH_FLOOR,
        program_names::BENCH_CYCLE,
        program_names::BENCH_LIMIT_1,
        program_names::BENCH_LIMIT_2,
        program_names::BENCH_HASH,
        program_names::BENCH_LPM,
    ]
    .into_iter()
    .chain(program_names::BENCH_PROTOS)
    .chain(program_names::BENCH_PIPELINE)
    {
        program(&mut loaded, name)
            .load()
            .expect("load bench program");
    }

    let frame = Frame::udp(
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        5060,
    )
    .build();
    println!(
        "dataplane: ns per packet under BPF_PROG_TEST_RUN, {}-byte UDP/IPv4 frame, repeat {}, \
         median of {} rounds; x floor is the median of each round's ratio to a floor run \
         right before it",
        frame.len(),
        config.repeat,
        config.rounds
    );
    println!(
        "{:<34} {:>9} {:>9} {:>8} {:>8}",
        "program", "entries", "sources", "ns/pkt", "x floor"
    );
    // `--prototypes`: only the prototype table, at 100k bans with the full rounds, for a
    // focused look at one layout question.
    if std::env::args().any(|a| a == "--prototypes") {
        let mut inserted = 0;
        grow_to(&mut loaded, &mut inserted, 100_000);
        let mut json = serde_json::Map::new();
        prototypes(&mut loaded, &frame, &config, &mut json);
        return;
    }
    // `--detect`: only detection's rows, at 100k bans.
    if std::env::args().any(|a| a == "--detect") {
        let mut inserted = 0;
        grow_to(&mut loaded, &mut inserted, 100_000);
        let mut json = serde_json::Map::new();
        detect::detection(&mut loaded, &frame, &config, inserted, &mut json);
        return;
    }
    let floor = measure(&mut loaded, program_names::BENCH_FLOOR, &frame, &config);
    row("bare XDP_DROP (floor)", None, 1, floor);
    let floor = floor.ns;
    let mut json = serde_json::Map::new();
    json.insert("floor_ns".into(), round(floor));

    // Two working sets: 1,024 sources stay in the CPU caches (a burst from a thousand
    // scanners); 65,536 sources make nearly every lookup a cache and TLB miss.
    let mut inserted = 0u32;
    let mut at_100k = Vec::new();
    let mut yardsticks = Vec::new();
    for &size in &config.sizes {
        grow_to(&mut loaded, &mut inserted, size);
        let with_peers = size >= 10_000;
        for sources in [1_024u32, 65_536] {
            let mut programs = vec![program_names::BENCH_CYCLE];
            if with_peers {
                programs.extend(PEERS);
            }
            set_params(&mut loaded, size, sources - 1);
            let miss_set = measure_set(&mut loaded, &programs, &frame, &config);
            let miss = miss_set.of(program_names::BENCH_CYCLE);
            row("apiban, source not banned", Some(size), sources, miss);
            if size < sources {
                continue;
            }
            set_params(&mut loaded, 0, sources - 1);
            let hit_set = measure_set(&mut loaded, &programs, &frame, &config);
            let hit = hit_set.of(program_names::BENCH_CYCLE);
            row("apiban, source banned (drop)", Some(size), sources, hit);
            set_flag(&mut loaded, DataplaneConfig::NO_HIT_TRACKING, true);
            let untracked = measure(&mut loaded, program_names::BENCH_CYCLE, &frame, &config);
            set_flag(&mut loaded, DataplaneConfig::NO_HIT_TRACKING, false);
            row("  same, per-entry hits off", Some(size), sources, untracked);
            if with_peers {
                yardsticks.push((size, sources, miss_set, hit_set));
            }
            let worst = miss.x_floor.max(hit.x_floor);
            if size == 100_000 {
                at_100k.push((sources, worst));
            }
            let label = label(size);
            let suffix = if sources == 1_024 {
                "_1024_sources"
            } else {
                ""
            };
            if sources == 65_536 {
                // The required key keeps the harsher working set: the worst of hit and miss
                // with 65,536 sources. The ratios for both working sets are keyed below.
                json.insert(format!("apiban_ns_{label}"), round(miss.ns.max(hit.ns)));
            }
            json.insert(format!("apiban_miss_ns_{label}{suffix}"), round(miss.ns));
            json.insert(format!("apiban_hit_ns_{label}{suffix}"), round(hit.ns));
            json.insert(format!("apiban_x_floor_{label}{suffix}"), round(worst));
            json.insert(
                format!("apiban_miss_x_floor_{label}{suffix}"),
                round(miss.x_floor),
            );
        }
    }
    yardstick_table(&yardsticks, &mut json);
    if inserted >= 100_000 {
        prototypes(&mut loaded, &frame, &config, &mut json);
    }

    detect::detection(&mut loaded, &frame, &config, inserted, &mut json);

    println!();
    println!("loading bans into an empty map (IPv4 /32s)");
    println!(
        "{:<34} {:>9} {:>12} {:>12}",
        "method", "entries", "total ms", "ns/entry"
    );
    let mut batched_100k = None;
    for &size in &config.load_sizes {
        let nets = addresses(0, size);
        loaded
            .dataplane
            .undeny_batch(&addresses(0, inserted))
            .expect("clear");
        inserted = 0;
        let one_by_one = time(|| {
            for n in &nets {
                loaded.dataplane.deny(*n).expect("insert");
            }
        });
        load_row("one call per address", size, one_by_one);
        loaded.dataplane.undeny_batch(&nets).expect("clear");
        let batched = time(|| {
            loaded.dataplane.deny_batch(&nets, false).expect("batch");
        });
        load_row("one call per batch", size, batched);
        loaded.dataplane.undeny_batch(&nets).expect("clear");
        if size == 100_000 {
            batched_100k = Some(batched);
        }
        json.insert(
            format!("load_batched_ms_{}k", size / 1_000),
            round(batched.as_secs_f64() * 1e3),
        );
    }

    write_results(&serde_json::json!({ "dataplane": json.clone() }));
    if mode == Mode::Smoke {
        println!("(a smoke run: every part ran; its figures are not measurements)");
        return;
    }
    println!();
    for (sources, worst) in at_100k.iter().filter(|(s, _)| *s == 1_024) {
        verdict(
            &format!("ours at 100k entries within 1.6x the floor, {sources} sources (warm)"),
            *worst <= 1.6,
            format!("{worst:.2}x, worst of drop and clean"),
        );
    }
    let f = |key: &str| json.get(key).and_then(serde_json::Value::as_f64);
    for (key, what, met) in [
        (
            "cold_drop_x_limit_100k",
            "cold drop (65,536 sources, 100k bans) within 1.3x the one-load limit",
            (|x| x <= 1.3) as fn(f64) -> bool,
        ),
        (
            "cold_drop_x_limit_1m",
            "cold drop at 1M bans within 1.5x the one-load limit",
            |x| x <= 1.5,
        ),
        (
            "hash_x_ours_cold_100k",
            "the BPF hash >= 2x ours on the cold drop at 100k",
            |x| x >= 2.0,
        ),
        (
            "lpm_x_ours_cold_100k",
            "the LPM trie >= 3x ours on the cold drop at 100k",
            |x| x >= 3.0,
        ),
    ] {
        if let Some(x) = f(key) {
            verdict(what, met(x), format!("{x:.2}x"));
        }
    }
    if let Some(batched) = batched_100k {
        verdict(
            "loading 100k entries under 100 ms",
            batched < Duration::from_millis(100),
            format!("{:.1} ms batched", batched.as_secs_f64() * 1e3),
        );
    }
}

fn round(x: f64) -> serde_json::Value {
    serde_json::json!((x * 100.0).round() / 100.0)
}

fn program<'a>(loaded: &'a mut Loaded, name: &str) -> &'a mut Xdp {
    loaded
        .ebpf_mut()
        .program_mut(name)
        .expect("program in object")
        .try_into()
        .expect("xdp program")
}

/// ns per run of one program, and how many times the floor's that is.
#[derive(Clone, Copy)]
struct Measured {
    ns: f64,
    x_floor: f64,
}

/// Medians over `rounds` rounds of `repeat` runs each. Every round runs the floor right before
/// the program and takes the ratio of the two: this machine's speed drifts by a fifth from one
/// minute to the next (other guests), and the ratio cancels what both runs share.
fn measure(loaded: &mut Loaded, name: &str, frame: &[u8], config: &Config) -> Measured {
    let mut run = |name: &str, repeat: u32| {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        // The kernel reports the mean time of one run.
        program(loaded, name)
            .test_run(opts)
            .expect("test run")
            .duration
            .as_nanos() as f64
    };
    run(program_names::BENCH_FLOOR, config.repeat / 10);
    run(name, config.repeat / 10);
    let mut ns = Vec::with_capacity(config.rounds);
    let mut ratios = Vec::with_capacity(config.rounds);
    for _ in 0..config.rounds {
        let floor = run(program_names::BENCH_FLOOR, config.repeat);
        let ours = run(name, config.repeat);
        ns.push(ours);
        ratios.push(ours / floor);
    }
    Measured {
        ns: median(ns),
        x_floor: median(ratios),
    }
}

/// Every round: the floor, then each program in turn (rotated from round to round), `repeat`
/// runs each.
struct Rounds {
    names: Vec<String>,
    /// ns per run, one row per round, the floor first.
    ns: Vec<Vec<f64>>,
}

impl Rounds {
    fn index(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{name} was not measured"))
    }

    /// The median over rounds of `a`'s time over `b`'s in the same round.
    fn ratio(&self, a: &str, b: &str) -> f64 {
        self.paired(a, b, |a, b| a / b)
    }

    /// The median over rounds of `a`'s time minus `b`'s in the same round, in ns.
    fn over(&self, a: &str, b: &str) -> f64 {
        self.paired(a, b, |a, b| a - b)
    }

    fn paired(&self, a: &str, b: &str, compare: fn(f64, f64) -> f64) -> f64 {
        let (a, b) = (self.index(a), self.index(b));
        median(self.ns.iter().map(|r| compare(r[a], r[b])).collect())
    }

    fn of(&self, name: &str) -> Measured {
        let i = self.index(name);
        Measured {
            ns: median(self.ns.iter().map(|r| r[i]).collect()),
            x_floor: median(self.ns.iter().map(|r| r[i] / r[0]).collect()),
        }
    }
}

fn measure_set(loaded: &mut Loaded, names: &[&str], frame: &[u8], config: &Config) -> Rounds {
    let mut run = |name: &str, repeat: u32| {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        program(loaded, name)
            .test_run(opts)
            .expect("test run")
            .duration
            .as_nanos() as f64
    };
    let all: Vec<&str> = std::iter::once(program_names::BENCH_FLOOR)
        .chain(names.iter().copied())
        .collect();
    for name in &all {
        run(name, config.repeat / 10);
    }
    // Each round starts the programs at the next one: a program that runs right after
    // another on the same maps finds them warmed, so no program may always follow the same
    // one. The floor runs first in every round.
    let ns = (0..config.rounds)
        .map(|round| {
            let mut times = vec![0.0; all.len()];
            times[0] = run(all[0], config.repeat);
            let others = all.len() - 1;
            for k in 0..others {
                let i = 1 + (round + k) % others;
                times[i] = run(all[i], config.repeat);
            }
            times
        })
        .collect();
    Rounds {
        names: all.iter().map(|n| (*n).to_owned()).collect(),
        ns,
    }
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn set_params(loaded: &mut Loaded, base: u32, mask: u32) {
    let map = loaded
        .ebpf_mut()
        .map_mut(map_names::BENCH_PARAMS)
        .expect("bench params map");
    let mut params: Array<_, BenchParams> = Array::try_from(map).expect("array");
    params
        .set(0, &BenchParams { base, mask }, 0)
        .expect("set params");
}

fn set_flag(loaded: &mut Loaded, flag: u32, on: bool) {
    loaded.dataplane.set_flag(flag, on).expect("set flag");
}

fn addresses(from: u32, to: u32) -> Vec<IpNet> {
    (from..to)
        .map(|i| {
            IpNet::V4(Ipv4Net::new_assert(
                bench_address(0, u32::MAX, i).into(),
                32,
            ))
        })
        .collect()
}

/// Grows our maps, and the peers' with the same bans, to `size` addresses.
fn grow_to(loaded: &mut Loaded, inserted: &mut u32, size: u32) {
    if size > *inserted {
        loaded
            .dataplane
            .deny_batch(&addresses(*inserted, size), false)
            .expect("fill deny map");
        let ebpf = loaded.ebpf_mut();
        let mut hash: HashMap<_, [u8; 4], u64> = HashMap::try_from(
            ebpf.map_mut(map_names::BENCH_HASH_V4)
                .expect("the hash peer"),
        )
        .expect("a hash map");
        for i in *inserted..size {
            let key = bench_address(0, u32::MAX, i).to_be_bytes();
            hash.insert(&key, &0, 0).expect("fill the hash peer");
        }
        let mut trie: LpmTrie<_, [u8; 4], u64> = LpmTrie::try_from(
            ebpf.map_mut(map_names::BENCH_LPM_V4)
                .expect("the trie peer"),
        )
        .expect("an LPM trie");
        for i in *inserted..size {
            let key = Key::new(32, bench_address(0, u32::MAX, i).to_be_bytes());
            trie.insert(&key, &0, 0).expect("fill the trie peer");
        }
        *inserted = size;
    }
}

fn label(size: u32) -> String {
    match size {
        0 => "0".to_owned(),
        s if s >= 1_000_000 => format!("{}m", s / 1_000_000),
        s => format!("{}k", s / 1_000),
    }
}

/// The yardsticks and the peers, measured in the same rounds as ours.
const PEERS: [&str; 4] = [
    program_names::BENCH_LIMIT_1,
    program_names::BENCH_LIMIT_2,
    program_names::BENCH_HASH,
    program_names::BENCH_LPM,
];

/// Ours against the limits and the peers, from paired rounds: each ratio is the median of the
/// rounds' own ratios.
fn yardstick_table(
    rows: &[(u32, u32, Rounds, Rounds)],
    json: &mut serde_json::Map<String, serde_json::Value>,
) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!(
        "yardsticks, same frames and rounds: ns per packet, and ours over the one-load limit \
         (x lim1), the two-load limit (x lim2); the peers over ours (hash/ours, lpm/ours)"
    );
    println!(
        "{:>9} {:>8} {:<7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9} {:>8}",
        "entries",
        "sources",
        "source",
        "ours",
        "lim1",
        "lim2",
        "hash",
        "lpm",
        "x lim1",
        "x lim2",
        "hash/ours",
        "lpm/ours"
    );
    use program_names::{BENCH_CYCLE as OURS, BENCH_HASH, BENCH_LIMIT_1, BENCH_LIMIT_2, BENCH_LPM};
    for (size, sources, miss, hit) in rows {
        for (what, set) in [("clean", miss), ("banned", hit)] {
            let ns = |p| set.of(p).ns;
            println!(
                "{:>9} {:>8} {:<7} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>6.2}x {:>6.2}x {:>8.2}x {:>7.2}x",
                size,
                sources,
                what,
                ns(OURS),
                ns(BENCH_LIMIT_1),
                ns(BENCH_LIMIT_2),
                ns(BENCH_HASH),
                ns(BENCH_LPM),
                set.ratio(OURS, BENCH_LIMIT_1),
                set.ratio(OURS, BENCH_LIMIT_2),
                set.ratio(BENCH_HASH, OURS),
                set.ratio(BENCH_LPM, OURS),
            );
            let warmth = if *sources == 1_024 { "warm" } else { "cold" };
            let verdict = if what == "clean" { "clean" } else { "drop" };
            let label = label(*size);
            for (key, value) in [
                (
                    format!("{warmth}_{verdict}_x_limit_{label}"),
                    set.ratio(OURS, BENCH_LIMIT_1),
                ),
                (
                    format!("{warmth}_{verdict}_x_limit2_{label}"),
                    set.ratio(OURS, BENCH_LIMIT_2),
                ),
                (
                    format!("hash_x_ours_{warmth}_{verdict}_{label}"),
                    set.ratio(BENCH_HASH, OURS),
                ),
                (
                    format!("lpm_x_ours_{warmth}_{verdict}_{label}"),
                    set.ratio(BENCH_LPM, OURS),
                ),
                (format!("limit_ns_{warmth}_{label}"), ns(BENCH_LIMIT_1)),
                (format!("limit2_ns_{warmth}_{label}"), ns(BENCH_LIMIT_2)),
                (
                    format!("hash_ns_{warmth}_{verdict}_{label}"),
                    ns(BENCH_HASH),
                ),
                (format!("lpm_ns_{warmth}_{verdict}_{label}"), ns(BENCH_LPM)),
            ] {
                json.insert(key, round(value));
            }
            if warmth == "cold" && verdict == "drop" {
                // The names for the cold drop.
                json.insert(
                    format!("hash_x_ours_cold_{label}"),
                    round(set.ratio(BENCH_HASH, OURS)),
                );
                json.insert(
                    format!("lpm_x_ours_cold_{label}"),
                    round(set.ratio(BENCH_LPM, OURS)),
                );
            }
        }
    }
}

fn time(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

fn row(what: &str, entries: Option<u32>, sources: u32, m: Measured) {
    let entries = entries.map_or("-".to_owned(), |e| e.to_string());
    println!(
        "{what:<34} {entries:>9} {sources:>9} {:>8.1} {:>7.2}x",
        m.ns, m.x_floor
    );
}

fn load_row(what: &str, entries: u32, took: Duration) {
    println!(
        "{what:<34} {entries:>9} {:>12.1} {:>12.0}",
        took.as_secs_f64() * 1e3,
        took.as_nanos() as f64 / f64::from(entries)
    );
}

fn verdict(target: &str, met: bool, detail: String) {
    println!(
        "target: {target}: {} ({detail})",
        if met { "met" } else { "MISSED" }
    );
}
