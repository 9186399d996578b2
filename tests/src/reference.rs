//! An independent model of the XDP program's verdict, written from its documented policy
//! (docs/design.md, "How it decides"), not from its code, to run side by side with the real program
//! on generated frames (tests/tests/differential.rs).
//!
//! The policy, as the model decides it:
//! - Ethernet II, then up to two VLAN tags (802.1Q or 802.1ad, in any order); a third tag or
//!   any ethertype but IPv4 and IPv6 is not IP. A header cut short is malformed.
//! - IPv4: the 20-byte fixed header must be there, with version 4 and IHL >= 5; options and
//!   the total length are not read. IPv6: the 40-byte fixed header, version 6.
//! - Scope `all`: the source decides. Scope `ports`: only TCP/UDP to a listed destination
//!   port is in scope, found behind the IPv4 options, or behind up to four IPv6 extension
//!   headers (hop-by-hop, routing, destination options, AH, fragment). A fragment after the
//!   first is in scope, and so is a chain longer than four headers (fail closed). Another
//!   transport is out of scope. Only what the walk reads must be there: two bytes of each
//!   extension header (four of a fragment header), four of the transport header.
//! - In scope, a source no deny prefix covers passes; one the allowlist covers is allowed;
//!   the rest are dropped. The allowlist is only consulted for banned sources.
//! - Observe mode: a source covered only by prefixes of sources in observe mode is
//!   observed (counted, passed); one that any enforcing prefix covers is dropped, whatever
//!   observes it too ("unless an enforcing source bans it too, or an enforcing prefix covers
//!   it"). The allowlist wins over both.
//!
//! Fields are read straight from the bytes here; `crosscheck` compares them with etherparse
//! wherever etherparse can parse the whole frame, so the model's own offsets are checked
//! against a maintained parser.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use apiban_common::Verdict;
use ipnet::IpNet;

/// What the program is configured with.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Banned by enforcing sources.
    pub deny: Vec<IpNet>,
    /// Listed by sources in observe mode only (a prefix in both lists is enforced).
    pub observe: Vec<IpNet>,
    pub allow: Vec<IpNet>,
    /// `Some` is scope `ports` with these destination ports.
    pub ports: Option<BTreeSet<u16>>,
}

/// What the model read on the way to its verdict, for the cross-check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    pub source: Option<IpAddr>,
    /// The destination port, when the verdict needed the transport header.
    pub dst_port: Option<u16>,
}

const TCP: u8 = 6;
const UDP: u8 = 17;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Where the scope walk ended.
enum Scope {
    In,
    Out,
    /// A header the walk needed was cut short.
    Short,
}

/// Whether TCP/UDP at `l4` goes to a scoped port.
fn transport_scope(
    frame: &[u8],
    proto: u8,
    l4: usize,
    ports: &BTreeSet<u16>,
    r: &mut Reading,
) -> Scope {
    if proto != TCP && proto != UDP {
        return Scope::Out;
    }
    match be16(frame, l4 + 2) {
        None => Scope::Short,
        Some(port) => {
            r.dst_port = Some(port);
            if ports.contains(&port) {
                Scope::In
            } else {
                Scope::Out
            }
        }
    }
}

fn v6_scope(
    frame: &[u8],
    mut next: u8,
    mut at: usize,
    ports: &BTreeSet<u16>,
    r: &mut Reading,
) -> Scope {
    const WALKED: usize = 4;
    for _ in 0..WALKED {
        match next {
            0 | 43 | 60 => {
                let (Some(&nh), Some(&len)) = (frame.get(at), frame.get(at + 1)) else {
                    return Scope::Short;
                };
                next = nh;
                at += (usize::from(len) + 1) * 8;
            }
            51 => {
                let (Some(&nh), Some(&len)) = (frame.get(at), frame.get(at + 1)) else {
                    return Scope::Short;
                };
                next = nh;
                at += (usize::from(len) + 2) * 4;
            }
            44 => {
                let (Some(&nh), Some(off)) = (frame.get(at), be16(frame, at + 2)) else {
                    return Scope::Short;
                };
                if off >> 3 != 0 {
                    return Scope::In;
                }
                next = nh;
                at += 8;
            }
            _ => return transport_scope(frame, next, at, ports, r),
        }
    }
    if matches!(next, 0 | 43 | 60 | 51 | 44) {
        Scope::In
    } else {
        transport_scope(frame, next, at, ports, r)
    }
}

