//! The addresses no ban may cover (see `sanitise::Rejection::FleetInfrastructure`): the
//! fleet's etcd endpoints (a ban of one cuts every node off from the fleet), and its nodes'
//! own addresses, which each node puts in its heartbeat.
//!
//! A heartbeat is written by whoever can write to etcd, so what it claims is bounded: at
//! most [`MEMBER_ADDRESSES`] host addresses a node, [`MEMBERS`] nodes.

/// The addresses of etcd `endpoints` (URLs, or host:port), resolved now: what no ban may
/// cover. A name that does not resolve is left out, and said so.
pub fn endpoint_addresses(endpoints: &[String]) -> Vec<std::net::IpAddr> {
    use std::net::ToSocketAddrs as _;
    let mut out = std::collections::BTreeSet::new();
    for endpoint in endpoints {
        let rest = endpoint
            .split_once("://")
            .map_or(endpoint.as_str(), |(_, r)| r);
        let authority = rest.split('/').next().unwrap_or_default();
        let has_port = authority.rsplit_once(':').is_some_and(|(host, port)| {
            !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':')
        }) && (!authority.starts_with('[') || authority.contains("]:"));
        let target = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:2379")
        };
        match target.to_socket_addrs() {
            Ok(addrs) => out.extend(addrs.map(|a| a.ip())),
            Err(e) => {
                tracing::warn!(endpoint, error = %e, "cannot resolve an etcd endpoint; bans of its addresses are not refused")
            }
        }
    }
    out.into_iter().collect()
}

/// The most addresses one node's heartbeat may protect, and the most nodes counted.
pub const MEMBER_ADDRESSES: usize = 16;
pub const MEMBERS: usize = 64;

/// This host's addresses as its heartbeat gives them: those another node could reach it
/// by, not loopback, link-local, multicast or unspecified ones.
pub fn own_beat_addresses() -> Vec<std::net::IpAddr> {
    let mut out: Vec<std::net::IpAddr> = crate::sanitise::host_addresses()
        .unwrap_or_default()
        .into_iter()
        .filter(reachable)
        .collect();
    out.sort();
    out.dedup();
    out.truncate(MEMBER_ADDRESSES);
    out
}

fn reachable(a: &std::net::IpAddr) -> bool {
    match a {
        std::net::IpAddr::V4(v4) => {
            !(v4.is_loopback() || v4.is_link_local() || v4.is_multicast() || v4.is_unspecified())
        }
        std::net::IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// What the nodes' heartbeats claim, bounded: each node's first [`MEMBER_ADDRESSES`]
/// reachable host addresses, of at most [`MEMBERS`] nodes (by name), sorted.
pub fn member_addresses<'a>(
    beats: impl IntoIterator<Item = (&'a String, &'a Vec<std::net::IpAddr>)>,
) -> Vec<std::net::IpAddr> {
    let mut beats: Vec<_> = beats.into_iter().collect();
    beats.sort_by(|a, b| a.0.cmp(b.0));
    let mut out: Vec<std::net::IpAddr> = beats
        .into_iter()
        .take(MEMBERS)
        .flat_map(|(_, addrs)| addrs.iter().filter(|a| reachable(a)).take(MEMBER_ADDRESSES))
        .copied()
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_endpoints_give_the_addresses_no_ban_may_cover() {
        let endpoints: Vec<String> = [
            "http://10.88.0.1:23790",
            "https://[fd00::7]:2379",
            "45.2.2.2",
            "http://[fd00::8]/",
            "https://localhost:2379",
            "http://no-such-host.invalid:2379",
        ]
        .map(String::from)
        .into();
        let got = endpoint_addresses(&endpoints);
        for want in ["10.88.0.1", "fd00::7", "45.2.2.2", "fd00::8", "127.0.0.1"] {
            let want: std::net::IpAddr = want.parse().unwrap();
            assert!(got.contains(&want), "{want} missing from {got:?}");
        }
    }

    #[test]
    fn heartbeats_protect_a_bounded_number_of_reachable_addresses() {
        let many: Vec<std::net::IpAddr> = (0..40u32)
            .map(|i| std::net::Ipv4Addr::from(0x2d01_0000 + i).into())
            .chain(["127.0.0.1".parse().unwrap(), "fe80::1".parse().unwrap()])
            .collect();
        let beats: Vec<(String, Vec<std::net::IpAddr>)> = (0..100)
            .map(|n| (format!("node-{n:03}"), many.clone()))
            .collect();
        let got = member_addresses(beats.iter().map(|(n, a)| (n, a)));
        assert_eq!(
            got.len(),
            MEMBER_ADDRESSES,
            "the same 16 of every node, deduplicated"
        );
        assert!(got.iter().all(reachable));
        let distinct: Vec<(String, Vec<std::net::IpAddr>)> = (0..100u32)
            .map(|n| {
                (
                    format!("node-{n:03}"),
                    vec![std::net::Ipv4Addr::from(0x2d02_0000 + n).into()],
                )
            })
            .collect();
        assert_eq!(
            member_addresses(distinct.iter().map(|(n, a)| (n, a))).len(),
            MEMBERS
        );
    }
}
