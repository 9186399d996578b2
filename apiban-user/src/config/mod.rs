//! The agent's configuration: flags, environment, the TOML file and defaults, in that order
//! of precedence. Every `apiban run` flag is also a key in the file, spelled the same way
//! (`--poll-interval 60s` is `poll-interval = "60s"`), and an `APIBAN_*` variable.
//!
//! Resolution is a pure function of the parsed flags (clap folds the environment in) and the
//! file's contents, so precedence is tested without touching the process environment, and a
//! SIGHUP reload re-runs it with the same flags and the file as it is now.

mod args;
mod cluster;
mod crowdsec;
pub mod detect;
mod file;
#[cfg(test)]
mod tests;

use cluster::resolve_cluster;
use crowdsec::resolve_crowdsec;
pub use crowdsec::{BouncerCredentials, CrowdsecSettings};
use detect::resolve_detect;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;

pub use self::{
    args::{ListArg, LogFormat, MetricsAddr, NamedList, RunArgs, ScopeKind, parse_cidr},
    cluster::{ClusterSettings, ClusterTls, DEFAULT_CLUSTER_PREFIX},
    detect::{DetectSettings, RateThresholds},
    file::{FileConfig, FileList, parse_file, read_file},
};
use crate::{
    dataplane::{Scope, loader::AttachMode},
    engine::EngineSettings,
    ledger::SourceId,
    source::{
        apiban::{ApiVersion, DEFAULT_BASE_URL, DataSet},
        blocklist::ListSpec,
    },
    sync::PollSettings,
};

pub const DEFAULT_CONFIG_FILE: &str = "/etc/apiban/config.toml";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/apiban/control.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/apiban";
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("no interface to protect: give --iface IF (or `iface = [\"eth0\"]` in the config)")]
    NoInterface,
}

fn invalid(key: &'static str, message: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.to_string(),
    }
}

/// Where the key comes from; read at start and on reload, never logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    Value(String),
    File(PathBuf),
}

/// The resolved configuration the agent runs with, grouped by what a SIGHUP does with each
/// part: `attach` and `process` take effect only on restart; `apiban` restarts the poller;
/// `engine`, `scope` and `lists` go to the ledger's owner and the list tasks.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    /// The file that was read, if any.
    pub file: Option<PathBuf>,
    pub attach: AttachSettings,
    pub process: ProcessSettings,
    pub apiban: ApibanSettings,
    pub engine: EngineSettings,
    pub scope: Scope,
    pub lists: Vec<ListSpec>,
    /// CrowdSec's LAPI as a feed; None: not configured.
    pub crowdsec: Option<CrowdsecSettings>,
    /// The fleet this node belongs to; None: a single node.
    pub cluster: Option<ClusterSettings>,
    /// SIP scanner detection; all of it changes on a reload.
    pub detect: DetectSettings,
}

/// Which interfaces the program is attached to, and how. Serialised with the config keys'
/// names, so a reload can name what it could not change.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AttachSettings {
    #[serde(rename = "iface")]
    pub ifaces: Vec<String>,
    pub iface_wait: Duration,
    pub xdp_mode: AttachMode,
    pub bpffs_dir: PathBuf,
    pub debug_events: bool,
}

/// Where the agent keeps its state and how it talks to operators.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ProcessSettings {
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub control_group: Option<String>,
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The ban API's address (off: None), token file and TTL for calls without one.
    pub ban_api: Option<std::net::SocketAddr>,
    pub ban_api_token_file: Option<PathBuf>,
    pub ban_api_ttl: Duration,
    /// In a fleet: every node's ban API shares one source (see `--ban-api-share`).
    pub ban_api_share: bool,
    pub dry_run: bool,
    pub log_format: LogFormat,
}

/// How APIBAN is reached and polled.
#[derive(Clone, Debug, PartialEq)]
pub struct ApibanSettings {
    pub key: Option<KeySource>,
    pub url: String,
    pub timeout: Duration,
    pub ca: Option<PathBuf>,
    pub version: ApiVersion,
    pub data_set: DataSet,
    pub poll: PollSettings,
}

impl AgentConfig {
    /// Settings that a SIGHUP cannot change, by key, for a warning when they differ.
    pub fn restart_only_changes(&self, new: &AgentConfig) -> Vec<String> {
        let mut changed = changed_keys(&self.attach, &new.attach);
        changed.extend(changed_keys(&self.process, &new.process));
        if self.cluster != new.cluster {
            changed.push("cluster".to_owned());
        }
        changed
    }

