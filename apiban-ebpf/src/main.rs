//! The apiban XDP program: drops packets whose source address is in a deny LPM trie and not
//! in the matching allow trie, before the kernel allocates anything for them.
//!
//! Policy: a blocklist must never drop what it cannot attribute to a banned source, so every
//! frame that cannot be parsed (truncated, unknown ethertype, ARP, three VLAN tags) passes and
//! is counted.
#![no_std]
#![no_main]
// The BPF target has no atomic RMW on core's Atomic types; the intrinsic lowers to BPF's
// atomic add. The eBPF crate is built with a pinned nightly, so the feature is stable for us.
#![feature(core_intrinsics)]
// An empty asm! hides a length from LLVM (see `copy_len`); asm on BPF is still unstable.
#![feature(asm_experimental_arch)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use apiban_common::{
    AllowEntry, Counter, DEFAULT_ALLOW_V4_ENTRIES, DEFAULT_ALLOW_V6_ENTRIES,
    DEFAULT_DENY_V4_ENTRIES, DEFAULT_DENY_V6_ENTRIES, DataplaneConfig, DenyEntry, ETH_P_IPV4,
    ETH_P_IPV6, HitClock, HostBucketV4, HostBucketV6, HostHits, HostTables, IFACE_COUNTER_SLOTS,
    IFACE_SLOT_INDEXES, OBSERVED, SCOPE_PORT_SLOTS, SampleBudget, VERDICT_COUNT, Verdict,
    block_filter, host_table, kernel_features,
};
use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, xdp_action},
    macros::{map, xdp},
    maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

// Banned single hosts, the bulk of every feed, in open-addressed tables searched inline (see
// `apiban_common::host_table`). Memory-mapped so that the agent writes slots with plain atomic
// stores. Sized by the agent at load time; these are the defaults' sizes.
#[map]
static DENY_V4_HOST_KEYS: Array<HostBucketV4> = Array::with_max_entries(
    host_table::buckets(DEFAULT_DENY_V4_ENTRIES, host_table::V4_SLOTS),
    BPF_F_MMAPABLE,
);
#[map]
static DENY_V4_HOST_HITS: Array<HostHits> = Array::with_max_entries(
    host_table::buckets(DEFAULT_DENY_V4_ENTRIES, host_table::V4_SLOTS) * host_table::V4_SLOTS,
    BPF_F_MMAPABLE,
);
#[map]
static DENY_V6_HOST_KEYS: Array<HostBucketV6> = Array::with_max_entries(
    host_table::buckets(DEFAULT_DENY_V6_ENTRIES, host_table::V6_SLOTS),
    BPF_F_MMAPABLE,
);
#[map]
static DENY_V6_HOST_HITS: Array<HostHits> = Array::with_max_entries(
    host_table::buckets(DEFAULT_DENY_V6_ENTRIES, host_table::V6_SLOTS) * host_table::V6_SLOTS,
    BPF_F_MMAPABLE,
);
#[map]
static HOST_TABLES: Array<HostTables> = Array::with_max_entries(1, 0);
#[map]
pub(crate) static HIT_CLOCK: PerCpuArray<HitClock> = PerCpuArray::with_max_entries(1, 0);
// Banned prefixes shorter than a host. An empty trie answers at its root, so feeds of single
// hosts pay nothing for it.
#[map]
static DENY_V4: LpmTrie<[u8; 4], DenyEntry> = LpmTrie::with_max_entries(DEFAULT_DENY_V4_ENTRIES, 0);
#[map]
static DENY_V6: LpmTrie<[u8; 16], DenyEntry> =
    LpmTrie::with_max_entries(DEFAULT_DENY_V6_ENTRIES, 0);
// Checked before either deny map (see `apiban_common::block_filter`). Memory-mapped so that the
// agent sets and clears bits with plain atomic stores, not a syscall per word.
#[map]
pub(crate) static DENY_V4_FILTER: Array<u64> =
    Array::with_max_entries(block_filter::WORDS, BPF_F_MMAPABLE);
#[map]
static DENY_V6_FILTER: Array<u64> = Array::with_max_entries(block_filter::WORDS, BPF_F_MMAPABLE);
// Checked before either allow trie, so a banned source outside every allowed block is dropped
// without a call into the kernel.
#[map]
static ALLOW_V4_FILTER: Array<u64> = Array::with_max_entries(block_filter::WORDS, BPF_F_MMAPABLE);
#[map]
static ALLOW_V6_FILTER: Array<u64> = Array::with_max_entries(block_filter::WORDS, BPF_F_MMAPABLE);
#[map]
static ALLOW_V4: LpmTrie<[u8; 4], AllowEntry> =
    LpmTrie::with_max_entries(DEFAULT_ALLOW_V4_ENTRIES, 0);
