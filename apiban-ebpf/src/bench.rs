//! The benchmarks' programs: the floor (a bare `XDP_DROP`), the production logic behind a
//! source-address rewrite, and a traffic generator for the veth benchmark. Built only with the
//! `bench` feature.

use core::mem;

use apiban_common::{BENCH_MULTIPLIER, BenchParams, TRAFFICGEN_SOURCE_SLOTS, TrafficgenParams};
use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_redirect,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{ptr_at_mut, try_apiban};

#[map]
static BENCH_PARAMS: Array<BenchParams> = Array::with_max_entries(1, 0);
#[map]
static TRAFFICGEN: Array<TrafficgenParams> = Array::with_max_entries(1, 0);
#[map]
static TRAFFICGEN_SOURCES: Array<[u8; 4]> = Array::with_max_entries(TRAFFICGEN_SOURCE_SLOTS, 0);
#[map]
static TRAFFICGEN_NEXT: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Bare `XDP_DROP`: what any XDP program costs on this machine, the benchmarks' floor.
#[xdp]
pub fn bench_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
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
    try_apiban(ctx)
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
