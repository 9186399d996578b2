//! Types and constants shared by the XDP program (`apiban-ebpf`) and the agent (`apiban-user`).
//!
//! Everything here is `#[repr(C)]` plain data: the same bytes are written by one side and read
//! by the other through BPF maps, so layouts must never depend on the compiler.
#![no_std]

mod names;
pub use names::{map_names, program_names};

/// What the kernel lets the XDP program do beyond the drop path. The loader sets the
/// program's [`kernel_features::GLOBAL`] from its probes before the verifier sees it; the
/// verifier reads a frozen read-only global as a constant and never looks at the code of a
/// feature that is off, so one object loads on every kernel from 5.10 and a helper the
/// kernel lacks is never called.
pub mod kernel_features {
    /// The name of the program's `u32` global.
    pub const GLOBAL: &str = "KERNEL_FEATURES";
    /// `bpf_xdp_load_bytes` (Linux 5.18): detection's samples and captures copy packets.
    pub const PAYLOAD_COPY: u32 = 1;
    /// Everything: the object's own value, for loaders that probe nothing (tests, benches).
    pub const ALL: u32 = PAYLOAD_COPY;
}

/// Capacity defaults. The tries (deny prefixes, allow) allocate entries on use. The host tables
/// are arrays, allocated whole when created: 20 bytes per IPv4 and 32 per IPv6 slot, with 1.25
/// slots per entry of capacity (see [`host_table::buckets`]). The deny capacities bound the host
/// tables and the prefix tries each.
pub const DEFAULT_DENY_V4_ENTRIES: u32 = 1_048_576;
pub const DEFAULT_DENY_V6_ENTRIES: u32 = 262_144;
pub const DEFAULT_ALLOW_V4_ENTRIES: u32 = 65_536;
pub const DEFAULT_ALLOW_V6_ENTRIES: u32 = 16_384;

/// The block filters: a bitmap in front of a list's maps, in which a bit is set while some entry
/// of the list covers part of its address block. A clear bit proves the source is not in the
/// list, so one array load, which the verifier inlines, replaces a lookup that is a call into
/// the kernel. In front of the deny maps it answers the clean majority of packets; in front of
/// the allow trie it answers most banned ones (allowlists are short).
///
/// IPv4 blocks are /24s, indexed directly. IPv6 blocks are /48s, hashed to the same number of
/// bits. A prefix shorter than a block sets every block it spans, up to
/// [`block_filter::V4_MAX_SPAN_BITS`] / [`block_filter::V6_MAX_SPAN_BITS`] of them; a wider one
/// sets the whole bitmap while it is listed.
///
/// Userspace sets the bits before inserting an entry and clears them after removing the last
/// entry in the block, so the program never sees an entry without its bit.
pub mod block_filter {
    /// Bits per family: 2^24, 2 MiB.
    pub const BITS_LOG2: u32 = 24;
    /// 64-bit words in each filter map.
    pub const WORDS: u32 = 1 << (BITS_LOG2 - 6);
    /// IPv4 block size: a /24 per bit.
    pub const V4_BLOCK_PREFIX: u32 = 24;
    /// IPv6 block size: a /48 per (hashed) bit.
    pub const V6_BLOCK_PREFIX: u32 = 48;
    /// IPv4 prefixes down to /16 set up to 2^8 bits; shorter ones saturate the filter.
    pub const V4_MAX_SPAN_BITS: u32 = 8;
    /// IPv6 prefixes down to /32 set up to 2^16 bits; shorter ones saturate the filter.
    pub const V6_MAX_SPAN_BITS: u32 = 16;
    const V6_HASH_MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

    /// The bit of an IPv4 address (host order): its /24.
    #[inline(always)]
    pub const fn v4_bit(addr: u32) -> u32 {
        addr >> (32 - V4_BLOCK_PREFIX)
    }

    /// The bit of an IPv6 /48, given as its 48 bits: a multiplicative hash spreads the few
    /// blocks in use over the whole bitmap.
    #[inline(always)]
    pub const fn v6_block_bit(block: u64) -> u32 {
        (block.wrapping_mul(V6_HASH_MULTIPLIER) >> (64 - BITS_LOG2)) as u32
    }

    /// The /48 an IPv6 address is in, as 48 bits.
    #[inline(always)]
    pub const fn v6_block(addr: &[u8; 16]) -> u64 {
        u64::from_be_bytes([0, 0, addr[0], addr[1], addr[2], addr[3], addr[4], addr[5]])
    }
}