#[map]
static ALLOW_V6: LpmTrie<[u8; 16], AllowEntry> =
    LpmTrie::with_max_entries(DEFAULT_ALLOW_V6_ENTRIES, 0);
#[map]
static VERDICT_STATS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(VERDICT_COUNT * IFACE_COUNTER_SLOTS, 0);
// An array indexed by ifindex rather than a hash: one bounds check on the hot path.
#[map]
static IFACE_SLOTS: Array<u32> = Array::with_max_entries(IFACE_SLOT_INDEXES, 0);

#[map]
pub(crate) static CONFIG: Array<DataplaneConfig> = Array::with_max_entries(1, 0);
#[map]
pub(crate) static SCOPE_PORTS: Array<u8> = Array::with_max_entries(SCOPE_PORT_SLOTS, 0);

// The benchmarks' programs and maps, only in the object `cargo xtask bench` and the tests
// load (feature `bench`): production agents never carry them.
#[cfg(feature = "bench")]
mod bench;
mod capture;
mod detect;
mod egress;
mod hits;
mod packet;

pub(crate) use hits::tick_now_ns;
use hits::{DenyHit, record_hit};
#[cfg(feature = "bench")]
pub(crate) use hits::{hit_sample, write_hit};
#[cfg(feature = "bench")]
use packet::ptr_at_mut;
pub(crate) use packet::{in_port_scope, l3_start, load, ptr_at, v6_in_port_scope};

/// What this kernel lets the program do beyond the drop path (`apiban_common::kernel_features`):
/// the loader overrides it before the verifier reads it as a constant.
#[unsafe(no_mangle)]
static KERNEL_FEATURES: u32 = kernel_features::ALL;

/// Whether the loader found `feature` on this kernel. A volatile read, so that LLVM keeps the
/// load the verifier resolves (and prunes the feature's code on) instead of folding in the
/// object's own value.
#[inline(always)]
pub(crate) fn kernel_has(feature: u32) -> bool {
    // SAFETY: a plain read of a global the program never writes.
    unsafe { core::ptr::read_volatile(&raw const KERNEL_FEATURES) & feature != 0 }
}

#[xdp]
pub fn apiban(ctx: XdpContext) -> u32 {
    match try_apiban(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
pub(crate) fn try_apiban(ctx: &XdpContext) -> Result<u32, ()> {
    let flags = CONFIG.get(0).map_or(0, |c| c.flags);
    let verdict = classify(ctx, flags).unwrap_or(Verdict::Malformed);
    count(ctx, verdict);
    if flags & DataplaneConfig::CAPTURE != 0 {
        capture::offer(ctx, verdict);
    }
    if verdict == Verdict::Passed || verdict == Verdict::Observed {
        // Only sources that are neither banned nor allowed: what no list knows yet, or only
        // lists on trial know.
        let _ = detect::watch(ctx);
    }
    Ok(match verdict {
        Verdict::Dropped => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    })
}

/// `Err` means a header we needed was cut short: the caller counts it as malformed.
#[inline(always)]
pub(crate) fn classify(ctx: &XdpContext, flags: u32) -> Result<Verdict, ()> {
    let (ethertype, offset) = l3_start(ctx)?;
    match ethertype {
        ETH_P_IPV4 => classify_v4(ctx, offset, flags),
        ETH_P_IPV6 => classify_v6(ctx, offset, flags),
        _ => Ok(Verdict::NotIp),
    }
}

#[inline(always)]
fn classify_v4(ctx: &XdpContext, offset: usize, flags: u32) -> Result<Verdict, ()> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, offset)?;
    // SAFETY: the whole fixed header was bounds-checked by ptr_at.
    let (vihl, frags, proto, src) =
        unsafe { ((*ip).vihl, (*ip).frags, (*ip).proto, (*ip).src_addr) };
    let header_len = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN {
        return Err(());
    }
    if flags & DataplaneConfig::SCOPE_PORTS != 0 {
        // Only the first fragment carries the ports. Later fragments of a banned source are
        // dropped whatever their port: SIP over UDP is the traffic that fragments, and a
        // datagram whose first fragment was dropped can never be reassembled anyway.
        let fragment_offset = u16::from_be_bytes(frags) & 0x1fff;
        if fragment_offset == 0 && !in_port_scope(ctx, proto, offset + header_len)? {
            return Ok(Verdict::Passed);
        }
    }
    let bit = block_filter::v4_bit(u32::from_be_bytes(src));
    if !may_match(&DENY_V4_FILTER, bit) {
        return Ok(Verdict::Passed);
    }
    let key = Key::new(32, src);
    let deny = v4_host(u32::from_ne_bytes(src))
        .map(DenyHit::table)
        .or_else(|| DENY_V4.get(&key).map(DenyHit::trie));
    Ok(match deny {
        None => Verdict::Passed,
        // The allowlist is only consulted for banned sources: same verdict as looking it up
        // first, without a second lookup for the clean majority of packets.
        Some(_)
            if flags & DataplaneConfig::ALLOW_V4_LISTED != 0
                && may_match(&ALLOW_V4_FILTER, bit)
                && ALLOW_V4.get(&key).is_some() =>
        {
            debug_event(ctx, flags, Verdict::Allowed, u32::from_be_bytes(src));
            Verdict::Allowed
        }
        Some(entry) => {
            let verdict = enforced(entry.hits, flags);
            record_hit(entry, flags);
            debug_event(ctx, flags, verdict, u32::from_be_bytes(src));
            verdict
        }
    })
}

