//! `apiban capture` (see `apiban_common::capture`): copies packets of the verdicts the
//! capture asks for to the agent through a ring buffer, with the time they were seen. Only
//! reached while the CAPTURE flag is set, so no capture costs nothing but that test.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
};

use apiban_common::{
    CaptureBudget, CaptureConfig, CaptureRecord, Verdict, capture, kernel_features,
};
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated::bpf_xdp_load_bytes},
    macros::map,
    maps::{Array, RingBuf},
    programs::XdpContext,
};

#[map]
static CAPTURE_CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, 0);
#[map]
static CAPTURE_RING: RingBuf = RingBuf::with_byte_size(capture::RING_BYTES, 0);
#[map]
static CAPTURE_BUDGET: Array<CaptureBudget> = Array::with_max_entries(1, 0);

#[inline(always)]
pub fn offer(ctx: &XdpContext, verdict: Verdict) {
    if !crate::kernel_has(kernel_features::PAYLOAD_COPY) {
        return;
    }
    let Some(config) = CAPTURE_CONFIG.get(0) else {
        return;
    };
    if config.verdicts & (1 << (verdict as u32)) == 0 {
        return;
    }
    let Some(budget) = CAPTURE_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a helper without arguments. The precise clock, not the per-tick one the hit
    // times use: a capture's packets must keep their order and spacing.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: `budget` points into an array slot, valid for the program's life.
    if !crate::take_budget(unsafe { &raw mut (*budget).window }, config.per_sec, now) {
        // SAFETY: as above; counted atomically, many CPUs may be over the cap at once.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*budget).over_cap, 1)
        };
        return;
    }
    let Some(mut entry) = CAPTURE_RING.reserve::<CaptureRecord>(0) else {
        // SAFETY: as above.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*budget).lost, 1) };
        return;
    };
    let record = entry.as_mut_ptr();
    let len = (ctx.data_end() - ctx.data()) as u64;
    let snaplen = u64::from(config.snaplen).min(capture::SNAPLEN as u64);
    // SAFETY: `record` is the ring buffer's reservation of a whole CaptureRecord; the copy is
    // bounded by its data array's size (`copy_len`).
    unsafe {
        (*record).ts_ns = now;
        (*record).ifindex = ctx.ingress_ifindex() as u32;
        (*record).len = len as u32;
        (*record).verdict = verdict as u32;
        let copied = match crate::copy_len(len.min(snaplen), capture::SNAPLEN as u64) {
            Some(n)
                if bpf_xdp_load_bytes(
                    ctx.ctx,
                    0,
                    (&raw mut (*record).data).cast::<c_void>(),
                    n,
                ) == 0 =>
            {
                n
            }
            _ => 0,
        };
        (*record).captured = copied;
    }
    entry.submit(0);
}
