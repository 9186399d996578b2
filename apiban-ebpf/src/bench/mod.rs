//! The benchmarks' programs: the floor (a bare `XDP_DROP`), the production logic behind a
//! source-address rewrite, and a traffic generator for the veth benchmark. Built only with the
//! `bench` feature.

use core::mem;

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use apiban_common::{
    BENCH_MULTIPLIER, BenchParams, DEFAULT_DENY_V4_ENTRIES, ETH_P_IPV4, TRAFFICGEN_SOURCE_SLOTS,
    TrafficgenParams, host_table,
};
use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, TC_ACT_OK, xdp_action},
    helpers::bpf_redirect,
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{l3_start, load, ptr_at_mut, try_apiban};

mod protos;

#[map]
static BENCH_PARAMS: Array<BenchParams> = Array::with_max_entries(1, 0);
#[map]
static TRAFFICGEN: Array<TrafficgenParams> = Array::with_max_entries(1, 0);
#[map]
static TRAFFICGEN_SOURCES: Array<[u8; 4]> = Array::with_max_entries(TRAFFICGEN_SOURCE_SLOTS, 0);
#[map]
static TRAFFICGEN_NEXT: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Buckets of the default IPv4 host table, whose size the yardsticks' arrays take.
const LIMIT_BUCKETS: u32 = host_table::buckets(DEFAULT_DENY_V4_ENTRIES, host_table::V4_SLOTS);
/// u64 words: 8 per 64-byte bucket of keys, 2 per 16-byte hit count of each slot.
const KEY_WORDS_PER_BUCKET: u32 = 8;
const HIT_WORDS_PER_BUCKET: u32 = host_table::V4_SLOTS * 2;
#[map]
static BENCH_LIMIT_KEYS: Array<u64> =
    Array::with_max_entries(LIMIT_BUCKETS * KEY_WORDS_PER_BUCKET, 0);
// The same, memory-mappable as the production tables are: such arrays are allocated for
// mmap with 4 KiB pages, where others may get huge ones.
#[map]
static BENCH_LIMIT_KEYS_MMAP: Array<u64> =
    Array::with_max_entries(LIMIT_BUCKETS * KEY_WORDS_PER_BUCKET, BPF_F_MMAPABLE);
#[map]
static BENCH_LIMIT_HITS: Array<u64> =
    Array::with_max_entries(LIMIT_BUCKETS * HIT_WORDS_PER_BUCKET, 0);
#[map]
static BENCH_HASH_V4: HashMap<[u8; 4], u64> = HashMap::with_max_entries(DEFAULT_DENY_V4_ENTRIES, 0);
#[map]
static BENCH_LPM_V4: LpmTrie<[u8; 4], u64> = LpmTrie::with_max_entries(DEFAULT_DENY_V4_ENTRIES, 0);

