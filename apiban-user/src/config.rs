//! The agent's configuration: flags, environment, the TOML file and defaults, in that order
//! of precedence. Every `apiban run` flag is also a key in the file, spelled the same way
//! (`--poll-interval 60s` is `poll-interval = "60s"`), and an `APIBAN_*` variable.
//!
//! Resolution is a pure function of the parsed flags (clap folds the environment in) and the
//! file's contents, so precedence is tested without touching the process environment, and a
//! SIGHUP reload re-runs it with the same flags and the file as it is now.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::ValueEnum;
use ipnet::IpNet;
use serde::Deserialize;

use crate::{
    dataplane::{Scope, loader::AttachMode},
    human::{HumanDuration, RateLimit},
    source::{
        apiban::{ApiVersion, DEFAULT_BASE_URL, DataSet},
        blocklist::{ListLocation, ListSpec},
    },
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

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeKind {
    /// Drop everything from banned sources.
    #[default]
    All,
    /// Drop only TCP/UDP from banned sources to --ports.
    Ports,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line per event, no colour unless stderr is a terminal (journald-friendly).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
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
    #[arg(long = "allow", env = "APIBAN_ALLOW", value_delimiter = ',')]
    pub allow: Vec<String>,
    /// Feed entries broader than this IPv4 prefix length are refused [default: 16].
    #[arg(long, env = "APIBAN_MIN_PREFIX_V4")]
    pub min_prefix_v4: Option<u8>,
    /// Feed entries broader than this IPv6 prefix length are refused [default: 32].
    #[arg(long, env = "APIBAN_MIN_PREFIX_V6")]
    pub min_prefix_v6: Option<u8>,
    /// Plain-text blocklist as NAME=PATH or NAME=URL (repeatable).
    #[arg(long = "list", env = "APIBAN_LIST", value_delimiter = ',')]
    pub lists: Vec<String>,
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
    pub metrics_addr: Option<String>,
    /// Fetch and report what would be blocked; load and attach nothing.
    #[arg(long, env = "APIBAN_DRY_RUN", num_args = 0..=1, default_missing_value = "true")]
    pub dry_run: Option<bool>,
    /// Log format [default: text].
    #[arg(long, env = "APIBAN_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The config file. Keys are the flag names; unknown keys are errors, so a typo is reported
/// instead of silently ignored.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub iface: Option<Vec<String>>,
    pub iface_wait: Option<String>,
    pub xdp_mode: Option<String>,
    pub bpffs_dir: Option<PathBuf>,
    pub scope: Option<String>,
    pub ports: Option<Vec<u16>>,
    pub debug_events: Option<bool>,
    pub api_key: Option<String>,
    pub api_key_file: Option<PathBuf>,
    pub api_url: Option<String>,
    pub api_timeout: Option<String>,
    pub api_ca: Option<PathBuf>,
    pub api_version: Option<String>,
    pub set: Option<String>,
    pub poll_interval: Option<String>,
    pub key_retry_max: Option<String>,
    pub resync_interval: Option<String>,
    pub rate_limit: Option<String>,
    pub ttl: Option<String>,
    pub allow: Option<Vec<String>>,
    pub min_prefix_v4: Option<u8>,
    pub min_prefix_v6: Option<u8>,
    pub list: Option<Vec<FileList>>,
    pub list_refresh: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub control_socket: Option<PathBuf>,
    pub control_group: Option<String>,
    pub metrics_addr: Option<String>,
    pub dry_run: Option<bool>,
    pub log_format: Option<String>,
}

/// `[[list]]` in the file: a blocklist with its own refresh interval if it needs one.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileList {
    pub name: String,
    /// A path or an http(s) URL.
    pub location: String,
    pub refresh: Option<String>,
}

/// Where the key comes from; read at start and on reload, never logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    Value(String),
    File(PathBuf),
}

