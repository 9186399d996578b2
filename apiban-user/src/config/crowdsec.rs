//! `--crowdsec`: CrowdSec's Local API as a feed (its decision stream) and, with a machine's
//! credentials, as where this host's bans go as alerts. See `source::crowdsec`.

use std::{path::PathBuf, time::Duration};

use super::{ConfigError, FileConfig, RunArgs, first, first_list, invalid};

/// How the bouncer is known to LAPI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BouncerCredentials {
    /// A file whose first line is the key `cscli bouncers add` printed.
    KeyFile(PathBuf),
    /// A client certificate and its key, PEM files (mTLS, https only).
    Certificate { cert: PathBuf, key: PathBuf },
}

/// `--crowdsec`: where CrowdSec's decisions are read, and which. The credentials are read
/// from their files at start and on every reload, and never logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrowdsecSettings {
    pub url: String,
    pub credentials: BouncerCredentials,
    /// The CA an https LAPI's certificate is checked against; None: the system's roots.
    pub ca: Option<PathBuf>,
    pub interval: Duration,
    pub origins: Vec<String>,
    pub scenarios: Vec<String>,
    /// The machine this host's bans are posted as, and its password's file; None: none
    /// are posted.
    pub machine: Option<(String, PathBuf)>,
    pub post_api_bans: bool,
    pub post_forgeable: bool,
}

fn read(flag: &'static str, path: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| invalid(flag, format!("cannot read {}: {e}", path.display())))
}

impl CrowdsecSettings {
    /// The CA the file holds now, checked.
    fn tls_ca(&self) -> Result<crate::source::crowdsec::LapiTls, ConfigError> {
        let tls = crate::source::crowdsec::LapiTls {
            ca: self
                .ca
                .as_deref()
                .map(|p| read("crowdsec-ca", p))
                .transpose()?,
            identity: None,
        };
        crate::source::crowdsec::client(&tls).map_err(|e| {
            invalid(
                "crowdsec-ca",
                format!(
                    "{}: {}",
                    self.ca
                        .as_deref()
                        .unwrap_or(std::path::Path::new(""))
                        .display(),
                    crate::error_chain(&e)
                ),
            )
        })?;
        Ok(tls)
    }

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
            post_forgeable: self.post_forgeable,
            tls: self.tls_ca()?,
        }))
    }

    /// What the CrowdSec task runs with: these settings and the credentials their files
    /// hold now, checked.
    pub fn spec(&self) -> Result<crate::source::crowdsec::CrowdsecSpec, ConfigError> {
        let mut tls = self.tls_ca()?;
        let key = match &self.credentials {
            BouncerCredentials::KeyFile(file) => {
                let text = String::from_utf8_lossy(&read("crowdsec-key-file", file)?).into_owned();
                let key = text.lines().next().unwrap_or("").trim().to_owned();
                if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(invalid(
                        "crowdsec-key-file",
                        format!(
                            "{} holds no bouncer key on its first line (`cscli bouncers add apiban`)",
                            file.display()
                        ),
                    ));
                }
                Some(key)
            }
            BouncerCredentials::Certificate { cert, key } => {
                let mut identity = read("crowdsec-cert", cert)?;
                identity.push(b'\n');
                identity.extend(read("crowdsec-cert-key", key)?);
                tls.identity = Some(identity);
                crate::source::crowdsec::client(&tls).map_err(|e| {
                    invalid(
                        "crowdsec-cert",
                        format!(
                            "{} with {}: {}",
                            cert.display(),
                            key.display(),
                            crate::error_chain(&e)
                        ),
                    )
                })?;
                None
            }
        };
        Ok(crate::source::crowdsec::CrowdsecSpec {
            url: self.url.clone(),
            key,
            tls,
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
    let key_file = args
        .crowdsec_key_file
        .clone()
        .or_else(|| file.crowdsec_key_file.clone());
    let cert = args
        .crowdsec_cert
        .clone()
        .or_else(|| file.crowdsec_cert.clone());
    let cert_key = args
        .crowdsec_cert_key
        .clone()
        .or_else(|| file.crowdsec_cert_key.clone());
    let ca = args
        .crowdsec_ca
        .clone()
        .or_else(|| file.crowdsec_ca.clone());
    let Some(url) = args.crowdsec.clone().or_else(|| file.crowdsec.clone()) else {
        for (flag, set) in [
            ("crowdsec-key-file", key_file.is_some()),
            ("crowdsec-cert", cert.is_some()),
            ("crowdsec-ca", ca.is_some()),
        ] {
            if set {
                return Err(invalid(
                    flag,
                    "is set, but crowdsec (the LAPI's URL) is not",
                ));
            }
        }
        return Ok(None);
    };
    let https = url.starts_with("https://");
    if !(https || url.starts_with("http://")) {
        return Err(invalid(
            "crowdsec",
            format!("`{url}` is not an http:// or https:// URL of CrowdSec's Local API"),
        ));
    }
    let credentials = match (key_file, cert, cert_key) {
        (Some(_), Some(_), _) => {
            return Err(invalid(
                "crowdsec-cert",
                "and crowdsec-key-file are both set: the bouncer is known by one of them",
            ));
        }
        (Some(file), None, _) => BouncerCredentials::KeyFile(file),
        (None, Some(cert), Some(key)) => BouncerCredentials::Certificate { cert, key },
        (None, Some(_), None) => {
            return Err(invalid(
                "crowdsec-cert-key",
                "is required with crowdsec-cert",
            ));
        }
        (None, None, _) => {
            return Err(invalid(
                "crowdsec-key-file",
                "is required with crowdsec: a file holding the key `cscli bouncers add apiban` prints (or crowdsec-cert and crowdsec-cert-key, over https)",
            ));
        }
    };
    if !https {
        if matches!(credentials, BouncerCredentials::Certificate { .. }) {
            return Err(invalid(
                "crowdsec-cert",
                format!("a client certificate needs an https:// LAPI, not `{url}`"),
            ));
        }
        if ca.is_some() {
            return Err(invalid(
                "crowdsec-ca",
                format!("a CA is for an https:// LAPI, not `{url}`"),
            ));
        }
    }
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
    let post_forgeable = first(
        args.crowdsec_post_forgeable,
        file.crowdsec_post_forgeable,
        false,
    );
    if post_forgeable && machine.is_none() {
        return Err(invalid(
            "crowdsec-post-forgeable",
            "needs crowdsec-machine and crowdsec-password-file to post with",
        ));
    }
    if post_api_bans && machine.is_none() {
        return Err(invalid(
            "crowdsec-post-api-bans",
            "needs crowdsec-machine and crowdsec-password-file to post with",
        ));
    }
    Ok(Some(CrowdsecSettings {
        machine,
        post_api_bans,
        post_forgeable,
        url,
        credentials,
        ca,
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