/// Banned single hosts, the bulk of every feed, in open-addressed hash tables that the XDP
/// program searches itself: each bucket is one 64-byte array element (16 IPv4 or 4 IPv6
/// addresses), and the verifier inlines array lookups, so finding a host costs a few loads and
/// compares and no call into the kernel, where a BPF hash map costs a call, a jhash and a bucket
/// walk.
///
/// An address lives in one of [`host_table::PROBE_BUCKETS`] buckets from its home bucket. The
/// agent puts an address that finds them all full in the deny trie as a full-length prefix
/// instead, where the program finds it after a table miss; so the table never has to be larger
/// than its sizing.
///
/// An empty slot holds zero (for IPv6: a first word of zero). Addresses with a first word of
/// zero (0.0.0.0, ::/32) go to the trie. The agent writes slots through a memory mapping,
/// one atomic word at a time, so the program never sees a torn IPv4 slot; an IPv6 slot is
/// published by writing its first word last, and freed by zeroing its first word.
///
/// Hit counts live in a second array indexed by slot (`bucket * slots + slot`), so lookups of
/// other addresses in a bucket do not share a cache line that hits keep writing.
pub mod host_table {
    /// IPv4 addresses per bucket: one cache line.
    pub const V4_SLOTS: u32 = 16;
    /// IPv6 addresses per bucket: one cache line.
    pub const V6_SLOTS: u32 = 4;
    /// Buckets an address may live in, from its home bucket on (wrapping at the end).
    pub const PROBE_BUCKETS: u32 = 4;

    /// Buckets for a capacity: room for 1.25 slots per entry, so a full table is 80% used.
    pub const fn buckets(capacity: u32, slots: u32) -> u32 {
        let wanted = (capacity as u64 * 5).div_ceil(4 * slots as u64);
        if wanted < PROBE_BUCKETS as u64 {
            PROBE_BUCKETS
        } else if wanted > u32::MAX as u64 / V4_SLOTS as u64 {
            u32::MAX / V4_SLOTS
        } else {
            wanted as u32
        }
    }

    /// The home bucket of a hash: its high bits scaled to the bucket count, so that any count
    /// works, not only powers of two.
    #[inline(always)]
    pub const fn home(hash: u32, buckets: u32) -> u32 {
        ((hash as u64 * buckets as u64) >> 32) as u32
    }

    /// MurmurHash3's finaliser: every input bit reaches every output bit, so addresses that
    /// differ only in their low octet (neighbours in a scanner's /24) land in unrelated buckets.
    #[inline(always)]
    pub const fn mix32(mut h: u32) -> u32 {
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }

    /// The hash of an IPv4 address as the packet carries it (network order, loaded natively).
    #[inline(always)]
    pub const fn v4_hash(addr: u32) -> u32 {
        mix32(addr)
    }

    /// The hash of an IPv6 address as four words loaded natively from the packet.
    #[inline(always)]
    pub const fn v6_hash(addr: &[u32; 4]) -> u32 {
        mix32(addr[0] ^ mix32(addr[1] ^ mix32(addr[2] ^ mix32(addr[3]))))
    }
}

/// A bucket of the IPv4 host table (see [`host_table`]): addresses in network order, zero free.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostBucketV4 {
    pub addrs: [u32; host_table::V4_SLOTS as usize],
}

/// A bucket of the IPv6 host table: four addresses, each as four words in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostBucketV6 {
    pub addrs: [[u32; 4]; host_table::V6_SLOTS as usize],
}

/// Hit bookkeeping of one host-table slot; see [`DenyEntry`] for the clock.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostHits {
    /// The hit count, and in bit 63 [`OBSERVED`]. The mark shares the word the program adds
    /// to on every hit, so checking it costs no cache line the drop does not touch anyway;
    /// a count cannot reach bit 63.
    pub hits: u64,
    pub last_hit_ns: u64,
}

/// Bit 63 of a deny entry's `hits` (host slot or trie value): every source of the entry is in
/// observe mode, so a packet that matches it passes, counted as [`Verdict::Observed`]. The
/// agent sets it before it publishes the entry and flips it with one atomic operation, so a
/// source switched between observe and enforce never leaves a gap.
pub const OBSERVED: u64 = 1 << 63;

/// The hit count of a `hits` word, without the [`OBSERVED`] mark.
#[inline(always)]
pub const fn hit_count(hits: u64) -> u64 {
    hits & !OBSERVED
}

/// The geometry of both host tables, in the single slot of the `HOST_TABLES` array. The agent
/// writes it from the tables' real sizes every time it loads the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostTables {
    pub v4_buckets: u32,
    pub v6_buckets: u32,
}

