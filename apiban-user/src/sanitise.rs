//! What may enter the deny list from a remote feed.
//!
//! A feed is an outside party: a compromised or buggy one must not be able to ban the host's
//! own network, loopback, multicast or half the Internet. Manual bans skip the feed rules
//! (the operator means it) but never beat the allowlist, which the XDP program consults too.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Why an entry from a feed was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    /// Not an address or CIDR.
    Invalid,
    /// Overlaps a special-purpose range (RFC 6890 and the IANA special registries).
    SpecialPurpose,
    /// A prefix shorter than the configured minimum.
    TooBroad,
    /// Covers one of this host's own addresses.
    OwnAddress,
    /// Covered by the allowlist.
    Allowlisted,
    /// Covers an etcd endpoint of this node's fleet (a ban of it would cut the fleet off),
    /// or a fleet node's own address.
    FleetInfrastructure,
}

impl Rejection {
    pub const ALL: [Rejection; 6] = [
        Rejection::Invalid,
        Rejection::SpecialPurpose,
        Rejection::TooBroad,
        Rejection::OwnAddress,
        Rejection::Allowlisted,
        Rejection::FleetInfrastructure,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rejection::Invalid => "invalid",
            Rejection::SpecialPurpose => "special_purpose",
            Rejection::TooBroad => "too_broad",
            Rejection::OwnAddress => "own_address",
            Rejection::Allowlisted => "allowlisted",
            Rejection::FleetInfrastructure => "fleet_infrastructure",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> (Ipv4Addr, u8) {
    (Ipv4Addr::new(a, b, c, d), len)
}

const SPECIAL_V4: [(Ipv4Addr, u8); 14] = [
    v4(0, 0, 0, 0, 8),
    v4(10, 0, 0, 0, 8),
    v4(100, 64, 0, 0, 10),
    v4(127, 0, 0, 0, 8),
    v4(169, 254, 0, 0, 16),
    v4(172, 16, 0, 0, 12),
    v4(192, 0, 0, 0, 24),
    v4(192, 0, 2, 0, 24),
    v4(192, 168, 0, 0, 16),
    v4(198, 18, 0, 0, 15),
    v4(198, 51, 100, 0, 24),
    v4(203, 0, 113, 0, 24),
    v4(224, 0, 0, 0, 4),
    v4(240, 0, 0, 0, 4),
];

const SPECIAL_V6: [(Ipv6Addr, u8); 8] = [
    (Ipv6Addr::UNSPECIFIED, 128),
    (Ipv6Addr::LOCALHOST, 128),
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96),
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
    (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32),
    // IPv4-compatible and other reserved space below ::ffff:0:0 is covered by ::/128 and ::1
    // only as hosts; the rest of ::/8 is not routable either.
    (Ipv6Addr::UNSPECIFIED, 8),
];

/// The special-purpose ranges a feed may never touch.
pub fn special_purpose() -> Vec<IpNet> {
    let v4 = SPECIAL_V4
        .iter()
        .map(|&(a, l)| IpNet::V4(Ipv4Net::new_assert(a, l)));
    let v6 = SPECIAL_V6
        .iter()
        .map(|&(a, l)| IpNet::V6(Ipv6Net::new_assert(a, l)));
    v4.chain(v6).collect()
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Parses an address or CIDR as feeds write them. Host bits under the mask are cleared
/// (`1.2.3.4/24` means `1.2.3.0/24`).
pub fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    if text.is_empty() || text.len() > 64 {
        return None;
    }
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Some(IpNet::from(addr));
    }
    text.parse::<IpNet>().ok().map(|n| n.trunc())
}

/// The operator's allowlist: from configuration and from `apiban allow add`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    nets: BTreeSet<IpNet>,
}

impl AllowList {
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> Self {
        Self {
            nets: nets.into_iter().map(|n| n.trunc()).collect(),
        }
    }

    pub fn insert(&mut self, net: IpNet) -> bool {
        self.nets.insert(net.trunc())
    }

