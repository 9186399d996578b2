//! Where a change came from decides, here and only here, what it must pass before it reaches
//! the ledger, whether the fleet hears of it, and whether another node takes it.
//!
//! Every change carries its [`Provenance`]. [`admit`] holds the checks each provenance passes
//! ([`crate::sanitise`] is their mechanism: special-purpose ranges, minimum prefix lengths,
//! this host's and the fleet's addresses, the allowlist) and [`route`] says where it goes in a
//! fleet. The engine asks [`admit`] before anything enters its ledger, the owner asks
//! [`route`] before anything is written to etcd, and a record read from etcd is admitted as
//! [`Provenance::FleetRecord`] on every node, whatever the node that wrote it checked.
//!
//! The rule behind every arm: what an outside party sent (a feed, CrowdSec, a packet, a SIP
//! proxy relaying a remote party, whoever can write to etcd) passes every check; only this
//! host's operator may override one, by saying `--force`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{
    ledger::SourceId,
    proven_view::ProvenView,
    sanitise::{AllowList, Rejection, Sanitiser},
};

/// A comment (on a ban, from the CLI, the ban API or etcd) is shown to operators: it is kept
/// short and free of control characters, which could drive their terminals.
pub const MAX_COMMENT_CHARS: usize = 200;

/// Where a change came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provenance {
    /// A feed this node polls: APIBAN or a blocklist.
    Feed,
    /// CrowdSec's decisions, read from its LAPI.
    Crowdsec,
    /// This host's SIP scanner detection: evidence from packets, which anyone can send.
    Detection,
    /// A SIP proxy through the ban API: what it asks for comes from a remote party's messages.
    BanApi,
    /// A ban derived from the ledger (IPv6 escalation): no feed sent it.
    Derived,
    /// This host's operator (CLI, control socket); `force` overrides the checks that keep the
    /// host reachable and the allowlist meaningful.
    Operator { force: bool },
    /// A ban record another node (or anyone who can write to etcd) put in etcd.
    FleetRecord(FleetRecordKind),
    /// An allowlist entry read from etcd.
    FleetAllow,
    /// This node's own business (its settings, its addresses, its sources' bookkeeping).
    Local,
}

/// What a record in etcd claims to be, which decides the checks beyond a feed's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FleetRecordKind {
    /// An operator's ban. `held_here`: this node holds the same record already, so it is its
    /// own operator's (forced) ban as etcd echoes it back, not an outside party's.
    Operator { held_here: bool },
    /// Another node's detection ban: weighed against the peers this node holds proven.
    Detection,
    /// A feed's, a proxy's or CrowdSec's ban, relayed by the node that took it.
    Other,
}

impl FleetRecordKind {
    pub fn of(source: &SourceId, held_here: bool) -> Self {
        match source {
            SourceId::Manual => Self::Operator { held_here },
            SourceId::Detect => Self::Detection,
            _ => Self::Other,
        }
    }
}

/// Where a change goes in a fleet, once applied here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Nowhere: this node's alone, or etcd's already.
    Local,
    /// To etcd, fenced on this node's leadership: only the leader's feeds speak for the fleet.
    LeaderFenced,
    /// To etcd for every node, from any node.
    EveryNode,
}

/// Where a change of this provenance goes in a fleet. Every node enforces what reaches etcd,
/// each after its own [`admit`].
pub fn route(from: Provenance) -> Route {
    match from {
        Provenance::Feed | Provenance::Crowdsec => Route::LeaderFenced,
        // A detection's or a proxy's ban protects every node, like an operator's.
        Provenance::Detection | Provenance::BanApi | Provenance::Operator { .. } => {
            Route::EveryNode
        }
        Provenance::Derived
        | Provenance::FleetRecord(_)
        | Provenance::FleetAllow
        | Provenance::Local => Route::Local,
    }
}

/// What this node checks against: its sanitiser and allowlist, and the peers it will not let
/// another node's detection ban.
#[derive(Clone, Copy)]
pub struct Checks<'a> {
    pub sanitiser: &'a Sanitiser,
    pub allow: &'a AllowList,
    /// `--detect-exempt`.
    pub detect_exempt: &'a [IpNet],
    pub proven: &'a ProvenView,
    pub now: u64,
}

