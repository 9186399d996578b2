//! The prototype table (`--prototypes`, and part of the full run): the drop path in parts
//! and in other layouts, and the one-load limit with work added after its load, each against
//! the same limit in the same rounds (BENCHMARKS.md, "Where the per-packet time goes").

use super::*;

/// Other layouts the host table could take, as bench-only programs, against the same limits
/// with 65,536 banned sources: what each would cost before anyone builds it.
pub(super) fn prototypes(
    loaded: &mut Loaded,
    frame: &[u8],
    config: &Config,
    json: &mut serde_json::Map<String, serde_json::Value>,
) {
    use program_names::{BENCH_CYCLE as OURS, BENCH_LIMIT_1, BENCH_LIMIT_2};
    let mut names = vec![OURS, BENCH_LIMIT_1, BENCH_LIMIT_2];
    names.extend(program_names::BENCH_PROTOS);
    // The same programs warm: what each step costs when its lines are cached, against what it
    // costs cold, tells a step that waits on memory from one that only adds instructions.
    set_params(loaded, 0, 1_023);
    let warm = measure_set(loaded, &names, frame, config);
    set_params(loaded, 0, 65_535);
    let set = measure_set(loaded, &names, frame, config);
    set_flag(loaded, DataplaneConfig::NO_HIT_TRACKING, true);
    let protos = program_names::BENCH_PROTOS;
    let untracked = measure_set(
        loaded,
        &[
            OURS,
            BENCH_LIMIT_1,
            protos[7],
            protos[0],
            protos[2],
            protos[3],
        ],
        frame,
        config,
    );
    set_flag(loaded, DataplaneConfig::NO_HIT_TRACKING, false);
    println!();
    println!(
        "prototypes of the drop path, 65,536 banned sources: ns per packet and x the one-load \
         limit, same rounds; where measured, ns over the limit cold and warm (1,024 sources)"
    );
    let show = |what: &str, ns: f64, x: f64| println!("  {what:<58} {ns:>7.1} {x:>6.2}x");
    let show_both = |what: &str, name: &str| {
        println!(
            "  {what:<58} {:>7.1} {:>6.2}x  cold +{:>5.1}  warm +{:>5.1}",
            set.of(name).ns,
            set.ratio(name, BENCH_LIMIT_1),
            set.over(name, BENCH_LIMIT_1),
            warm.over(name, BENCH_LIMIT_1),
        )
    };
    show_both("ours", OURS);
    show(
        "ours, per-entry hits off (block filter + keys)",
        untracked.of(OURS).ns,
        untracked.ratio(OURS, BENCH_LIMIT_1),
    );
    for (name, what) in [
        (protos[7], "  same rounds: block filter + keys, no count"),
        (
            protos[0],
            "  same rounds: ours' verdict (classify), uncounted",
        ),
        (
            protos[2],
            "  same rounds: ours' verdict, counted per interface",
        ),
        (
            protos[3],
            "  same rounds: ours' filter check and host search alone",
        ),
    ] {
        show(
            what,
            untracked.of(name).ns,
            untracked.ratio(name, BENCH_LIMIT_1),
        );
    }
    show(
        "limit: one load, 5 MiB (the keys)",
        set.of(BENCH_LIMIT_1).ns,
        1.0,
    );
    show_both(
        "limit: two dependent loads, 5 + 20 MiB (keys, hit counts)",
        BENCH_LIMIT_2,
    );
    for (name, what) in program_names::BENCH_PROTOS.iter().zip([
        "ours' verdict (classify), uncounted",
        "  the same without per-entry hit bookkeeping",
        "ours' verdict, counted per interface",
        "ours' filter check and host-table search alone",
        "ours' host-table search alone",
        "one load, 5 MiB memory-mappable array (as ours are)",
        "block filter, a branch on its bit, then keys, no count",
        "block filter + keys (independent loads), no count",
        "1 MiB filter + keys (independent loads), no count",
        "block filter + keys + hit line, atomic add (today's)",
        "block filter + keys + hit line, plain add",
        "block filter + key/u32 count line (10 MiB), atomic add",
        "block filter + key/u32 count line (10 MiB), plain add",
        "block filter + key/u64 count/time line (20 MiB), plain add",
        "1 MiB filter + key/u32 count line (10 MiB), plain add",
        "ours' filter check + search + hit clock and pace, no write",
        "ours' filter check + search + hit bookkeeping whole",
        "ours' filter check + search + per-CPU hit log",
    ]) {
        show_both(what, name);
        json.insert(
            format!("{}_x_limit_100k", name.trim_start_matches("bench_")),
            round(set.ratio(name, BENCH_LIMIT_1)),
        );
    }
    json.insert(
        "cold_drop_untracked_x_limit_100k".into(),
        round(untracked.ratio(OURS, BENCH_LIMIT_1)),
    );
    pipeline(loaded, frame, config, json);
}

/// Work added after the one-load limit's load, warm and cold: whether an instruction that
/// touches only hot lines costs a cold drop by its latency or by the room it takes among the
/// instructions in flight, whose misses overlap from one repeat to the next.
fn pipeline(
    loaded: &mut Loaded,
    frame: &[u8],
    config: &Config,
    json: &mut serde_json::Map<String, serde_json::Value>,
) {
    use program_names::{BENCH_LIMIT_1, BENCH_LIMIT_2, BENCH_PIPELINE};
    let mut names = vec![BENCH_LIMIT_1, BENCH_LIMIT_2];
    names.extend(BENCH_PIPELINE);
    let mut sets = Vec::new();
    for (warmth, mask) in [("warm", 1_023), ("cold", 65_535)] {
        set_params(loaded, 0, mask);
        sets.push((warmth, measure_set(loaded, &names, frame, config)));
    }
    println!();
    println!(
        "the one-load limit with work after its load: ns per packet and ns over the limit, \
         1,024 (warm) and 65,536 (cold) sources, same rounds"
    );
    for (name, what) in [BENCH_LIMIT_2].into_iter().chain(BENCH_PIPELINE).zip([
        "a second load, dependent on the first (lim2)",
        "48 additions that do not wait for the load",
        "96 additions that do not wait for the load",
        "48 additions that start from the loaded word",
        "the production's per-interface verdict counter",
    ]) {
        let mut line = format!("  {what:<50}");
        for (warmth, set) in &sets {
            let over = set.over(name, BENCH_LIMIT_1);
            line.push_str(&format!(
                " {warmth} {:>6.1} (+{over:>5.1})",
                set.of(name).ns
            ));
            json.insert(
                format!(
                    "{}_over_limit_ns_{warmth}",
                    name.trim_start_matches("bench_")
                ),
                round(over),
            );
        }
        println!("{line}");
    }
    for (warmth, set) in &sets {
        println!(
            "  the limit itself, {warmth}: {:.1} ns",
            set.of(BENCH_LIMIT_1).ns
        );
    }
}
