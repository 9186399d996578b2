//! Where a ban came from, and its name in the state file, etcd, `list` and /metrics.

use std::{collections::BTreeSet, fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// Where a ban came from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum SourceId {
    Apiban,
    /// A plain-text blocklist, by the name given in the configuration.
    List(String),
    /// `apiban ban`.
    Manual,
    /// This host's own SIP scanner detection (see `detect`).
    Detect,
    /// A SIP proxy through the ban API (see `ban_api`): a single node's, or a fleet's
    /// with `--ban-api-share`.
    Api,
    /// A SIP proxy through one fleet node's ban API: every node enforces its bans, and only
    /// that node's proxy lifts or flushes them.
    ApiNode(String),
    /// CrowdSec's decisions, from its LAPI's stream (see `source::crowdsec`).
    Crowdsec,
}

impl SourceId {
    /// Remote feeds are sanitised and reconciled; manual bans are the operator's word.
    pub fn is_remote(&self) -> bool {
        !matches!(self, SourceId::Manual)
    }

    /// Whether `observing` (the sources in observe mode) covers this one: `api` covers
    /// every node's ban API too.
    pub fn observed_in(&self, observing: &BTreeSet<SourceId>) -> bool {
        observing.contains(self)
            || (matches!(self, SourceId::ApiNode(_)) && observing.contains(&SourceId::Api))
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceId::Apiban => f.write_str("apiban"),
            SourceId::List(name) => write!(f, "list:{name}"),
            SourceId::Manual => f.write_str("manual"),
            SourceId::Detect => f.write_str("detect"),
            SourceId::Api => f.write_str("api"),
            SourceId::ApiNode(node) => write!(f, "api:{node}"),
            SourceId::Crowdsec => f.write_str("crowdsec"),
        }
    }
}

impl FromStr for SourceId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "apiban" => Ok(SourceId::Apiban),
            "manual" => Ok(SourceId::Manual),
            "detect" => Ok(SourceId::Detect),
            "api" => Ok(SourceId::Api),
            "crowdsec" => Ok(SourceId::Crowdsec),
            _ if s.starts_with("api:") && s.len() > 4 => Ok(SourceId::ApiNode(s[4..].to_owned())),
            _ => match s.strip_prefix("list:") {
                Some(name) if !name.is_empty() => Ok(SourceId::List(name.to_owned())),
                _ => Err(format!(
                    "unknown source `{s}`; expected apiban, manual, detect, api, crowdsec or list:<name>"
                )),
            },
        }
    }
}

impl From<SourceId> for String {
    fn from(s: SourceId) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for SourceId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}
