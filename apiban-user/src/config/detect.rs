//! `--detect*`'s settings: what SIP scanner detection (`crate::detect`) looks at and does,
//! and what its XDP program is told. Here, below detection, so that the configuration it is
//! read from does not depend on the detector.

use std::time::Duration;

use apiban_common::{
    DetectConfig,
    detect::{METHOD_INVITE, METHOD_OPTIONS, METHOD_OTHER, METHOD_REGISTER},
};
use clap::ValueEnum;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::*;
use crate::human::RateLimit;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectMode {
    /// No detection: the program counts and samples nothing.
    Off,
    /// Log and count what would be banned; drop nothing.
    #[default]
    Observe,
    /// Ban what the rules match.
    Enforce,
}

impl DetectMode {
    pub fn name(self) -> &'static str {
        match self {
            DetectMode::Off => "off",
            DetectMode::Observe => "observe",
            DetectMode::Enforce => "enforce",
        }
    }
}

/// User-Agents of scanners seen in the wild: each matches a User-Agent that is it or starts
/// with it and then a character that is no letter or digit, case-insensitively (see
/// [`crate::detect::rules::user_agent_matches`]).
pub const DEFAULT_USER_AGENTS: [&str; 9] = [
    "friendly-scanner",
    "sipvicious",
    "sipcli",
    "vaxsipuseragent",
    "pplsip",
    "sundayddr",
    "iwar",
    "sipscan",
    "sip-scan",
];

/// `--detect-rate*`: requests of each method that opens a transaction (REGISTER, INVITE,
/// OPTIONS, other: SUBSCRIBE, MESSAGE, PUBLISH, REFER) from one source within one window.
/// In-dialog requests (ACK, BYE, CANCEL...), responses and keep-alives never count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateThresholds {
    pub window: Duration,
    /// Indexed by `apiban_common::detect::METHOD_*`; 0 is off.
    pub per_method: [u32; apiban_common::detect::METHODS],
}

impl Default for RateThresholds {
    /// A NAT office of 150 phones re-registering after an outage (each REGISTER challenged
    /// once: 300), a trunk at 100 calls a second, phones subscribing to their colleagues'
    /// lines (BLF) at boot: all under; SIPp's or svcrack's floods are over in a second or
    /// two.
    fn default() -> Self {
        Self {
            window: Duration::from_secs(10),
            per_method: [300, 1_000, 100, 1_000],
        }
    }
}

/// `--detect*`: what detection looks at and what it does. All of it changes on a reload.
#[derive(Clone, Debug, PartialEq)]
pub struct DetectSettings {
    pub mode: DetectMode,
    /// The operator chose the mode (flag, environment or config file): a kernel that cannot
    /// detect makes that an error, where the default is turned off (`agent::features`).
    pub mode_set: bool,
    /// Ports of SIP in the clear, read.
    pub ports: Vec<u16>,
    /// Ports of SIP over TLS: counted, never read.
    pub tls_ports: Vec<u16>,
    /// A first ban's TTL on evidence a forged source cannot bring (`auth-failure`); each
    /// re-offence doubles it, up to `ttl_max`.
    pub ttl: Duration,
    pub ttl_max: Duration,
    /// The same for evidence that someone forging the source's address could bring (every
    /// rule that reads requests only): short.
    pub forgeable_ttl: Duration,
    pub forgeable_ttl_max: Duration,
    /// Credentials for nonces the server issued to one source, refused, within a window.
    pub auth_failures: Option<RateLimit>,
    /// Distinct users the server answered "does not exist" to one source, within a window.
    pub unknown_users: Option<RateLimit>,
    /// How long a proof (2xx to an authenticated REGISTER or INVITE) keeps a peer proven.
    pub proven_ttl: Duration,
    /// Lower-cased signatures (see [`DEFAULT_USER_AGENTS`]).
    pub user_agents: Vec<String>,
    pub rate: RateThresholds,
    /// Distinct target users from one source within a window.
    pub users: Option<RateLimit>,
    /// The operator's proven peers: never banned by detection (customers' PBXs, trunks),
    /// what would have happened is reported; feeds may still ban them.
    pub exempt: Vec<IpNet>,
    /// What the configuration set that no longer does anything, for the log.
    pub notices: Vec<String>,
}