    /// `new` with the parts that only change on restart taken from `self`, so that the next
    /// reload compares against what runs.
    pub fn reloaded(&self, new: AgentConfig) -> AgentConfig {
        AgentConfig {
            attach: self.attach.clone(),
            process: self.process.clone(),
            cluster: self.cluster.clone(),
            ..new
        }
    }
}

/// The keys whose values differ between two serialisations of one settings struct.
fn changed_keys<T: Serialize>(old: &T, new: &T) -> Vec<String> {
    let (Ok(serde_json::Value::Object(old)), Ok(serde_json::Value::Object(new))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    old.iter()
        .filter(|(key, value)| new.get(key.as_str()) != Some(*value))
        .map(|(key, _)| key.clone())
        .collect()
}

fn first<T>(flag: Option<T>, file: Option<T>, default: T) -> T {
    flag.or(file).unwrap_or(default)
}

/// A duration's flag over its key over its default.
fn duration(
    flag: Option<crate::human::HumanDuration>,
    file: Option<file::Parsed<crate::human::HumanDuration>>,
    default: Duration,
) -> Duration {
    first(flag.map(|d| d.0), file.map(|d| d.0.0), default)
}

/// The first of the flag's and the file's lists that is not empty.
fn first_list<T: Clone>(flag: &[T], file: Option<Vec<T>>) -> Vec<T> {
    if flag.is_empty() {
        file.unwrap_or_default()
    } else {
        flag.to_vec()
    }
}

fn resolve_scope(args: &RunArgs, file: &FileConfig) -> Result<Scope, ConfigError> {
    let kind = first(args.scope, file.scope.map(|s| s.0), ScopeKind::All);
    let ports: BTreeSet<u16> = if args.ports.is_empty() {
        file.ports
            .clone()
            .unwrap_or_else(|| vec![5060, 5061])
            .into_iter()
            .collect()
    } else {
        args.ports.iter().copied().collect()
    };
    match kind {
        ScopeKind::All => Ok(Scope::All),
        ScopeKind::Ports if ports.is_empty() => {
            Err(invalid("ports", "--scope ports needs at least one port"))
        }
        ScopeKind::Ports => Ok(Scope::Ports(ports)),
    }
}

/// Whether a source's entries are dropped or only matched and counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceMode {
    /// Drop what the source bans.
    #[default]
    Enforce,
    /// Match what it bans, count it as `observed` and let it pass: a source on trial.
    Observe,
}

/// The configured lists, and the names of those in observe mode.
fn resolve_lists(
    args: &RunArgs,
    file: &FileConfig,
) -> Result<(Vec<ListSpec>, BTreeSet<String>), ConfigError> {
    let refresh = first(
        args.list_refresh.map(|d| d.0),
        file.list_refresh.map(|d| d.0.0),
        Duration::from_secs(3600),
    );
    let mut observe = BTreeSet::new();
    let lists: Vec<ListSpec> = if args.lists.is_empty() {
        let mut lists = Vec::new();
        for l in file.list.clone().unwrap_or_default() {
            if l.name.is_empty() || l.location.is_empty() {
                return Err(invalid(
                    "list",
                    "every [[list]] needs a name and a location",
                ));
            }
            if l.mode.is_some_and(|m| m.0 == SourceMode::Observe) {
                observe.insert(l.name.clone());
            }
            lists.push(ListSpec {
                name: l.name,
                location: crate::source::blocklist::ListLocation::parse(&l.location),
                refresh: l.refresh.map_or(refresh, |d| d.0.0),
            });
        }
        lists
    } else {
        let mut lists: Vec<ListSpec> = Vec::new();
        for arg in &args.lists {
            match arg {
                args::ListArg::List(l) => lists.push(ListSpec {
                    name: l.name.clone(),
                    location: l.location.clone(),
                    refresh,
                }),
                args::ListArg::Mode(mode) => {
                    let Some(list) = lists.last() else {
                        return Err(invalid(
                            "list",
                            "mode= follows the list it applies to, e.g. voipbl=URL,mode=observe",
                        ));
                    };
                    if *mode == SourceMode::Observe {
                        observe.insert(list.name.clone());
                    } else {
                        observe.remove(&list.name);
                    }
                }
            }
        }
        lists
    };
    let mut names = BTreeSet::new();
    if let Some(dup) = lists.iter().find(|l| !names.insert(l.name.as_str())) {
        return Err(invalid(
            "list",
            format!("two lists are named `{}`", dup.name),
        ));
    }
    Ok((lists, observe))
}