/// A per-CPU clock for last-hit times, and the pace of this CPU's hits. `bpf_jiffies64` is
/// inlined by the verifier where `bpf_ktime_get_ns` is a call, and a hit time needs no more
/// than a tick's precision, so the program reads the clock once per tick per CPU and reuses
/// it for every hit until jiffies move on. (`bpf_ktime_get_coarse_ns` would do the same, but
/// it came in Linux 5.11, and the drop path runs from 5.10.)
///
/// Hit bookkeeping writes the entry's count and time, a line of its own that a cache-cold
/// drop would otherwise have to fetch and dirty on every packet. So a CPU records every hit
/// up to [`EXACT_HITS_PER_TICK`] in a tick; past that (a flood) it records one hit in
/// [`SAMPLED_HIT_EVERY`], adding that many: counts stay exact at the rates a person reads
/// one by one, and within a sample of the truth under a flood.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HitClock {
    pub jiffies: u64,
    /// CLOCK_MONOTONIC at this CPU's first hit in this tick.
    pub tick_ns: u64,
    /// Hits on this CPU in this tick.
    pub hits: u32,
    /// Hits left until the next sampled one.
    pub countdown: u32,
}

/// Hits per CPU per tick (4 ms at HZ=250) that are all recorded: 64,000 a second per CPU.
pub const EXACT_HITS_PER_TICK: u32 = 256;
/// Past that, one hit in this many is recorded, counting for all of them.
pub const SAMPLED_HIT_EVERY: u32 = 16;

/// Interfaces are numbered by ifindex up to this bound for per-interface counters; a larger
/// ifindex counts in slot 0 with every interface that has no slot.
pub const IFACE_SLOT_INDEXES: u32 = 65_536;
/// Counter slots: slot 0 is "other", slots 1.. are the interfaces the agent attached to.
pub const IFACE_COUNTER_SLOTS: u32 = 16;

/// One slot per destination port: a byte array is a single inlined array lookup on the hot path.
pub const SCOPE_PORT_SLOTS: u32 = 65_536;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_DSTOPTS: u8 = 60;

/// What the XDP program decided about a packet. Its counter in `STATS` is at
/// `slot * VERDICT_COUNT + verdict`, where `slot` is the interface's counter slot.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// From a banned source (and, in port scope, to a scoped port): XDP_DROP.
    Dropped = 0,
    /// From a banned source that the allowlist covers: passed. Counts what the allowlist saved.
    Allowed = 1,
    /// IP from a source that is not banned, or out of scope: passed.
    Passed = 2,
    /// Not IPv4/IPv6 (ARP, LLDP, more than two VLAN tags, ...): passed.
    NotIp = 3,
    /// IP but truncated or inconsistent headers: passed, since the source cannot be trusted.
    Malformed = 4,
    /// From a source only sources in observe mode ban: passed, counted as what would have
    /// been dropped.
    Observed = 5,
}

pub const VERDICT_COUNT: u32 = 6;

impl Verdict {
    pub const ALL: [Verdict; VERDICT_COUNT as usize] = [
        Verdict::Dropped,
        Verdict::Allowed,
        Verdict::Passed,
        Verdict::NotIp,
        Verdict::Malformed,
        Verdict::Observed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Dropped => "dropped",
            Verdict::Allowed => "allowed",
            Verdict::Passed => "passed",
            Verdict::NotIp => "not_ip",
            Verdict::Malformed => "malformed",
            Verdict::Observed => "observed",
        }
    }
}

/// Per-CPU packet and byte counter for one verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// The value of a deny entry: how often the banned prefix was hit and when last.
///
/// `last_hit_ns` is CLOCK_MONOTONIC in nanoseconds to a tick's precision (see `HitClock`); zero means never hit. `prefix_len` repeats the key's prefix length: an LPM
/// lookup does not say which prefix matched, the value does, so userspace answers "which entry
/// covers this address" and "is this exact prefix present" with one lookup each.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyEntry {
    /// The hit count, with the [`OBSERVED`] mark in bit 63 (see [`HostHits`]).
    pub hits: u64,
    pub last_hit_ns: u64,
    pub prefix_len: u32,
    pub _reserved: u32,
}

/// The value of an allow entry. The allowlist carries no hit bookkeeping: the `Allowed`
/// verdict counter says how often it saved a packet. See [`DenyEntry`] for `prefix_len`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowEntry {
    pub prefix_len: u32,
}

/// Runtime switches of the XDP program, in the single slot of the `CONFIG` array.
/// A map rather than load-time globals, so a restarted agent can change them on the pinned,
/// running program without reloading it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataplaneConfig {
    pub flags: u32,
    pub _reserved: u32,
}

impl DataplaneConfig {
    /// Drop only packets to the destination ports marked in `SCOPE_PORTS` (TCP/UDP).
    pub const SCOPE_PORTS: u32 = 1 << 0;
    /// Do not record per-entry hit counts and last-hit time (saves an atomic per drop).
    pub const NO_HIT_TRACKING: u32 = 1 << 1;
    /// Emit an aya-log event for each drop and allowlist match. Debug only: costly under load.
    pub const DEBUG_EVENTS: u32 = 1 << 2;
    /// The IPv4 (IPv6) allowlist has entries. While it has none, a banned source drops without
    /// touching the allow filter. Set before the first entry goes in, cleared after the last
    /// one is gone.
    pub const ALLOW_V4_LISTED: u32 = 1 << 3;
    pub const ALLOW_V6_LISTED: u32 = 1 << 4;
    /// Some deny entry carries the [`OBSERVED`] mark. While none does, a drop does not read
    /// the mark; set before the first marked entry goes in, cleared after the last is gone.
    pub const OBSERVED_LISTED: u32 = 1 << 5;
    /// A capture runs (`apiban capture`): packets whose verdict it asks for are copied to the
    /// agent. Off, capturing costs nothing but the test of this bit in a word already loaded.
    pub const CAPTURE: u32 = 1 << 6;
}

