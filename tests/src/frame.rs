//! Builds Ethernet frames byte by byte, so tests control every field the XDP program reads:
//! VLAN tags, IP versions, fragments, truncation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88A8;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;

/// A frame under construction. `build` yields the bytes.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// TPIDs of the VLAN tags, outermost first (VLAN IDs are 100, 200, ...).
    pub vlans: Vec<u16>,
    pub l3: L3,
}

#[derive(Clone, Debug)]
pub enum L3 {
    Ipv4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: u8,
        /// Fragment offset in 8-byte units; non-zero means a non-first fragment.
        fragment_offset: u16,
        more_fragments: bool,
        l4: Vec<u8>,
    },
    Ipv6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        /// Extension headers to put before the transport header, as (type, body) where body
        /// is the header without its first two bytes, already padded to 8n-2.
        ext: Vec<(u8, Vec<u8>)>,
        proto: u8,
        l4: Vec<u8>,
    },
    Arp,
    Raw {
        ethertype: u16,
        payload: Vec<u8>,
    },
}

/// A UDP header plus payload (checksum zero: fine for XDP, and for IPv4 sockets).
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("payload fits a datagram");
    let mut v = Vec::with_capacity(usize::from(len));
    v.extend_from_slice(&sport.to_be_bytes());
    v.extend_from_slice(&dport.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(payload);
    v
}

/// A TCP SYN header (20 bytes).
pub fn tcp_syn(sport: u16, dport: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(20);
    v.extend_from_slice(&sport.to_be_bytes());
    v.extend_from_slice(&dport.to_be_bytes());
    v.extend_from_slice(&1u32.to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes());
    v.push(5 << 4);
    v.push(0x02);
    v.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    v
}

impl Frame {
    fn new(l3: L3) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlans: Vec::new(),
            l3,
        }
    }

    /// UDP to `dport` from `src` to `dst` (both of one family).
    pub fn udp(src: IpAddr, dst: IpAddr, dport: u16) -> Self {
        Self::ip(
            src,
            dst,
            PROTO_UDP,
            udp(40000, dport, b"OPTIONS sip:probe SIP/2.0\r\n\r\n"),
        )
    }

    pub fn tcp(src: IpAddr, dst: IpAddr, dport: u16) -> Self {
        Self::ip(src, dst, PROTO_TCP, tcp_syn(40000, dport))
    }

    pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, l4: Vec<u8>) -> Self {
        match (src, dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => Self::new(L3::Ipv4 {
                src,
                dst,
                proto,
                fragment_offset: 0,
                more_fragments: false,
                l4,
            }),
            (IpAddr::V6(src), IpAddr::V6(dst)) => Self::new(L3::Ipv6 {
                src,
                dst,
                ext: Vec::new(),
                proto,
                l4,
            }),
            _ => panic!("source and destination must be of one family"),
        }
    }

    pub fn arp() -> Self {
        Self::new(L3::Arp)
    }

    pub fn raw(ethertype: u16, payload: Vec<u8>) -> Self {
        Self::new(L3::Raw { ethertype, payload })
    }

    pub fn vlan(mut self, tpid: u16) -> Self {
        self.vlans.push(tpid);
        self
    }

    /// Makes an IPv4 frame a fragment at `offset` (8-byte units).
    pub fn fragment(mut self, offset: u16, more: bool) -> Self {
        if let L3::Ipv4 {
            fragment_offset,
            more_fragments,
            ..
        } = &mut self.l3
        {
            *fragment_offset = offset;
            *more_fragments = more;
        }
        self
    }

    /// Adds an IPv6 extension header (type, body padded to 8n-2 bytes).
    pub fn ipv6_ext(mut self, kind: u8, body: Vec<u8>) -> Self {
        if let L3::Ipv6 { ext, .. } = &mut self.l3 {
            ext.push((kind, body));
        }
        self
    }

    /// The length of everything before the IP header.
    pub fn l2_len(&self) -> usize {
        14 + 4 * self.vlans.len()
    }

    pub fn build(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(128);
        v.extend_from_slice(&self.dst_mac);
        v.extend_from_slice(&self.src_mac);
        for (i, tpid) in self.vlans.iter().enumerate() {
            v.extend_from_slice(&tpid.to_be_bytes());
            v.extend_from_slice(&(100 * (i as u16 + 1)).to_be_bytes());
        }
        match &self.l3 {
            L3::Ipv4 {
                src,
                dst,
                proto,
                fragment_offset,
                more_fragments,
                l4,
            } => {
                v.extend_from_slice(&0x0800u16.to_be_bytes());
                let total = u16::try_from(20 + l4.len()).expect("fits");
                let frags = fragment_offset | if *more_fragments { 0x2000 } else { 0 };
                let mut h = [0u8; 20];
                h[0] = 0x45;
                h[2..4].copy_from_slice(&total.to_be_bytes());
                h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
                h[6..8].copy_from_slice(&frags.to_be_bytes());
                h[8] = 64;
                h[9] = *proto;
                h[12..16].copy_from_slice(&src.octets());
                h[16..20].copy_from_slice(&dst.octets());
                let sum = checksum(&h);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                v.extend_from_slice(&h);
                v.extend_from_slice(l4);
            }
            L3::Ipv6 {
                src,
                dst,
                ext,
                proto,
                l4,
            } => {
                v.extend_from_slice(&0x86DDu16.to_be_bytes());
                let mut body = Vec::new();
                let kinds: Vec<u8> = ext.iter().map(|(k, _)| *k).chain([*proto]).collect();
                for (i, (_, ext_body)) in ext.iter().enumerate() {
                    body.push(kinds[i + 1]);
                    body.push(u8::try_from((ext_body.len() + 2) / 8 - 1).expect("fits"));
                    body.extend_from_slice(ext_body);
                }
                body.extend_from_slice(l4);
                v.extend_from_slice(&[0x60, 0, 0, 0]);
                v.extend_from_slice(&u16::try_from(body.len()).expect("fits").to_be_bytes());
                v.push(kinds[0]);
                v.push(64);
                v.extend_from_slice(&src.octets());
                v.extend_from_slice(&dst.octets());
                v.extend_from_slice(&body);
            }
            L3::Arp => {
                v.extend_from_slice(&0x0806u16.to_be_bytes());
                // Ethernet/IPv4 ARP request, 28 bytes.
                v.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
                v.extend_from_slice(&self.src_mac);
                v.extend_from_slice(&[192, 0, 2, 1]);
                v.extend_from_slice(&[0; 6]);
                v.extend_from_slice(&[192, 0, 2, 2]);
            }
            L3::Raw { ethertype, payload } => {
                v.extend_from_slice(&ethertype.to_be_bytes());
                v.extend_from_slice(payload);
            }
        }
        v
    }
}

/// The Internet checksum (RFC 1071).
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
