//! What every benchmark (tests/benches) shares: how much it measures, and where its results
//! go. `cargo xtask bench` runs them; `cargo xtask test` runs each with `--smoke`, so that a
//! benchmark that stops running fails CI rather than waiting for the next person to try.

use std::path::PathBuf;

/// How much a benchmark measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every size, every repeat: the figures BENCHMARKS.md quotes.
    Full,
    /// `--quick`: fewer repeats and sizes, a few minutes; not figures to quote.
    Quick,
    /// `--smoke`: the smallest sizes, seconds, in a debug build; the figures mean nothing,
    /// only that every part ran and reported.
    Smoke,
}

impl Mode {
    pub fn from_args() -> Self {
        let args: Vec<String> = std::env::args().collect();
        if args.iter().any(|a| a == "--smoke") {
            Mode::Smoke
        } else if args.iter().any(|a| a == "--quick") {
            Mode::Quick
        } else {
            Mode::Full
        }
    }

    /// The agent binary the benchmark runs: the release build operators run, or in a smoke
    /// run the debug build the tests already made.
    pub fn apiban_bin(self) -> PathBuf {
        crate::agent::build_apiban(self != Mode::Smoke)
    }
}

/// `--json-out PATH`, where `cargo xtask bench` reads the results.
pub fn json_out() -> Option<PathBuf> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == "--json-out")?;
    args.get(i + 1).map(PathBuf::from)
}

/// Writes `results` to `--json-out`, if given.
pub fn write_results(results: &serde_json::Value) {
    if let Some(path) = json_out() {
        std::fs::write(&path, results.to_string())
            .unwrap_or_else(|e| panic!("write the results to {}: {e}", path.display()));
    }
}

/// The size as the results' keys name it: 10k, 100k, 1m, or the number.
pub fn size_label(n: u64) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}m", n / 1_000_000)
    } else if n >= 1_000 && n.is_multiple_of(1_000) {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}
