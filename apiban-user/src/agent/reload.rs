//! SIGHUP and `apiban reload`: re-resolve the configuration with the same flags, and apply
//! what can change without re-attaching.

use std::sync::{Arc, Mutex};

use super::{apiban_client, scope_text};
use crate::{
    config::{self, AgentConfig, RunArgs},
    engine::Enforcer,
    source::apiban::ApiKey,
    status::AgentInfo,
    sync::{Change, Running},
};

pub use crate::control::ReloadError;

/// SIGHUP: re-reads the config file with the same flags and environment, and applies what
/// can change without re-attaching. A config that does not resolve changes nothing.
pub(super) async fn reload<E: Enforcer + Send + 'static>(
    args: &RunArgs,
    config: &mut AgentConfig,
    running: &mut Running<E>,
    info: &Arc<Mutex<AgentInfo>>,
    key_in_use: &mut Option<ApiKey>,
    detect: Option<&tokio::sync::watch::Sender<crate::detect::DetectSettings>>,
) -> Result<(), ReloadError> {
    let outcome = apply_reload(args, config, running, info, key_in_use, detect).await;
    match &outcome {
        Ok(()) => tracing::info!("configuration reloaded"),
        Err(e) => tracing::error!(error = %crate::error_chain(e), "reload failed"),
    }
    outcome
}

async fn apply_reload<E: Enforcer + Send + 'static>(
    args: &RunArgs,
    config: &mut AgentConfig,
    running: &mut Running<E>,
    info: &Arc<Mutex<AgentInfo>>,
    key_in_use: &mut Option<ApiKey>,
    detect: Option<&tokio::sync::watch::Sender<crate::detect::DetectSettings>>,
) -> Result<(), ReloadError> {
    let mut new = config::load(args).map_err(ReloadError::Config)?;
    // A key file that cannot be read refuses the reload, as a bad config does.
    let crowdsec = new
        .crowdsec
        .as_ref()
        .map(config::CrowdsecSettings::spec)
        .transpose()
        .map_err(ReloadError::Config)?;
    let crowdsec_alerts = new
        .crowdsec
        .as_ref()
        .map(config::CrowdsecSettings::alerts)
        .transpose()
        .map_err(ReloadError::Config)?
        .flatten();
    if let Some(kernel) = super::features::probed() {
        super::features::fit(&mut new.detect, kernel).map_err(ReloadError::Config)?;
    }
    let apiban = apiban_client(&new.apiban).map_err(|e| ReloadError::Apiban(e.into()))?;
    for key in config.restart_only_changes(&new) {
        tracing::warn!(
            key,
            "changed in the configuration, but only takes effect on restart"
        );
    }
    let change = Change::Settings {
        engine: new.engine.clone(),
        scope: new.scope.clone(),
    };
    crate::sync::send_change(&running.updates, change)
        .await
        .map_err(ReloadError::Apply)?;
    // A key file rotated in place has the same path: compare what it holds.
    let key_now = apiban.as_ref().map(|(client, _)| client.key().clone());
    let apiban_enabled = apiban.is_some();
    if key_now != *key_in_use || new.apiban != config.apiban {
        tracing::info!("APIBAN settings changed; restarting the poller from its saved position");
        running.restart_poller(apiban);
        *key_in_use = key_now;
    } else {
        // The operator may have fixed what made APIBAN reject the key outside our view.
        running.retry_apiban_now();
    }
    running.set_crowdsec(crowdsec, crowdsec_alerts).await;
    let polling = running.polling();
    for name in running.set_lists(new.lists.clone()) {
        // In a fleet, the lists are the leader's: its drop deletes the records in etcd for
        // every node. A standby node's list config does not speak for the fleet.
        if polling {
            let _ = crate::sync::send_change(&running.updates, Change::DropList { name }).await;
        }
    }
    {
        let mut i = crate::lock(info);
        i.scope = scope_text(&new.scope);
        i.rate_limit = new.apiban.poll.rate_limit.to_string();
        i.poll_interval = crate::human::format_duration(new.apiban.poll.poll_interval);
        i.apiban_enabled = apiban_enabled;
    }
    if let Some(detect) = detect {
        detect.send_if_modified(|running| {
            let changed = *running != new.detect;
            running.clone_from(&new.detect);
            changed
        });
    }
    *config = config.reloaded(new);
    Ok(())
}