/// Bare `XDP_DROP`: what any XDP program costs on this machine, the benchmarks' floor.
#[xdp]
pub fn bench_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Bare `TC_ACT_OK`: what any classifier costs here, the egress program's floor.
#[classifier]
pub fn bench_tc_floor(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// The production logic, behind a step that rewrites the IPv4 source address on each run.
/// Under `BPF_PROG_TEST_RUN` with `repeat`, the kernel reuses the same buffer for every run,
/// so this walks many distinct keys instead of measuring one hot cache line. The run counter
/// lives in the first four bytes of the destination MAC, which the verdict never reads.
#[xdp]
pub fn bench_cycle(ctx: XdpContext) -> u32 {
    match try_bench_cycle(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn try_bench_cycle(ctx: &XdpContext) -> Result<u32, ()> {
    next_source(ctx)?;
    try_apiban(ctx)
}

/// Rewrites the frame's IPv4 source to the next of the run's sources (see `bench_cycle`).
#[inline(always)]
fn next_source(ctx: &XdpContext) -> Result<(), ()> {
    let params = BENCH_PARAMS.get(0).ok_or(())?;
    let counter: *mut u32 = ptr_at_mut(ctx, 0)?;
    let src: *mut [u8; 4] = ptr_at_mut(ctx, EthHdr::LEN + mem::offset_of!(Ipv4Hdr, src_addr))?;
    // SAFETY: both pointers were bounds-checked against the packet by ptr_at_mut.
    unsafe {
        let i = counter.read_unaligned();
        counter.write_unaligned(i.wrapping_add(1));
        let addr = params
            .base
            .wrapping_add(i & params.mask)
            .wrapping_mul(BENCH_MULTIPLIER);
        src.write_unaligned(addr.to_be_bytes());
    }
    Ok(())
}

/// The yardsticks' and peers' first steps, as the production program takes them: the next
/// source, the Ethernet and IPv4 headers, the source address.
#[inline(always)]
fn parsed_source(ctx: &XdpContext) -> Result<[u8; 4], ()> {
    next_source(ctx)?;
    let (ethertype, offset) = l3_start(ctx)?;
    if ethertype != ETH_P_IPV4 {
        return Err(());
    }
    let ip: Ipv4Hdr = load(ctx, offset)?;
    Ok(ip.src_addr)
}

/// The physical limit of a lookup in a table the host table's size: one random load.
#[xdp]
pub fn bench_limit_1(ctx: XdpContext) -> u32 {
    limit(&ctx, false).unwrap_or(xdp_action::XDP_PASS)
}

/// The same with a second load that depends on the first: a key, then its hit count.
#[xdp]
pub fn bench_limit_2(ctx: XdpContext) -> u32 {
    limit(&ctx, true).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn limit(ctx: &XdpContext, second: bool) -> Result<u32, ()> {
    let (src, bucket, mut word) = limit_load(ctx)?;
    if second {
        // The slot's index comes from the loaded word: a load that cannot start before the
        // first one has finished, as a hit count cannot before its key was found.
        let slot = (word as u32 ^ u32::from_ne_bytes(src)) & (host_table::V4_SLOTS - 1);
        let hits = BENCH_LIMIT_HITS
            .get(bucket * HIT_WORDS_PER_BUCKET + slot * 2)
            .ok_or(())?;
        // SAFETY: as above.
        word ^= unsafe { (hits as *const u64).read_volatile() };
    }
    // The arrays hold zeros: every packet drops, as a banned source's does.
    Ok(if word == u64::MAX {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    })
}

/// The limit's parse and its one random load: the source, its bucket, the loaded word.
#[inline(always)]
fn limit_load(ctx: &XdpContext) -> Result<([u8; 4], u32, u64), ()> {
    let src = parsed_source(ctx)?;
    let bucket = host_table::home(host_table::v4_hash(u32::from_ne_bytes(src)), LIMIT_BUCKETS);
    let word = volatile(
        BENCH_LIMIT_KEYS
            .get(bucket * KEY_WORDS_PER_BUCKET)
            .ok_or(())?,
    );
    Ok((src, bucket, word))
}

/// A peer: hosts in a BPF hash, with a hit count, as xdp-filter keeps them.
#[xdp]
pub fn bench_hash(ctx: XdpContext) -> u32 {
    let Ok(src) = parsed_source(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    hit_or_pass(BENCH_HASH_V4.get_ptr_mut(&src))
}

/// A peer: everything in one LPM trie, with a hit count.
#[xdp]
pub fn bench_lpm(ctx: XdpContext) -> u32 {
    let Ok(src) = parsed_source(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    // The trie hands out shared references; the count is added to atomically all the same,
    // as the production program does with its trie entries.
    hit_or_pass(
        BENCH_LPM_V4
            .get(&Key::new(32, src))
            .map(|v| (v as *const u64).cast_mut()),
    )
}

#[inline(always)]
fn hit_or_pass(hits: Option<*mut u64>) -> u32 {
    match hits {
        Some(hits) => {
            // SAFETY: a pointer from a successful lookup, valid for this run.
            unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(hits, 1) };
            xdp_action::XDP_DROP
        }
        None => xdp_action::XDP_PASS,
    }
}

/// The veth benchmark's traffic generator, run with `BPF_F_TEST_XDP_LIVE_FRAMES`: frames
/// leave through the redirect as XDP frames, so the receiving veth sees them without an skb,
/// as a NIC driver does. Expects an untagged UDP/IPv4 frame with no UDP checksum.
#[xdp]
pub fn bench_trafficgen(ctx: XdpContext) -> u32 {
    match try_trafficgen(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_ABORTED,
    }
}

#[inline(always)]
fn try_trafficgen(ctx: &XdpContext) -> Result<u32, ()> {
    let ifindex = TRAFFICGEN.get(0).ok_or(())?.ifindex;
    let next = TRAFFICGEN_NEXT.get_ptr_mut(0).ok_or(())?;
    // SAFETY: a per-CPU slot, only touched by the CPU running this program.
    let i = unsafe {
        let i = *next;
        *next = i.wrapping_add(1);
        i
    };
    let src = *TRAFFICGEN_SOURCES
        .get(i & (TRAFFICGEN_SOURCE_SLOTS - 1))
        .ok_or(())?;
    let ip: *mut Ipv4Hdr = ptr_at_mut(ctx, EthHdr::LEN)?;
    // SAFETY: the whole header was bounds-checked by ptr_at_mut. Live frames keep what the
    // previous run wrote, so the checksum is updated from whatever source is there now.
    unsafe {
        let old = (*ip).src_addr;
        (*ip).src_addr = src;
        let check = checksum_replace(u16::from_be_bytes((*ip).check), old, src);
        (*ip).check = check.to_be_bytes();
    }
    // SAFETY: a helper call with plain integer arguments.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as u32)
}

/// RFC 1624's incremental update of a ones' complement checksum for a changed 32-bit field.
#[inline(always)]
fn checksum_replace(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let mut sum = u32::from(!check)
        + u32::from(!u16::from_be_bytes([old[0], old[1]]))
        + u32::from(!u16::from_be_bytes([old[2], old[3]]))
        + u32::from(u16::from_be_bytes([new[0], new[1]]))
        + u32::from(u16::from_be_bytes([new[2], new[3]]));
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn volatile(word: &u64) -> u64 {
    // SAFETY: a reference from a successful lookup; volatile so that the load stays.
    unsafe { (word as *const u64).read_volatile() }
}
