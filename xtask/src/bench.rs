//! `cargo xtask bench`: runs the benchmarks in tests/benches, each with `--json-out`, merges
//! their results into one object and reads the targets off it. A benchmark that fails is
//! named in the results' `errors` and the others still report; the command then fails.
//! `cargo xtask test` runs every one in smoke mode (`Mode::Smoke`): seconds each, in the
//! debug build, so that none stops running unnoticed.

use std::path::Path;

use anyhow::bail;

use crate::{cargo, status};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchKind {
    Dataplane,
    Sync,
    Compare,
    Fleet,
}

impl BenchKind {
    fn name(self) -> &'static str {
        match self {
            BenchKind::Dataplane => "dataplane",
            BenchKind::Sync => "sync",
            BenchKind::Compare => "compare",
            BenchKind::Fleet => "fleet",
        }
    }
}

impl BenchKind {
    pub const ALL: [BenchKind; 4] = [
        BenchKind::Dataplane,
        BenchKind::Sync,
        BenchKind::Compare,
        BenchKind::Fleet,
    ];

    /// The top-level keys of this benchmark's results.
    fn sections(self) -> &'static [&'static str] {
        match self {
            BenchKind::Dataplane => &["dataplane"],
            BenchKind::Sync => &["sync", "agent"],
            BenchKind::Compare => &["load", "veth"],
            BenchKind::Fleet => &["fleet"],
        }
    }
}

/// How much every benchmark measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Full,
    /// `--quick`: fewer repeats and sizes.
    Quick,
    /// `--smoke`: the smallest sizes, in the debug build; only that each part runs.
    Smoke,
}

/// Runs `kinds` in `mode`; prints the targets (not in a smoke run) and, with `json`, the
/// merged results as one line. Fails naming each benchmark that failed or reported nothing.
pub fn run(root: &Path, kinds: &[BenchKind], mode: Mode, json: bool) -> anyhow::Result<()> {
    let mut merged = serde_json::Map::new();
    let mut errors = serde_json::Map::new();
    for kind in kinds {
        absorb(*kind, run_one(root, *kind, mode), &mut merged, &mut errors);
    }
    if !errors.is_empty() {
        merged.insert("errors".into(), serde_json::Value::Object(errors.clone()));
    }
    let merged = serde_json::Value::Object(merged);
    if mode != Mode::Smoke {
        println!();
        print_targets(&merged);
    }
    if json {
        println!("{merged}");
    }
    if !errors.is_empty() {
        let names: Vec<String> = errors
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or_default()))
            .collect();
        bail!("benchmarks failed:\n  {}", names.join("\n  "));
    }
    Ok(())
}

type Object = serde_json::Map<String, serde_json::Value>;

/// Adds one benchmark's results to `merged`, and to `errors` its failed parts, or that it
/// failed, or each of its sections it did not report.
fn absorb(
    kind: BenchKind,
    results: anyhow::Result<serde_json::Value>,
    merged: &mut Object,
    errors: &mut Object,
) {
    let map = match results {
        Ok(serde_json::Value::Object(map)) => map,
        Ok(other) => {
            errors.insert(
                kind.name().into(),
                format!("results not an object: {other}").into(),
            );
            return;
        }
        Err(e) => {
            errors.insert(kind.name().into(), format!("{e:#}").into());
            return;
        }
    };
    for (key, value) in map {
        match (key.as_str(), value) {
            // The benchmark's own failed parts, by part.
            ("errors", serde_json::Value::Object(parts)) => {
                for (part, why) in parts {
                    errors.insert(format!("{}.{part}", kind.name()), why);
                }
            }
            (_, value) => {
                merged.insert(key, value);
            }
        }
    }
    let failed_part = |errors: &Object| {
        errors
            .keys()
            .any(|k| k.starts_with(&format!("{}.", kind.name())))
    };
    for section in kind.sections() {
        let reported = merged
            .get(*section)
            .and_then(serde_json::Value::as_object)
            .is_some_and(|o| !o.is_empty());
        if !reported && !failed_part(errors) {
            errors.insert(
                format!("{}.{section}", kind.name()),
                "reported nothing".into(),
            );
        }
    }
}

