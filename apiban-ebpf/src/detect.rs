//! SIP scanner detection (see `apiban_common::detect`): for requests to a SIP port from
//! sources the verdict passed, counts per source and method, and samples to the agent.
//! Runs only after the verdict, so the drop path of banned sources does not change.
//! Keep-alives and packets to a TLS port are only counted: what cannot be read as a request
//! must never become a reason to ban.

use core::ffi::c_void;

use apiban_common::{
    DetectConfig, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, SCOPE_PORT_SLOTS, SampleBudget,
    SipSample, SipSource,
    detect::{self, Payload},
    kernel_features,
};
use aya_ebpf::{
    helpers::bpf_get_prandom_u32,
    helpers::generated::bpf_xdp_load_bytes,
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
    programs::XdpContext,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{l3_start, load, ptr_at, tick_now_ns};

// Shared with the egress program (`crate::egress`), which reads the same settings, ports and
// sources and sends into the same ring buffer.
#[map]
pub(crate) static DETECT_CONFIG: Array<DetectConfig> = Array::with_max_entries(1, 0);
#[map]
pub(crate) static SIP_PORTS: Array<u8> = Array::with_max_entries(SCOPE_PORT_SLOTS, 0);
#[map]
pub(crate) static SIP_SOURCES: Array<SipSource> = Array::with_max_entries(detect::SOURCES, 0);
#[map]
pub(crate) static SIP_SAMPLES: RingBuf = RingBuf::with_byte_size(detect::RING_BYTES, 0);
#[map]
static SAMPLE_BUDGET: Array<SampleBudget> = Array::with_max_entries(detect::BUDGETS, 0);
#[map]
static DETECT_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(detect::COUNTS, 0);

/// A request's place in the frame.
struct Request {
    /// The source, as `detect::address_words` gives it.
    src: [u64; 2],
    family: u8,
    proto: u8,
    dst_port: u16,
    /// `detect::PORT_*` of the destination port.
    port: u8,
    /// Offset of the SIP payload.
    payload: usize,
    /// Its length, from the IP header's: an Ethernet frame's padding is not payload.
    len: usize,
}

/// Looks at a passed packet; any error only means it is not a SIP request we can read.
#[inline(always)]
pub fn watch(ctx: &XdpContext) -> Result<(), ()> {
    // Without a sample's copy there is nothing to detect from (the agent says so at start).
    if !crate::kernel_has(kernel_features::PAYLOAD_COPY) {
        return Ok(());
    }
    let Some(config) = DETECT_CONFIG.get(0) else {
        return Ok(());
    };
    if config.enabled == 0 {
        return Ok(());
    }
    let Some(request) = sip_request(ctx)? else {
        return Ok(());
    };
    if request.port == detect::PORT_TLS {
        bump(detect::COUNT_TLS);
        return Ok(());
    }
    let method = match detect::classify(head(ctx, &request)?) {
        Payload::Request(method) => method,
        Payload::Response => return Ok(()),
        Payload::KeepAlive => {
            bump(detect::COUNT_KEEPALIVES);
            return Ok(());
        }
    };
    let now = tick_now_ns();
    let Some(source) = slot_for(&request.src, config, now) else {
        // No room: sampled within the cap all the same, so that a full table hides no
        // scanner's signature, but neither counted nor followed.
        bump(detect::COUNT_UNTRACKED);
        if take_budget(detect::BUDGET_SAMPLES, config.samples_per_sec, now) {
            send(
                ctx,
                &request,
                method,
                &SipSource::default(),
                detect::KIND_SAMPLE,
            );
        }
        return Ok(());
    };
    let m = usize::from(method) & (detect::METHODS - 1);
    // SAFETY: a slot of an array map, valid for the program's life. Two CPUs may update
    // one source at once; the counts are estimates for thresholds, and a lost increment is
    // fine.
    let (seen, report) = unsafe {
        (*source).seen = (*source).seen.wrapping_add(1);
        (*source).hits = (*source).hits.saturating_add(1);
        if method == detect::METHOD_REGISTER || method == detect::METHOD_OPTIONS {
            (*source).probes = (*source).probes.wrapping_add(1);
        }
        // Only requests that open a transaction count against a rate: a trunk's ACKs and
        // BYEs follow its INVITEs, and what cannot be read is no reason to ban. The report
        // goes when the count reaches the threshold: once a window.
        let report = detect::rated(method) && {
            let count = (*source).requests[m].saturating_add(1);
            (*source).requests[m] = count;
            u32::from(count) == config.rate_thresholds[m]
        };
        ((*source).seen, report)
    };
    if report && take_budget(detect::BUDGET_REPORTS, config.reports_per_sec, now) {
        // SAFETY: as above; the record copies the counts.
        send(
            ctx,
            &request,
            method,
            unsafe { &*source },
            detect::KIND_RATE,
        );
    }
    // `sample_every` is a power of two (see `DetectConfig`): a mask, not a division.
    let seen = u32::from(seen);
    let sampled = seen <= config.first_samples
        || (config.sample_every != 0 && seen & (config.sample_every - 1) == 0);
    if sampled && take_budget(detect::BUDGET_SAMPLES, config.samples_per_sec, now) {
        // SAFETY: as above.
        send(
            ctx,
            &request,
            method,
            unsafe { &*source },
            detect::KIND_SAMPLE,
        );
    }
    Ok(())
}

/// The slot `src` has in `SIP_SOURCES`, or takes now, its window current; None when its
/// bucket has no room for it. A newcomer takes the way with fewer requests this window
/// when that way has at most one (never taken, idle, or one packet: what each source of a
/// spoofed flood is), and a busier way only with a chance of one in its requests: a flood
/// of new sources wears down a busy source's slot no faster than it earns it back.
#[inline(always)]
fn slot_for(src: &[u64; 2], config: &DetectConfig, now: u64) -> Option<*mut SipSource> {
    let tag = detect::source_hash(src, config.hash_seed);
    let first = detect::bucket_slot(tag);
    let a = SIP_SOURCES.get_ptr_mut(first)?;
    let b = SIP_SOURCES.get_ptr_mut(first + 1)?;
    let tick = (now >> detect::TICK_SHIFT) as u32;
    let window = (config.window_ns >> detect::TICK_SHIFT) as u32;
    // SAFETY: slots of an array map, valid for the program's life; racing writers leave at
    // worst a slot whose counts are off, never memory out of place.
    unsafe {
        let current = |slot: *mut SipSource| tick.wrapping_sub((*slot).window_start) < window;
        let hit = if (*a).tag == tag {
            a
        } else if (*b).tag == tag {
            b
        } else {
            let weight = |slot| if current(slot) { (*slot).hits } else { 0 };
            let (wa, wb) = (weight(a), weight(b));
            let (victim, held) = if wa <= wb { (a, wa) } else { (b, wb) };
            // A chance of one in `held`, by multiply and shift: `r * held >> 32` is uniform
            // over `0..held`, and no division runs on the packet path.
            if held > 1 && (u64::from(bpf_get_prandom_u32()) * u64::from(held)) >> 32 != 0 {
                return None;
            }
            *victim = SipSource {
                tag,
                window_start: tick,
                ..SipSource::default()
            };
            return Some(victim);
        };
        if !current(hit) {
            (*hit).window_start = tick;
            (*hit).requests = [0; detect::METHODS];
            (*hit).hits = 0;
        }
        Some(hit)
    }
}

/// The source, transport and payload offset of a UDP datagram or TCP segment with payload
/// to a SIP port; None for anything else (other ports, non-first fragments, IPv6 extension
/// headers, empty TCP segments).
#[inline(always)]
fn sip_request(ctx: &XdpContext) -> Result<Option<Request>, ()> {
    let (ethertype, offset) = l3_start(ctx)?;
    // The port first, reading only the fields it needs: every passed packet pays this, SIP
    // or not.
    let (proto, l4) = match ethertype {
        ETH_P_IPV4 => {
            let ip: *const Ipv4Hdr = ptr_at(ctx, offset)?;
            // SAFETY: the whole fixed header was bounds-checked by ptr_at.
            let (vihl, proto, frags) = unsafe { ((*ip).vihl, (*ip).proto, (*ip).frags) };
            if u16::from_be_bytes(frags) & 0x1fff != 0 {
                return Ok(None);
            }
            (proto, offset + usize::from(vihl & 0x0f) * 4)
        }
        ETH_P_IPV6 => {
            let ip: *const Ipv6Hdr = ptr_at(ctx, offset)?;
            // SAFETY: as above.
            (unsafe { (*ip).next_hdr }, offset + Ipv6Hdr::LEN)
        }
        _ => return Ok(None),
    };
    if proto != IPPROTO_UDP && proto != IPPROTO_TCP {
        return Ok(None);
    }
    let [_, _, hi, lo] = load::<[u8; 4]>(ctx, l4)?;
    let dst_port = u16::from_be_bytes([hi, lo]);
    let port = match SIP_PORTS.get(u32::from(dst_port)) {
        Some(kind) if *kind != 0 => *kind,
        _ => return Ok(None),
    };
    let payload = if proto == IPPROTO_UDP {
        l4 + 8
    } else {
        let [data_offset] = load::<[u8; 1]>(ctx, l4 + 12)?;
        l4 + usize::from(data_offset >> 4) * 4
    };
    // Where the IP packet ends, by its own length: a short frame's Ethernet padding
    // follows it.
    let (src, family, ip_end) = if ethertype == ETH_P_IPV4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, offset)?;
        // SAFETY: as above.
        let ([a, b, c, d], tot_len) = unsafe { ((*ip).src_addr, (*ip).tot_len) };
        (
            detect::address_words(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d]),
            4,
            offset + usize::from(u16::from_be_bytes(tot_len)),
        )
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, offset)?;
        // SAFETY: as above.
        let (src, payload_len) = unsafe { ((*ip).src_addr, (*ip).payload_len) };
        (
            detect::address_words(&src),
            6,
            offset + Ipv6Hdr::LEN + usize::from(u16::from_be_bytes(payload_len)),
        )
    };
    let end = ip_end.min(ctx.data_end() - ctx.data());
    // An empty TCP segment (an ACK) carries no request; an empty datagram is no keep-alive
    // we count either.
    if end <= payload {
        return Ok(None);
    }
    Ok(Some(Request {
        src,
        family,
        proto,
        dst_port,
        port,
        payload,
        len: end - payload,
    }))
}

