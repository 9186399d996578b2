//! Reading the packet: every access bounds-checked through one `ptr_at`, the walk to the
//! network header past VLAN tags, and the walk to the transport header's port for port scope.

use core::mem;

use apiban_common::{
    ETH_P_8021AD, ETH_P_8021Q, IPPROTO_AH, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT, IPPROTO_HOPOPTS,
    IPPROTO_ROUTING, IPPROTO_TCP, IPPROTO_UDP,
};
use aya_ebpf::programs::{TcContext, XdpContext};
use network_types::{eth::EthHdr, vlan::VlanHdr};

use crate::SCOPE_PORTS;

/// How many IPv6 extension headers are walked to find the transport header in port scope.
/// Real traffic carries zero or one; the bound keeps the verifier happy. A packet with more
/// is in scope (fail closed): a banned source must not get through by stacking headers.
const MAX_IPV6_EXT_HEADERS: usize = 4;

/// A packet whose bytes the program reads directly: the XDP frame, or the linear part of a
/// socket buffer (where a TC program finds the headers).
pub(crate) trait Packet {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

/// Every packet access goes through here: the verifier only accepts loads it can prove are
/// inside `[data, data_end)`.
#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &impl Packet, offset: usize) -> Result<*const T, ()> {
    let start = ctx.start();
    let end = ctx.end();
    if start + offset + mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *const T)
}

#[cfg(feature = "bench")]
#[inline(always)]
pub(crate) fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    Ok(ptr_at::<T>(ctx, offset)?.cast_mut())
}

#[inline(always)]
pub(crate) fn load<T: Copy>(ctx: &impl Packet, offset: usize) -> Result<T, ()> {
    // SAFETY: bounds-checked by ptr_at; headers are not guaranteed aligned after VLAN tags.
    Ok(unsafe { ptr_at::<T>(ctx, offset)?.read_unaligned() })
}

/// The ethertype after up to two VLAN tags, and where the network header starts.
#[inline(always)]
pub(crate) fn l3_start(ctx: &XdpContext) -> Result<(u16, usize), ()> {
    let mut offset = EthHdr::LEN;
    let mut ethertype = u16::from_be(load::<u16>(ctx, mem::offset_of!(EthHdr, ether_type))?);
    // Up to two tags: 802.1Q, or 802.1ad (QinQ) outer + 802.1Q inner. Written out rather than
    // looped so the verifier sees two straight-line bounds checks.
    if is_vlan(ethertype) {
        ethertype = u16::from_be(load::<u16>(
            ctx,
            offset + mem::offset_of!(VlanHdr, ether_type),
        )?);
        offset += VlanHdr::LEN;
        if is_vlan(ethertype) {
            ethertype = u16::from_be(load::<u16>(
                ctx,
                offset + mem::offset_of!(VlanHdr, ether_type),
            )?);
            offset += VlanHdr::LEN;
        }
    }
    Ok((ethertype, offset))
}

#[inline(always)]
fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

/// Walks IPv6 extension headers to the transport header. A non-first fragment is in scope
/// (see `classify_v4`), and so is a chain longer than the walk: whatever follows cannot be
/// attributed to a port, and a banned source must not pass by stacking headers.
#[inline(always)]
pub(crate) fn v6_in_port_scope(
    ctx: &XdpContext,
    mut next_header: u8,
    mut offset: usize,
) -> Result<bool, ()> {
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next_header {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let [nh, len] = load::<[u8; 2]>(ctx, offset)?;
                next_header = nh;
                offset += (usize::from(len) + 1) * 8;
            }
            IPPROTO_AH => {
                let [nh, len] = load::<[u8; 2]>(ctx, offset)?;
                next_header = nh;
                offset += (usize::from(len) + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let [nh, _, off_hi, off_lo] = load::<[u8; 4]>(ctx, offset)?;
                if u16::from_be_bytes([off_hi, off_lo]) >> 3 != 0 {
                    return Ok(true);
                }
                next_header = nh;
                offset += 8;
            }
            _ => return in_port_scope(ctx, next_header, offset),
        }
    }
    Ok(is_ipv6_ext_header(next_header) || in_port_scope(ctx, next_header, offset)?)
}

#[inline(always)]
fn is_ipv6_ext_header(next_header: u8) -> bool {
    matches!(
        next_header,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT
    )
}

/// Whether a TCP/UDP packet goes to one of the scoped destination ports. Other protocols
/// (ICMP, ESP, ...) are out of scope.
#[inline(always)]
pub(crate) fn in_port_scope(ctx: &XdpContext, proto: u8, l4_offset: usize) -> Result<bool, ()> {
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Ok(false);
    }
    // Source and destination port are the first four bytes of both TCP and UDP headers.
    let [_, _, hi, lo] = load::<[u8; 4]>(ctx, l4_offset)?;
    let port = u16::from_be_bytes([hi, lo]);
    Ok(SCOPE_PORTS.get(u32::from(port)).is_some_and(|on| *on != 0))
}