fn resolve_apiban(args: &RunArgs, file: &FileConfig) -> Result<ApibanSettings, ConfigError> {
    // A key given on a higher level wins over a key file on a lower one, and vice versa.
    let key = match (&args.api_key, &args.api_key_file) {
        (Some(k), _) => Some(KeySource::Value(k.clone())),
        (None, Some(p)) => Some(KeySource::File(p.clone())),
        (None, None) => match (&file.api_key, &file.api_key_file) {
            (Some(k), _) => Some(KeySource::Value(k.clone())),
            (None, Some(p)) => Some(KeySource::File(p.clone())),
            (None, None) => None,
        },
    };
    let defaults = PollSettings::default();
    let poll = PollSettings {
        poll_interval: duration(
            args.poll_interval,
            file.poll_interval,
            defaults.poll_interval,
        ),
        key_retry_max: duration(
            args.key_retry_max,
            file.key_retry_max,
            defaults.key_retry_max,
        ),
        resync_interval: duration(
            args.resync_interval,
            file.resync_interval,
            defaults.resync_interval,
        ),
        rate_limit: first(
            args.rate_limit,
            file.rate_limit.map(|r| r.0),
            defaults.rate_limit,
        ),
        ..defaults
    };
    if poll.poll_interval.is_zero() {
        return Err(invalid("poll-interval", "must be longer than zero"));
    }
    if poll.key_retry_max.is_zero() {
        return Err(invalid("key-retry-max", "must be longer than zero"));
    }
    Ok(ApibanSettings {
        key,
        url: first(
            args.api_url.clone(),
            file.api_url.clone(),
            DEFAULT_BASE_URL.into(),
        ),
        timeout: duration(args.api_timeout, file.api_timeout, Duration::from_secs(30))
            .max(Duration::from_secs(1)),
        ca: args.api_ca.clone().or_else(|| file.api_ca.clone()),
        version: first(
            args.api_version,
            file.api_version.map(|v| v.0),
            ApiVersion::V2,
        ),
        data_set: first(args.data_set, file.set.map(|s| s.0), DataSet::Sip),
        poll,
    })
}

fn resolve_engine(args: &RunArgs, file: &FileConfig) -> Result<EngineSettings, ConfigError> {
    let min_prefix_v4 = first(args.min_prefix_v4, file.min_prefix_v4, 16);
    let min_prefix_v6 = first(args.min_prefix_v6, file.min_prefix_v6, 32);
    if min_prefix_v4 > 32 {
        return Err(invalid("min-prefix-v4", "must be 0..=32"));
    }
    if min_prefix_v6 > 128 {
        return Err(invalid("min-prefix-v6", "must be 0..=128"));
    }
    let escalation = first(
        args.v6_escalation,
        file.v6_escalation.map(|e| e.0),
        args::V6Escalation {
            threshold: 4,
            prefix_len: 64,
        },
    );
    if escalation.threshold > 0 && escalation.prefix_len < min_prefix_v6 {
        return Err(invalid(
            "v6-escalation",
            format!(
                "a /{} is broader than min-prefix-v6 /{min_prefix_v6} lets a feed ban",
                escalation.prefix_len
            ),
        ));
    }
    let file_allow = file.allow.as_ref().map(|a| a.iter().map(|c| c.0).collect());
    Ok(EngineSettings {
        ttl: first(
            args.ttl.map(|d| d.0),
            file.ttl.map(|d| d.0.0),
            Duration::from_secs(7 * 86_400),
        ),
        min_prefix_v4,
        min_prefix_v6,
        allow: first_list(&args.allow, file_allow),
        observe: BTreeSet::new(),
        v6_escalation_threshold: escalation.threshold,
        v6_escalation_prefix: escalation.prefix_len,
        detect_exempt: Vec::new(),
    })
}

/// The sources in observe mode: APIBAN, manual bans, each list. Detection has a mode of its
/// own (`--detect`), whose observe logs and counts what it would ban without entries.
fn observing_sources(
    args: &RunArgs,
    file: &FileConfig,
    lists: BTreeSet<String>,
) -> BTreeSet<SourceId> {
    let mut observe: BTreeSet<SourceId> = lists.into_iter().map(SourceId::List).collect();
    let mode = |flag: Option<SourceMode>, key: Option<file::ByName<SourceMode>>| {
        first(flag, key.map(|m| m.0), SourceMode::Enforce)
    };
    if mode(args.apiban_mode, file.apiban_mode) == SourceMode::Observe {
        observe.insert(SourceId::Apiban);
    }
    if mode(args.manual_mode, file.manual_mode) == SourceMode::Observe {
        observe.insert(SourceId::Manual);
    }
    if mode(args.crowdsec_mode, file.crowdsec_mode) == SourceMode::Observe {
        observe.insert(SourceId::Crowdsec);
    }
    observe
}