    pub fn remove(&mut self, net: &IpNet) -> bool {
        self.nets.remove(&net.trunc())
    }

    pub fn iter(&self) -> impl Iterator<Item = &IpNet> {
        self.nets.iter()
    }

    pub fn len(&self) -> usize {
        self.nets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// The most specific allow entry that covers `addr`.
    pub fn covering(&self, addr: IpAddr) -> Option<IpNet> {
        self.nets
            .iter()
            .filter(|a| a.contains(&addr))
            .max_by_key(|a| a.prefix_len())
            .copied()
    }

    /// True when an allow entry covers all of `net`.
    pub fn covers(&self, net: &IpNet) -> bool {
        // Allowlists are short (tens of entries); a scan is cheaper than an index to keep.
        self.nets.iter().any(|a| a.contains(net))
    }
}

/// The rules applied to every entry from a remote feed.
#[derive(Clone, Debug)]
pub struct Sanitiser {
    pub min_prefix_v4: u8,
    pub min_prefix_v6: u8,
    own_addresses: BTreeSet<IpAddr>,
    /// The fleet's etcd endpoints and nodes: no source may ban them.
    fleet_addresses: BTreeSet<IpAddr>,
    special: Vec<IpNet>,
}

impl Default for Sanitiser {
    fn default() -> Self {
        Self::new(16, 32, [])
    }
}

impl Sanitiser {
    pub fn new(
        min_prefix_v4: u8,
        min_prefix_v6: u8,
        own: impl IntoIterator<Item = IpAddr>,
    ) -> Self {
        Self {
            min_prefix_v4,
            min_prefix_v6,
            own_addresses: own.into_iter().collect(),
            fleet_addresses: BTreeSet::new(),
            special: special_purpose(),
        }
    }

    pub fn set_own_addresses(&mut self, own: impl IntoIterator<Item = IpAddr>) {
        self.own_addresses = own.into_iter().collect();
    }

    pub fn own_addresses(&self) -> Vec<IpAddr> {
        self.own_addresses.iter().copied().collect()
    }

    pub fn set_fleet_addresses(&mut self, fleet: impl IntoIterator<Item = IpAddr>) {
        self.fleet_addresses = fleet.into_iter().collect();
    }

    /// The fleet address `net` covers, if any.
    pub fn covered_fleet_address(&self, net: &IpNet) -> Option<IpAddr> {
        self.fleet_addresses
            .iter()
            .copied()
            .find(|a| net.contains(a))
    }

    /// Checks an allowlist entry that came from outside this node (etcd): one broader than
    /// the shortest ban a feed may make would switch protection off for a swathe of the
    /// Internet, unless it lies in a special-purpose range, which no feed may ban anyway (an
    /// operator's 10.0.0.0/8).
    pub fn check_allow(&self, net: IpNet) -> Result<(), Rejection> {
        if self.special.iter().any(|s| s.contains(&net)) {
            return Ok(());
        }
        let min = match net {
            IpNet::V4(_) => self.min_prefix_v4,
            IpNet::V6(_) => self.min_prefix_v6,
        };
        if net.prefix_len() < min {
            return Err(Rejection::TooBroad);
        }
        Ok(())
    }

    /// Checks one feed entry: the prefix to ban, or why not.
    pub fn check(&self, text: &str, allow: &AllowList) -> Result<IpNet, Rejection> {
        let net = parse_net(text).ok_or(Rejection::Invalid)?;
        self.check_net(net, allow)?;
        Ok(net)
    }