impl Default for DetectSettings {
    fn default() -> Self {
        Self {
            mode: DetectMode::Observe,
            mode_set: false,
            ports: vec![5060],
            tls_ports: vec![5061],
            ttl: Duration::from_secs(86_400),
            ttl_max: Duration::from_secs(30 * 86_400),
            forgeable_ttl: Duration::from_secs(600),
            forgeable_ttl_max: Duration::from_secs(86_400),
            // A phone with a wrong password retries once or twice a minute; a password
            // guesser sends hundreds.
            auth_failures: Some(RateLimit {
                requests: 10,
                window: Duration::from_secs(60),
            }),
            // svwar against a real PBX: hundreds a minute. A few phones left registering with
            // deleted extensions behind one NAT: a handful.
            unknown_users: Some(RateLimit {
                requests: 20,
                window: Duration::from_secs(60),
            }),
            proven_ttl: Duration::from_secs(7 * 86_400),
            user_agents: DEFAULT_USER_AGENTS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            rate: RateThresholds::default(),
            users: Some(RateLimit {
                requests: 20,
                window: Duration::from_secs(60),
            }),
            exempt: Vec::new(),
            notices: Vec::new(),
        }
    }
}

/// Packets of a new source that are all sampled, then one in `SAMPLE_EVERY` (a power of
/// two: the program masks rather than divides).
const FIRST_SAMPLES: u32 = 8;
const SAMPLE_EVERY: u32 = 8;
const _: () = assert!(SAMPLE_EVERY.is_power_of_two());
/// Samples per second at most: what the agent can parse without noticing, and a bound on
/// what a flood of new sources costs it.
const SAMPLES_PER_SEC: u32 = 2_000;
const REPORTS_PER_SEC: u32 = 500;
/// Responses to followed sources a second at most (the egress program's own cap): a
/// challenge or an answer to each sampled request, and then some.
const RESPONSES_PER_SEC: u32 = 2_000;

/// The key of the program's source table (`detect::bucket_slot`): random for each agent,
/// from the OS's randomness (std's `RandomState`), and the same for its whole life, so that
/// a settings change keeps the table's counts.
fn table_seed() -> u64 {
    use std::hash::BuildHasher as _;
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(0u64))
}

impl DetectSettings {
    /// What the program is told.
    pub fn dataplane_config(&self) -> DetectConfig {
        if self.mode == DetectMode::Off {
            return DetectConfig::default();
        }
        DetectConfig {
            enabled: 1,
            first_samples: FIRST_SAMPLES,
            sample_every: SAMPLE_EVERY,
            samples_per_sec: SAMPLES_PER_SEC,
            reports_per_sec: REPORTS_PER_SEC,
            rate_thresholds: self.rate.per_method,
            responses_per_sec: RESPONSES_PER_SEC,
            window_ns: self.rate.window.as_nanos() as u64,
            hash_seed: table_seed(),
        }
    }

    /// The TTL of a source's `offence`-th ban: doubled each time, up to the maximum; short
    /// where the evidence is `forgeable`.
    pub fn ttl_for(&self, offence: u32, forgeable: bool) -> Duration {
        let (first, max) = if forgeable {
            (self.forgeable_ttl, self.forgeable_ttl_max)
        } else {
            (self.ttl, self.ttl_max)
        };
        let doublings = offence.saturating_sub(1).min(30);
        first.saturating_mul(1u32 << doublings).min(max.max(first))
    }
}