/// Flags (with the environment folded in by clap) over the file over the defaults.
pub fn resolve(
    args: &RunArgs,
    file_path: Option<PathBuf>,
    file: FileConfig,
) -> Result<AgentConfig, ConfigError> {
    let ifaces = first_list(&args.ifaces, file.iface.clone());
    let dry_run = first(args.dry_run, file.dry_run, false);
    if ifaces.is_empty() && !dry_run {
        return Err(ConfigError::NoInterface);
    }
    let attach = AttachSettings {
        ifaces,
        iface_wait: first(
            args.iface_wait.map(|d| d.0),
            file.iface_wait.map(|d| d.0.0),
            Duration::from_secs(30),
        ),
        xdp_mode: first(args.xdp_mode, file.xdp_mode.map(|m| m.0), AttachMode::Auto),
        bpffs_dir: first(
            args.bpffs_dir.clone(),
            file.bpffs_dir.clone(),
            PathBuf::from(crate::dataplane::loader::DEFAULT_BPFFS_DIR),
        ),
        debug_events: first(args.debug_events, file.debug_events, false),
    };
    let process = ProcessSettings {
        state_dir: first(
            args.state_dir.clone(),
            file.state_dir.clone(),
            PathBuf::from(DEFAULT_STATE_DIR),
        ),
        control_socket: first(
            args.control_socket.clone(),
            file.control_socket.clone(),
            PathBuf::from(DEFAULT_CONTROL_SOCKET),
        ),
        control_group: args
            .control_group
            .clone()
            .or_else(|| file.control_group.clone())
            .filter(|g| !g.is_empty() && !g.eq_ignore_ascii_case("none")),
        metrics_addr: match args.metrics_addr.or(file.metrics_addr.map(|m| m.0)) {
            Some(MetricsAddr(addr)) => addr,
            None => DEFAULT_METRICS_ADDR.parse().ok(),
        },
        ban_api: args
            .ban_api
            .or(file.ban_api.map(|m| m.0))
            .and_then(|MetricsAddr(a)| a),
        ban_api_token_file: args
            .ban_api_token_file
            .clone()
            .or_else(|| file.ban_api_token_file.clone()),
        ban_api_ttl: duration(
            args.ban_api_ttl,
            file.ban_api_ttl,
            Duration::from_secs(3600),
        ),
        ban_api_share: args.ban_api_share.or(file.ban_api_share).unwrap_or(false),
        dry_run,
        log_format: first(
            args.log_format,
            file.log_format.map(|f| f.0),
            LogFormat::Text,
        ),
    };
    if let Some(addr) = process.ban_api
        && !addr.ip().is_loopback()
        && process.ban_api_token_file.is_none()
    {
        return Err(invalid(
            "ban-api-token-file",
            format!(
                "the ban API on {addr} is reachable beyond this host: give it a token file                  (or listen on 127.0.0.1)"
            ),
        ));
    }
    if process.ban_api_ttl.is_zero() || process.ban_api_ttl > crate::ban_api::TTL_MAX {
        return Err(invalid(
            "ban-api-ttl",
            format!(
                "must be from 1s to {}: a proxy's ban rests on what a remote party sent it",
                crate::human::format_duration(crate::ban_api::TTL_MAX)
            ),
        ));
    }
    let (lists, observed_lists) = resolve_lists(args, &file)?;
    let detect = resolve_detect(args, &file)?;
    let mut engine = resolve_engine(args, &file)?;
    engine.observe = observing_sources(args, &file, observed_lists);
    engine.detect_exempt = detect.exempt.clone();
    Ok(AgentConfig {
        file: file_path,
        attach,
        process,
        apiban: resolve_apiban(args, &file)?,
        engine,
        scope: resolve_scope(args, &file)?,
        lists,
        crowdsec: resolve_crowdsec(args, &file)?,
        cluster: resolve_cluster(args, &file)?,
        detect,
    })
}

/// Reads the file the flags point at (or the default one) and resolves.
pub fn load(args: &RunArgs) -> Result<AgentConfig, ConfigError> {
    let (path, file) = read_file(args.config.as_deref())?;
    resolve(args, path, file)
}

/// The control socket for client commands: flag or environment, else the config file's,
/// else the default.
pub fn control_socket(flag: Option<&Path>, config: Option<&Path>) -> Result<PathBuf, ConfigError> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    let (_, file) = read_file(config)?;
    Ok(file
        .control_socket
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET)))
}
