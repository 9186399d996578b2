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
pub const UNKNOWN_USERS: &str = "unknown-users";
pub const RULES: [&str; 6] = [
    SCANNER_USER_AGENT,
    INJECTION,
    REQUEST_RATE,
    EXTENSION_ENUMERATION,
    AUTH_FAILURE,
    UNKNOWN_USERS,
];

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
    /// Someone forging the source address could have brought this evidence: everything
    /// read from requests alone, and answers to requests a forger can send over UDP.
    pub forgeable: bool,
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
    /// Users the server said do not exist (404, 484, 604), in answers to this source.
    unknown_users: BTreeSet<String>,
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
            let forgeable = match rule {
                AUTH_FAILURE => false,
                // A 404 answers whatever request reached the server, forged or not; over
                // TCP the source completed a handshake first, which a forger cannot.
                UNKNOWN_USERS => sample.proto != apiban_common::IPPROTO_TCP,
                _ => true,
            };
            Some(Finding {
                addr: sample.addr,
                rule,
                counts,
                line,
                forgeable,
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
    if matches!(response.status, 404 | 484 | 604)
        && matches!(
            response.method,
            "REGISTER" | "INVITE" | "OPTIONS" | "SUBSCRIBE" | "MESSAGE"
        )
        && let (Some(limit), Some(user)) = (settings.unknown_users, response.target_user())
    {
        if tracked.unknown_users.len() < MAX_USERS {
            tracked.unknown_users.insert(user.to_owned());
        }
        let distinct = tracked.unknown_users.len() as u32;
        if distinct >= limit.requests {
            return (
                Some((
                    UNKNOWN_USERS,
                    format!(
                        "{distinct} users the server said do not exist within {} (last: {user})",
                        format_duration(limit.window)
                    ),
                    printable(
                        &format!(
                            "SIP/2.0 {} to {} for {user}",
                            response.status, response.method
                        ),
                        LINE_CHARS,
                    ),
                )),
                None,
            );
        }
        return (None, None);
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
        settings.unknown_users.map(|l| l.window),
        Some(SIGNATURE_WINDOW),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(SIGNATURE_WINDOW)
}

const _: () = assert!(METHODS == METHOD_NAMES.len());

#[cfg(test)]
mod tests;
