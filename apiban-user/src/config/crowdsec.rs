//! `--crowdsec`: CrowdSec's Local API as a feed (its decision stream) and, with a machine's
//! credentials, as where this host's bans go as alerts. See `source::crowdsec`.

use std::{path::PathBuf, time::Duration};

use super::{ConfigError, FileConfig, RunArgs, first, first_list, invalid};

/// `--crowdsec`: where CrowdSec's decisions are read, and which. The key is read from its
/// file at start and on every reload, and never logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrowdsecSettings {
    pub url: String,
    pub key_file: PathBuf,
    pub interval: Duration,
    pub origins: Vec<String>,
    pub scenarios: Vec<String>,
    /// The machine this host's bans are posted as, and its password's file; None: none
    /// are posted.
    pub machine: Option<(String, PathBuf)>,
    pub post_api_bans: bool,
}

impl CrowdsecSettings {
    /// Where this host's bans go as alerts, with the password the file holds now.
    pub fn alerts(&self) -> Result<Option<crate::source::crowdsec::AlertSpec>, ConfigError> {
        let Some((machine, file)) = &self.machine else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(file).map_err(|e| {
            invalid(
                "crowdsec-password-file",
                format!("cannot read {}: {e}", file.display()),
            )
        })?;
        let password = text.lines().next().unwrap_or("").trim_end().to_owned();
        if password.is_empty() {
            return Err(invalid(
                "crowdsec-password-file",
                format!("{} holds no password on its first line", file.display()),
            ));
        }
        Ok(Some(crate::source::crowdsec::AlertSpec {
            url: self.url.clone(),
            machine: machine.clone(),
            password,
            post_api_bans: self.post_api_bans,
        }))
    }

    /// What the CrowdSec task runs with: these settings and the key the file holds now.
    pub fn spec(&self) -> Result<crate::source::crowdsec::CrowdsecSpec, ConfigError> {
        let text = std::fs::read_to_string(&self.key_file).map_err(|e| {
            invalid(
                "crowdsec-key-file",
                format!("cannot read {}: {e}", self.key_file.display()),
            )
        })?;
        let key = text.lines().next().unwrap_or("").trim().to_owned();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "crowdsec-key-file",
                format!(
                    "{} holds no bouncer key on its first line (`cscli bouncers add apiban`)",
                    self.key_file.display()
                ),
            ));
        }
        Ok(crate::source::crowdsec::CrowdsecSpec {
            url: self.url.clone(),
            key,
            interval: self.interval,
            origins: self.origins.clone(),
            scenarios: self.scenarios.clone(),
        })
    }
}

pub(super) fn resolve_crowdsec(
    args: &RunArgs,
    file: &FileConfig,
) -> Result<Option<CrowdsecSettings>, ConfigError> {
    let Some(url) = args.crowdsec.clone().or_else(|| file.crowdsec.clone()) else {
        if args.crowdsec_key_file.is_some() || file.crowdsec_key_file.is_some() {
            return Err(invalid(
                "crowdsec-key-file",
                "is set, but crowdsec (the LAPI's URL) is not",
            ));
        }
        return Ok(None);
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(invalid(
            "crowdsec",
            format!("`{url}` is not an http:// or https:// URL of CrowdSec's Local API"),
        ));
    }
    let key_file = args
        .crowdsec_key_file
        .clone()
        .or_else(|| file.crowdsec_key_file.clone())
        .ok_or_else(|| {
            invalid(
                "crowdsec-key-file",
                "is required with crowdsec: a file holding the key `cscli bouncers add apiban` prints",
            )
        })?;
    let interval = first(
        args.crowdsec_interval.map(|d| d.0),
        file.crowdsec_interval.map(|d| d.0.0),
        Duration::from_secs(10),
    );
    if interval < Duration::from_secs(1) {
        return Err(invalid("crowdsec-interval", "must be at least 1s"));
    }
    let words = |list: Vec<String>| -> Vec<String> {
        list.into_iter()
            .map(|w| w.trim().to_owned())
            .filter(|w| !w.is_empty())
            .collect()
    };
    let machine = match (
        args.crowdsec_machine
            .clone()
            .or_else(|| file.crowdsec_machine.clone()),
        args.crowdsec_password_file
            .clone()
            .or_else(|| file.crowdsec_password_file.clone()),
    ) {
        (Some(name), Some(password)) => Some((name, password)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid(
                "crowdsec-password-file",
                "is required with crowdsec-machine (`cscli machines add apiban -p ...`)",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "crowdsec-machine",
                "is required with crowdsec-password-file",
            ));
        }
    };
    let post_api_bans = first(
        args.crowdsec_post_api_bans,
        file.crowdsec_post_api_bans,
        false,
    );
    if post_api_bans && machine.is_none() {
        return Err(invalid(
            "crowdsec-post-api-bans",
            "needs crowdsec-machine and crowdsec-password-file to post with",
        ));
    }
    Ok(Some(CrowdsecSettings {
        machine,
        post_api_bans,
        url,
        key_file,
        interval,
        origins: words(first_list(
            &args.crowdsec_origins,
            file.crowdsec_origins.clone(),
        )),
        scenarios: words(first_list(
            &args.crowdsec_scenarios,
            file.crowdsec_scenarios.clone(),
        )),
    }))
}
