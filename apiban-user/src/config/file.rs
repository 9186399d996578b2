//! The TOML config file, deserialised once into the same value types the flags parse into.
//! A bad value is refused by serde with the line it is on; an unknown key is an error, so a
//! typo is reported instead of silently ignored.

use std::{
    marker::PhantomData,
    path::{Path, PathBuf},
};

use clap::ValueEnum;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, de};

use super::{
    ConfigError, DEFAULT_CONFIG_FILE,
    args::{MetricsAddr, ScopeKind, parse_cidr, value_enum},
};
use crate::{
    dataplane::loader::AttachMode,
    human::{HumanDuration, RateLimit},
    source::apiban::{ApiVersion, DataSet},
};

/// The file's keys are the flag names.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub iface: Option<Vec<String>>,
    pub iface_wait: Option<Parsed<HumanDuration>>,
    pub xdp_mode: Option<ByName<AttachMode>>,
    pub bpffs_dir: Option<PathBuf>,
    pub scope: Option<ByName<ScopeKind>>,
    pub ports: Option<Vec<u16>>,
    pub debug_events: Option<bool>,
    pub api_key: Option<String>,
    pub api_key_file: Option<PathBuf>,
    pub api_url: Option<String>,
    pub api_timeout: Option<Parsed<HumanDuration>>,
    pub api_ca: Option<PathBuf>,
    pub api_version: Option<ByName<ApiVersion>>,
    pub set: Option<ByName<DataSet>>,
    pub poll_interval: Option<Parsed<HumanDuration>>,
    pub key_retry_max: Option<Parsed<HumanDuration>>,
    pub resync_interval: Option<Parsed<HumanDuration>>,
    pub rate_limit: Option<Parsed<RateLimit>>,
    pub ttl: Option<Parsed<HumanDuration>>,
    pub allow: Option<Vec<Cidr>>,
    pub min_prefix_v4: Option<u8>,
    pub min_prefix_v6: Option<u8>,
    pub v6_escalation: Option<Parsed<super::args::V6Escalation>>,
    pub list: Option<Vec<FileList>>,
    pub list_refresh: Option<Parsed<HumanDuration>>,
    pub crowdsec: Option<String>,
    pub crowdsec_key_file: Option<PathBuf>,
    pub crowdsec_cert: Option<PathBuf>,
    pub crowdsec_cert_key: Option<PathBuf>,
    pub crowdsec_ca: Option<PathBuf>,
    pub crowdsec_interval: Option<Parsed<HumanDuration>>,
    pub crowdsec_origins: Option<Vec<String>>,
    pub crowdsec_scenarios: Option<Vec<String>>,
    pub crowdsec_mode: Option<ByName<super::SourceMode>>,
    pub crowdsec_machine: Option<String>,
    pub crowdsec_password_file: Option<PathBuf>,
    pub crowdsec_post_api_bans: Option<bool>,
    pub crowdsec_post_forgeable: Option<bool>,
    pub apiban_mode: Option<ByName<super::SourceMode>>,
    pub manual_mode: Option<ByName<super::SourceMode>>,
    pub state_dir: Option<PathBuf>,
    pub control_socket: Option<PathBuf>,
    pub control_group: Option<String>,
    pub metrics_addr: Option<Parsed<MetricsAddr>>,
    pub ban_api: Option<Parsed<MetricsAddr>>,
    pub ban_api_token_file: Option<PathBuf>,
    pub ban_api_ttl: Option<Parsed<HumanDuration>>,
    pub ban_api_share: Option<bool>,
    pub dry_run: Option<bool>,
    pub log_format: Option<ByName<super::LogFormat>>,
    pub cluster: Option<Vec<String>>,
    pub cluster_prefix: Option<String>,
    pub cluster_max_clock_offset: Option<Parsed<HumanDuration>>,
    pub node_name: Option<String>,
    pub cluster_ca: Option<PathBuf>,
    pub cluster_cert: Option<PathBuf>,
    pub cluster_key: Option<PathBuf>,
    pub cluster_user: Option<String>,
    pub cluster_password_file: Option<PathBuf>,
    pub detect: Option<ByName<crate::config::detect::DetectMode>>,
    pub detect_ports: Option<Vec<u16>>,
    pub detect_tls_ports: Option<Vec<u16>>,
    pub detect_ttl: Option<Parsed<HumanDuration>>,
    pub detect_ttl_max: Option<Parsed<HumanDuration>>,
    pub detect_forgeable_ttl: Option<Parsed<HumanDuration>>,
    pub detect_forgeable_ttl_max: Option<Parsed<HumanDuration>>,
    pub detect_auth_failures: Option<Parsed<super::args::Threshold>>,
    pub detect_unknown_users: Option<Parsed<super::args::Threshold>>,
    pub detect_proven_ttl: Option<Parsed<HumanDuration>>,
    pub detect_user_agents: Option<Vec<String>>,
    pub detect_rate: Option<Parsed<super::args::Threshold>>,
    pub detect_rate_register: Option<super::args::Count>,
    pub detect_rate_invite: Option<super::args::Count>,
    pub detect_rate_other: Option<super::args::Count>,
    pub detect_users: Option<Parsed<super::args::Threshold>>,
    /// Removed (the malformed-requests rule is gone: what cannot be parsed is never a reason
    /// to ban); accepted, whatever its value, and reported, so that an upgrade does not stop
    /// an agent whose file still sets it.
    pub detect_malformed: Option<toml::Value>,
    pub detect_exempt: Option<Vec<Cidr>>,
}

/// `[[list]]` in the file: a blocklist with its own refresh interval if it needs one.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileList {
    pub name: String,
    /// A path or an http(s) URL.
    pub location: String,
    pub refresh: Option<Parsed<HumanDuration>>,
    pub mode: Option<ByName<super::SourceMode>>,
}

/// A string value parsed with the type's `FromStr`, the parser its flag uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed<T>(pub T);

impl<'de, T> Deserialize<'de> for Parsed<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(Parsed).map_err(de::Error::custom)
    }
}

/// A count is a number in the file, or "off" (or a number in a string), as its flag takes it.
impl<'de> Deserialize<'de> for super::args::Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u32),
            Text(String),
        }
        match Raw::deserialize(d)
            .map_err(|_| de::Error::custom("expected a count of requests (e.g. 300) or \"off\""))?
        {
            Raw::Number(0) => Err(de::Error::custom(
                "0 is not a count of requests; write \"off\" to turn the rule off",
            )),
            Raw::Number(n) => Ok(Self(n)),
            Raw::Text(text) => text.parse().map_err(de::Error::custom),
        }
    }
}

/// A value-enum's name, matched as its flag matches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByName<T>(pub T);

impl<'de, T: ValueEnum> Deserialize<'de> for ByName<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name<T>(PhantomData<T>);
        impl<T: ValueEnum> de::Visitor<'_> for Name<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a name")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
                value_enum(text).map_err(E::custom)
            }
        }
        d.deserialize_str(Name(PhantomData)).map(ByName)
    }
}

/// An address or CIDR in `allow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_cidr(&text).map(Cidr).map_err(de::Error::custom)
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
