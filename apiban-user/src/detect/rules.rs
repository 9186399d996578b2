//! The rules that recognise a scanner from what the dataplane sends: samples of its requests
//! and rate reports. Each rule has a name (in evidence, logs and metrics) and a threshold;
//! the state per source is bounded and forgets a source once its window has passed.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    time::Duration,
};

use apiban_common::detect::{KIND_RATE, METHOD_NAMES, METHOD_OPTIONS, METHOD_REGISTER};

use super::{
    DetectSettings,
    sample::Sample,
    sip::{SipRequest, printable},
};
use crate::human::format_duration;

/// Rule names, as evidence, logs and `apiban_detect_matches_total{rule}` spell them.
pub const SCANNER_USER_AGENT: &str = "scanner-user-agent";
pub const REQUEST_RATE: &str = "request-rate";
pub const EXTENSION_ENUMERATION: &str = "extension-enumeration";
pub const MALFORMED_REQUESTS: &str = "malformed-requests";
pub const RULES: [&str; 4] = [
    SCANNER_USER_AGENT,
    REQUEST_RATE,
    EXTENSION_ENUMERATION,
    MALFORMED_REQUESTS,
];

/// Sources followed at once; a flood of spoofed sources cannot grow the agent past this.
const MAX_SOURCES: usize = 65_536;
/// Longest evidence line kept.
const LINE_CHARS: usize = 160;

/// A rule that matched a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub addr: IpAddr,
    pub rule: &'static str,
    /// What the rule counted.
    pub counts: String,
    /// The first matching line, printable and truncated.
    pub line: String,
}

#[derive(Debug, Default)]
struct Tracked {
    window_start_ms: u64,
    users: BTreeSet<String>,
    /// Sampled REGISTER and OPTIONS requests in this window.
    probes_sampled: u32,
    enumeration_found: bool,
    /// The dataplane's count of them when the window started.
    probes_at_start: u32,
    malformed: u32,
    /// The request line of the first sample in this window, for a rate report's evidence.
    first_line: Option<String>,
}

/// Most distinct users kept per source: far above any threshold that makes sense.
const MAX_USERS: usize = 4_096;

#[derive(Debug, Default)]
pub struct Detector {
    sources: HashMap<IpAddr, Tracked>,
}

impl Detector {
    /// What one record from the dataplane shows about its source, if a rule matches.
    pub fn observe(
        &mut self,
        settings: &DetectSettings,
        sample: &Sample,
        now_ms: u64,
    ) -> Option<Finding> {
        let window_ms = window(settings).as_millis() as u64;
        if self.sources.len() >= MAX_SOURCES && !self.sources.contains_key(&sample.addr) {
            self.sources
                .retain(|_, t| now_ms.saturating_sub(t.window_start_ms) < window_ms);
            if self.sources.len() >= MAX_SOURCES {
                self.sources.clear();
            }
        }
        let tracked = self.sources.entry(sample.addr).or_default();
        if now_ms.saturating_sub(tracked.window_start_ms) >= window_ms {
            *tracked = Tracked {
                window_start_ms: now_ms,
                // A REGISTER's or OPTIONS' own request is counted in `probes` already.
                probes_at_start: sample
                    .probes
                    .saturating_sub(u32::from(is_probe(sample.method))),
                ..Tracked::default()
            };
        }
        let finding = |rule, counts: String, line: String| {
            Some(Finding {
                addr: sample.addr,
                rule,
                counts,
                line,
            })
        };
        if sample.kind == KIND_RATE {
            let (method, count) = busiest(&sample.requests);
            let limit = settings.rate?;
            return finding(
                REQUEST_RATE,
                format!(
                    "{count} {method} requests within {} (limit {})",
                    format_duration(limit.window),
                    limit.requests
                ),
                tracked.first_line.clone().unwrap_or_default(),
            );
        }
        let request = match SipRequest::parse(&sample.payload) {
            Ok(r) => r,
            Err(why) => {
                tracked.malformed += 1;
                let limit = settings.malformed?;
                if tracked.malformed == limit.requests {
                    let first = sample
                        .payload
                        .split(|b| *b == b'\n')
                        .next()
                        .unwrap_or_default();
                    return finding(
                        MALFORMED_REQUESTS,
                        format!(
                            "{} malformed requests within {} ({why})",
                            tracked.malformed,
                            format_duration(limit.window)
                        ),
                        printable(&String::from_utf8_lossy(first), LINE_CHARS),
                    );
                }
                return None;
            }
        };
        let request_line = format!("{} {} SIP/2.0", request.method, request.uri);
        tracked
            .first_line
            .get_or_insert_with(|| printable(&request_line, LINE_CHARS));
        if let Some(agent) = request.user_agent {
            let lower = agent.to_ascii_lowercase();
            if let Some(known) = settings
                .user_agents
                .iter()
                .find(|known| lower.contains(known.as_str()))
            {
                return finding(
                    SCANNER_USER_AGENT,
                    format!("User-Agent contains `{known}`"),
                    printable(&format!("User-Agent: {agent}"), LINE_CHARS),
                );
            }
        }
        // REGISTER and OPTIONS only: a PBX's INVITEs go to many numbers, its registrations
        // and keep-alives to its own few accounts; svwar walks extensions with REGISTER by
        // default (and an INVITE flood is the rate rule's).
        let probes_users = matches!(request.method, "REGISTER" | "OPTIONS");
        if let (Some(limit), Some(user), true) =
            (settings.users, request.target_user(), probes_users)
        {
            tracked.probes_sampled += 1;
            if tracked.users.len() < MAX_USERS {
                tracked.users.insert(user.to_owned());
            }
            let estimate = distinct_users(tracked, sample.probes);
            if estimate >= limit.requests && !tracked.enumeration_found {
                tracked.enumeration_found = true;
                return finding(
                    EXTENSION_ENUMERATION,
                    format!(
                        "about {estimate} distinct target users within {} (last: {user})",
                        format_duration(limit.window)
                    ),
                    printable(&request_line, LINE_CHARS),
                );
            }
        }
        None
    }