/// Why a change was not admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A sanitiser rule.
    Rule(Rejection),
    /// The comment is too long or holds a control character (the text says which).
    Comment(String),
    /// A ban of a whole address family, which not even `--force` allows.
    WholeFamily,
    /// An operator's ban that would cut this host off or have no effect; `--force` overrides.
    Operator(String),
    /// Another node's detection ban of a peer this node exempts (`--detect-exempt`).
    DetectExempt,
    /// Another node's detection ban of a peer this node's detection holds proven.
    ProvenPeer,
}

impl Refusal {
    /// The reason as `apiban_cluster_records_refused_total` and the logs name it.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Rule(why) => why.name(),
            Refusal::Comment(_) => "comment",
            Refusal::WholeFamily => "too_broad",
            Refusal::Operator(_) => "operator",
            Refusal::DetectExempt => "detect_exempt",
            Refusal::ProvenPeer => "proven_peer",
        }
    }
}

impl Refusal {
    /// The sanitiser's rule behind a refusal, as feeds count their skipped entries. A feed's
    /// entries carry no comment of their own making, so only a rule refuses them; anything
    /// else counts as invalid.
    pub fn rule(&self) -> Rejection {
        match self {
            Refusal::Rule(why) => *why,
            _ => Rejection::Invalid,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Rule(why) => write!(f, "{why}"),
            Refusal::Comment(text) | Refusal::Operator(text) => f.write_str(text),
            Refusal::WholeFamily => f.write_str("a ban of the whole address family"),
            Refusal::DetectExempt => f.write_str("a peer exempt from detection here"),
            Refusal::ProvenPeer => f.write_str("a peer this node's detection holds proven"),
        }
    }
}

/// Whether a ban of `net` with `comment`, of this provenance, may enter this node's ledger.
pub fn admit(
    from: Provenance,
    net: IpNet,
    comment: Option<&str>,
    checks: &Checks<'_>,
) -> Result<(), Refusal> {
    let comment_ok = || match comment.and_then(comment_problem) {
        Some(problem) => Err(Refusal::Comment(problem)),
        None => Ok(()),
    };
    match from {
        Provenance::Feed
        | Provenance::Crowdsec
        | Provenance::Detection
        | Provenance::BanApi
        | Provenance::Derived => {
            checks
                .sanitiser
                .check_net(net, checks.allow)
                .map_err(Refusal::Rule)?;
            comment_ok()
        }
        Provenance::Operator { force } => {
            if net.prefix_len() == 0 {
                return Err(Refusal::WholeFamily);
            }
            comment_ok()?;
            if force {
                return Ok(());
            }
            operator_checks(net, checks).map_err(Refusal::Operator)
        }
        Provenance::FleetRecord(kind) => {
            let ruled = match checks.sanitiser.check_net(net, checks.allow) {
                // The allowlist wins in the dataplane anyway; an operator may record a ban
                // it covers.
                Err(Rejection::Allowlisted) if matches!(kind, FleetRecordKind::Operator { .. }) => {
                    Ok(())
                }
                other => other.map_err(Refusal::Rule),
            };
            match (ruled, kind) {
                // This node's own operator's ban, echoed by etcd: what it says must still be
                // printable.
                (Err(_), FleetRecordKind::Operator { held_here: true }) => {}
                (ruled, _) => ruled?,
            }
            comment_ok()?;
            if kind == FleetRecordKind::Detection {
                if checks.detect_exempt.iter().any(|e| e.contains(&net.addr())) {
                    return Err(Refusal::DetectExempt);
                }
                if checks.proven.covers(net.addr(), checks.now) {
                    return Err(Refusal::ProvenPeer);
                }
            }
            Ok(())
        }
        Provenance::FleetAllow => checks.sanitiser.check_allow(net).map_err(Refusal::Rule),
        // Nothing of this node's own business is a ban.
        Provenance::Local => Ok(()),
    }
}

