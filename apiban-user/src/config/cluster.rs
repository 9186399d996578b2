//! `--cluster*`: the etcd a fleet shares its ledger through, and this node's name in it.

use super::*;
pub use crate::cluster::settings::{ClusterSettings, ClusterTls, DEFAULT_CLUSTER_PREFIX};

pub(super) fn resolve_cluster(
    args: &RunArgs,
    file: &FileConfig,
) -> Result<Option<ClusterSettings>, ConfigError> {
    let endpoints: Vec<String> = first_list(&args.cluster, file.cluster.clone())
        .into_iter()
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        return Ok(None);
    }
    if let Some(bad) = endpoints
        .iter()
        .find(|e| !(e.starts_with("http://") || e.starts_with("https://")))
    {
        return Err(invalid(
            "cluster",
            format!("`{bad}` is not an etcd endpoint URL (e.g. http://10.0.0.5:2379)"),
        ));
    }
    let prefix = first(
        args.cluster_prefix.clone(),
        file.cluster_prefix.clone(),
        DEFAULT_CLUSTER_PREFIX.to_owned(),
    );
    if !prefix.starts_with('/') || !prefix.ends_with('/') {
        return Err(invalid(
            "cluster-prefix",
            format!("`{prefix}` must start and end with / (e.g. /apiban/v1/)"),
        ));
    }
    let node = match args.node_name.clone().or_else(|| file.node_name.clone()) {
        Some(n) => n,
        None => host_name()
            .ok_or_else(|| invalid("node-name", "the host has no name to use: give --node-name"))?,
    };
    if node.is_empty() || node.contains(['/', ' ']) {
        return Err(invalid(
            "node-name",
            format!("`{node}`: a node name has no spaces or slashes"),
        ));
    }
    let https = endpoints.iter().any(|e| e.starts_with("https://"));
    if https && endpoints.iter().any(|e| e.starts_with("http://")) {
        return Err(invalid(
            "cluster",
            "give every endpoint as https:// or every one as http://",
        ));
    }
    let ca = args.cluster_ca.clone().or_else(|| file.cluster_ca.clone());
    let cert = args
        .cluster_cert
        .clone()
        .or_else(|| file.cluster_cert.clone());
    let key = args
        .cluster_key
        .clone()
        .or_else(|| file.cluster_key.clone());
    let identity = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => {
            return Err(invalid(
                "cluster-cert",
                "give --cluster-cert and --cluster-key together",
            ));
        }
    };
    let tls = match (https, ca) {
        (true, Some(ca)) => Some(ClusterTls { ca, identity }),
        (true, None) => {
            return Err(invalid(
                "cluster-ca",
                "https:// endpoints need --cluster-ca (the CA that signed etcd's certificates)",
            ));
        }
        (false, None) if identity.is_none() => None,
        (false, _) => {
            return Err(invalid(
                "cluster-ca",
                "TLS settings need https:// endpoints",
            ));
        }
    };
    let user = args
        .cluster_user
        .clone()
        .or_else(|| file.cluster_user.clone());
    let password = args
        .cluster_password_file
        .clone()
        .or_else(|| file.cluster_password_file.clone());
    let user = match (user, password) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        _ => {
            return Err(invalid(
                "cluster-user",
                "give --cluster-user and --cluster-password-file together",
            ));
        }
    };
    let max_clock_offset = duration(
        args.cluster_max_clock_offset,
        file.cluster_max_clock_offset,
        Duration::from_secs(30),
    );
    if max_clock_offset < Duration::from_secs(1) {
        return Err(invalid(
            "cluster-max-clock-offset",
            "must be at least 1s: a fleet's clocks are compared to the second",
        ));
    }
    Ok(Some(ClusterSettings {
        endpoints,
        prefix,
        node,
        tls,
        user,
        max_clock_offset,
    }))
}

fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length; gethostname NUL-terminates within it on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned()).filter(|n| !n.is_empty())
}
