//! Hit bookkeeping: each deny entry's count and last-hit time, written on a drop, exact at the
//! pace a person reads them and sampled under a flood (see `HitClock`).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use apiban_common::{DataplaneConfig, DenyEntry, EXACT_HITS_PER_TICK, HostHits, SAMPLED_HIT_EVERY};
use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_ns};

use crate::HIT_CLOCK;

/// A deny entry's hit bookkeeping, and whether it lives in an LPM trie. `DenyEntry` starts
/// with the fields of `HostHits`, in the same order, so both kinds are read alike; they are
/// written differently (see `record_hit`).
#[derive(Clone, Copy)]
pub(crate) struct DenyHit {
    pub(crate) hits: *mut HostHits,
    in_trie: bool,
}

impl DenyHit {
    #[inline(always)]
    pub(crate) fn table(hits: *mut HostHits) -> Self {
        Self {
            hits,
            in_trie: false,
        }
    }

    #[inline(always)]
    pub(crate) fn trie(entry: &DenyEntry) -> Self {
        Self {
            hits: (entry as *const DenyEntry).cast_mut().cast::<HostHits>(),
            in_trie: true,
        }
    }
}

/// Counts a hit. A trie entry's value follows its key inside the kernel's trie node, so an
/// IPv4 entry's count sits 4 bytes off an 8-byte boundary: an atomic add there is an
/// alignment fault on arm64 (a kernel oops, found by `cargo xtask compat --arch arm64`). A
/// trie entry's count is read and written plainly: CPUs hitting one banned prefix at once
/// may lose each other's increments, the price of a count that cannot crash the host.
#[inline(always)]
pub(crate) fn record_hit(entry: DenyHit, flags: u32) {
    if flags & DataplaneConfig::NO_HIT_TRACKING != 0 {
        return;
    }
    if let Some((add, now)) = hit_sample() {
        if entry.in_trie {
            write_trie_hit(entry.hits, add, now);
        } else {
            write_hit(entry.hits, add, now);
        }
    }
}

/// `write_hit` without the atomic add (see `record_hit`).
#[inline(always)]
fn write_trie_hit(entry: *mut HostHits, add: u64, now: u64) {
    // SAFETY: the pointer comes from a successful map lookup and stays valid for this run
    // (RCU). Plain loads and stores: arm64 allows them unaligned, unlike its atomics. The
    // observe mark in bit 63 is kept: the add never reaches it.
    unsafe {
        let hits = &raw mut (*entry).hits;
        hits.write_volatile(hits.read_volatile().wrapping_add(add));
        let last = &raw mut (*entry).last_hit_ns;
        if last.read_volatile() != now {
            last.write_volatile(now);
        }
    }
}

/// Whether this hit is recorded, and as how many hits at what time: this CPU's clock and pace
/// (see `HitClock`), all on a per-CPU line.
#[inline(always)]
pub(crate) fn hit_sample() -> Option<(u64, u64)> {
    let clock = HIT_CLOCK.get_ptr_mut(0)?;
    // SAFETY: a helper without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    // SAFETY: a per-CPU slot, only touched by the CPU running this program.
    unsafe {
        if (*clock).jiffies != jiffies {
            (*clock).jiffies = jiffies;
            (*clock).tick_ns = bpf_ktime_get_ns();
            (*clock).hits = 0;
        }
        (*clock).hits += 1;
        // See `HitClock`: exact up to a pace, sampled past it.
        let add = if (*clock).hits <= EXACT_HITS_PER_TICK {
            1
        } else if (*clock).countdown > 1 {
            (*clock).countdown -= 1;
            return None;
        } else {
            (*clock).countdown = SAMPLED_HIT_EVERY;
            u64::from(SAMPLED_HIT_EVERY)
        };
        Some((add, (*clock).tick_ns))
    }
}

/// Adds to an entry's count and sets its last-hit time: the entry's own line, cold under a
/// flood of many sources.
#[inline(always)]
pub(crate) fn write_hit(entry: *mut HostHits, add: u64, now: u64) {
    // SAFETY: the pointer comes from a successful map lookup and stays valid for this run
    // (RCU). Many CPUs may hit one entry at once: the count is atomic, the timestamp a plain
    // store where the last writer wins, skipped when it would not change.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*entry).hits, add);
        let last = &raw mut (*entry).last_hit_ns;
        if last.read_volatile() != now {
            last.write_volatile(now);
        }
    }
}

/// CLOCK_MONOTONIC to a tick's precision, read at most once per tick on each CPU (see
/// `HitClock`).
#[inline(always)]
pub(crate) fn tick_now_ns() -> u64 {
    // SAFETY: helpers without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(clock) = HIT_CLOCK.get_ptr_mut(0) else {
        // SAFETY: a helper without arguments.
        return unsafe { bpf_ktime_get_ns() };
    };
    // SAFETY: a per-CPU slot, only touched by the CPU running this program.
    unsafe {
        if (*clock).jiffies != jiffies {
            (*clock).jiffies = jiffies;
            (*clock).tick_ns = bpf_ktime_get_ns();
        }
        (*clock).tick_ns
    }
}