#[inline(always)]
fn classify_v6(ctx: &XdpContext, offset: usize, flags: u32) -> Result<Verdict, ()> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, offset)?;
    // SAFETY: the whole fixed header was bounds-checked by ptr_at.
    let (vcf0, next_header, src) = unsafe { ((*ip).vcf[0], (*ip).next_hdr, (*ip).src_addr) };
    if vcf0 >> 4 != 6 {
        return Err(());
    }
    if flags & DataplaneConfig::SCOPE_PORTS != 0
        && !v6_in_port_scope(ctx, next_header, offset + Ipv6Hdr::LEN)?
    {
        return Ok(Verdict::Passed);
    }
    let bit = block_filter::v6_block_bit(block_filter::v6_block(&src));
    if !may_match(&DENY_V6_FILTER, bit) {
        return Ok(Verdict::Passed);
    }
    let key = Key::new(128, src);
    let words = [
        u32::from_ne_bytes([src[0], src[1], src[2], src[3]]),
        u32::from_ne_bytes([src[4], src[5], src[6], src[7]]),
        u32::from_ne_bytes([src[8], src[9], src[10], src[11]]),
        u32::from_ne_bytes([src[12], src[13], src[14], src[15]]),
    ];
    let deny = v6_host(&words)
        .map(DenyHit::table)
        .or_else(|| DENY_V6.get(&key).map(DenyHit::trie));
    Ok(match deny {
        None => Verdict::Passed,
        Some(_)
            if flags & DataplaneConfig::ALLOW_V6_LISTED != 0
                && may_match(&ALLOW_V6_FILTER, bit)
                && ALLOW_V6.get(&key).is_some() =>
        {
            Verdict::Allowed
        }
        Some(entry) => {
            let verdict = enforced(entry.hits, flags);
            record_hit(entry, flags);
            verdict
        }
    })
}

/// What a deny entry does to the packet: drop it, unless all its sources only observe.
#[inline(always)]
fn enforced(entry: *mut HostHits, flags: u32) -> Verdict {
    if flags & DataplaneConfig::OBSERVED_LISTED == 0 {
        return Verdict::Dropped;
    }
    // SAFETY: a pointer from a successful map lookup, valid for this run (RCU). One aligned
    // 64-bit load: the agent flips the mark with an atomic operation on the same word.
    let hits = unsafe { (&raw const (*entry).hits).read_volatile() };
    if hits & OBSERVED != 0 {
        Verdict::Observed
    } else {
        Verdict::Dropped
    }
}

/// The hit bookkeeping of a banned IPv4 host, if the host table has it.
#[inline(always)]
pub(crate) fn v4_host(addr: u32) -> Option<*mut HostHits> {
    DENY_V4_HOST_HITS.get_ptr_mut(v4_host_slot(addr)?)
}

/// The slot of a banned IPv4 host in the host table, if the table has it.
#[inline(always)]
pub(crate) fn v4_host_slot(addr: u32) -> Option<u32> {
    let buckets = HOST_TABLES.get(0)?.v4_buckets;
    let mut bucket = host_table::home(host_table::v4_hash(addr), buckets);
    for _ in 0..host_table::PROBE_BUCKETS {
        let keys = DENY_V4_HOST_KEYS.get(bucket)?;
        for slot in 0..host_table::V4_SLOTS {
            // SAFETY: in bounds of the bucket. One 32-bit load: the agent writes each slot with
            // one atomic store, so this sees the old or the new address, never a mix.
            let key = unsafe { (&raw const keys.addrs[slot as usize]).read_volatile() };
            if key == addr {
                return Some(bucket * host_table::V4_SLOTS + slot);
            }
        }
        bucket += 1;
        if bucket >= buckets {
            bucket = 0;
        }
    }
    None
}

