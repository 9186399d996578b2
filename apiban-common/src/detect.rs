//! SIP scanner detection in the dataplane. For SIP requests (UDP, or a TCP segment with
//! payload) to a SIP port, from a source that is neither banned nor allowed, the program
//! counts requests per source and method in a fixed table (`SIP_SOURCES`, see
//! [`SOURCES`]), and sends the agent, through a ring buffer, the first packets of each
//! new source and one in `sample_every` after that, at most `samples_per_sec` in all; a
//! source over the rate threshold of one method within a window is reported once per
//! window. Nothing goes to userspace per packet.

/// Slots of `SIP_SOURCES`: a fixed array of buckets of `WAYS` slots, a bucket per source
/// address by a keyed hash ([`source_hash`]). A fixed table rather than an LRU hash: under
/// a flood from spoofed sources every packet is a new source, and an LRU insert with
/// eviction per packet made detection the bottleneck. A slot is 32 bytes, so a bucket is one
/// cache line. A newcomer takes a way that is free, idle this window, or seen once; a busier
/// way only with a chance of one in its requests, so a flood of one-packet sources cannot
/// wipe the counts of the sources that matter (see `apiban-ebpf/src/detect.rs`).
pub const SOURCES: u32 = WAYS << BUCKET_BITS;
pub const WAYS: u32 = 2;
pub const BUCKET_BITS: u32 = 15;

/// A source's hash under `seed` (`DetectConfig::hash_seed`, random per agent, so that no one
/// can pick addresses that share a bucket with someone else's). `addr` is as
/// [`address_words`] gives it. The hash is also the slot's tag: for IPv4 sources (one fixed
/// first word) it is a bijection of the address, so no two share one.
#[inline(always)]
pub const fn source_hash(addr: &[u64; 2], seed: u64) -> u64 {
    ((addr[0] ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ addr[1])
        .wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
}

/// The first of the `WAYS` slots of the bucket of a source with `hash`.
#[inline(always)]
pub const fn bucket_slot(hash: u64) -> u32 {
    ((hash >> (64 - BUCKET_BITS)) as u32) * WAYS
}

/// `SipSource::window_start`'s unit: 2^20 ns, about a millisecond.
pub const TICK_SHIFT: u32 = 20;

/// The most requests of one method a window can count (16 bits a count): a rate threshold
/// above it could never be reached.
pub const MAX_THRESHOLD: u32 = u16::MAX as u32;

/// A source address as `SIP_SOURCES` keys it: its 16 bytes (IPv4 mapped into IPv6) as two
/// native-endian words.
#[inline(always)]
pub const fn address_words(addr: &[u8; 16]) -> [u64; 2] {
    [
        u64::from_ne_bytes([
            addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
        ]),
        u64::from_ne_bytes([
            addr[8], addr[9], addr[10], addr[11], addr[12], addr[13], addr[14], addr[15],
        ]),
    ]
}
/// Bytes of SIP payload a sample carries at most: a REGISTER answering a challenge is
/// 500-800 bytes, and svcrack puts its Authorization after Content-Length, the last
/// header, which 512 bytes cut off.
pub const SNAPLEN: usize = 1024;
/// The ring buffer's size: room for about 950 samples between two reads.
pub const RING_BYTES: u32 = 1 << 20;

/// Requests counted apart, per source and window, against a rate threshold each: the
/// ones that open a transaction outside a dialog, which is what a flood or a scan sends.
/// `METHOD_OTHER` is SUBSCRIBE, MESSAGE, PUBLISH and REFER.
pub const METHOD_REGISTER: u8 = 0;
pub const METHOD_INVITE: u8 = 1;
pub const METHOD_OPTIONS: u8 = 2;
pub const METHOD_OTHER: u8 = 3;
pub const METHODS: usize = 4;
pub const METHOD_NAMES: [&str; METHODS] = ["REGISTER", "INVITE", "OPTIONS", "other"];
/// Requests inside a call or a subscription (ACK, BYE, CANCEL, PRACK, UPDATE, INFO,
/// NOTIFY): a busy trunk sends them at its call rate, so they are sampled but never
/// counted against a rate.
pub const METHOD_IN_DIALOG: u8 = 4;
/// A payload that starts with no method we know: sampled so that the agent can count
/// and show it, never counted against a rate. What cannot be read is no reason to ban.
pub const METHOD_UNKNOWN: u8 = 5;

/// What a ring buffer record is.
pub const KIND_SAMPLE: u8 = 1;
/// The source went over a rate threshold in this window (no payload).
pub const KIND_RATE: u8 = 2;
/// A response the server sent to a followed source, seen by the egress program: `src`
/// is the source it went to, `dst_port` the server's port it left from.
pub const KIND_RESPONSE: u8 = 3;

/// Budget slots in `SAMPLE_BUDGET`: samples and rate reports have separate caps, so a
/// flood of samples cannot hide a rate report.
pub const BUDGET_SAMPLES: u32 = 0;
pub const BUDGET_REPORTS: u32 = 1;
pub const BUDGET_RESPONSES: u32 = 2;
pub const BUDGETS: u32 = 3;

/// `SIP_PORTS` values: a port whose payload is SIP in the clear, or SIP over TLS, whose
/// records are counted and never read (they are ciphertext to anyone but the server).
pub const PORT_SIP: u8 = 1;
pub const PORT_TLS: u8 = 2;

/// Slots of `DETECT_COUNTS` (per CPU): what detection passes over, counted so that
/// `status` and /metrics can show it.
/// Keep-alives: CRLF (RFC 5626 §3.5.1) and STUN binding requests.
pub const COUNT_KEEPALIVES: u32 = 0;
/// Packets to a TLS port, counted and not parsed.
pub const COUNT_TLS: u32 = 1;
/// Requests from a source that found no slot in `SIP_SOURCES`: sampled within the cap,
/// not counted against a rate, their answers not followed.
pub const COUNT_UNTRACKED: u32 = 2;
pub const COUNTS: u32 = 3;

/// What the first four bytes of a payload are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// A request, with its `METHOD_*`.
    Request(u8),
    /// A response (`SIP/`), which a scanner's target sends, not the scanner.
    Response,
    /// CRLF keep-alive or STUN: a phone behind NAT keeping its binding open.
    KeepAlive,
}

