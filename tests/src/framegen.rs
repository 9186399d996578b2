//! Frames for the differential test: well-formed ones built by etherparse and by hand, then
//! mutated. 0 to 3 VLAN tags (802.1Q and 802.1ad in any order); IPv4 with and without options,
//! bad versions and IHLs, every kind of fragment; IPv6 with chains of hop-by-hop, routing,
//! destination-options, AH and fragment headers; TCP, UDP, ICMP and odd protocols; ARP and
//! other ethertypes; then truncated, bit-flipped or grown past a jumbo MTU. Sources are drawn
//! from the policy's own prefixes as often as from elsewhere, so every verdict turns up.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The smallest frame BPF_PROG_TEST_RUN takes for XDP (an Ethernet header).
pub const MIN_FRAME: usize = 14;
/// Below a page less the headroom the kernel keeps.
pub const MAX_FRAME: usize = 3_000;

pub struct FrameGen {
    rng: fastrand::Rng,
    /// Prefixes sources are drawn from (deny and allow entries).
    pools: Vec<IpNet>,
    ports: Vec<u16>,
}

const TPIDS: [u16; 2] = [0x8100, 0x88a8];
const V6_EXT: [u8; 5] = [0, 43, 60, 51, 44];

impl FrameGen {
    pub fn new(seed: u64, pools: Vec<IpNet>, ports: Vec<u16>) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(seed),
            pools,
            ports,
        }
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.rng.usize(..from.len())]
    }

    fn chance(&mut self, percent: u8) -> bool {
        self.rng.u8(..100) < percent
    }

    /// An address inside `net`, at random.
    fn within(&mut self, net: IpNet) -> IpAddr {
        match net {
            IpNet::V4(n) => {
                let host_bits = 32 - u32::from(n.prefix_len());
                let mask = if host_bits == 32 {
                    u32::MAX
                } else {
                    (1u32 << host_bits) - 1
                };
                IpAddr::V4(Ipv4Addr::from(
                    u32::from(n.network()) | (self.rng.u32(..) & mask),
                ))
            }
            IpNet::V6(n) => {
                let host_bits = 128 - u32::from(n.prefix_len());
                let mask = if host_bits == 128 {
                    u128::MAX
                } else {
                    (1u128 << host_bits) - 1
                };
                IpAddr::V6(Ipv6Addr::from(
                    u128::from(n.network()) | (self.rng.u128(..) & mask),
                ))
            }
        }
    }

    fn source(&mut self, v6: bool) -> IpAddr {
        let pools: Vec<IpNet> = self
            .pools
            .iter()
            .copied()
            .filter(|n| matches!(n, IpNet::V6(_)) == v6)
            .collect();
        if !pools.is_empty() && self.chance(65) {
            let net = self.pick(&pools);
            // Exactly the prefix's first address half the time: hosts in the table.
            if self.chance(50) {
                return net.network();
            }
            return self.within(net);
        }
        if v6 {
            IpAddr::V6(Ipv6Addr::from(self.rng.u128(..)))
        } else {
            IpAddr::V4(Ipv4Addr::from(self.rng.u32(..)))
        }
    }

    fn port(&mut self) -> u16 {
        if !self.ports.is_empty() && self.chance(60) {
            let ports = self.ports.clone();
            self.pick(&ports)
        } else {
            self.rng.u16(..)
        }
    }

    fn transport(&mut self, proto: u8) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.rng.u16(..).to_be_bytes());
        l4.extend_from_slice(&self.port().to_be_bytes());
        let rest = match proto {
            6 => 16,
            17 => 4,
            _ => self.rng.usize(0..8),
        };
        l4.extend((0..rest).map(|_| self.rng.u8(..)));
        let payload = self.rng.usize(0..48);
        l4.extend((0..payload).map(|_| self.rng.u8(..)));
        l4
    }

    fn proto(&mut self, v6: bool) -> u8 {
        match self.rng.u8(..100) {
            0..40 => 17,
            40..70 => 6,
            70..85 => {
                if v6 {
                    58
                } else {
                    1
                }
            }
            _ => self.rng.u8(..),
        }
    }

    /// An IPv4 header (with options, odd IHLs and versions now and then) and what follows.
    fn ipv4(&mut self) -> Vec<u8> {
        let proto = self.proto(false);
        let src = match self.source(false) {
            IpAddr::V4(a) => a.octets(),
            IpAddr::V6(_) => unreachable!("an IPv4 source"),
        };
        let options = if self.chance(20) {
            self.rng.usize(1..=10)
        } else {
            0
        };
        let mut ihl = 5 + options as u8;
        let mut version = 4u8;
        if self.chance(5) {
            ihl = self.rng.u8(0..16);
        }
        if self.chance(4) {
            version = self.rng.u8(0..16);
        }
        let flags_frag: u16 = match self.rng.u8(..100) {
            0..65 => 0x4000,                            // DF, whole
            65..75 => 0x2000,                           // first fragment, MF
            75..85 => 0x2000 | self.rng.u16(1..0x2000), // middle fragment
            85..92 => self.rng.u16(1..0x2000),          // last fragment
            _ => self.rng.u16(..),
        };
        let l4 = self.transport(proto);
        let mut ip = vec![
            (version << 4) | (ihl & 0x0f),
            0,
            0,
            0,
            0x12,
            0x34,
            (flags_frag >> 8) as u8,
            flags_frag as u8,
            64,
            proto,
            0,
            0,
        ];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&[192, 0, 2, 1]);
        ip.extend((0..options * 4).map(|i| if i == 0 { 1 } else { self.rng.u8(..) }));
        let total = (ip.len() + l4.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend(l4);
        ip
    }

    /// An IPv6 header, 0 to 8 extension headers and what follows.
    fn ipv6(&mut self) -> Vec<u8> {
        let src = match self.source(true) {
            IpAddr::V6(a) => a.octets(),
            IpAddr::V4(_) => unreachable!("an IPv6 source"),
        };
        let count = match self.rng.u8(..100) {
            0..50 => 0,
            50..75 => 1,
            75..85 => 2,
            _ => self.rng.usize(3..=8),
        };
        let kinds: Vec<u8> = (0..count).map(|_| self.pick(&V6_EXT)).collect();
        let proto = self.proto(true);
        let mut version = 6u8;
        if self.chance(4) {
            version = self.rng.u8(0..16);
        }
        let mut ip = vec![
            version << 4,
            0,
            0,
            0,
            0,
            0,
            *kinds.first().unwrap_or(&proto),
            64,
        ];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets());
        for (i, kind) in kinds.iter().enumerate() {
            let next = *kinds.get(i + 1).unwrap_or(&proto);
            match kind {
                44 => {
                    let offset: u16 = match self.rng.u8(..100) {
                        0..50 => 1,                             // first fragment, M
                        50..80 => self.rng.u16(1..0x2000) << 3, // a later one
                        _ => 0,                                 // atomic
                    };
                    ip.extend_from_slice(&[next, 0]);
                    ip.extend_from_slice(&offset.to_be_bytes());
                    ip.extend_from_slice(&self.rng.u32(..).to_be_bytes());
                }
                51 => {
                    // AH: length in 4-byte units minus 2; 12 bytes of ICV at least.
                    let units = self.rng.u8(1..4);
                    ip.extend_from_slice(&[next, units + 1]);
                    ip.extend((0..(units as usize + 3) * 4 - 2).map(|_| self.rng.u8(..)));
                }
                _ => {
                    let units = self.rng.u8(0..3);
                    ip.extend_from_slice(&[next, units]);
                    ip.extend((0..(units as usize + 1) * 8 - 2).map(|_| 0));
                }
            }
        }
        let l4 = self.transport(proto);
        let payload_len = (ip.len() - 40 + l4.len()) as u16;
        ip[4..6].copy_from_slice(&payload_len.to_be_bytes());
        ip.extend(l4);
        ip
    }

    /// A frame built by etherparse: always well formed.
    fn built(&mut self) -> Vec<u8> {
        use etherparse::{PacketBuilder, VlanId};
        let v6 = self.chance(50);
        let tags = self.rng.u8(0..3);
        let vid = |r: &mut fastrand::Rng| VlanId::try_new(r.u16(1..4095)).expect("a VLAN ID");
        let step = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let (sport, dport) = (self.rng.u16(..), self.port());
        let payload: Vec<u8> = (0..self.rng.usize(0..64))
            .map(|_| self.rng.u8(..))
            .collect();
        let (src, tcp) = (self.source(v6), self.chance(40));
        let mut out = Vec::new();
        macro_rules! finish {
            ($ip:expr) => {
                if tcp {
                    $ip.tcp(sport, dport, 1, 512).write(&mut out, &payload)
                } else {
                    $ip.udp(sport, dport).write(&mut out, &payload)
                }
            };
        }
        macro_rules! ip {
            ($step:expr) => {
                match src {
                    IpAddr::V4(a) => finish!($step.ipv4(a.octets(), [192, 0, 2, 1], 64)),
                    IpAddr::V6(a) => finish!($step.ipv6(
                        a.octets(),
                        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets(),
                        64
                    )),
                }
            };
        }
        let written = match tags {
            0 => ip!(step),
            1 => ip!(step.single_vlan(vid(&mut self.rng))),
            _ => ip!(step.double_vlan(vid(&mut self.rng), vid(&mut self.rng))),
        };
        written.expect("etherparse builds what it is given");
        out
    }

    /// One frame, before mutation.
    fn template(&mut self) -> Vec<u8> {
        if self.chance(25) {
            return self.built();
        }
        let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
        let tags = match self.rng.u8(..100) {
            0..60 => 0,
            60..80 => 1,
            80..95 => 2,
            _ => 3,
        };
        for _ in 0..tags {
            let tpid = self.pick(&TPIDS);
            frame.extend_from_slice(&tpid.to_be_bytes());
            frame.extend_from_slice(&self.rng.u16(..0x1000).to_be_bytes());
        }
        let l3 = match self.rng.u8(..100) {
            0..45 => (0x0800u16, self.ipv4()),
            45..90 => (0x86dd, self.ipv6()),
            90..95 => (0x0806, (0..28).map(|_| self.rng.u8(..)).collect()),
            _ => (
                self.rng.u16(..),
                (0..self.rng.usize(0..64))
                    .map(|_| self.rng.u8(..))
                    .collect(),
            ),
        };
        frame.extend_from_slice(&l3.0.to_be_bytes());
        frame.extend(l3.1);
        frame
    }

    /// The next frame to test: a template, mutated a third of the time.
    pub fn frame(&mut self) -> Vec<u8> {
        let mut frame = self.template();
        match self.rng.u8(..100) {
            0..20 => {
                // Cut short at any byte (test runs need the Ethernet header).
                let cut = self.rng.usize(MIN_FRAME..=frame.len().max(MIN_FRAME));
                frame.truncate(cut);
            }
            20..30 => {
                for _ in 0..self.rng.usize(1..=3) {
                    let at = self.rng.usize(..frame.len());
                    frame[at] ^= 1 << self.rng.u8(..8);
                }
            }
            30..33 => {
                let grow = self.rng.usize(frame.len()..=MAX_FRAME);
                frame.resize(grow, 0);
            }
            _ => {}
        }
        frame.resize(frame.len().max(MIN_FRAME), 0);
        frame.truncate(MAX_FRAME);
        frame
    }
}
