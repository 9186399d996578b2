//! The answers half of SIP scanner detection: a TC egress classifier on the same interfaces
//! as the XDP program. For a SIP response (`SIP/2.0 NNN`, not provisional) leaving a SIP port
//! towards a source detection follows, it sends the agent the response's first bytes through
//! detection's ring buffer, under a cap of its own. Everything else costs a port check; it
//! never changes a packet nor its fate.
//!
//! Headers are read directly from the buffer's linear part, where the stack puts them (a
//! helper call per header cost the other packets 120 ns); the payload, which may lie past
//! the linear part, with `bpf_skb_load_bytes` (`TcContext::load`).

use core::ffi::c_void;

use apiban_common::{
    ETH_P_IPV4, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, SipSample, SipSource, detect,
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, TC_ACT_OK},
    helpers::generated::bpf_skb_load_bytes,
    macros::classifier,
    programs::TcContext,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    detect::{DETECT_CONFIG, SIP_PORTS, SIP_SAMPLES, SIP_SOURCES, take_budget, words_bytes},
    load, ptr_at, tick_now_ns,
};

#[classifier]
pub fn apiban_egress(ctx: TcContext) -> i32 {
    // Only reads: whatever it finds, the packet goes on.
    let _ = try_egress(&ctx);
    TC_ACT_OK
}

/// A response's place in the packet.
struct Response {
    /// Where it goes: the source detection follows, as `detect::address_words` gives it.
    to: [u64; 2],
    family: u8,
    proto: u8,
    /// The server's port it leaves from.
    port: u16,
    payload: usize,
    len: usize,
}

#[inline(always)]
fn try_egress(ctx: &TcContext) -> Result<(), ()> {
    let Some(config) = DETECT_CONFIG.get(0) else {
        return Ok(());
    };
    if config.enabled == 0 || config.responses_per_sec == 0 {
        return Ok(());
    }
    let Some(response) = sip_response(ctx)? else {
        return Ok(());
    };
    let Some(source) = followed(&response.to, config.hash_seed) else {
        return Ok(());
    };
    let now = tick_now_ns();
    if take_budget(detect::BUDGET_RESPONSES, config.responses_per_sec, now) {
        send(ctx, &response, source);
    }
    Ok(())
}

/// A final response (2xx-6xx) leaving a SIP port over UDP or TCP; None for anything else.
#[inline(always)]
fn sip_response(ctx: &TcContext) -> Result<Option<Response>, ()> {
    let ethertype = u16::from_be(load::<u16>(ctx, 12)?);
    let l3 = EthHdr::LEN;
    // The port first: it is all that nearly every packet leaving the host costs.
    let (proto, l4) = match ethertype {
        ETH_P_IPV4 => {
            let ip: *const Ipv4Hdr = ptr_at(ctx, l3)?;
            // SAFETY: the whole fixed header was bounds-checked by ptr_at.
            let (vihl, proto) = unsafe { ((*ip).vihl, (*ip).proto) };
            (proto, l3 + usize::from(vihl & 0x0f) * 4)
        }
        ETH_P_IPV6 => {
            let ip: *const Ipv6Hdr = ptr_at(ctx, l3)?;
            // SAFETY: as above.
            (unsafe { (*ip).next_hdr }, l3 + Ipv6Hdr::LEN)
        }
        _ => return Ok(None),
    };
    if proto != IPPROTO_UDP && proto != IPPROTO_TCP {
        return Ok(None);
    }
    let port = u16::from_be(load::<u16>(ctx, l4)?);
    match SIP_PORTS.get(u32::from(port)) {
        Some(kind) if *kind == detect::PORT_SIP => {}
        _ => return Ok(None),
    }
    let payload = if proto == IPPROTO_UDP {
        l4 + 8
    } else {
        let [data_offset] = load::<[u8; 1]>(ctx, l4 + 12)?;
        l4 + usize::from(data_offset >> 4) * 4
    };
    let (to, family, ip_end) = if ethertype == ETH_P_IPV4 {
        let ip: Ipv4Hdr = load(ctx, l3)?;
        if u16::from_be_bytes(ip.frags) & 0x1fff != 0 {
            return Ok(None);
        }
        let [a, b, c, d] = ip.dst_addr;
        (
            detect::address_words(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d]),
            4,
            l3 + usize::from(u16::from_be_bytes(ip.tot_len)),
        )
    } else {
        let ip: Ipv6Hdr = load(ctx, l3)?;
        (
            detect::address_words(&ip.dst_addr),
            6,
            l3 + Ipv6Hdr::LEN + usize::from(u16::from_be_bytes(ip.payload_len)),
        )
    };
    let end = ip_end.min(ctx.len() as usize);
    // `SIP/2.0 NNN`: the status code's first digit at 8.
    if end < payload + 12 {
        return Ok(None);
    }
    let head: [u8; 12] = ctx.load(payload).map_err(|_| ())?;
    if &head[..8] != b"SIP/2.0 " || head[8] < b'2' || head[8] > b'6' {
        return Ok(None);
    }
    Ok(Some(Response {
        to,
        family,
        proto,
        port,
        payload,
        len: end - payload,
    }))
}

/// The slot of `to` in `SIP_SOURCES`, if detection follows it: a lookup, never an insert.
#[inline(always)]
fn followed(to: &[u64; 2], seed: u64) -> Option<*const SipSource> {
    let tag = detect::source_hash(to, seed);
    let first = detect::bucket_slot(tag);
    for slot in [first, first + 1] {
        let source = SIP_SOURCES.get_ptr(slot)?;
        // SAFETY: a slot of an array map, valid for the program's life.
        if unsafe { (*source).tag } == tag {
            return Some(source);
        }
    }
    None
}

#[inline(always)]
fn send(ctx: &TcContext, response: &Response, source: *const SipSource) {
    let Some(mut entry) = SIP_SAMPLES.reserve::<SipSample>(0) else {
        return;
    };
    let sample = entry.as_mut_ptr();
    // SAFETY: `sample` is the ring buffer's reservation of a whole SipSample; `source` is
    // from a successful lookup. The copy is bounded by the payload array's size (`copy_len`).
    unsafe {
        (*sample).kind = detect::KIND_RESPONSE;
        (*sample).family = response.family;
        (*sample).proto = response.proto;
        (*sample).method = 0;
        (*sample).dst_port = response.port;
        (*sample).src = words_bytes(&response.to);
        (*sample).requests = (*source).requests.map(u32::from);
        (*sample).seen = u32::from((*source).seen);
        (*sample).probes = u32::from((*source).probes);
        (*sample).ifindex = (*ctx.as_ptr().cast::<__sk_buff>()).ifindex;
        let copied = match crate::copy_len(response.len as u64, detect::SNAPLEN as u64) {
            Some(n)
                if bpf_skb_load_bytes(
                    ctx.as_ptr().cast_const(),
                    response.payload as u32,
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