/// The payload's first four bytes, zero-padded when it is shorter (a CRLF keep-alive is
/// two bytes). A single byte is no SIP message nor keep-alive: `Err`, not looked at. (Its
/// one-byte load would not verify either: LLVM folds the `+ 1 > end` check into `>= end`.)
#[inline(always)]
fn head(ctx: &XdpContext, request: &Request) -> Result<[u8; 4], ()> {
    if request.len >= 4 {
        return load::<[u8; 4]>(ctx, request.payload);
    }
    if request.len < 2 {
        return Err(());
    }
    let [a, b] = load::<[u8; 2]>(ctx, request.payload)?;
    Ok([a, b, 0, 0])
}

/// Counts one packet detection passes over, in `DETECT_COUNTS[slot]`.
#[inline(always)]
fn bump(slot: u32) {
    if let Some(count) = DETECT_COUNTS.get_ptr_mut(slot) {
        // SAFETY: this CPU's own slot, from a successful lookup; no other CPU writes it.
        unsafe { *count += 1 };
    }
}

/// Takes one from detection's cap in `slot` of `SAMPLE_BUDGET`.
#[inline(always)]
pub(crate) fn take_budget(slot: u32, cap: u32, now: u64) -> bool {
    SAMPLE_BUDGET
        .get_ptr_mut(slot)
        .is_some_and(|budget| crate::take_budget(budget, cap, now))
}