/// The resolved configuration the agent runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    /// The file that was read, if any.
    pub file: Option<PathBuf>,
    pub ifaces: Vec<String>,
    pub iface_wait: Duration,
    pub xdp_mode: AttachMode,
    pub bpffs_dir: PathBuf,
    pub scope: Scope,
    pub debug_events: bool,
    pub key: Option<KeySource>,
    pub api_url: String,
    pub api_timeout: Duration,
    pub api_ca: Option<PathBuf>,
    pub api_version: ApiVersion,
    pub data_set: DataSet,
    pub poll_interval: Duration,
    pub key_retry_max: Duration,
    pub resync_interval: Duration,
    pub rate_limit: RateLimit,
    pub ttl: Duration,
    pub allow: Vec<IpNet>,
    pub min_prefix_v4: u8,
    pub min_prefix_v6: u8,
    pub lists: Vec<ListSpec>,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub control_group: Option<String>,
    pub metrics_addr: Option<SocketAddr>,
    pub dry_run: bool,
    pub log_format: LogFormat,
}

impl AgentConfig {
    /// Settings that a SIGHUP cannot change, by key, for a warning when they differ.
    pub fn restart_only_changes(&self, new: &AgentConfig) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |key, differs: bool| {
            if differs {
                changed.push(key);
            }
        };
        check("iface", self.ifaces != new.ifaces);
        check("iface-wait", self.iface_wait != new.iface_wait);
        check("xdp-mode", self.xdp_mode != new.xdp_mode);
        check("bpffs-dir", self.bpffs_dir != new.bpffs_dir);
        check("debug-events", self.debug_events != new.debug_events);
        check("state-dir", self.state_dir != new.state_dir);
        check("control-socket", self.control_socket != new.control_socket);
        check("control-group", self.control_group != new.control_group);
        check("metrics-addr", self.metrics_addr != new.metrics_addr);
        check("dry-run", self.dry_run != new.dry_run);
        check("log-format", self.log_format != new.log_format);
        changed
    }
}

/// Reads the config file: `explicit` must exist; without it the default path is read if it
/// exists. Returns the path that was read.
pub fn read_file(explicit: Option<&Path>) -> Result<(Option<PathBuf>, FileConfig), ConfigError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let default = PathBuf::from(DEFAULT_CONFIG_FILE);
            if !default.exists() {
                return Ok((None, FileConfig::default()));
            }
            default
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let file = parse_file(&text).map_err(|message| ConfigError::Parse {
        path: path.clone(),
        message,
    })?;
    Ok((Some(path), file))
}

pub fn parse_file(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

fn first<T>(flag: Option<T>, file: Option<T>, default: T) -> T {
    flag.or(file).unwrap_or(default)
}

fn from_file<T>(
    key: &'static str,
    value: Option<&String>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, ConfigError> {
    value
        .map(|v| parse(v).map_err(|m| invalid(key, m)))
        .transpose()
}

fn value_enum<T: ValueEnum>(text: &str) -> Result<T, String> {
    T::from_str(text, true).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_owned()))
            .collect();
        format!("`{text}` is not one of {}", names.join(", "))
    })
}

fn duration(text: &str) -> Result<Duration, String> {
    crate::human::parse_duration(text).map_err(|e| e.to_string())
}

fn cidr(key: &'static str, text: &str) -> Result<IpNet, ConfigError> {
    crate::sanitise::parse_net(text).ok_or_else(|| {
        invalid(
            key,
            format!("`{text}` is not an address or CIDR (e.g. 192.0.2.7 or 2001:db8::/32)"),
        )
    })
}

fn list_spec(text: &str, refresh: Duration) -> Result<ListSpec, ConfigError> {
    let (name, location) = text
        .split_once('=')
        .filter(|(n, loc)| !n.is_empty() && !loc.is_empty())
        .ok_or_else(|| invalid("list", format!("`{text}`: write NAME=PATH or NAME=URL")))?;
    Ok(ListSpec {
        name: name.to_owned(),
        location: ListLocation::parse(location),
        refresh,
    })
}

/// "off" turns the metrics endpoint off.
pub fn parse_metrics_addr(text: &str) -> Result<Option<SocketAddr>, String> {
    if text.eq_ignore_ascii_case("off") || text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| format!("`{text}` is not ADDRESS:PORT (e.g. 127.0.0.1:9477) or off"))
}

