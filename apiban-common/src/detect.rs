//! SIP scanner detection in the dataplane. For SIP requests (UDP, or a TCP segment with
//! payload) to a SIP port, from a source that is neither banned nor allowed, the program
//! counts requests per source and method in a bounded LRU map, and sends the agent, through
//! a ring buffer, the first packets of each new source and one in `sample_every` after that,
//! at most `samples_per_sec` in all; a source over the rate threshold of one method
//! within a window is reported once per window. Nothing goes to userspace per packet.

/// Sources tracked at once; the least recently seen go first.
pub const SOURCES: u32 = 65_536;
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
pub const COUNTS: u32 = 2;

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
    /// After those, one packet in this many (0: none).
    pub sample_every: u32,
    /// Samples per second at most, over all sources and CPUs.
    pub samples_per_sec: u32,
    /// Rate reports per second at most.
    pub reports_per_sec: u32,
    /// Requests of each rated method (`METHOD_*`) from one source within a window
    /// that make a rate report (0: that method makes none).
    pub rate_thresholds: [u32; METHODS],
    /// Responses to followed sources the egress program sends, per second at most over all
    /// CPUs (0: none).
    pub responses_per_sec: u32,
    /// The window of `rate_thresholds`.
    pub window_ns: u64,
}

/// One source's requests, in `SIP_SOURCES` (key: the address, IPv4 mapped into IPv6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SipSource {
    pub window_start_ns: u64,
    /// Requests per method in the current window.
    pub requests: [u32; METHODS],
    /// Requests since the source was first seen (sampling counts on this).
    pub seen: u32,
    /// 1 once this window's rate report went out.
    pub reported: u32,
    /// REGISTER and OPTIONS requests since the source was first seen: what extension
    /// enumeration sends, so that the agent can scale what it samples of them.
    pub probes: u32,
    pub _pad: u32,
}

/// A cap per second (see `SAMPLE_BUDGET`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleBudget {
    pub second: u64,
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

const _: () = assert!(core::mem::size_of::<SipSource>() == 40);
const _: () = assert!(core::mem::size_of::<SipSample>() == 1076);