pub(super) fn resolve_detect(
    args: &RunArgs,
    file: &FileConfig,
) -> Result<DetectSettings, ConfigError> {
    let defaults = DetectSettings::default();
    let threshold = |flag: Option<args::Threshold>,
                     key: Option<file::Parsed<args::Threshold>>,
                     default: Option<crate::human::RateLimit>| {
        flag.or(key.map(|k| k.0)).map_or(default, |t| t.0)
    };
    let user_agents: Vec<String> =
        first_list(&args.detect_user_agents, file.detect_user_agents.clone())
            .into_iter()
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
    let settings = DetectSettings {
        mode: first(args.detect, file.detect.map(|m| m.0), defaults.mode),
        mode_set: args.detect.is_some() || file.detect.is_some(),
        ports: Some(first_list(&args.detect_ports, file.detect_ports.clone()))
            .filter(|p| !p.is_empty())
            .unwrap_or(defaults.ports),
        ttl: duration(args.detect_ttl, file.detect_ttl, defaults.ttl),
        ttl_max: duration(args.detect_ttl_max, file.detect_ttl_max, defaults.ttl_max),
        forgeable_ttl: duration(
            args.detect_forgeable_ttl,
            file.detect_forgeable_ttl,
            defaults.forgeable_ttl,
        ),
        forgeable_ttl_max: duration(
            args.detect_forgeable_ttl_max,
            file.detect_forgeable_ttl_max,
            defaults.forgeable_ttl_max,
        ),
        auth_failures: threshold(
            args.detect_auth_failures,
            file.detect_auth_failures,
            defaults.auth_failures,
        ),
        unknown_users: threshold(
            args.detect_unknown_users,
            file.detect_unknown_users,
            defaults.unknown_users,
        ),
        proven_ttl: duration(
            args.detect_proven_ttl,
            file.detect_proven_ttl,
            defaults.proven_ttl,
        ),
        user_agents: if user_agents.is_empty() {
            defaults.user_agents
        } else {
            user_agents
        },
        tls_ports: Some(first_list(
            &args.detect_tls_ports,
            file.detect_tls_ports.clone(),
        ))
        .filter(|p| !p.is_empty())
        .unwrap_or(defaults.tls_ports),
        rate: {
            let options = args.detect_rate.or(file.detect_rate.map(|k| k.0)).map_or(
                Some(RateLimit {
                    requests: defaults.rate.per_method[METHOD_OPTIONS as usize],
                    window: defaults.rate.window,
                }),
                |t| t.0,
            );
            let count = |flag: Option<args::Count>, key: Option<args::Count>, method: u8| {
                flag.or(key)
                    .map_or(defaults.rate.per_method[usize::from(method)], |c| c.0)
            };
            RateThresholds {
                window: options.map_or(defaults.rate.window, |o| o.window),
                per_method: [
                    count(
                        args.detect_rate_register,
                        file.detect_rate_register,
                        METHOD_REGISTER,
                    ),
                    count(
                        args.detect_rate_invite,
                        file.detect_rate_invite,
                        METHOD_INVITE,
                    ),
                    options.map_or(0, |o| o.requests),
                    count(args.detect_rate_other, file.detect_rate_other, METHOD_OTHER),
                ],
            }
        },
        users: threshold(args.detect_users, file.detect_users, defaults.users),
        notices: file
            .detect_malformed
            .as_ref()
            .map(|_| {
                "detect-malformed in the config file is ignored: the malformed-requests rule \
                 is gone, since what cannot be parsed is never a reason to ban (unreadable \
                 samples are counted in status and apiban_detect_unreadable_total); remove \
                 the key"
                    .to_owned()
            })
            .into_iter()
            .collect(),
        exempt: first_list(
            &args.detect_exempt,
            file.detect_exempt
                .as_ref()
                .map(|a| a.iter().map(|c| c.0).collect()),
        ),
    };
    if settings.ttl.as_secs() == 0 {
        return Err(invalid("detect-ttl", "must be at least 1s"));
    }
    if settings.forgeable_ttl.as_secs() == 0 {
        return Err(invalid("detect-forgeable-ttl", "must be at least 1s"));
    }
    if settings.ports.contains(&0) || settings.tls_ports.contains(&0) {
        return Err(invalid("detect-ports", "0 is not a port"));
    }
    let max = apiban_common::detect::MAX_THRESHOLD;
    for (i, flag) in [
        "detect-rate-register",
        "detect-rate-invite",
        "detect-rate",
        "detect-rate-other",
    ]
    .into_iter()
    .enumerate()
    {
        if settings.rate.per_method[i] > max {
            return Err(invalid(
                flag,
                format!(
                    "the program counts at most {max} requests of a method per window; \
                     set {max} or fewer, or a shorter window"
                ),
            ));
        }
    }
    if let Some(both) = settings
        .ports
        .iter()
        .find(|p| settings.tls_ports.contains(p))
    {
        return Err(invalid(
            "detect-ports",
            format!(
                "{both} is in detect-ports and detect-tls-ports; a port carries SIP either in the \
                 clear or over TLS (TLS ports are counted, never read; the default TLS port is \
                 5061): take it out of one list"
            ),
        ));
    }
    Ok(settings)
}