/// One benchmark's results, or why there are none.
fn run_one(root: &Path, kind: BenchKind, mode: Mode) -> anyhow::Result<serde_json::Value> {
    let out = std::env::temp_dir().join(format!(
        "apiban-bench-{}-{}.json",
        kind.name(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&out);
    let mut cmd = cargo(root);
    cmd.arg("bench");
    if mode == Mode::Smoke {
        // The tests' debug build: no release build of the test crate for seconds of running.
        cmd.args(["--profile", "dev"]);
    }
    cmd.args(["-p", "tests", "--bench", kind.name(), "--"]);
    match mode {
        Mode::Full => {}
        Mode::Quick => {
            cmd.arg("--quick");
        }
        Mode::Smoke => {
            cmd.arg("--smoke");
        }
    }
    cmd.arg("--json-out").arg(&out);
    eprintln!("[bench] {}: {:?}", kind.name(), cmd);
    let ran = status(cmd);
    // A benchmark that failed in one part still wrote what it measured.
    let results = std::fs::read_to_string(&out)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
    let _ = std::fs::remove_file(&out);
    match (ran, results) {
        (_, Some(v)) => Ok(v),
        (Err(e), None) => Err(e),
        (Ok(()), None) => bail!("the {} benchmark wrote no JSON results", kind.name()),
    }
}

fn print_targets(r: &serde_json::Value) {
    let f = |path: &str| {
        path.split('.')
            .try_fold(r, |v, k| v.get(k))
            .and_then(serde_json::Value::as_f64)
    };
    let line = |what: &str, value: Option<f64>, met: fn(f64) -> bool, unit: &str| {
        if let Some(v) = value {
            let verdict = if met(v) { "met" } else { "MISSED" };
            println!("target: {what}: {verdict} ({v:.2}{unit})");
        }
    };
    println!("targets");
    // Ratios measured round by round (see tests/benches/dataplane.rs): the warm working set
    // against the bare floor, the cold one against the physical limit and the peers.
    line(
        "warm (1,024 sources, 100k entries) drop and clean <= 1.6x the floor",
        f("dataplane.apiban_x_floor_100k_1024_sources"),
        |x| x <= 1.6,
        "x",
    );
    line(
        "cold drop (65,536 sources, 100k entries) <= 1.3x the one-load limit",
        f("dataplane.cold_drop_x_limit_100k"),
        |x| x <= 1.3,
        "x",
    );
    line(
        "cold drop at 1M entries <= 1.5x the one-load limit",
        f("dataplane.cold_drop_x_limit_1m"),
        |x| x <= 1.5,
        "x",
    );
    line(
        "a BPF hash >= 2x ours on the cold drop at 100k",
        f("dataplane.hash_x_ours_cold_100k"),
        |x| x >= 2.0,
        "x",
    );
    line(
        "an LPM trie >= 3x ours on the cold drop at 100k",
        f("dataplane.lpm_x_ours_cold_100k"),
        |x| x >= 3.0,
        "x",
    );
    line(
        "clean SIP from 65,536 rotating sources: detection on <= 1.5x off",
        f("dataplane.detect_on_x_off_65536"),
        |x| x <= 1.5,
        "x",
    );
    line(
        "clean SIP from 1,024 sources: detection on <= 1.3x off",
        f("dataplane.detect_on_x_off_1024"),
        |x| x <= 1.3,
        "x",
    );
    line(
        "a non-SIP packet through the egress classifier <= 5 ns over no program",
        f("dataplane.egress_non_sip_ns_over"),
        |x| x <= 5.0,
        " ns",
    );
    line(
        "100k entries loaded in under 100 ms",
        f("load.apiban_ms_100k"),
        |x| x < 100.0,
        " ms",
    );
    line(
        ">= 5x iptables per address at 10k (receive CPU per packet)",
        f("veth.xdp_vs_iptables"),
        |x| x >= 5.0,
        "x",
    );
    line(
        ">= 1.5x the nftables set at 10k (receive CPU per packet)",
        f("veth.xdp_vs_nft_set"),
        |x| x >= 1.5,
        "x",
    );
    line(
        "a manual ban on every node of a 3-node fleet within 1 s (p99)",
        f("fleet.propagation_p99_ms"),
        |x| x <= 1000.0,
        " ms",
    );
    line(
        "a new fleet node syncs 100k bans within 5 s",
        f("fleet.new_node_sync_s_100k"),
        |x| x <= 5.0,
        " s",
    );
    line(
        "a new fleet node syncs 1M bans within 60 s",
        f("fleet.new_node_sync_s_1m"),
        |x| x <= 60.0,
        " s",
    );
    line(
        "no fleet leader for at most 1 s after the Raft leader member is killed",
        f("fleet.leaderless_ms_raft_leader_killed"),
        |x| x <= 1000.0,
        " ms",
    );
    line(
        "no fleet leader for at most 6 s (the lease + 1 s) after the poller is SIGKILLed",
        f("fleet.leaderless_s_poller_killed"),
        |x| x <= 6.0,
        " s",
    );
    line(
        "the agent under 50 MB resident with 100k entries",
        f("agent.rss_mib_100k"),
        |x| x < 50.0 * 1e6 / (1024.0 * 1024.0),
        " MiB",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_part_is_named_and_the_rest_kept() {
        let (mut merged, mut errors) = (Object::new(), Object::new());
        let results = serde_json::json!({
            "load": {"apiban_ms_1k": 4.8},
            "veth": null,
            "errors": {"veth": "live-frames test run: EPERM"},
        });
        absorb(BenchKind::Compare, Ok(results), &mut merged, &mut errors);
        assert_eq!(merged["load"]["apiban_ms_1k"], 4.8);
        assert_eq!(errors["compare.veth"], "live-frames test run: EPERM");
        assert_eq!(errors.len(), 1, "{errors:?}");
    }

    #[test]
    fn a_benchmark_that_failed_or_reported_nothing_is_named() {
        let (mut merged, mut errors) = (Object::new(), Object::new());
        absorb(
            BenchKind::Fleet,
            Err(anyhow::anyhow!("exit status 101")),
            &mut merged,
            &mut errors,
        );
        absorb(
            BenchKind::Sync,
            Ok(serde_json::json!({"sync": {"ingest_ms_100k": 170.0}, "agent": {}})),
            &mut merged,
            &mut errors,
        );
        assert_eq!(errors["fleet"], "exit status 101");
        assert_eq!(errors["sync.agent"], "reported nothing");
        assert!(!errors.contains_key("sync.sync"), "{errors:?}");
        assert_eq!(merged["sync"]["ingest_ms_100k"], 170.0);
    }
}
