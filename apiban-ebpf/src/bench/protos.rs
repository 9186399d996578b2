//! Prototypes of the drop path, measured beside the yardsticks (`cargo bench -p tests --bench
//! dataplane -- --prototypes`; BENCHMARKS.md, "Where the per-packet time goes"): other
//! layouts of the host table, the production lookup in parts, and the one-load limit with work
//! added after its load. None of them is in the agent's object.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use apiban_common::{block_filter, host_table};
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};

use super::{
    BENCH_LIMIT_HITS, BENCH_LIMIT_KEYS, BENCH_LIMIT_KEYS_MMAP, HIT_WORDS_PER_BUCKET,
    KEY_WORDS_PER_BUCKET, LIMIT_BUCKETS, limit, limit_load, next_source, parsed_source, volatile,
};

// Prototypes of layouts the host table could take, measured beside the yardsticks (see
// BENCHMARKS.md, "Where the per-packet time goes"): the block filter's 2 MiB, a co-located
// table with a key and a hit count in each line (8 or 16 bytes a slot), a 1 MiB Bloom-style
// filter that would stay in L2.
const SLOTS: u32 = LIMIT_BUCKETS * host_table::V4_SLOTS;
#[map]
static BENCH_PROTO_FILTER: Array<u64> = Array::with_max_entries(block_filter::WORDS, 0);
#[map]
static BENCH_PROTO_COLOC8: Array<u64> = Array::with_max_entries(SLOTS, 0);
#[map]
static BENCH_PROTO_COLOC16: Array<u64> = Array::with_max_entries(SLOTS * 2, 0);
#[map]
static BENCH_PROTO_BLOOM: Array<u64> = Array::with_max_entries(1 << 17, 0);
// The prototypes: which filter is read first (none, the 2 MiB block filter, a 1 MiB one that
// would stay in L2), where the key is (the 5 MiB keys, or a line with its count beside it),
// and how the count is kept (not at all, an atomic add, or a plain add that may lose a
// concurrent increment).
macro_rules! proto_program {
    ($name:ident, $filter:expr, $table:expr, $count:expr) => {
        #[xdp]
        pub fn $name(ctx: XdpContext) -> u32 {
            proto(&ctx, $filter, $table, $count).unwrap_or(xdp_action::XDP_PASS)
        }
    };
}

