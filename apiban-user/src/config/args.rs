//! `apiban run`'s flags, and the value types that flags and the config file share, so that
//! `--ttl 7x` and `ttl = "7x"` are refused by the same parser with the same words.

use std::{net::SocketAddr, path::PathBuf, str::FromStr};

use clap::ValueEnum;
use ipnet::IpNet;
use serde::Serialize;

use crate::{
    dataplane::loader::AttachMode,
    human::{HumanDuration, RateLimit},
    source::{
        apiban::{ApiVersion, DataSet},
        blocklist::ListLocation,
    },
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ScopeKind {
    /// Drop everything from banned sources.
    #[default]
    All,
    /// Drop only TCP/UDP from banned sources to --ports.
    Ports,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line per event, no colour unless stderr is a terminal (journald-friendly).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where /metrics is served; `off` (or empty) turns it off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

impl FromStr for MetricsAddr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if text.eq_ignore_ascii_case("off") || text.is_empty() {
            return Ok(Self(None));
        }
        text.parse()
            .map(|a| Self(Some(a)))
            .map_err(|_| format!("`{text}` is not ADDRESS:PORT (e.g. 127.0.0.1:9477) or off"))
    }
}

/// `--v6-escalation N/LEN`: N bans of one source inside one IPv6 /LEN ban the /LEN; `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V6Escalation {
    /// 0: off.
    pub threshold: usize,
    pub prefix_len: u8,
}

impl FromStr for V6Escalation {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if text.eq_ignore_ascii_case("off") {
            return Ok(Self {
                threshold: 0,
                prefix_len: 64,
            });
        }
        let wrong = || format!("`{text}` is not N/LEN (e.g. 4/64: 4 bans in one /64) or off");
        let (n, len) = text.split_once('/').ok_or_else(wrong)?;
        let threshold: usize = n.trim().parse().map_err(|_| wrong())?;
        let prefix_len: u8 = len.trim().parse().map_err(|_| wrong())?;
        if threshold < 2 || !(16..=127).contains(&prefix_len) {
            return Err(format!(
                "`{text}`: N must be at least 2 and LEN from 16 to 127"
            ));
        }
        Ok(Self {
            threshold,
            prefix_len,
        })
    }
}

/// An address or a CIDR, as operators write them on the command line and in files.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    crate::sanitise::parse_net(text).ok_or_else(|| {
        format!("`{text}` is not an address or CIDR (e.g. 192.0.2.7 or 2001:db8::/32)")
    })
}

/// One comma-separated item of `--list NAME=PATH|URL[,mode=observe|enforce]`: a list, or
/// the mode of the list before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListArg {
    List(NamedList),
    Mode(crate::config::SourceMode),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedList {
    pub name: String,
    pub location: ListLocation,
}

fn parse_named_list(text: &str) -> Result<ListArg, String> {
    let (name, location) = text
        .split_once('=')
        .filter(|(n, loc)| !n.is_empty() && !loc.is_empty())
        .ok_or_else(|| format!("`{text}`: write NAME=PATH or NAME=URL"))?;
    if name == "mode" {
        return value_enum(location).map(ListArg::Mode);
    }
    Ok(ListArg::List(NamedList {
        name: name.to_owned(),
        location: ListLocation::parse(location),
    }))
}

/// A value-enum's name, matched as clap matches it (case-insensitively), listing the choices
/// when it is none of them.
pub fn value_enum<T: ValueEnum>(text: &str) -> Result<T, String> {
    T::from_str(text, true).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_owned()))
            .collect();
        format!("`{text}` is not one of {}", names.join(", "))
    })
}