/// Parameters of the `bench_cycle` program: source address of run `i` is
/// `(base + (i & mask)).wrapping_mul(BENCH_MULTIPLIER)`, big-endian. The multiplier is odd, so
/// the mapping is a bijection and spreads keys over the whole address space like real attackers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BenchParams {
    pub base: u32,
    pub mask: u32,
}

pub const BENCH_MULTIPLIER: u32 = 0x9E37_79B1;

/// Parameters of the `bench_trafficgen` program, which the veth benchmark runs under
/// `BPF_PROG_TEST_RUN` with live frames: each frame gets the next source address from
/// `TRAFFICGEN_SOURCES` (cycling) and is redirected out of interface `ifindex`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficgenParams {
    pub ifindex: u32,
    pub _reserved: u32,
}

/// Source addresses the traffic generator cycles through (a power of two).
pub const TRAFFICGEN_SOURCE_SLOTS: u32 = 4_096;

/// The IPv4 address the benchmark program uses for index `i` (host order).
pub const fn bench_address(base: u32, mask: u32, i: u32) -> u32 {
    base.wrapping_add(i & mask).wrapping_mul(BENCH_MULTIPLIER)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;

    /// Marks map key and value types as plain old data for aya.
    macro_rules! pod {
        ($($t:ty),* $(,)?) => {$(
            // SAFETY: every type listed is repr(C), holds only integers and arrays of
            // integers, and has no padding (each is laid out to a multiple of its alignment
            // by hand, and the eBPF side reads the same layout).
            unsafe impl aya::Pod for $t {}
        )*};
    }

    pod!(
        Counter,
        DenyEntry,
        AllowEntry,
        DataplaneConfig,
        BenchParams,
        TrafficgenParams,
        HostBucketV4,
        HostBucketV6,
        HostHits,
        HostTables,
        HitClock,
        DetectConfig,
        SipSource,
        SampleBudget,
        SipSample,
        CaptureConfig,
        CaptureBudget,
        CaptureRecord,
    );
}

pub mod detect;
pub use detect::{DetectConfig, SampleBudget, SipSample, SipSource};

/// `apiban capture`: while [`DataplaneConfig::CAPTURE`] is set, the program copies the first
/// `snaplen` bytes of each packet whose verdict is in `verdicts` into a ring buffer, at most
/// `per_sec` a second over all CPUs, with the time it saw it.
pub mod capture {
    /// Bytes of a frame a record holds at most: a full Ethernet frame with two VLAN tags.
    pub const SNAPLEN: usize = 1536;
    /// The ring buffer's size: room for about 650 records between two reads.
    pub const RING_BYTES: u32 = 1 << 20;
    /// The highest cap an operator may ask for.
    pub const MAX_PER_SEC: u32 = 100_000;
}

/// What a capture wants; all zero captures nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Bit `v` set: capture packets with verdict `v` ([`Verdict`] as u32).
    pub verdicts: u32,
    /// Bytes copied of each frame, at most [`capture::SNAPLEN`].
    pub snaplen: u32,
    /// Records per second at most, over all CPUs.
    pub per_sec: u32,
    pub _pad: u32,
}

/// The capture's cap per second and what it could not send.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureBudget {
    pub window: SampleBudget,
    /// Packets that matched past the cap.
    pub over_cap: u64,
    /// Packets the ring buffer had no room for (the agent fell behind).
    pub lost: u64,
}

/// A captured packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureRecord {
    /// `bpf_ktime_get_ns` when the program saw it (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub ifindex: u32,
    /// The frame's length on the wire.
    pub len: u32,
    /// Bytes of `data` that hold the frame's start.
    pub captured: u32,
    /// The [`Verdict`] as u32.
    pub verdict: u32,
    pub data: [u8; capture::SNAPLEN],
}

impl CaptureRecord {
    /// An empty record, for userspace tests and parsing.
    pub const fn zeroed() -> Self {
        Self {
            ts_ns: 0,
            ifindex: 0,
            len: 0,
            captured: 0,
            verdict: 0,
            data: [0; capture::SNAPLEN],
        }
    }
}

const _: () = assert!(core::mem::size_of::<CaptureRecord>() == 24 + capture::SNAPLEN);