    /// Sources followed now.
    pub fn tracked(&self) -> usize {
        self.sources.len()
    }
}

/// The distinct target users among all of a source's REGISTER and OPTIONS requests in this
/// window, from the sampled ones. The dataplane samples only some requests; when every
/// sampled request named a new user, as in an enumeration, the requests between them
/// most likely did too, so the count is scaled by requests per sample. When users repeat
/// (a PBX re-registering its accounts) the sampled count is the estimate.
fn distinct_users(tracked: &Tracked, probes_now: u32) -> u32 {
    let distinct = tracked.users.len() as u32;
    let requests = probes_now.saturating_sub(tracked.probes_at_start);
    if distinct == tracked.probes_sampled && requests > tracked.probes_sampled {
        (u64::from(distinct) * u64::from(requests) / u64::from(tracked.probes_sampled.max(1)))
            .min(u64::from(u32::MAX)) as u32
    } else {
        distinct
    }
}

/// REGISTER and OPTIONS: what the dataplane counts in `probes`.
fn is_probe(method: u8) -> bool {
    method == METHOD_REGISTER || method == METHOD_OPTIONS
}

/// The window state is kept for: the longest of the rules' windows.
fn window(settings: &DetectSettings) -> Duration {
    [settings.rate, settings.users, settings.malformed]
        .iter()
        .flatten()
        .map(|l| l.window)
        .max()
        .unwrap_or(Duration::from_secs(60))
}