/// What keeps an operator's ban from cutting the host off from itself (loopback, its own
/// addresses, the fleet's etcd endpoints and nodes) or having no effect (the allowlist wins).
fn operator_checks(net: IpNet, checks: &Checks<'_>) -> Result<(), String> {
    let loopback: [IpNet; 2] = [
        IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::LOCALHOST, 8).trunc()),
        IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
    ];
    let force_hint = "; add --force to ban it anyway";
    if let Some(lo) = loopback
        .iter()
        .find(|lo| lo.contains(&net) || net.contains(*lo))
    {
        return Err(format!("it covers loopback ({lo}){force_hint}"));
    }
    let own: Option<IpAddr> = checks
        .sanitiser
        .own_addresses()
        .into_iter()
        .find(|a| net.contains(a));
    if let Some(own) = own {
        return Err(format!(
            "it covers {own}, an address of this host{force_hint}"
        ));
    }
    if let Some(etcd) = checks.sanitiser.covered_fleet_address(&net) {
        return Err(format!(
            "it covers {etcd}, an etcd endpoint or a node of this fleet{force_hint}"
        ));
    }
    if checks.allow.covers(&net) {
        let entry = checks
            .allow
            .covering(net.network())
            .map(|a| a.to_string())
            .unwrap_or_default();
        return Err(format!(
            "the allowlist covers it ({entry}) and wins, so the ban would have no effect; \
             remove it from the allowlist first, or add --force to record it anyway"
        ));
    }
    Ok(())
}