/// `apiban run` flags. Each is optional here: a flag that is not given falls through to its
/// `APIBAN_*` variable, then to the config file, then to the default shown in --help.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct RunArgs {
    /// Config file [default: /etc/apiban/config.toml if it exists].
    #[arg(long, env = "APIBAN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Interface to protect; repeat (or comma-separate) for several.
    #[arg(long = "iface", env = "APIBAN_IFACE", value_delimiter = ',')]
    pub ifaces: Vec<String>,
    /// How long to wait at start for an --iface that does not exist yet (udev renaming,
    /// a VLAN or bond created later in boot) [default: 30s].
    #[arg(long, env = "APIBAN_IFACE_WAIT")]
    pub iface_wait: Option<HumanDuration>,
    /// XDP attach mode [default: auto]: native, falling back to skb.
    #[arg(long, env = "APIBAN_XDP_MODE", value_enum)]
    pub xdp_mode: Option<AttachMode>,
    /// Where maps and links are pinned, so enforcement outlives the agent
    /// [default: /sys/fs/bpf/apiban].
    #[arg(long, env = "APIBAN_BPFFS_DIR")]
    pub bpffs_dir: Option<PathBuf>,
    /// Drop everything from banned sources (all), or only TCP/UDP to --ports (ports)
    /// [default: all].
    #[arg(long, env = "APIBAN_SCOPE", value_enum)]
    pub scope: Option<ScopeKind>,
    /// Destination ports for --scope ports [default: 5060,5061].
    #[arg(long, env = "APIBAN_PORTS", value_delimiter = ',')]
    pub ports: Vec<u16>,
    /// Log each drop and allowlist match from the XDP program (debugging only).
    #[arg(long, env = "APIBAN_DEBUG_EVENTS", num_args = 0..=1, default_missing_value = "true")]
    pub debug_events: Option<bool>,
    /// APIBAN API key (free at https://apiban.org/getkey.html). Prefer APIBAN_KEY or
    /// --api-key-file: flags show up in `ps`.
    #[arg(long, env = "APIBAN_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// File whose first line is the API key (e.g. a systemd credential).
    #[arg(long, env = "APIBAN_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// APIBAN base URL, up to and including /api/ (a mirror, or a local test server)
    /// [default: https://apiban.org/api/].
    #[arg(long, env = "APIBAN_API_URL")]
    pub api_url: Option<String>,
    /// How long one API request may take before it counts as failed [default: 30s].
    #[arg(long, env = "APIBAN_API_TIMEOUT")]
    pub api_timeout: Option<HumanDuration>,
    /// PEM file of CA certificates to trust for --api-url, besides the system's and the
    /// bundled web roots (a mirror or proxy with an internal CA).
    #[arg(long, env = "APIBAN_API_CA")]
    pub api_ca: Option<PathBuf>,
    /// APIBAN API version [default: v2].
    #[arg(long, env = "APIBAN_API_VERSION", value_enum)]
    pub api_version: Option<ApiVersion>,
    /// APIBAN data set [default: sip].
    #[arg(long = "set", env = "APIBAN_SET", value_enum)]
    pub data_set: Option<DataSet>,
    /// Time between incremental polls [default: 60s].
    #[arg(long, env = "APIBAN_POLL_INTERVAL")]
    pub poll_interval: Option<HumanDuration>,
    /// Longest wait between retries while APIBAN rejects the key (403); the first retry is
    /// one poll interval later, the wait doubles up to this [default: 30m].
    #[arg(long, env = "APIBAN_KEY_RETRY_MAX")]
    pub key_retry_max: Option<HumanDuration>,
    /// Time between full pulls that reconcile the list [default: 24h].
    #[arg(long, env = "APIBAN_RESYNC_INTERVAL")]
    pub resync_interval: Option<HumanDuration>,
    /// At most N requests in any window T, each held T/10 longer (at most 5 s) for
    /// requests that reach the server late [default: 11/120s, APIBAN's limit].
    #[arg(long, env = "APIBAN_RATE_LIMIT")]
    pub rate_limit: Option<RateLimit>,
    /// How long a feed entry stays banned after it was last seen [default: 7d].
    #[arg(long, env = "APIBAN_TTL")]
    pub ttl: Option<HumanDuration>,
    /// Never ban this prefix (repeatable); wins over every feed.
    #[arg(long = "allow", env = "APIBAN_ALLOW", value_delimiter = ',', value_parser = parse_cidr)]
    pub allow: Vec<IpNet>,
    /// Feed entries broader than this IPv4 prefix length are refused [default: 16].
    #[arg(long, env = "APIBAN_MIN_PREFIX_V4")]
    pub min_prefix_v4: Option<u8>,
    /// Feed entries broader than this IPv6 prefix length are refused [default: 32].
    #[arg(long, env = "APIBAN_MIN_PREFIX_V6")]
    pub min_prefix_v6: Option<u8>,
    /// CrowdSec's Local API (e.g. http://127.0.0.1:8080): its ban decisions become bans of
    /// source `crowdsec`, each for as long as its decision runs [default: off].
    #[arg(long, env = "APIBAN_CROWDSEC")]
    pub crowdsec: Option<String>,
    /// File holding the bouncer key for --crowdsec (from `cscli bouncers add apiban`).
    #[arg(long, env = "APIBAN_CROWDSEC_KEY_FILE")]
    pub crowdsec_key_file: Option<PathBuf>,
    /// PEM client certificate the bouncer presents to an https LAPI instead of a key (its
    /// OU one of LAPI's bouncers_allowed_ou); with --crowdsec-cert-key.
    #[arg(long, env = "APIBAN_CROWDSEC_CERT")]
    pub crowdsec_cert: Option<PathBuf>,
    /// PEM private key of --crowdsec-cert.
    #[arg(long, env = "APIBAN_CROWDSEC_CERT_KEY")]
    pub crowdsec_cert_key: Option<PathBuf>,
    /// PEM CA that signed an https LAPI's certificate [default: the system's roots].
    #[arg(long, env = "APIBAN_CROWDSEC_CA")]
    pub crowdsec_ca: Option<PathBuf>,
    /// How often CrowdSec's decision stream is read [default: 10s].
    #[arg(long, env = "APIBAN_CROWDSEC_INTERVAL")]
    pub crowdsec_interval: Option<HumanDuration>,
    /// Only CrowdSec decisions of these origins, e.g. crowdsec,cscli [default: all].
    #[arg(long, env = "APIBAN_CROWDSEC_ORIGINS", value_delimiter = ',')]
    pub crowdsec_origins: Vec<String>,
    /// Only CrowdSec decisions whose scenario contains one of these, e.g. sip,asterisk
    /// [default: all].
    #[arg(long, env = "APIBAN_CROWDSEC_SCENARIOS", value_delimiter = ',')]
    pub crowdsec_scenarios: Vec<String>,
    /// Post this host's detection bans to CrowdSec as alerts, as this machine (from
    /// `cscli machines add apiban`), so that its other bouncers ban the scanner too.
    #[arg(long, env = "APIBAN_CROWDSEC_MACHINE")]
    pub crowdsec_machine: Option<String>,
    /// File whose first line is the --crowdsec-machine's password.
    #[arg(long, env = "APIBAN_CROWDSEC_PASSWORD_FILE")]
    pub crowdsec_password_file: Option<PathBuf>,
    /// Post the ban API's bans to CrowdSec too (with --crowdsec-machine).
    #[arg(long, env = "APIBAN_CROWDSEC_POST_API_BANS", num_args = 0..=1, default_missing_value = "true")]
    pub crowdsec_post_api_bans: Option<bool>,
    /// Post detection's bans on evidence a forged source address can bring (the request
    /// rules) too; by default only bans on the server's answers go to CrowdSec.
    #[arg(long, env = "APIBAN_CROWDSEC_POST_FORGEABLE", num_args = 0..=1, default_missing_value = "true")]
    pub crowdsec_post_forgeable: Option<bool>,
    /// CrowdSec's bans: enforce or observe [default: enforce].
    #[arg(long, env = "APIBAN_CROWDSEC_MODE", value_enum)]
    pub crowdsec_mode: Option<crate::config::SourceMode>,
    /// Plain-text blocklist as NAME=PATH or NAME=URL, optionally followed by ,mode=observe
    /// to match and count its entries without dropping (repeatable).
    #[arg(long = "list", env = "APIBAN_LIST", value_delimiter = ',', value_parser = parse_named_list)]
    pub lists: Vec<ListArg>,
    /// APIBAN's entries: enforce (drop) or observe (match, count and pass) [default: enforce].
    #[arg(long, env = "APIBAN_APIBAN_MODE", value_enum)]
    pub apiban_mode: Option<crate::config::SourceMode>,
    /// IPv6 prefix escalation: N bans of one source inside one /LEN ban the whole /LEN
    /// while they last, or off [default: 4/64].
    #[arg(long, env = "APIBAN_V6_ESCALATION")]
    pub v6_escalation: Option<V6Escalation>,
    /// Manual bans (`apiban ban`): enforce or observe [default: enforce].
    #[arg(long, env = "APIBAN_MANUAL_MODE", value_enum)]
    pub manual_mode: Option<crate::config::SourceMode>,
    /// How often blocklists are re-read [default: 1h].
    #[arg(long, env = "APIBAN_LIST_REFRESH")]
    pub list_refresh: Option<HumanDuration>,
    /// Where the ledger, sync position and request journal are saved
    /// [default: /var/lib/apiban].
    #[arg(long, env = "APIBAN_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Control socket for status, check, list, ban, unban and allow
    /// [default: /run/apiban/control.sock].
    #[arg(long, env = "APIBAN_CONTROL_SOCKET")]
    pub control_socket: Option<PathBuf>,
    /// Members of this group may run the read-only commands (status, check, list, allow
    /// list) on the control socket; everything else stays root-only [default: none].
    #[arg(long, env = "APIBAN_CONTROL_GROUP")]
    pub control_group: Option<String>,
    /// Where /metrics is served (Prometheus text format); "off" disables it
    /// [default: 127.0.0.1:9477].
    #[arg(long, env = "APIBAN_METRICS_ADDR")]
    pub metrics_addr: Option<MetricsAddr>,
    /// Serve the ban API for SIP proxies (palner/iptables-api's /addip, /blockip, /removeip,
    /// plus POST /v1/bans) on ADDRESS:PORT, e.g. 127.0.0.1:8082 [default: off].
    #[arg(long, env = "APIBAN_BAN_API")]
    pub ban_api: Option<MetricsAddr>,
    /// File holding the bearer token ban API clients must send; required unless the ban API
    /// listens on loopback only.
    #[arg(long, env = "APIBAN_BAN_API_TOKEN_FILE")]
    pub ban_api_token_file: Option<PathBuf>,
    /// How long a ban through /addip or /blockip lasts (a JSON ban may say) [default: 1h].
    #[arg(long, env = "APIBAN_BAN_API_TTL")]
    pub ban_api_ttl: Option<HumanDuration>,
    /// In a fleet: one ban API source for every node, so that any node's /removeip and
    /// /flushchain lift every node's proxies' bans. Without it each node's proxy owns its
    /// bans (source api:<node>), which every node still enforces.
    #[arg(long, env = "APIBAN_BAN_API_SHARE", num_args = 0..=1, default_missing_value = "true")]
    pub ban_api_share: Option<bool>,
    /// Fetch and report what would be blocked; load and attach nothing.
    #[arg(long, env = "APIBAN_DRY_RUN", num_args = 0..=1, default_missing_value = "true")]
    pub dry_run: Option<bool>,
    /// etcd endpoints of the fleet this node belongs to (comma-separated or repeated);
    /// without it the agent runs on its own.
    #[arg(long = "cluster", env = "APIBAN_CLUSTER", value_delimiter = ',')]
    pub cluster: Vec<String>,
    /// Key prefix of this fleet in etcd, so that several fleets can share one etcd
    /// [default: /apiban/v1/].
    #[arg(long, env = "APIBAN_CLUSTER_PREFIX")]
    pub cluster_prefix: Option<String>,
    /// How far this node's clock may be from the fleet's before it stops leading and
    /// deleting from etcd [default: 30s].
    #[arg(long, env = "APIBAN_CLUSTER_MAX_CLOCK_OFFSET")]
    pub cluster_max_clock_offset: Option<HumanDuration>,
    /// This node's name in the fleet [default: the host name].
    #[arg(long, env = "APIBAN_NODE_NAME")]
    pub node_name: Option<String>,
    /// PEM file of the CA that signed etcd's certificates (for https:// endpoints).
    #[arg(long, env = "APIBAN_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,
    /// This node's client certificate for etcd, PEM (with --cluster-key).
    #[arg(long, env = "APIBAN_CLUSTER_CERT")]
    pub cluster_cert: Option<PathBuf>,
    /// The client certificate's key, PEM.
    #[arg(long, env = "APIBAN_CLUSTER_KEY")]
    pub cluster_key: Option<PathBuf>,
    /// etcd user (with --cluster-password-file).
    #[arg(long, env = "APIBAN_CLUSTER_USER")]
    pub cluster_user: Option<String>,
    /// File whose first line is the etcd user's password (e.g. a systemd credential).
    #[arg(long, env = "APIBAN_CLUSTER_PASSWORD_FILE")]
    pub cluster_password_file: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, env = "APIBAN_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// SIP scanner detection in the dataplane: off, observe (log and count what it would
    /// ban) or enforce (ban it, source `detect`) [default: observe].
    #[arg(long, env = "APIBAN_DETECT", value_enum)]
    pub detect: Option<crate::config::detect::DetectMode>,
    /// Ports of SIP in the clear that detection reads (UDP, and TCP with payload)
    /// [default: 5060].
    #[arg(long, env = "APIBAN_DETECT_PORTS", value_delimiter = ',')]
    pub detect_ports: Vec<u16>,
    /// Ports of SIP over TLS: their packets are counted, never read [default: 5061].
    #[arg(long, env = "APIBAN_DETECT_TLS_PORTS", value_delimiter = ',')]
    pub detect_tls_ports: Vec<u16>,
    /// How long a source is first banned on evidence a forged source address cannot bring
    /// (auth-failure: the server's answers); each re-offence doubles it [default: 1d].
    #[arg(long, env = "APIBAN_DETECT_TTL")]
    pub detect_ttl: Option<HumanDuration>,
    /// The longest a doubled --detect-ttl gets [default: 30d].
    #[arg(long, env = "APIBAN_DETECT_TTL_MAX")]
    pub detect_ttl_max: Option<HumanDuration>,
    /// How long a source is first banned on evidence that someone forging its address could
    /// bring (the rules that read requests only); each re-offence doubles it [default: 10m].
    #[arg(long, env = "APIBAN_DETECT_FORGEABLE_TTL")]
    pub detect_forgeable_ttl: Option<HumanDuration>,
    /// The longest a doubled --detect-forgeable-ttl gets [default: 1d].
    #[arg(long, env = "APIBAN_DETECT_FORGEABLE_TTL_MAX")]
    pub detect_forgeable_ttl_max: Option<HumanDuration>,
    /// Credentials for nonces the server issued to one source that it refused (401, 403,
    /// 407 again) within a window, or off [default: 10/60s].
    #[arg(long, env = "APIBAN_DETECT_AUTH_FAILURES")]
    pub detect_auth_failures: Option<Threshold>,
    /// Distinct users the server answered "does not exist" (404, 484, 604) to one source
    /// within a window, or off; bans over TCP keep --detect-ttl, over UDP (a forged request
    /// also gets an answer) --detect-forgeable-ttl [default: 20/60s].
    #[arg(long, env = "APIBAN_DETECT_UNKNOWN_USERS")]
    pub detect_unknown_users: Option<Threshold>,
    /// How long a source stays proven after the server answered 2xx to its authenticated
    /// REGISTER or INVITE; detection never bans a proven peer [default: 7d].
    #[arg(long, env = "APIBAN_DETECT_PROVEN_TTL")]
    pub detect_proven_ttl: Option<HumanDuration>,
    /// User-Agents that mark a scanner: each matches a User-Agent that is it, or starts with
    /// it and then a character that is no letter or digit, case-insensitively; replaces the
    /// default list (friendly-scanner, sipvicious, sipcli, VaxSIPUserAgent, pplsip,
    /// sundayddr, iWar, SIPScan, sip-scan).
    #[arg(long, env = "APIBAN_DETECT_USER_AGENTS", value_delimiter = ',')]
    pub detect_user_agents: Vec<String>,
    /// OPTIONS requests from one source within a window, N/T, or off; T is the window of
    /// every --detect-rate* threshold [default: 100/10s].
    #[arg(long, env = "APIBAN_DETECT_RATE")]
    pub detect_rate: Option<Threshold>,
    /// REGISTER requests from one source within --detect-rate's window, or off
    /// [default: 300].
    #[arg(long, env = "APIBAN_DETECT_RATE_REGISTER")]
    pub detect_rate_register: Option<Count>,
    /// INVITE requests from one source within --detect-rate's window, or off [default: 1000].
    #[arg(long, env = "APIBAN_DETECT_RATE_INVITE")]
    pub detect_rate_invite: Option<Count>,
    /// SUBSCRIBE, MESSAGE, PUBLISH and REFER requests from one source within --detect-rate's
    /// window, or off [default: 1000].
    #[arg(long, env = "APIBAN_DETECT_RATE_OTHER")]
    pub detect_rate_other: Option<Count>,
    /// Distinct target users (extensions) from one source within a window, from a source
    /// that answered no challenge with credentials, or off [default: 20/60s].
    #[arg(long, env = "APIBAN_DETECT_USERS")]
    pub detect_users: Option<Threshold>,
    /// Proven peers, never banned by detection (repeatable): customers' PBXs, trunks,
    /// monitoring. What a rule would have done to them is still logged and shown.
    #[arg(long, env = "APIBAN_DETECT_EXEMPT", value_delimiter = ',', value_parser = parse_cidr)]
    pub detect_exempt: Vec<IpNet>,
}

/// A count of requests, or `off` (0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Count(pub u32);

impl FromStr for Count {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if text.eq_ignore_ascii_case("off") {
            return Ok(Self(0));
        }
        match text.parse::<u32>() {
            Ok(n) if n > 0 => Ok(Self(n)),
            _ => Err(format!(
                "`{text}` is not a count of requests (e.g. 300) or off"
            )),
        }
    }
}

/// A detection rule's threshold, `N/T`, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold(pub Option<RateLimit>);

impl FromStr for Threshold {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if text.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        text.parse::<RateLimit>()
            .map(|r| Self(Some(r)))
            .map_err(|_| format!("`{text}` is not N/T (e.g. 100/10s) or off"))
    }
}
