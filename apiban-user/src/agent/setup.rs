//! What `apiban run` works out before it starts anything: the APIBAN client and its key,
//! what the control socket lets whom do, and what `status` says of the agent itself.

use super::*;

/// The key, if one is configured; a configured key that cannot be read is an error.
pub(super) fn read_key(c: &ApibanSettings) -> anyhow::Result<Option<ApiKey>> {
    match &c.key {
        None => Ok(None),
        Some(KeySource::Value(k)) => ApiKey::new(k)
            .map(Some)
            .context("the API key (--api-key, APIBAN_KEY or api-key) is not usable"),
        Some(KeySource::File(p)) => ApiKey::from_file(p)
            .map(Some)
            .with_context(|| format!("cannot use the API key file {}", p.display())),
    }
}

/// The APIBAN client the configuration describes, if it names a key.
pub fn client_from_config(c: &ApibanSettings) -> anyhow::Result<Option<ApibanClient>> {
    let Some(key) = read_key(c)? else {
        return Ok(None);
    };
    let mut config = ClientConfig::new(&c.url, key);
    config.timeout = c.timeout;
    config.connect_timeout = config.connect_timeout.min(c.timeout);
    config.version = c.version;
    config.set = c.data_set;
    if let Some(ca) = &c.ca {
        config.extra_ca_pem = Some(
            std::fs::read(ca)
                .with_context(|| format!("cannot read the --api-ca file {}", ca.display()))?,
        );
    }
    let client = ApibanClient::new(config).with_context(|| match &c.ca {
        Some(ca) => format!(
            "cannot build the HTTP client with the CAs in {}",
            ca.display()
        ),
        None => "cannot build the HTTP client".to_owned(),
    })?;
    Ok(Some(client))
}

pub(super) fn apiban_client(
    c: &ApibanSettings,
) -> anyhow::Result<Option<(ApibanClient, PollSettings)>> {
    Ok(client_from_config(c)?.map(|client| (client, c.poll.clone())))
}

pub(super) fn info(
    c: &AgentConfig,
    interfaces: Vec<InterfaceInfo>,
    apiban: bool,
    started_at: u64,
) -> AgentInfo {
    AgentInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        started_at,
        dry_run: c.process.dry_run,
        interfaces,
        scope: scope_text(&c.scope),
        apiban_enabled: apiban,
        rate_limit: c.apiban.poll.rate_limit.to_string(),
        poll_interval: crate::human::format_duration(c.apiban.poll.poll_interval),
        config_file: c.file.as_ref().map(|p| p.display().to_string()),
        cluster: None,
        detect: None,
        features: features::probed().map(|k| k.report()).unwrap_or_default(),
    }
}

/// Who besides root may use the control socket; a group that does not exist is a
/// configuration error, found before anything is attached.
pub(super) fn control_access(config: &AgentConfig) -> anyhow::Result<control::Access> {
    let read_gid =
        match &config.process.control_group {
            Some(group) => Some(control::resolve_group(group).map_err(|message| {
                config::ConfigError::Invalid {
                    key: "control-group",
                    message,
                }
            })?),
            None => None,
        };
    Ok(control::Access { read_gid })
}