/// Why a comment cannot be kept, if it cannot: it is shown to operators.
pub fn comment_problem(comment: &str) -> Option<String> {
    let chars = comment.chars().count();
    if chars > MAX_COMMENT_CHARS {
        return Some(format!(
            "the comment has {chars} characters; a comment has at most {MAX_COMMENT_CHARS}"
        ));
    }
    comment.chars().find(|c| c.is_control()).map(|c| {
        format!(
            "the comment holds a control character ({})",
            c.escape_unicode()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        crate::sanitise::parse_net(s).unwrap()
    }

    struct Node {
        sanitiser: Sanitiser,
        allow: AllowList,
        exempt: Vec<IpNet>,
        proven: ProvenView,
    }

    impl Node {
        /// Own address 203.0.113.9 is special-purpose already; 45.1.1.1 is this host's,
        /// 46.1.1.1 the fleet's etcd, 47.1.0.0/16 allowlisted, 48.1.1.1 a peer exempt from
        /// detection and 49.1.1.1 one proven here.
        fn new() -> Self {
            let mut sanitiser = Sanitiser::new(16, 32, ["45.1.1.1".parse().unwrap()]);
            sanitiser.set_fleet_addresses(["46.1.1.1".parse().unwrap()]);
            let proven = ProvenView::default();
            proven.replace([("49.1.1.1".parse().unwrap(), 2_000)].into());
            Self {
                sanitiser,
                allow: AllowList::new([net("47.1.0.0/16")]),
                exempt: vec![net("48.1.1.1")],
                proven,
            }
        }

        fn admit(&self, from: Provenance, n: &str, comment: Option<&str>) -> Result<(), Refusal> {
            let checks = Checks {
                sanitiser: &self.sanitiser,
                allow: &self.allow,
                detect_exempt: &self.exempt,
                proven: &self.proven,
                now: 1_000,
            };
            admit(from, net(n), comment, &checks)
        }
    }

    const OUTSIDE: [Provenance; 5] = [
        Provenance::Feed,
        Provenance::Crowdsec,
        Provenance::Detection,
        Provenance::BanApi,
        Provenance::Derived,
    ];

    #[test]
    fn outside_parties_pass_every_check() {
        let node = Node::new();
        for from in OUTSIDE
            .into_iter()
            .chain([Provenance::FleetRecord(FleetRecordKind::Other)])
        {
            let rule = |n| node.admit(from, n, None).map_err(|r| r.rule());
            assert_eq!(rule("8.8.8.8"), Ok(()), "{from:?}");
            assert_eq!(rule("10.0.0.1"), Err(Rejection::SpecialPurpose), "{from:?}");
            assert_eq!(rule("8.0.0.0/8"), Err(Rejection::TooBroad), "{from:?}");
            assert_eq!(rule("45.1.1.0/24"), Err(Rejection::OwnAddress), "{from:?}");
            assert_eq!(
                rule("46.1.1.1"),
                Err(Rejection::FleetInfrastructure),
                "{from:?}"
            );
            assert_eq!(rule("47.1.2.3"), Err(Rejection::Allowlisted), "{from:?}");
            assert!(matches!(
                node.admit(from, "8.8.8.8", Some("a\u{1b}[2J")),
                Err(Refusal::Comment(_))
            ));
        }
    }

    #[test]
    fn only_this_hosts_operator_may_force() {
        let node = Node::new();
        let operator = Provenance::Operator { force: false };
        for n in ["127.0.0.1", "45.1.1.1", "46.1.1.0/24", "47.1.2.3"] {
            assert!(
                matches!(node.admit(operator, n, None), Err(Refusal::Operator(_))),
                "{n}"
            );
            assert_eq!(
                node.admit(Provenance::Operator { force: true }, n, None),
                Ok(())
            );
        }
        // An operator may ban what no feed may: a private range, a short prefix.
        assert_eq!(node.admit(operator, "10.9.0.0/16", None), Ok(()));
        assert_eq!(node.admit(operator, "8.0.0.0/8", None), Ok(()));
        for force in [false, true] {
            let from = Provenance::Operator { force };
            assert_eq!(
                node.admit(from, "0.0.0.0/0", None),
                Err(Refusal::WholeFamily)
            );
            assert!(matches!(
                node.admit(from, "8.8.8.8", Some(&"x".repeat(MAX_COMMENT_CHARS + 1))),
                Err(Refusal::Comment(_))
            ));
        }
    }

    #[test]
    fn another_nodes_records_pass_this_nodes_checks() {
        let node = Node::new();
        let operators =
            |held_here| Provenance::FleetRecord(FleetRecordKind::Operator { held_here });
        // An operator's ban elsewhere: the allowlist wins in the dataplane, so it may be
        // recorded; every other check holds.
        assert_eq!(node.admit(operators(false), "47.1.2.3", None), Ok(()));
        assert_eq!(
            node.admit(operators(false), "10.0.0.0/8", None),
            Err(Refusal::Rule(Rejection::SpecialPurpose))
        );
        assert_eq!(
            node.admit(operators(false), "0.0.0.0/0", None),
            Err(Refusal::Rule(Rejection::SpecialPurpose))
        );
        // This node's own forced ban, echoed back: kept, but its comment is still checked.
        assert_eq!(node.admit(operators(true), "10.0.0.0/8", None), Ok(()));
        assert!(matches!(
            node.admit(operators(true), "10.0.0.0/8", Some("\u{7}")),
            Err(Refusal::Comment(_))
        ));
        // Another node's detection ban of a peer this node trusts.
        let detection = Provenance::FleetRecord(FleetRecordKind::Detection);
        assert_eq!(node.admit(detection, "8.8.8.8", None), Ok(()));
        assert_eq!(
            node.admit(detection, "48.1.1.1", None),
            Err(Refusal::DetectExempt)
        );
        assert_eq!(
            node.admit(detection, "49.1.1.1", None),
            Err(Refusal::ProvenPeer)
        );
        assert_eq!(
            node.admit(
                Provenance::FleetRecord(FleetRecordKind::Other),
                "49.1.1.1",
                None
            ),
            Ok(())
        );
        // Allowlist entries: none broader than a feed's shortest ban outside special ranges.
        assert_eq!(
            node.admit(Provenance::FleetAllow, "10.0.0.0/8", None),
            Ok(())
        );
        assert_eq!(
            node.admit(Provenance::FleetAllow, "0.0.0.0/0", None),
            Err(Refusal::Rule(Rejection::TooBroad))
        );
        assert_eq!(
            FleetRecordKind::of(&SourceId::Manual, true),
            FleetRecordKind::Operator { held_here: true }
        );
        assert_eq!(
            FleetRecordKind::of(&SourceId::Detect, true),
            FleetRecordKind::Detection
        );
        assert_eq!(
            FleetRecordKind::of(&SourceId::Api, false),
            FleetRecordKind::Other
        );
    }

    #[test]
    fn only_the_leaders_feeds_speak_for_the_fleet() {
        assert_eq!(route(Provenance::Feed), Route::LeaderFenced);
        assert_eq!(route(Provenance::Crowdsec), Route::LeaderFenced);
        for from in [
            Provenance::Detection,
            Provenance::BanApi,
            Provenance::Operator { force: true },
        ] {
            assert_eq!(route(from), Route::EveryNode, "{from:?}");
        }
        for from in [
            Provenance::Derived,
            Provenance::FleetRecord(FleetRecordKind::Other),
            Provenance::FleetAllow,
            Provenance::Local,
        ] {
            assert_eq!(route(from), Route::Local, "{from:?}");
        }
    }
}