/// The hit bookkeeping of a banned IPv6 host, if the host table has it.
#[inline(always)]
fn v6_host(addr: &[u32; 4]) -> Option<*mut HostHits> {
    let buckets = HOST_TABLES.get(0)?.v6_buckets;
    let mut bucket = host_table::home(host_table::v6_hash(addr), buckets);
    for _ in 0..host_table::PROBE_BUCKETS {
        let keys = DENY_V6_HOST_KEYS.get(bucket)?;
        for slot in 0..host_table::V6_SLOTS {
            let key = &keys.addrs[slot as usize];
            // SAFETY: in bounds of the bucket. The first word is read first: the agent
            // publishes a slot by writing it last and frees it by zeroing it first.
            let found = unsafe {
                (&raw const key[0]).read_volatile() == addr[0]
                    && (&raw const key[1]).read_volatile() == addr[1]
                    && (&raw const key[2]).read_volatile() == addr[2]
                    && (&raw const key[3]).read_volatile() == addr[3]
            };
            if found {
                return DENY_V6_HOST_HITS.get_ptr_mut(bucket * host_table::V6_SLOTS + slot);
            }
        }
        bucket += 1;
        if bucket >= buckets {
            bucket = 0;
        }
    }
    None
}

/// False only when no entry of the filter's list covers the source's block. A word the lookup
/// cannot find (it always can: the index is below the map's size) sends the packet to the full
/// lookup.
#[inline(always)]
pub(crate) fn may_match(filter: &Array<u64>, bit: u32) -> bool {
    filter
        .get(bit >> 6)
        .is_none_or(|word| word & (1 << (bit & 63)) != 0)
}

/// `len` as a length `bpf_xdp_load_bytes` may copy into a buffer of `max` bytes: `None` for
/// nothing to copy, else a value the verifier can prove is in `1..=max`. LLVM folds a plain
/// `len > 0` into `len != 0`, which verifiers before 6.8 do not narrow to a lower bound (Debian
/// 12's 6.1 refuses the copy then), so the test is a signed one on a value LLVM cannot see
/// through.
#[inline(always)]
pub(crate) fn copy_len(len: u64, max: u64) -> Option<u32> {
    let mut len = len;
    // SAFETY: a register moved onto itself: no memory, no stack. One real instruction, not an
    // empty template: 6.1's verifier refuses two line_info records at one offset.
    unsafe {
        core::arch::asm!("{0} = {0}", inout(reg) len, options(nomem, nostack, preserves_flags));
    }
    if (len as i64) < 1 {
        return None;
    }
    if len > max {
        len = max;
    }
    Some(len as u32)
}

/// Takes one from a per-second cap shared by every CPU. Read, then add: the object is built
/// for BPF's first instruction set, whose atomic add returns nothing, so CPUs racing at the
/// cap or at a new second may take a few more than the cap; it bounds a flood all the same.
#[inline(always)]
pub(crate) fn take_budget(budget: *mut SampleBudget, cap: u32, now: u64) -> bool {
    if cap == 0 {
        return false;
    }
    // SAFETY: a pointer into an array map's slot, valid for the program's life; `used` is
    // added to atomically, `until` is a plain store where the last writer wins.
    unsafe {
        if now >= (&raw const (*budget).until).read_volatile() {
            (*budget).until = now + 1_000_000_000;
            (*budget).used = 0;
        }
        if (&raw const (*budget).used).read_volatile() >= u64::from(cap) {
            return false;
        }
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*budget).used, 1);
    }
    true
}

#[inline(always)]
pub(crate) fn count(ctx: &XdpContext, verdict: Verdict) {
    let ifindex = ctx.ingress_ifindex() as u32;
    let slot = IFACE_SLOTS
        .get(ifindex)
        .copied()
        .filter(|s| *s < IFACE_COUNTER_SLOTS)
        .unwrap_or(0);
    if let Some(counter) = VERDICT_STATS.get_ptr_mut(slot * VERDICT_COUNT + verdict as u32) {
        let bytes = (ctx.data_end() - ctx.data()) as u64;
        // SAFETY: a per-CPU slot is only ever touched by the CPU running this program.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}

#[inline(always)]
fn debug_event(ctx: &XdpContext, flags: u32, verdict: Verdict, src: u32) {
    if flags & DataplaneConfig::DEBUG_EVENTS != 0 {
        debug!(ctx, "{} {:i}", verdict.name(), src);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
