//! The rules that recognise a scanner from what the dataplane sends: samples of its requests
//! and rate reports. Each rule has a name (in evidence, logs and metrics) and a threshold;
//! the state per source is bounded and forgets a source once its window has passed.
//!
//! The request rules read requests, which anyone who can forge a source address can send in
//! that address's name, so none fires on one request: a signature must be seen in several
//! sampled requests, a rate or an enumeration needs many, and their bans are short. What
//! cannot be read as SIP is counted and shown, never a reason to ban.
//!
//! The server's answers (seen on egress, sent to the source's address) give what a forger
//! cannot: the nonce of a digest challenge reaches only the real source, so credentials for
//! it come from that source. Answered with 2xx, they prove the source a real peer (see
//! [`super::proven`]); answered with another challenge or a refusal again and again, they
//! are a password being guessed (`auth-failure`).

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    net::IpAddr,
    time::Duration,
};

use apiban_common::detect::{
    KIND_RATE, KIND_RESPONSE, METHOD_NAMES, METHOD_OPTIONS, METHOD_REGISTER, METHODS,
};

use super::{
    DetectSettings,
    sample::Sample,
    sip::{self, SipRequest, SipResponse, printable},
};
use crate::human::format_duration;

/// Rule names, as evidence, logs and `apiban_detect_matches_total{rule}` spell them.
pub const SCANNER_USER_AGENT: &str = "scanner-user-agent";
pub const INJECTION: &str = "injection";
pub const REQUEST_RATE: &str = "request-rate";
pub const EXTENSION_ENUMERATION: &str = "extension-enumeration";
pub const AUTH_FAILURE: &str = "auth-failure";
pub const RULES: [&str; 5] = [
    SCANNER_USER_AGENT,
    INJECTION,
    REQUEST_RATE,
    EXTENSION_ENUMERATION,
    AUTH_FAILURE,
];

/// Whether a rule's evidence could have been brought by someone forging the source address:
/// everything read from requests alone.
pub fn forgeable(rule: &str) -> bool {
    rule != AUTH_FAILURE
}

/// Sampled requests carrying a scanner's signature (its User-Agent, an injection) that a
/// source must have sent within [`SIGNATURE_WINDOW`] before a signature rule matches: one
/// forged datagram must not be enough. The dataplane samples a new source's first requests
/// all, so a real scanner is caught on its third.
pub const SIGNATURE_REQUESTS: u32 = 3;
pub const SIGNATURE_WINDOW: Duration = Duration::from_secs(60);

/// Sources followed at once; a flood of spoofed sources cannot grow the agent past this.
const MAX_SOURCES: usize = 65_536;
/// Longest evidence line kept.
const LINE_CHARS: usize = 160;

/// What an injection puts in a user part, and no phone's or PBX's user part holds: quotes,
/// SQL comments and the words of a SQL or template injection (matched as whole words, case
/// insensitively, so `selector` or `reunion` are not).
const INJECTION_MARKS: [&str; 6] = ["'", "\"", "%27", "%22", "--", "/*"];
const INJECTION_WORDS: [&str; 7] = [
    "union",
    "select",
    "sleep",
    "benchmark",
    "waitfor",
    "jndi",
    "script",
];

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

/// A source proved a real peer (see [`super::proven`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proved {
    pub addr: IpAddr,
    pub how: String,
}

/// A sample that could not be read as SIP: counted and shown, never a ban reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    pub addr: IpAddr,
    pub why: String,
    pub line: String,
}