    pub fn check_net(&self, net: IpNet, allow: &AllowList) -> Result<(), Rejection> {
        if self.special.iter().any(|s| overlaps(s, &net)) {
            return Err(Rejection::SpecialPurpose);
        }
        let min = match net {
            IpNet::V4(_) => self.min_prefix_v4,
            IpNet::V6(_) => self.min_prefix_v6,
        };
        if net.prefix_len() < min {
            return Err(Rejection::TooBroad);
        }
        if self.own_addresses.iter().any(|a| net.contains(a)) {
            return Err(Rejection::OwnAddress);
        }
        if self.covered_fleet_address(&net).is_some() {
            return Err(Rejection::FleetInfrastructure);
        }
        if allow.covers(&net) {
            return Err(Rejection::Allowlisted);
        }
        Ok(())
    }
}

/// This host's addresses on every interface, so no feed can ban the host itself.
pub fn host_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free with freeifaddrs below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr whose family tells its real type.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: family is AF_INET, so this is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            } else if family == libc::AF_INET6 {
                // SAFETY: family is AF_INET6, so this is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        parse_net(s).unwrap()
    }

    #[test]
    fn parses_addresses_and_prefixes() {
        assert_eq!(parse_net("1.2.3.4"), Some(net("1.2.3.4/32")));
        assert_eq!(parse_net(" 1.2.3.4/24 "), Some(net("1.2.3.0/24")));
        assert_eq!(parse_net("2001:db8::1"), Some(net("2001:db8::1/128")));
        for junk in [
            "",
            "1.2.3",
            "1.2.3.4/33",
            "999.1.1.1",
            "hello",
            "1.2.3.4 5.6.7.8",
            "::1/129",
        ] {
            assert_eq!(parse_net(junk), None, "{junk}");
        }
    }

    #[test]
    fn every_special_purpose_range_is_refused_from_feeds() {
        let s = Sanitiser::default();
        let allow = AllowList::default();
        for text in [
            "0.1.2.3",
            "10.1.2.3",
            "100.64.1.1",
            "100.127.255.255",
            "127.0.0.1",
            "169.254.1.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:1.2.3.4",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
        ] {
            assert_eq!(
                s.check(text, &allow),
                Err(Rejection::SpecialPurpose),
                "{text}"
            );
        }
        // A prefix that contains a special range overlaps it too.
        assert_eq!(
            s.check("10.0.0.0/7", &allow),
            Err(Rejection::SpecialPurpose)
        );
        // Neighbours of special ranges are ordinary addresses.
        for text in [
            "1.2.3.4",
            "100.63.255.255",
            "100.128.0.0",
            "172.32.0.1",
            "198.20.0.1",
            "223.255.255.255",
            "2001:db9::1",
            "2a01:4f8::1",
        ] {
            assert!(s.check(text, &allow).is_ok(), "{text}");
        }
    }

    #[test]
    fn minimum_prefix_own_addresses_and_allowlist() {
        let s = Sanitiser::new(16, 32, ["45.1.2.3".parse().unwrap()]);
        let mut allow = AllowList::new([net("91.0.0.0/8")]);
        assert_eq!(s.check("8.0.0.0/8", &allow), Err(Rejection::TooBroad));
        assert_eq!(s.check("8.8.0.0/16", &allow), Ok(net("8.8.0.0/16")));
        assert_eq!(s.check("2a01::/16", &allow), Err(Rejection::TooBroad));
        assert_eq!(s.check("2a01:4f8::/32", &allow), Ok(net("2a01:4f8::/32")));
        assert_eq!(s.check("45.1.2.3", &allow), Err(Rejection::OwnAddress));
        assert_eq!(s.check("45.1.2.0/24", &allow), Err(Rejection::OwnAddress));
        assert_eq!(s.check("91.5.5.5", &allow), Err(Rejection::Allowlisted));
        // A ban wider than an allow entry is kept: the XDP allow trie carves the hole.
        assert_eq!(s.check("91.0.0.0/7", &allow), Err(Rejection::TooBroad));
        allow.insert(net("5.5.5.5/32"));
        assert_eq!(s.check("5.5.5.0/24", &allow), Ok(net("5.5.5.0/24")));
        assert_eq!(s.check("not-an-ip", &allow), Err(Rejection::Invalid));
    }

    #[test]
    fn host_addresses_include_loopback() {
        let own = host_addresses().unwrap();
        assert!(own.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{own:?}");
    }
}