fn decide(source: IpAddr, policy: &Policy) -> Verdict {
    let denied = policy.deny.iter().any(|n| n.contains(&source));
    if !denied && !policy.observe.iter().any(|n| n.contains(&source)) {
        return Verdict::Passed;
    }
    if policy.allow.iter().any(|n| n.contains(&source)) {
        Verdict::Allowed
    } else if denied {
        Verdict::Dropped
    } else {
        Verdict::Observed
    }
}

/// The verdict the policy gives `frame`, and what was read to reach it.
pub fn verdict(frame: &[u8], policy: &Policy) -> (Verdict, Reading) {
    let mut r = Reading::default();
    let Some(mut ethertype) = be16(frame, 12) else {
        return (Verdict::Malformed, r);
    };
    let mut at = 14;
    for _ in 0..2 {
        if ethertype != 0x8100 && ethertype != 0x88a8 {
            break;
        }
        let Some(inner) = be16(frame, at + 2) else {
            return (Verdict::Malformed, r);
        };
        ethertype = inner;
        at += 4;
    }
    let v = match ethertype {
        0x0800 => {
            let Some(ip) = frame.get(at..at + 20) else {
                return (Verdict::Malformed, r);
            };
            let (version, ihl) = (ip[0] >> 4, usize::from(ip[0] & 0x0f));
            if version != 4 || ihl < 5 {
                return (Verdict::Malformed, r);
            }
            let source = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
            r.source = Some(source);
            let first_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff == 0;
            let scope = match &policy.ports {
                None => Scope::In,
                Some(_) if !first_fragment => Scope::In,
                Some(ports) => transport_scope(frame, ip[9], at + ihl * 4, ports, &mut r),
            };
            match scope {
                Scope::Short => Verdict::Malformed,
                Scope::Out => Verdict::Passed,
                Scope::In => decide(source, policy),
            }
        }
        0x86dd => {
            let Some(ip) = frame.get(at..at + 40) else {
                return (Verdict::Malformed, r);
            };
            if ip[0] >> 4 != 6 {
                return (Verdict::Malformed, r);
            }
            let octets: [u8; 16] = ip[8..24].try_into().expect("16 bytes");
            let source = IpAddr::V6(Ipv6Addr::from(octets));
            r.source = Some(source);
            let scope = match &policy.ports {
                None => Scope::In,
                Some(ports) => v6_scope(frame, ip[6], at + 40, ports, &mut r),
            };
            match scope {
                Scope::Short => Verdict::Malformed,
                Scope::Out => Verdict::Passed,
                Scope::In => decide(source, policy),
            }
        }
        _ => Verdict::NotIp,
    };
    (v, r)
}

/// Compares what the model read with what etherparse reads, on frames etherparse parses
/// whole; returns a description of the first difference.
pub fn crosscheck(frame: &[u8], reading: &Reading) -> Result<(), String> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let Ok(packet) = SlicedPacket::from_ethernet(frame) else {
        return Ok(());
    };
    // Past two tags the program stops, and so does the model; etherparse reads a third.
    if packet.link_exts.len() > 2 {
        return Ok(());
    }
    let source = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => Some(IpAddr::V4(ip.header().source_addr())),
        Some(NetSlice::Ipv6(ip)) => Some(IpAddr::V6(ip.header().source_addr())),
        _ => None,
    };
    if source.is_some() && reading.source.is_some() && source != reading.source {
        return Err(format!(
            "source: model read {:?}, etherparse {:?}",
            reading.source, source
        ));
    }
    let port = match &packet.transport {
        Some(TransportSlice::Udp(u)) => Some(u.destination_port()),
        Some(TransportSlice::Tcp(t)) => Some(t.destination_port()),
        _ => None,
    };
    if port.is_some() && reading.dst_port.is_some() && port != reading.dst_port {
        return Err(format!(
            "destination port: model read {:?}, etherparse {:?}",
            reading.dst_port, port
        ));
    }
    Ok(())
}

/// The frame as hex, 32 bytes a line, for a disagreement's report.
pub fn hex(frame: &[u8]) -> String {
    frame
        .chunks(32)
        .map(|c| c.iter().map(|b| format!("{b:02x}")).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
}
