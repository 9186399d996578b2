//! What a fleet node needs to know of its fleet: the etcd it shares its ledger through and its
//! own name there. `config` resolves it from flags and the file; it lives here, below
//! `config`, because every part of `cluster` reads it.

use std::{path::PathBuf, time::Duration};

use serde::Serialize;

/// `--cluster`: the etcd this node's fleet shares its ledger through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClusterSettings {
    #[serde(rename = "cluster")]
    pub endpoints: Vec<String>,
    #[serde(rename = "cluster-prefix")]
    pub prefix: String,
    #[serde(rename = "node-name")]
    pub node: String,
    #[serde(rename = "cluster-ca")]
    pub tls: Option<ClusterTls>,
    /// The user and the file its password is in (read at every connect, never logged).
    #[serde(rename = "cluster-user")]
    pub user: Option<(String, PathBuf)>,
    /// Past this offset from the fleet's clock, the node does not lead and deletes nothing
    /// from etcd (see `cluster::clock`).
    #[serde(rename = "cluster-max-clock-offset")]
    pub max_clock_offset: Duration,
}

/// TLS to etcd: the CA that signed its certificates, and this node's client certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterTls {
    pub ca: PathBuf,
    /// Certificate and key, PEM.
    pub identity: Option<(PathBuf, PathBuf)>,
}

pub const DEFAULT_CLUSTER_PREFIX: &str = "/apiban/v1/";