/// The kind of a payload from its first four bytes (`head`, zero-padded when the payload
/// is shorter: a keep-alive can be two bytes, and some NATed phones send empty
/// datagrams). STUN's binding requests and answers start with 0x00 or 0x01 (RFC 5389
/// §6); no SIP message starts with either, nor with CR or LF.
#[inline(always)]
pub const fn classify(head: [u8; 4]) -> Payload {
    if head[0] == b'\r' || head[0] == b'\n' || head[0] <= 0x01 {
        return Payload::KeepAlive;
    }
    Payload::Request(match &head {
        b"REGI" => METHOD_REGISTER,
        b"INVI" => METHOD_INVITE,
        b"OPTI" => METHOD_OPTIONS,
        b"SUBS" | b"MESS" | b"PUBL" | b"REFE" => METHOD_OTHER,
        b"ACK " | b"BYE " | b"CANC" | b"PRAC" | b"UPDA" | b"INFO" | b"NOTI" => METHOD_IN_DIALOG,
        b"SIP/" => return Payload::Response,
        _ => METHOD_UNKNOWN,
    })
}

/// Whether `method` is counted against a rate threshold (and indexes `requests`).
#[inline(always)]
pub const fn rated(method: u8) -> bool {
    (method as usize) < METHODS
}

/// The detection settings the agent writes; all zero (the default) means off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DetectConfig {
    /// 1: detection on.
    pub enabled: u32,
    /// Packets of a new source that are all sampled.
    pub first_samples: u32,
    /// After those, one packet in this many (0: none); a power of two.
    pub sample_every: u32,
    /// Samples per second at most, over all sources and CPUs.
    pub samples_per_sec: u32,
    /// Rate reports per second at most.
    pub reports_per_sec: u32,
    /// Requests of each rated method (`METHOD_*`) from one source within a window
    /// that make a rate report (0: that method makes none); at most [`MAX_THRESHOLD`].
    pub rate_thresholds: [u32; METHODS],
    /// Responses to followed sources the egress program sends, per second at most over all
    /// CPUs (0: none).
    pub responses_per_sec: u32,
    /// The window of `rate_thresholds`.
    pub window_ns: u64,
    /// The key of [`source_hash`].
    pub hash_seed: u64,
}

/// One slot of `SIP_SOURCES`: a source's requests, in 32 bytes (two to a cache line).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SipSource {
    /// The source's [`source_hash`]; 0 in a slot never taken.
    pub tag: u64,
    /// When the current window started, in ticks of 2^[`TICK_SHIFT`] ns (wrapping).
    pub window_start: u32,
    /// Requests of any kind in the current window: what a newcomer must outweigh to take
    /// the slot.
    pub hits: u16,
    /// Requests since the slot was taken (wrapping; sampling counts on this).
    pub seen: u16,
    /// Requests per method in the current window, saturating. A rate report goes when one
    /// reaches its threshold, so once a window.
    pub requests: [u16; METHODS],
    /// REGISTER and OPTIONS requests since the slot was taken (wrapping): what extension
    /// enumeration sends, so that the agent can scale what it samples of them.
    pub probes: u16,
    pub _pad: [u16; 3],
}

/// A cap per second (see `SAMPLE_BUDGET`): `used` of it since `until - 1 s`. An end time
/// rather than a second number: no division on the packet path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleBudget {
    pub until: u64,
    pub used: u64,
}

/// A ring buffer record: a sample of a request, or a rate report.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SipSample {
    /// `KIND_*`.
    pub kind: u8,
    /// 4 or 6.
    pub family: u8,
    /// IPPROTO_UDP or IPPROTO_TCP.
    pub proto: u8,
    /// `METHOD_*` of this request.
    pub method: u8,
    pub dst_port: u16,
    /// Bytes of `payload` that hold data.
    pub captured: u16,
    /// The source, IPv4 mapped into IPv6 (`::ffff:a.b.c.d`).
    pub src: [u8; 16],
    /// The source's counts when this was sent.
    pub requests: [u32; METHODS],
    pub seen: u32,
    pub probes: u32,
    pub ifindex: u32,
    pub payload: [u8; SNAPLEN],
}

impl SipSample {
    /// An empty record, for userspace tests and parsing.
    pub const fn zeroed() -> Self {
        Self {
            kind: 0,
            family: 0,
            proto: 0,
            method: 0,
            dst_port: 0,
            captured: 0,
            src: [0; 16],
            requests: [0; METHODS],
            seen: 0,
            probes: 0,
            ifindex: 0,
            payload: [0; SNAPLEN],
        }
    }
}

const _: () = assert!(core::mem::size_of::<SipSource>() == 32);
const _: () = assert!(core::mem::size_of::<SipSample>() == 1076);