/// Flags (with the environment folded in by clap) over the file over the defaults.
pub fn resolve(
    args: &RunArgs,
    file_path: Option<PathBuf>,
    file: FileConfig,
) -> Result<AgentConfig, ConfigError> {
    let ifaces = if args.ifaces.is_empty() {
        file.iface.unwrap_or_default()
    } else {
        args.ifaces.clone()
    };
    let dry_run = first(args.dry_run, file.dry_run, false);
    if ifaces.is_empty() && !dry_run {
        return Err(ConfigError::NoInterface);
    }
    let scope_kind = first(
        args.scope,
        from_file("scope", file.scope.as_ref(), value_enum)?,
        ScopeKind::All,
    );
    let ports: BTreeSet<u16> = if !args.ports.is_empty() {
        args.ports.iter().copied().collect()
    } else {
        file.ports
            .unwrap_or_else(|| vec![5060, 5061])
            .into_iter()
            .collect()
    };
    let scope = match scope_kind {
        ScopeKind::All => Scope::All,
        ScopeKind::Ports if ports.is_empty() => {
            return Err(invalid("ports", "--scope ports needs at least one port"));
        }
        ScopeKind::Ports => Scope::Ports(ports),
    };
    // A key given on a higher level wins over a key file on a lower one, and vice versa.
    let key = match (&args.api_key, &args.api_key_file) {
        (Some(k), _) => Some(KeySource::Value(k.clone())),
        (None, Some(p)) => Some(KeySource::File(p.clone())),
        (None, None) => match (file.api_key, file.api_key_file) {
            (Some(k), _) => Some(KeySource::Value(k)),
            (None, Some(p)) => Some(KeySource::File(p)),
            (None, None) => None,
        },
    };
    let list_refresh = first(
        args.list_refresh.map(|d| d.0),
        from_file("list-refresh", file.list_refresh.as_ref(), duration)?,
        Duration::from_secs(3600),
    );
    let lists = if !args.lists.is_empty() {
        args.lists
            .iter()
            .map(|l| list_spec(l, list_refresh))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        let mut lists = Vec::new();
        for l in file.list.unwrap_or_default() {
            if l.name.is_empty() || l.location.is_empty() {
                return Err(invalid(
                    "list",
                    "every [[list]] needs a name and a location",
                ));
            }
            let refresh = from_file("list.refresh", l.refresh.as_ref(), duration)?;
            lists.push(ListSpec {
                name: l.name,
                location: ListLocation::parse(&l.location),
                refresh: refresh.unwrap_or(list_refresh),
            });
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
    let allow_text = if args.allow.is_empty() {
        file.allow.unwrap_or_default()
    } else {
        args.allow.clone()
    };
    let allow = allow_text
        .iter()
        .map(|t| cidr("allow", t))
        .collect::<Result<Vec<_>, _>>()?;
    let metrics_addr = match &args.metrics_addr {
        Some(text) => parse_metrics_addr(text).map_err(|m| invalid("metrics-addr", m))?,
        None => from_file(
            "metrics-addr",
            file.metrics_addr.as_ref(),
            parse_metrics_addr,
        )?
        .unwrap_or_else(|| DEFAULT_METRICS_ADDR.parse().ok()),
    };
    let min_prefix_v4 = first(args.min_prefix_v4, file.min_prefix_v4, 16);
    let min_prefix_v6 = first(args.min_prefix_v6, file.min_prefix_v6, 32);
    if min_prefix_v4 > 32 {
        return Err(invalid("min-prefix-v4", "must be 0..=32"));
    }
    if min_prefix_v6 > 128 {
        return Err(invalid("min-prefix-v6", "must be 0..=128"));
    }
    let poll_interval = first(
        args.poll_interval.map(|d| d.0),
        from_file("poll-interval", file.poll_interval.as_ref(), duration)?,
        Duration::from_secs(60),
    );
    if poll_interval.is_zero() {
        return Err(invalid("poll-interval", "must be longer than zero"));
    }
    let key_retry_max = first(
        args.key_retry_max.map(|d| d.0),
        from_file("key-retry-max", file.key_retry_max.as_ref(), duration)?,
        Duration::from_secs(1800),
    );
    if key_retry_max.is_zero() {
        return Err(invalid("key-retry-max", "must be longer than zero"));
    }
    let control_group = args
        .control_group
        .clone()
        .or(file.control_group)
        .filter(|g| !g.is_empty() && !g.eq_ignore_ascii_case("none"));
    Ok(AgentConfig {
        file: file_path,
        ifaces,
        iface_wait: first(
            args.iface_wait.map(|d| d.0),
            from_file("iface-wait", file.iface_wait.as_ref(), duration)?,
            Duration::from_secs(30),
        ),
        xdp_mode: first(
            args.xdp_mode,
            from_file("xdp-mode", file.xdp_mode.as_ref(), value_enum)?,
            AttachMode::Auto,
        ),
        bpffs_dir: first(
            args.bpffs_dir.clone(),
            file.bpffs_dir,
            PathBuf::from(crate::dataplane::loader::DEFAULT_BPFFS_DIR),
        ),
        scope,
        debug_events: first(args.debug_events, file.debug_events, false),
        key,
        api_url: first(args.api_url.clone(), file.api_url, DEFAULT_BASE_URL.into()),
        api_timeout: first(
            args.api_timeout.map(|d| d.0),
            from_file("api-timeout", file.api_timeout.as_ref(), duration)?,
            Duration::from_secs(30),
        )
        .max(Duration::from_secs(1)),
        api_ca: args.api_ca.clone().or(file.api_ca),
        api_version: first(
            args.api_version,
            from_file("api-version", file.api_version.as_ref(), value_enum)?,
            ApiVersion::V2,
        ),
        data_set: first(
            args.data_set,
            from_file("set", file.set.as_ref(), value_enum)?,
            DataSet::Sip,
        ),
        poll_interval,
        key_retry_max,
        resync_interval: first(
            args.resync_interval.map(|d| d.0),
            from_file("resync-interval", file.resync_interval.as_ref(), duration)?,
            Duration::from_secs(86_400),
        ),
        rate_limit: first(
            args.rate_limit,
            from_file("rate-limit", file.rate_limit.as_ref(), |t| {
                t.parse::<RateLimit>().map_err(|e| e.to_string())
            })?,
            RateLimit::APIBAN,
        ),
        ttl: first(
            args.ttl.map(|d| d.0),
            from_file("ttl", file.ttl.as_ref(), duration)?,
            Duration::from_secs(7 * 86_400),
        ),
        allow,
        min_prefix_v4,
        min_prefix_v6,
        lists,
        state_dir: first(
            args.state_dir.clone(),
            file.state_dir,
            PathBuf::from(DEFAULT_STATE_DIR),
        ),
        control_socket: first(
            args.control_socket.clone(),
            file.control_socket,
            PathBuf::from(DEFAULT_CONTROL_SOCKET),
        ),
        control_group,
        metrics_addr,
        dry_run,
        log_format: first(
            args.log_format,
            from_file("log-format", file.log_format.as_ref(), value_enum)?,
            LogFormat::Text,
        ),
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    /// clap reads APIBAN_* while parsing: tests that parse hold this, and the one test that
    /// sets variables holds it while they are set.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn args(argv: &[&str]) -> RunArgs {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        Cli::try_parse_from(std::iter::once("apiban").chain(argv.iter().copied()))
            .expect("flags parse")
            .run
    }

    fn file(text: &str) -> FileConfig {
        parse_file(text).expect("config parses")
    }

    #[test]
    fn defaults_when_only_an_interface_is_given() {
        let c = resolve(&args(&["--iface", "eth0"]), None, FileConfig::default()).unwrap();
        assert_eq!(c.ifaces, ["eth0"]);
        assert_eq!(c.xdp_mode, AttachMode::Auto);
        assert_eq!(c.scope, Scope::All);
        assert_eq!(c.poll_interval, Duration::from_secs(60));
        assert_eq!(c.ttl, Duration::from_secs(7 * 86_400));
        assert_eq!(c.resync_interval, Duration::from_secs(86_400));
        assert_eq!(c.rate_limit, RateLimit::APIBAN);
        assert_eq!(c.api_version, ApiVersion::V2);
        assert_eq!(c.data_set, DataSet::Sip);
        assert_eq!(c.api_url, DEFAULT_BASE_URL);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/apiban"));
        assert_eq!(c.bpffs_dir, PathBuf::from("/sys/fs/bpf/apiban"));
        assert_eq!(c.control_socket, PathBuf::from("/run/apiban/control.sock"));
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9477".parse().unwrap()));
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(!c.dry_run && c.key.is_none() && c.allow.is_empty() && c.lists.is_empty());
    }

    #[test]
    fn every_flag_parses_as_people_write_it() {
        let a = args(&[
            "--iface",
            "eth0",
            "--iface",
            "eth1",
            "--xdp-mode",
            "skb",
            "--scope",
            "ports",
            "--ports",
            "5060,5080",
            "--poll-interval",
            "90s",
            "--ttl",
            "2d",
            "--resync-interval",
            "12h",
            "--rate-limit",
            "5/1m",
            "--allow",
            "192.0.2.0/24",
            "--allow",
            "2001:db8::/32",
            "--api-version",
            "v1",
            "--set",
            "all",
            "--list",
            "mine=/etc/apiban/mine.txt",
            "--list-refresh",
            "5m",
            "--metrics-addr",
            "off",
            "--dry-run",
            "--log-format",
            "json",
            "--control-socket",
            "/tmp/c.sock",
            "--min-prefix-v4",
            "20",
        ]);
        let c = resolve(&a, None, FileConfig::default()).unwrap();
        assert_eq!(c.ifaces, ["eth0", "eth1"]);
        assert_eq!(c.xdp_mode, AttachMode::Skb);
        assert_eq!(c.scope, Scope::Ports([5060, 5080].into()));
        assert_eq!(c.poll_interval, Duration::from_secs(90));
        assert_eq!(c.ttl, Duration::from_secs(2 * 86_400));
        assert_eq!(c.resync_interval, Duration::from_secs(12 * 3600));
        assert_eq!(c.rate_limit, "5/60s".parse().unwrap());
        assert_eq!(c.allow.len(), 2);
        assert_eq!(c.api_version, ApiVersion::V1);
        assert_eq!(c.data_set, DataSet::All);
        assert_eq!(c.lists[0].name, "mine");
        assert_eq!(c.lists[0].refresh, Duration::from_secs(300));
        assert_eq!(c.metrics_addr, None);
        assert!(c.dry_run);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.min_prefix_v4, 20);
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let f = file(
            r#"
            iface = ["eth9"]
            poll-interval = "5m"
            ttl = "1d"
            allow = ["198.51.100.0/24"]
            api-key = "from-file"
            metrics-addr = "127.0.0.1:9999"
            scope = "ports"
            ports = [5060]
            [[list]]
            name = "local"
            location = "/etc/apiban/local.txt"
            refresh = "10m"
            "#,
        );
        let c = resolve(&args(&["--iface", "eth0", "--ttl", "3d"]), None, f.clone()).unwrap();
        assert_eq!(c.ifaces, ["eth0"], "flag wins");
        assert_eq!(c.ttl, Duration::from_secs(3 * 86_400), "flag wins");
        assert_eq!(
            c.poll_interval,
            Duration::from_secs(300),
            "file beats default"
        );
        assert_eq!(c.allow, vec!["198.51.100.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(c.key, Some(KeySource::Value("from-file".into())));
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9999".parse().unwrap()));
        assert_eq!(c.scope, Scope::Ports([5060].into()));
        assert_eq!(c.lists[0].refresh, Duration::from_secs(600));
        assert_eq!(
            c.lists[0].location,
            ListLocation::File("/etc/apiban/local.txt".into())
        );
        // A key file on the command line beats a key in the file.
        let c = resolve(&args(&["--api-key-file", "/run/key"]), None, f).unwrap();
        assert_eq!(c.key, Some(KeySource::File("/run/key".into())));
        assert_eq!(c.ifaces, ["eth9"], "file supplies the interface");
    }

    #[test]
    fn environment_sits_between_flags_and_the_file() {
        let parse = |argv: &[&str]| {
            Cli::try_parse_from(std::iter::once("apiban").chain(argv.iter().copied()))
                .expect("flags parse")
                .run
        };
        let (env_args, flag_args) = {
            let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: every reader of these variables in this binary holds ENV.
            unsafe {
                std::env::set_var("APIBAN_TTL", "4d");
                std::env::set_var("APIBAN_IFACE", "enve0,enve1");
            }
            let parsed = (parse(&[]), parse(&["--ttl", "2d"]));
            // SAFETY: as above, ENV is still held.
            unsafe {
                std::env::remove_var("APIBAN_TTL");
                std::env::remove_var("APIBAN_IFACE");
            }
            parsed
        };
        let f = file("ttl = \"1d\"\niface = [\"filee0\"]\n");
        let from_env = resolve(&env_args, None, f.clone());
        let from_flag = resolve(&flag_args, None, f);
        let from_env = from_env.unwrap();
        assert_eq!(from_env.ttl, Duration::from_secs(4 * 86_400));
        assert_eq!(from_env.ifaces, ["enve0", "enve1"]);
        assert_eq!(from_flag.unwrap().ttl, Duration::from_secs(2 * 86_400));
    }

    #[test]
    fn mistakes_are_reported_with_the_key_that_holds_them() {
        let err = |a: &[&str], f: &str| resolve(&args(a), None, file(f)).unwrap_err().to_string();
        assert!(err(&["--iface", "e"], "ttl = \"forever\"").starts_with("ttl:"));
        assert!(err(&["--iface", "e"], "scope = \"some\"").contains("all, ports"));
        assert!(err(&["--iface", "e"], "allow = [\"10.0.0.0/33\"]").starts_with("allow:"));
        assert!(err(&["--iface", "e", "--list", "nolocation"], "").starts_with("list:"));
        assert!(err(&[], "").contains("--iface"));
        assert!(err(&["--iface", "e"], "metrics-addr = \"9477\"").starts_with("metrics-addr:"));
        assert!(
            parse_file("pol-interval = \"60s\"")
                .unwrap_err()
                .contains("pol-interval")
        );
        let dup = "[[list]]\nname = \"a\"\nlocation = \"/x\"\n[[list]]\nname = \"a\"\nlocation = \"/y\"\n";
        assert!(err(&["--iface", "e"], dup).contains("two lists"));
        // Bad flag values are clap's usage errors.
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        assert!(Cli::try_parse_from(["apiban", "--ttl", "7x"]).is_err());
        assert!(Cli::try_parse_from(["apiban", "--xdp-mode", "fast"]).is_err());
    }

    #[test]
    fn dry_run_needs_no_interface() {
        let c = resolve(&args(&["--dry-run"]), None, FileConfig::default()).unwrap();
        assert!(c.dry_run && c.ifaces.is_empty());
    }

    /// packaging/config.toml is what operators start from: it must parse, and document
    /// every `apiban run` flag as a key.
    #[test]
    fn the_packaged_config_parses_and_documents_every_flag() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config.toml");
        let text = std::fs::read_to_string(&path).expect("packaging/config.toml");
        let parsed = parse_file(&text).expect("the packaged config parses");
        assert_eq!(parsed.iface, Some(vec!["eth0".to_owned()]));
        // Uncommented, every documented key must still parse as its type.
        let uncommented: String = text
            .lines()
            .map(|l| {
                let t = l.trim_start_matches("# ");
                if t.starts_with(|c: char| c.is_ascii_lowercase() || c == '[')
                    && t.contains(['=', ']'])
                {
                    t.to_owned()
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            .replace("iface = [\"eth0\"]\n", "");
        let all = parse_file(&uncommented).expect("every documented key parses");
        assert!(all.ttl.is_some() && all.list.as_ref().is_some_and(|l| l.len() == 2));
        let cmd = <RunArgs as clap::Args>::augment_args(clap::Command::new("run"));
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "config" || long == "help" {
                continue;
            }
            let key = if long == "list" {
                "[[list]]".to_owned()
            } else {
                format!("{long} =")
            };
            assert!(
                text.contains(&format!("\n{key}")) || text.contains(&format!("# {key}")),
                "--{long} is not documented in packaging/config.toml"
            );
        }
    }
}