#[derive(Debug, Default)]
struct Tracked {
    window_start_ms: u64,
    users: BTreeSet<String>,
    /// Sampled REGISTER and OPTIONS requests in this window.
    probes_sampled: u32,
    enumeration_found: bool,
    /// A sampled request in this window answered a challenge: this source registers or
    /// calls with credentials, as a NAT office full of phones does and a scanner walking
    /// extensions does not.
    credentials: bool,
    /// The dataplane's count of them when the window started.
    probes_at_start: u32,
    /// Sampled requests with a signature in this window, and the first one's rule and
    /// evidence.
    signatures: u32,
    signature: Option<(&'static str, String, String)>,
    /// The request line of the first sample in this window, for a rate report's evidence.
    first_line: Option<String>,
    /// Nonces the server's challenges to this source carried (seen on egress), newest last.
    nonces: VecDeque<String>,
    /// Calls (Call-IDs) in which this source sent credentials for one of those nonces.
    answered: VecDeque<String>,
    /// Credentials of this source answered by another challenge or a refusal, this window.
    auth_failures: u32,
    auth_failure_line: Option<String>,
}

/// Nonces and answered calls kept per source: a handshake takes one of each.
const MAX_NONCES: usize = 16;
const MAX_ANSWERED: usize = 32;

fn push_bounded(queue: &mut VecDeque<String>, item: &str, max: usize) {
    if queue.iter().any(|q| q == item) {
        return;
    }
    if queue.len() >= max {
        queue.pop_front();
    }
    queue.push_back(item.to_owned());
}

/// Most distinct users kept per source: far above any threshold that makes sense.
const MAX_USERS: usize = 4_096;

#[derive(Debug, Default)]
pub struct Detector {
    sources: HashMap<IpAddr, Tracked>,
    /// Samples (or messages in them) that were not SIP requests we could read.
    pub unreadable: u64,
    pub last_unreadable: Option<Unreadable>,
    /// Responses read from the egress program.
    pub responses: u64,
    /// Proofs found since the caller last took them.
    proofs: Vec<Proved>,
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
            // The report names the method that went over its threshold.
            let m = usize::from(sample.method);
            let limit = *settings.rate.per_method.get(m)?;
            if limit == 0 {
                return None;
            }
            return finding(
                REQUEST_RATE,
                format!(
                    "{} {} requests within {} (limit {limit})",
                    sample.requests[m],
                    METHOD_NAMES[m],
                    format_duration(settings.rate.window),
                ),
                tracked.first_line.clone().unwrap_or_default(),
            );
        }
        if sample.kind == KIND_RESPONSE {
            self.responses += 1;
            let mut found = None;
            for message in sip::messages(&sample.payload) {
                let Ok(response) = SipResponse::parse(message) else {
                    continue;
                };
                let (outcome, proof) = response_rules(settings, tracked, &response);
                if let Some(how) = proof {
                    self.proofs.push(Proved {
                        addr: sample.addr,
                        how,
                    });
                }
                found = found.or(outcome);
            }
            let (rule, counts, line) = found?;
            return finding(rule, counts, line);
        }
        let cut = sample.payload.len() >= apiban_common::detect::SNAPLEN;
        let messages = sip::messages(&sample.payload);
        let last = messages.len().saturating_sub(1);
        let mut found = None;
        for (i, message) in messages.into_iter().enumerate() {
            if sip::is_response(message) {
                continue;
            }
            let request = match SipRequest::parse(message) {
                Ok(r) => r,
                // The sample's end, not the sender, cut this one.
                Err(sip::Malformed::Truncated) if i == last && (i > 0 || cut) => break,
                Err(why) => {
                    self.unreadable += 1;
                    let first = message.split(|b| *b == b'\n').next().unwrap_or_default();
                    self.last_unreadable = Some(Unreadable {
                        addr: sample.addr,
                        why: why.to_string(),
                        line: printable(&String::from_utf8_lossy(first), LINE_CHARS),
                    });
                    // What follows cannot be placed either.
                    break;
                }
            };
            if found.is_none() {
                found = request_rules(settings, tracked, &request, sample.probes);
            }
        }
        let (rule, counts, line) = found?;
        finding(rule, counts, line)
    }

    /// Sources followed now.
    pub fn tracked(&self) -> usize {
        self.sources.len()
    }

    /// The proofs found since the last call.
    pub fn take_proofs(&mut self) -> Vec<Proved> {
        std::mem::take(&mut self.proofs)
    }
}

