//! The addresses of the fleet's etcd endpoints: a ban that covers one cuts every node off
//! from the fleet, so no source may make one (see `sanitise::Rejection::FleetInfrastructure`).

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
}