/// The method with the most requests, and how many.
fn busiest(requests: &[u32; 4]) -> (&'static str, u32) {
    let (i, n) = requests
        .iter()
        .enumerate()
        .max_by_key(|(_, n)| **n)
        .map_or((0, 0), |(i, n)| (i, *n));
    (METHOD_NAMES[i], n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiban_common::detect::KIND_SAMPLE;

    fn sample(addr: &str, payload: &[u8]) -> Sample {
        Sample {
            kind: KIND_SAMPLE,
            addr: addr.parse().unwrap(),
            method: 0,
            dst_port: 5060,
            requests: [1, 0, 0, 0],
            seen: 1,
            probes: 1,
            payload: payload.to_vec(),
        }
    }

    fn register(to_user: &str, agent: &str) -> Vec<u8> {
        format!(
            "REGISTER sip:192.0.2.1 SIP/2.0\r\nTo: <sip:{to_user}@192.0.2.1>\r\nFrom: <sip:{to_user}@192.0.2.1>;tag=1\r\nUser-Agent: {agent}\r\nCall-ID: 1\r\n\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn a_scanner_user_agent_matches_case_insensitively() {
        let s = DetectSettings::default();
        let mut d = Detector::default();
        let f = d
            .observe(
                &s,
                &sample("198.51.100.7", &register("100", "Friendly-Scanner 0.3")),
                0,
            )
            .expect("a match");
        assert_eq!(f.rule, SCANNER_USER_AGENT);
        assert_eq!(f.line, "User-Agent: Friendly-Scanner 0.3");
    }

    #[test]
    fn a_normal_phone_is_no_finding() {
        let s = DetectSettings::default();
        let mut d = Detector::default();
        for t in 0..100 {
            let got = d.observe(
                &s,
                &sample("198.51.100.8", &register("100", "Yealink SIP-T46S")),
                t * 1000,
            );
            assert_eq!(got, None);
        }
    }

    #[test]
    fn many_target_users_from_one_source_is_enumeration() {
        let s = DetectSettings::default();
        let limit = s.users.unwrap().requests;
        let mut d = Detector::default();
        let mut found = None;
        for user in 0..limit {
            found = d.observe(
                &s,
                &sample("198.51.100.9", &register(&format!("{}", 100 + user), "x")),
                10,
            );
            if user + 1 < limit {
                assert_eq!(found, None, "after {user}");
            }
        }
        assert_eq!(found.expect("a match").rule, EXTENSION_ENUMERATION);
    }

    #[test]
    fn sampled_enumeration_is_scaled_to_the_requests_between_samples() {
        let s = DetectSettings::default();
        let mut d = Detector::default();
        // The dataplane's sampling: the first 8 requests, then one in 8; every request
        // names a new user.
        let mut found = None;
        for n in 1..=200u32 {
            if n > 8 && n % 8 != 0 {
                continue;
            }
            let mut one = sample(
                "198.51.100.14",
                &register(&format!("{}", 1000 + n), "Zoiper"),
            );
            one.probes = n;
            one.seen = n;
            if let Some(f) = d.observe(&s, &one, 10) {
                found = Some((n, f));
                break;
            }
        }
        let (n, f) = found.expect("enumeration found");
        assert_eq!(f.rule, EXTENSION_ENUMERATION);
        assert!(n <= 24, "found only after {n} requests");
    }

    #[test]
    fn a_pbx_re_registering_its_trunks_is_no_enumeration() {
        let s = DetectSettings::default();
        let mut d = Detector::default();
        // Five trunks re-registered every minute, all sampled, for an hour.
        for n in 0..300u32 {
            let mut one = sample(
                "198.51.100.15",
                &register(&format!("trunk{}", n % 5), "Asterisk"),
            );
            one.probes = n + 1;
            one.seen = n + 1;
            assert_eq!(d.observe(&s, &one, u64::from(n / 5) * 60_000), None);
        }
    }

    #[test]
    fn a_pbx_calling_many_numbers_is_no_enumeration() {
        let s = DetectSettings::default();
        let mut d = Detector::default();
        for n in 0..200 {
            let invite = format!(
                "INVITE sip:{n}@192.0.2.1 SIP/2.0\r\nTo: <sip:{n}@192.0.2.1>\r\nFrom: <sip:pbx@192.0.2.9>;tag=1\r\nUser-Agent: Asterisk PBX 20\r\n\r\n"
            );
            assert_eq!(
                d.observe(&s, &sample("198.51.100.13", invite.as_bytes()), 10),
                None
            );
        }
    }

    #[test]
    fn malformed_requests_over_the_threshold_match_once() {
        let s = DetectSettings::default();
        let limit = s.malformed.unwrap().requests;
        let mut d = Detector::default();
        let matches = (0..limit * 3)
            .filter_map(|_| d.observe(&s, &sample("198.51.100.10", b"\x16\x03\x01 garbage\r\n"), 5))
            .count();
        assert_eq!(matches, 1);
    }

    #[test]
    fn a_rate_report_names_the_busiest_method() {
        let s = DetectSettings::default();
        let mut d = Detector::default();
        let mut report = sample("198.51.100.11", b"");
        report.kind = KIND_RATE;
        report.requests = [300, 2, 0, 0];
        let f = d.observe(&s, &report, 0).expect("a match");
        assert_eq!(f.rule, REQUEST_RATE);
        assert!(
            f.counts.starts_with("300 REGISTER requests"),
            "{}",
            f.counts
        );
    }

    #[test]
    fn the_window_forgets_old_users() {
        let s = DetectSettings::default();
        let limit = s.users.unwrap().requests;
        let window = s.users.unwrap().window.as_millis() as u64;
        let mut d = Detector::default();
        for user in 0..limit {
            // One user per window: never enumeration.
            let got = d.observe(
                &s,
                &sample("198.51.100.12", &register(&format!("{user}"), "x")),
                u64::from(user) * (window + 1),
            );
            assert_eq!(got, None);
        }
        assert_eq!(d.tracked(), 1);
    }
}