#[inline(always)]
fn send(ctx: &XdpContext, request: &Request, method: u8, source: &SipSource, kind: u8) {
    let Some(mut entry) = SIP_SAMPLES.reserve::<SipSample>(0) else {
        return;
    };
    let sample = entry.as_mut_ptr();
    let wanted = if kind == detect::KIND_SAMPLE {
        request.len as u64
    } else {
        0
    };
    // SAFETY: `sample` is the ring buffer's reservation of a whole SipSample. The copy is
    // bounded by the payload array's size (`copy_len`).
    unsafe {
        (*sample).kind = kind;
        (*sample).family = request.family;
        (*sample).proto = request.proto;
        (*sample).method = method;
        (*sample).dst_port = request.dst_port;
        (*sample).src = words_bytes(&request.src);
        (*sample).requests = source.requests.map(u32::from);
        (*sample).seen = u32::from(source.seen);
        (*sample).probes = u32::from(source.probes);
        (*sample).ifindex = ctx.ingress_ifindex() as u32;
        let copied = match crate::copy_len(wanted, detect::SNAPLEN as u64) {
            Some(n)
                if bpf_xdp_load_bytes(
                    ctx.ctx,
                    request.payload as u32,
                    (&raw mut (*sample).payload).cast::<c_void>(),
                    n,
                ) == 0 =>
            {
                n
            }
            _ => 0,
        };
        (*sample).captured = copied as u16;
    }
    entry.submit(0);
}

/// The 16 bytes of an address in `detect::address_words` form.
#[inline(always)]
pub(crate) fn words_bytes(words: &[u64; 2]) -> [u8; 16] {
    let (a, b) = (words[0].to_ne_bytes(), words[1].to_ne_bytes());
    [
        a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], b[0], b[1], b[2], b[3], b[4], b[5], b[6],
        b[7],
    ]
}
