//! The XDP program against an independent model of its policy (`tests::reference`), frame by
//! frame under BPF_PROG_TEST_RUN, on frames from `tests::framegen`: every verdict must agree
//! (dropped, allowed, passed, not IP, malformed, observed, read from the program's own
//! counters), under scope all and scope ports, with and without an allowlist, with hosts in
//! the host tables and prefixes in the tries, a filter-saturating wide prefix included, and
//! sources in observe mode beside enforcing ones. Which entries carry the observe mark is
//! decided by the agent's own ledger, so the test covers that rule (an observed host inside
//! an enforced prefix must enforce) together with the program. See `tests::differential`.
//!
//! APIBAN_DIFF_FRAMES sets how many frames (default 200,000, spread over the
//! configurations); APIBAN_DIFF_SEED replays a run (the seed is printed). `cargo xtask fuzz`
//! runs millions. A disagreement prints the frame in hex.

use apiban_common::Verdict;
use tests::{differential, require_root};

#[test]
fn the_program_agrees_with_the_model_on_every_frame() {
    require_root();
    let frames: usize = std::env::var("APIBAN_DIFF_FRAMES")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(200_000);
    let seed: u64 = std::env::var("APIBAN_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("differential test: {frames} frames, APIBAN_DIFF_SEED={seed}");
    let agreement = differential::run(frames, seed).unwrap_or_else(|e| panic!("{e}"));
    let seen = agreement.seen;
    println!(
        "agreed on every frame; verdicts {seen:?} (dropped, allowed, passed, not_ip, \
         malformed, observed); {} IP frames",
        agreement.ip_frames
    );
    // A generator that never produced one kind of verdict would prove nothing about it.
    for v in Verdict::ALL {
        assert!(
            seen[v as usize] * 50 >= frames.min(100_000) / 10,
            "too few {} frames: {seen:?}",
            v.name()
        );
    }
}