proto_program!(
    bench_proto_filter_key,
    Filter::Block,
    Table::Keys,
    Count::None
);
proto_program!(
    bench_proto_keys_mmap,
    Filter::None,
    Table::KeysMmap,
    Count::None
);
proto_program!(
    bench_proto_filter_branch_key,
    Filter::BlockBranch,
    Table::Keys,
    Count::None
);
proto_program!(
    bench_proto_bloom_key,
    Filter::Small,
    Table::Keys,
    Count::None
);
proto_program!(
    bench_proto_filter_key_hits_atomic,
    Filter::Block,
    Table::Keys,
    Count::Atomic
);
proto_program!(
    bench_proto_filter_key_hits_plain,
    Filter::Block,
    Table::Keys,
    Count::Plain
);
proto_program!(
    bench_proto_filter_coloc8_atomic,
    Filter::Block,
    Table::Coloc8,
    Count::Atomic
);
proto_program!(
    bench_proto_filter_coloc8_plain,
    Filter::Block,
    Table::Coloc8,
    Count::Plain
);
proto_program!(
    bench_proto_filter_coloc16_plain,
    Filter::Block,
    Table::Coloc16,
    Count::Plain
);
proto_program!(
    bench_proto_bloom_coloc8_plain,
    Filter::Small,
    Table::Coloc8,
    Count::Plain
);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Filter {
    None,
    Block,
    /// The block filter, with the program's branch on its bit before the keys are read.
    BlockBranch,
    Small,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    /// The keys' 5 MiB; a count, if any, in a separate array the size of today's hit counts.
    Keys,
    /// The same keys' size, memory-mappable.
    KeysMmap,
    /// Key and u32 count in one line, 8 bytes a slot.
    Coloc8,
    /// Key, u64 count and time in one line, 16 bytes a slot.
    Coloc16,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Count {
    None,
    Atomic,
    Plain,
}

#[inline(always)]
fn count(word: *mut u64, how: Count) {
    // SAFETY: a pointer from a successful lookup, valid for this run.
    unsafe {
        match how {
            Count::None => {}
            Count::Atomic => {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(word, 1);
            }
            Count::Plain => word.write_volatile(word.read_volatile() + 1),
        }
    }
}

#[inline(always)]
fn proto(ctx: &XdpContext, filter: Filter, table: Table, how: Count) -> Result<u32, ()> {
    let src = parsed_source(ctx)?;
    let hash = host_table::v4_hash(u32::from_ne_bytes(src));
    let mut word = match filter {
        Filter::None => 0,
        Filter::Block => {
            let bit = block_filter::v4_bit(u32::from_be_bytes(src));
            volatile(BENCH_PROTO_FILTER.get(bit >> 6).ok_or(())?)
        }
        Filter::Small => volatile(BENCH_PROTO_BLOOM.get(hash >> 15).ok_or(())?),
        Filter::BlockBranch => {
            let bit = block_filter::v4_bit(u32::from_be_bytes(src));
            let filter = volatile(BENCH_PROTO_FILTER.get(bit >> 6).ok_or(())?);
            // The array is all zeros: "no ban in this block" is a set bit here, so that every
            // packet goes on to the keys, as a banned source's does.
            if filter & (1 << (bit & 63)) != 0 {
                return Ok(xdp_action::XDP_PASS);
            }
            0
        }
    };
    match table {
        Table::Keys => {
            let bucket = host_table::home(hash, LIMIT_BUCKETS);
            let key = volatile(
                BENCH_LIMIT_KEYS
                    .get(bucket * KEY_WORDS_PER_BUCKET)
                    .ok_or(())?,
            );
            word ^= key;
            if how != Count::None {
                // The slot's index comes from the key line, as a found slot's does.
                let slot = (key as u32 ^ u32::from_ne_bytes(src)) & (host_table::V4_SLOTS - 1);
                let hits = BENCH_LIMIT_HITS
                    .get_ptr_mut(bucket * HIT_WORDS_PER_BUCKET + slot * 2)
                    .ok_or(())?;
                count(hits, how);
            }
        }
        Table::KeysMmap => {
            let bucket = host_table::home(hash, LIMIT_BUCKETS);
            word ^= volatile(
                BENCH_LIMIT_KEYS_MMAP
                    .get(bucket * KEY_WORDS_PER_BUCKET)
                    .ok_or(())?,
            );
        }
        Table::Coloc8 | Table::Coloc16 => {
            let (map, words) = if table == Table::Coloc16 {
                (&BENCH_PROTO_COLOC16, 2 * SLOTS)
            } else {
                (&BENCH_PROTO_COLOC8, SLOTS)
            };
            // A 64-byte line holds 8 words: the key's line, and its count in the same line.
            let line = host_table::home(hash, words / 8) * 8;
            word ^= volatile(map.get(line).ok_or(())?);
            count(map.get_ptr_mut(line + 4).ok_or(())?, how);
        }
    }
    Ok(if word == u64::MAX {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    })
}

/// The production maps and lookups alone: its filter check, then its host-table search.
#[xdp]
pub fn bench_proto_prod_lookup(ctx: XdpContext) -> u32 {
    let Ok(src) = parsed_source(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    let bit = block_filter::v4_bit(u32::from_be_bytes(src));
    if !crate::may_match(&crate::DENY_V4_FILTER, bit) {
        return xdp_action::XDP_PASS;
    }
    match crate::v4_host(u32::from_ne_bytes(src)) {
        Some(_) => xdp_action::XDP_DROP,
        None => xdp_action::XDP_PASS,
    }
}

/// The same, then the hit bookkeeping's clock and pace, without writing the entry.
#[xdp]
pub fn bench_proto_prod_lookup_paced(ctx: XdpContext) -> u32 {
    prod_lookup_booked(&ctx, false).unwrap_or(xdp_action::XDP_PASS)
}

/// The same, then the hit bookkeeping whole: clock, pace and the entry's sampled writes.
#[xdp]
pub fn bench_proto_prod_lookup_booked(ctx: XdpContext) -> u32 {
    prod_lookup_booked(&ctx, true).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn prod_lookup_booked(ctx: &XdpContext, write: bool) -> Result<u32, ()> {
    let src = parsed_source(ctx)?;
    let bit = block_filter::v4_bit(u32::from_be_bytes(src));
    if !crate::may_match(&crate::DENY_V4_FILTER, bit) {
        return Ok(xdp_action::XDP_PASS);
    }
    let entry = crate::v4_host(u32::from_ne_bytes(src)).ok_or(())?;
    if let Some((add, now)) = crate::hit_sample()
        && write
    {
        crate::write_hit(entry, add, now);
    }
    Ok(xdp_action::XDP_DROP)
}

/// A per-CPU log of the host slots hit, in order, for the agent to fold into the counts: a
/// prototype of hit bookkeeping that writes only a hot, sequential line on each drop.
const PROTO_HIT_LOG_ENTRIES: usize = 2048;
#[repr(C)]
pub struct ProtoHitLog {
    jiffies: u64,
    tick_ns: u64,
    head: u64,
    entries: [u32; PROTO_HIT_LOG_ENTRIES],
}
#[map]
static BENCH_PROTO_HIT_LOG: PerCpuArray<ProtoHitLog> = PerCpuArray::with_max_entries(1, 0);

/// The production filter check and host search, then the slot appended to this CPU's hit
/// log, with the tick's time kept beside it.
#[xdp]
pub fn bench_proto_prod_lookup_logged(ctx: XdpContext) -> u32 {
    prod_lookup_logged(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn prod_lookup_logged(ctx: &XdpContext) -> Result<u32, ()> {
    let src = parsed_source(ctx)?;
    let bit = block_filter::v4_bit(u32::from_be_bytes(src));
    if !crate::may_match(&crate::DENY_V4_FILTER, bit) {
        return Ok(xdp_action::XDP_PASS);
    }
    let slot = crate::v4_host_slot(u32::from_ne_bytes(src)).ok_or(())?;
    let log = BENCH_PROTO_HIT_LOG.get_ptr_mut(0).ok_or(())?;
    // SAFETY: a per-CPU slot, only touched by the CPU running this program; the index is
    // masked into the entries.
    unsafe {
        let jiffies = bpf_jiffies64();
        if (*log).jiffies != jiffies {
            (*log).jiffies = jiffies;
            (*log).tick_ns = bpf_ktime_get_ns();
        }
        let head = (*log).head;
        (*log).entries[head as usize & (PROTO_HIT_LOG_ENTRIES - 1)] = slot;
        (*log).head = head + 1;
    }
    Ok(xdp_action::XDP_DROP)
}

/// Only the production host-table search, no filter.
#[xdp]
pub fn bench_proto_prod_hosts(ctx: XdpContext) -> u32 {
    let Ok(src) = parsed_source(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    match crate::v4_host(u32::from_ne_bytes(src)) {
        Some(_) => xdp_action::XDP_DROP,
        None => xdp_action::XDP_PASS,
    }
}

/// The production verdict without the counters (`count`) or anything after it.
#[xdp]
pub fn bench_proto_prod_classify(ctx: XdpContext) -> u32 {
    if next_source(&ctx).is_err() {
        return xdp_action::XDP_PASS;
    }
    let flags = crate::CONFIG.get(0).map_or(0, |c| c.flags);
    match crate::classify(&ctx, flags) {
        Ok(apiban_common::Verdict::Dropped) => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

/// The same with the verdict counted, as the production program does.
#[xdp]
pub fn bench_proto_prod_counted(ctx: XdpContext) -> u32 {
    if next_source(&ctx).is_err() {
        return xdp_action::XDP_PASS;
    }
    let flags = crate::CONFIG.get(0).map_or(0, |c| c.flags);
    let verdict = crate::classify(&ctx, flags).unwrap_or(apiban_common::Verdict::Malformed);
    crate::count(&ctx, verdict);
    match verdict {
        apiban_common::Verdict::Dropped => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

/// `bench_proto_prod_classify` with per-entry hit bookkeeping switched off for this program
/// only: the same rounds tell what the bookkeeping costs.
#[xdp]
pub fn bench_proto_prod_classify_untracked(ctx: XdpContext) -> u32 {
    if next_source(&ctx).is_err() {
        return xdp_action::XDP_PASS;
    }
    let flags = crate::CONFIG.get(0).map_or(0, |c| c.flags)
        | apiban_common::DataplaneConfig::NO_HIT_TRACKING;
    match crate::classify(&ctx, flags) {
        Ok(apiban_common::Verdict::Dropped) => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

// Why work that touches only hot lines still costs on a cold drop: `BPF_PROG_TEST_RUN`'s
// repeats, like packets off a ring, overlap their cache misses as far as the CPU's window of
// in-flight instructions reaches. These are the one-load limit with work added after its load,
// so the rounds tell whether an instruction costs by its latency (only when it waits for the
// load) or by the room it takes in that window (either way).

/// The limit, then 48 additions that do not wait for the load.
#[xdp]
pub fn bench_pipe_limit_pad(ctx: XdpContext) -> u32 {
    limit_padded(&ctx, false, 1).unwrap_or(xdp_action::XDP_PASS)
}

/// The same with 96 additions.
#[xdp]
pub fn bench_pipe_limit_pad_twice(ctx: XdpContext) -> u32 {
    limit_padded(&ctx, false, 2).unwrap_or(xdp_action::XDP_PASS)
}

/// The limit, then 48 additions that start from the loaded word.
#[xdp]
pub fn bench_pipe_limit_pad_dependent(ctx: XdpContext) -> u32 {
    limit_padded(&ctx, true, 1).unwrap_or(xdp_action::XDP_PASS)
}

/// The limit, then the production's per-interface verdict counter.
#[xdp]
pub fn bench_pipe_limit_counted(ctx: XdpContext) -> u32 {
    let Ok(action) = limit(&ctx, false) else {
        return xdp_action::XDP_PASS;
    };
    let verdict = if action == xdp_action::XDP_DROP {
        apiban_common::Verdict::Dropped
    } else {
        apiban_common::Verdict::Passed
    };
    crate::count(&ctx, verdict);
    action
}

#[inline(always)]
fn limit_padded(ctx: &XdpContext, dependent: bool, times: u32) -> Result<u32, ()> {
    let (src, _, word) = limit_load(ctx)?;
    let seed = if dependent {
        word
    } else {
        u64::from(u32::from_ne_bytes(src))
    };
    let mut chains = [seed, seed ^ 1, seed ^ 2, seed ^ 3];
    for _ in 0..times {
        chains = pad48(chains);
    }
    let [a, b, c, d] = chains;
    // The verdict depends on both the load and the additions.
    Ok(if word ^ a ^ b ^ c ^ d == u64::MAX {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    })
}

#[inline(always)]
fn pad48([mut a, mut b, mut c, mut d]: [u64; 4]) -> [u64; 4] {
    // SAFETY: register arithmetic only: no memory, no stack. Four chains of twelve, so that
    // the additions' own latency stays short next to a miss.
    unsafe {
        core::arch::asm!(
            ".rept 12",
            "{0} += 1",
            "{1} += 1",
            "{2} += 1",
            "{3} += 1",
            ".endr",
            inout(reg) a,
            inout(reg) b,
            inout(reg) c,
            inout(reg) d,
            options(nomem, nostack, preserves_flags),
        );
    }
    [a, b, c, d]
}