/// What one response the server sent to a source shows: a nonce issued, a proof, or an
/// authentication failure. Returns a finding and a proof's description.
fn response_rules(
    settings: &DetectSettings,
    tracked: &mut Tracked,
    response: &SipResponse,
) -> (Option<(&'static str, String, String)>, Option<String>) {
    let answered_call = response
        .call_id
        .is_some_and(|id| tracked.answered.iter().any(|a| a == id));
    let user = response.target_user().unwrap_or("?");
    if (200..300).contains(&response.status)
        && matches!(response.method, "REGISTER" | "INVITE")
        && answered_call
    {
        return (
            None,
            Some(format!(
                "{} to an authenticated {} for {user}",
                response.status, response.method
            )),
        );
    }
    let challenge = matches!(response.status, 401 | 407);
    if challenge && let Some(nonce) = response.nonce {
        push_bounded(&mut tracked.nonces, nonce, MAX_NONCES);
    }
    if !(answered_call && (challenge || response.status == 403)) {
        return (None, None);
    }
    tracked.auth_failures += 1;
    let line = format!(
        "SIP/2.0 {} to credentials for {user} ({})",
        response.status, response.method
    );
    tracked
        .auth_failure_line
        .get_or_insert_with(|| printable(&line, LINE_CHARS));
    let Some(limit) = settings.auth_failures else {
        return (None, None);
    };
    if tracked.auth_failures < limit.requests {
        return (None, None);
    }
    (
        Some((
            AUTH_FAILURE,
            format!(
                "{} sets of credentials for nonces the server gave this address refused within {}",
                tracked.auth_failures,
                format_duration(limit.window)
            ),
            tracked.auth_failure_line.clone().unwrap_or_default(),
        )),
        None,
    )
}

/// The rules one readable request feeds: signatures, then enumeration.
fn request_rules(
    settings: &DetectSettings,
    tracked: &mut Tracked,
    request: &SipRequest,
    probes_now: u32,
) -> Option<(&'static str, String, String)> {
    let request_line = format!("{} {} SIP/2.0", request.method, request.uri);
    tracked
        .first_line
        .get_or_insert_with(|| printable(&request_line, LINE_CHARS));
    tracked.credentials |= request.credentials;
    // Credentials for a nonce the server gave this address: only the real source saw it.
    if let (Some(nonce), Some(call_id)) = (request.nonce, request.call_id)
        && tracked.nonces.iter().any(|n| n == nonce)
    {
        push_bounded(&mut tracked.answered, call_id, MAX_ANSWERED);
    }
    if let Some(signature) = signature(settings, request) {
        tracked.signatures += 1;
        let first = tracked.signature.get_or_insert(signature);
        // Every signature from here on matches: the caller reports a source once per ban,
        // and one that comes back after its ban ends is matched again.
        if tracked.signatures >= SIGNATURE_REQUESTS {
            let (rule, what, line) = first.clone();
            return Some((
                rule,
                format!(
                    "{what}; {} sampled requests within {} carried it",
                    tracked.signatures,
                    format_duration(SIGNATURE_WINDOW)
                ),
                line,
            ));
        }
    }
    // REGISTER and OPTIONS only: a PBX's INVITEs go to many numbers, its registrations
    // and keep-alives to its own few accounts; svwar walks extensions with REGISTER by
    // default (and an INVITE flood is the rate rule's).
    let probes_users = matches!(request.method, "REGISTER" | "OPTIONS");
    let (Some(limit), Some(user), true) = (settings.users, request.target_user(), probes_users)
    else {
        return None;
    };
    tracked.probes_sampled += 1;
    if tracked.users.len() < MAX_USERS {
        tracked.users.insert(user.to_owned());
    }
    // Phones behind one NAT address register many users, each answering the server's
    // challenge; an extension scanner never holds credentials to answer with.
    if tracked.credentials || tracked.enumeration_found {
        return None;
    }
    let estimate = distinct_users(tracked, probes_now);
    if estimate < limit.requests {
        return None;
    }
    tracked.enumeration_found = true;
    Some((
        EXTENSION_ENUMERATION,
        format!(
            "about {estimate} distinct target users within {}, none with credentials (last: {user})",
            format_duration(limit.window)
        ),
        printable(&request_line, LINE_CHARS),
    ))
}

/// A scanner's mark on one request: (rule, what it is, the evidence line).
fn signature(
    settings: &DetectSettings,
    request: &SipRequest,
) -> Option<(&'static str, String, String)> {
    if let Some(agent) = request.user_agent
        && let Some(known) = settings
            .user_agents
            .iter()
            .find(|known| user_agent_matches(agent, known))
    {
        return Some((
            SCANNER_USER_AGENT,
            format!("User-Agent starts with `{known}`"),
            printable(&format!("User-Agent: {agent}"), LINE_CHARS),
        ));
    }
    request.user_parts().find_map(|(place, user)| {
        let mark = injection(user)?;
        Some((
            INJECTION,
            format!("the user part of the {place} holds `{mark}`"),
            printable(&format!("{place} user: {user}"), LINE_CHARS),
        ))
    })
}

/// A User-Agent is a scanner's when it is `known`, or starts with it followed by something
/// that is not a letter or digit (a version, a space), case-insensitively: `friendly-scanner`
/// and `sipvicious 0.3.4` match, a phone whose name merely contains a short word does not.
pub fn user_agent_matches(agent: &str, known: &str) -> bool {
    let agent = agent.trim();
    let Some(head) = agent.get(..known.len()) else {
        return false;
    };
    head.eq_ignore_ascii_case(known)
        && agent[known.len()..]
            .chars()
            .next()
            .is_none_or(|c| !c.is_ascii_alphanumeric())
}

/// The first injection mark in a user part.
fn injection(user: &str) -> Option<&'static str> {
    let lower = user.to_ascii_lowercase();
    if let Some(mark) = INJECTION_MARKS.iter().find(|m| lower.contains(**m)) {
        return Some(mark);
    }
    lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .find_map(|word| INJECTION_WORDS.iter().find(|w| **w == word).copied())
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
    [
        Some(settings.rate.window),
        settings.users.map(|l| l.window),
        settings.auth_failures.map(|l| l.window),
        Some(SIGNATURE_WINDOW),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(SIGNATURE_WINDOW)
}

const _: () = assert!(METHODS == METHOD_NAMES.len());

#[cfg(test)]
mod tests {
    use super::*;
    use apiban_common::detect::{KIND_SAMPLE, METHOD_INVITE};

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

    /// `register` answering the server's challenge.
    fn register_with_credentials(to_user: &str) -> Vec<u8> {
        format!(
            "REGISTER sip:192.0.2.1 SIP/2.0\r\nTo: <sip:{to_user}@192.0.2.1>\r\nFrom: <sip:{to_user}@192.0.2.1>;tag=1\r\nAuthorization: Digest username=\"{to_user}\", nonce=\"abc\"\r\nUser-Agent: Yealink SIP-T46S\r\nCall-ID: {to_user}\r\n\r\n"
        )
        .into_bytes()
    }

    /// Feeds `n` copies of `payload` from `addr`; the findings.
    fn feed(d: &mut Detector, addr: &str, payload: &[u8], n: u32) -> Vec<Finding> {
        let s = DetectSettings::default();
        (1..=n)
            .filter_map(|i| {
                let mut one = sample(addr, payload);
                one.seen = i;
                d.observe(&s, &one, 10)
            })
            .collect()
    }

    #[test]
    fn a_scanner_user_agent_matches_on_its_third_request_only() {
        let mut d = Detector::default();
        let found = feed(
            &mut d,
            "198.51.100.7",
            &register("100", "Friendly-Scanner 0.3"),
            2,
        );
        assert_eq!(
            found,
            [],
            "one or two requests, forged or not, are not enough"
        );
        let found = feed(
            &mut d,
            "198.51.100.7",
            &register("100", "Friendly-Scanner 0.3"),
            5,
        );
        assert_eq!(
            found.len(),
            5,
            "the third of seven and each after: {found:?}"
        );
        assert_eq!(found[0].rule, SCANNER_USER_AGENT);
        assert_eq!(found[0].line, "User-Agent: Friendly-Scanner 0.3");
        assert!(found[0].counts.contains("3 sampled requests"), "{found:?}");
    }

    #[test]
    fn signatures_match_whole_names_not_substrings() {
        for (agent, known, hit) in [
            ("friendly-scanner", "friendly-scanner", true),
            ("sipvicious 0.3.4", "sipvicious", true),
            ("SIPVicious/0.3.4", "sipvicious", true),
            ("iWar 0.5", "iwar", true),
            // A device whose name merely holds a short word.
            ("Polycom-iWar-7", "iwar", false),
            ("iwarrior phone 2.1", "iwar", false),
            ("MySIPCLIent 1.0", "sipcli", false),
            ("sipclient 4", "sipcli", false),
            ("", "sipcli", false),
        ] {
            assert_eq!(user_agent_matches(agent, known), hit, "{agent} / {known}");
        }
    }

    #[test]
    fn injections_in_user_parts_are_a_signature() {
        let attempt = b"INVITE sip:100'%20or%201=1--@192.0.2.1 SIP/2.0\r\nFrom: <sip:100@192.0.2.1>;tag=1\r\nTo: <sip:100@192.0.2.1>\r\n\r\n";
        let found = feed(&mut Detector::default(), "198.51.100.30", attempt, 3);
        assert_eq!(found.len(), 1, "on the third: {found:?}");
        assert_eq!(found[0].rule, INJECTION);
        assert!(found[0].counts.contains("Request-URI"), "{found:?}");
        let union = b"OPTIONS sip:x@192.0.2.1 SIP/2.0\r\nFrom: \"a\" <sip:1 UNION SELECT password@192.0.2.1>;tag=1\r\n\r\n";
        let found = feed(&mut Detector::default(), "198.51.100.31", union, 3);
        assert_eq!(found.len(), 1, "{found:?}");
        // Display names are quoted; user parts with words that merely contain the marks.
        for clean in [
            &b"INVITE sip:+4930123@192.0.2.1 SIP/2.0\r\nFrom: \"O'Brien, Sales\" <sip:obrien@192.0.2.1>;tag=1\r\nTo: <sip:selector-desk@192.0.2.1>\r\n\r\n"[..],
            b"REGISTER sip:192.0.2.1 SIP/2.0\r\nTo: <sip:reunion.room@192.0.2.1>\r\nFrom: <sip:reunion.room@192.0.2.1>;tag=1\r\n\r\n",
        ] {
            assert_eq!(feed(&mut Detector::default(), "198.51.100.32", clean, 50), []);
        }
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
    fn a_nat_office_answering_challenges_is_no_enumeration() {
        // 60 phones behind one address after an outage: each REGISTER is challenged and
        // sent again with credentials, all within seconds; the dataplane samples the first
        // 8 requests, then one in 8.
        let s = DetectSettings::default();
        let mut d = Detector::default();
        let mut n = 0u32;
        for phone in 0..60 {
            let user = format!("{}", 200 + phone);
            for payload in [
                register(&user, "Yealink SIP-T46S"),
                register_with_credentials(&user),
            ] {
                n += 1;
                if n > 8 && !n.is_multiple_of(8) {
                    continue;
                }
                let mut one = sample("198.51.100.40", &payload);
                (one.seen, one.probes) = (n, n);
                assert_eq!(d.observe(&s, &one, u64::from(n) * 40), None, "request {n}");
            }
        }
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
    fn what_cannot_be_read_is_counted_and_never_a_finding() {
        let s = DetectSettings::default();
        let mut d = Detector::default();
        for payload in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"register sip:x SIP/2.0\r\n\r\n",
        ] {
            for _ in 0..100 {
                assert_eq!(d.observe(&s, &sample("198.51.100.10", payload), 5), None);
            }
        }
        assert_eq!(d.unreadable, 300);
        let last = d.last_unreadable.clone().expect("the latest is kept");
        assert_eq!(last.line, "register sip:x SIP/2.0?");
        // A sample cut at the snap length in its request line is the sample's end, not
        // the sender's.
        let mut cut = sample("198.51.100.10", &[b'A'; 512]);
        cut.payload[..8].copy_from_slice(b"OPTIONS ");
        assert_eq!(d.observe(&s, &cut, 5), None);
        assert_eq!(d.unreadable, 300);
    }

    #[test]
    fn a_scanner_request_after_an_ordinary_one_in_a_tcp_segment_is_read() {
        let mut segment = b"OPTIONS sip:100@192.0.2.1 SIP/2.0\r\nUser-Agent: Yealink\r\nContent-Length: 0\r\n\r\n".to_vec();
        segment.extend(register("100", "friendly-scanner"));
        let found = feed(&mut Detector::default(), "198.51.100.33", &segment, 3);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].rule, SCANNER_USER_AGENT);
    }

    #[test]
    fn a_rate_report_names_the_method_over_its_threshold() {
        let s = DetectSettings::default();
        let mut d = Detector::default();
        let mut report = sample("198.51.100.11", b"");
        report.kind = KIND_RATE;
        report.method = METHOD_INVITE;
        report.requests = [2, 1000, 0, 0];
        let f = d.observe(&s, &report, 0).expect("a match");
        assert_eq!(f.rule, REQUEST_RATE);
        assert_eq!(
            f.counts, "1000 INVITE requests within 10s (limit 1000)",
            "{f:?}"
        );
        // A method whose threshold is off reports nothing.
        let mut off = s.clone();
        off.rate.per_method[usize::from(METHOD_INVITE)] = 0;
        assert_eq!(d.observe(&off, &report, 0), None);
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

    fn response(
        addr: &str,
        status: &str,
        call_id: &str,
        method: &str,
        nonce: Option<&str>,
    ) -> Sample {
        let challenge = nonce.map_or(String::new(), |n| {
            format!("WWW-Authenticate: Digest realm=\"r\", nonce=\"{n}\"\r\n")
        });
        let mut s = sample(
            addr,
            format!(
                "SIP/2.0 {status}\r\nTo: <sip:201@192.0.2.1>;tag=x\r\nCall-ID: {call_id}\r\nCSeq: 1 {method}\r\n{challenge}\r\n"
            )
            .as_bytes(),
        );
        s.kind = KIND_RESPONSE;
        s
    }

    fn answer(addr: &str, call_id: &str, nonce: &str) -> Sample {
        sample(
            addr,
            format!(
                "REGISTER sip:192.0.2.1 SIP/2.0\r\nTo: <sip:201@192.0.2.1>\r\nCall-ID: {call_id}\r\nAuthorization: Digest username=\"201\", nonce=\"{nonce}\", response=\"x\"\r\n\r\n"
            )
            .as_bytes(),
        )
    }

    #[test]
    fn a_2xx_to_credentials_for_an_issued_nonce_proves_the_peer() {
        let s = DetectSettings::default();
        let mut d = Detector::default();
        let a = "198.51.100.50";
        d.observe(
            &s,
            &response(a, "401 Unauthorized", "c1", "REGISTER", Some("n1")),
            1,
        );
        d.observe(&s, &answer(a, "c1", "n1"), 2);
        d.observe(&s, &response(a, "200 OK", "c1", "REGISTER", None), 3);
        let proofs = d.take_proofs();
        assert_eq!(proofs.len(), 1, "{proofs:?}");
        assert_eq!(proofs[0].how, "200 to an authenticated REGISTER for 201");
        // Credentials for a nonce this address was never given (a forger guessing, or
        // replaying another address's) prove nothing, however the server answers.
        let b = "198.51.100.51";
        d.observe(
            &s,
            &response(b, "401 Unauthorized", "c2", "REGISTER", Some("n2")),
            1,
        );
        d.observe(&s, &answer(b, "c2", "n1"), 2);
        d.observe(&s, &response(b, "200 OK", "c2", "REGISTER", None), 3);
        // Nor does a 200 to a request without credentials.
        d.observe(&s, &response(b, "200 OK", "c3", "INVITE", None), 4);
        assert_eq!(d.take_proofs(), []);
    }

    #[test]
    fn refused_credentials_for_issued_nonces_are_an_auth_failure() {
        let s = DetectSettings::default();
        let limit = s.auth_failures.unwrap().requests;
        let mut d = Detector::default();
        let a = "198.51.100.52";
        let mut found = Vec::new();
        d.observe(
            &s,
            &response(a, "401 Unauthorized", "c0", "REGISTER", Some("n0")),
            1,
        );
        for i in 1..=limit {
            let call = format!("c{i}");
            d.observe(&s, &answer(a, &call, &format!("n{}", i - 1)), 2);
            let refused = response(
                a,
                "401 Unauthorized",
                &call,
                "REGISTER",
                Some(&format!("n{i}")),
            );
            found.extend(d.observe(&s, &refused, 3));
        }
        assert_eq!(found.len(), 1, "at the limit: {found:?}");
        assert_eq!(found[0].rule, AUTH_FAILURE);
        assert!(!forgeable(AUTH_FAILURE));
        assert!(
            found[0].line.contains("401 to credentials for 201"),
            "{found:?}"
        );
        // A phone with a wrong password, retrying twice a minute for an hour: never.
        let s = DetectSettings::default();
        let mut d = Detector::default();
        let b = "198.51.100.53";
        for minute in 0..60u64 {
            for retry in 0..2u64 {
                let at = minute * 60_000 + retry * 30_000;
                let call = format!("p{minute}-{retry}");
                d.observe(
                    &s,
                    &response(b, "401 Unauthorized", &call, "REGISTER", Some(&call)),
                    at,
                );
                d.observe(&s, &answer(b, &call, &call), at + 1);
                let refused = response(b, "403 Forbidden", &call, "REGISTER", None);
                assert_eq!(d.observe(&s, &refused, at + 2), None);
            }
        }
    }
}
