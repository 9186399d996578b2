//! Plain-text blocklists (VoIPBL, FireHOL netsets, Spamhaus DROP and the like): one address
//! or CIDR per line, `#` or `;` comments, from a file or an HTTP(S) URL.

use std::{path::PathBuf, time::Duration};

/// Where a list comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListLocation {
    File(PathBuf),
    Url(String),
}

impl ListLocation {
    pub fn parse(text: &str) -> Self {
        if text.starts_with("http://") || text.starts_with("https://") {
            ListLocation::Url(text.to_owned())
        } else {
            ListLocation::File(PathBuf::from(text))
        }
    }
}

impl std::fmt::Display for ListLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListLocation::File(p) => write!(f, "{}", p.display()),
            ListLocation::Url(u) => f.write_str(u),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListSpec {
    /// Names the source in the ledger, status and metrics (`list:<name>`).
    pub name: String,
    pub location: ListLocation,
    pub refresh: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("cannot read blocklist {location}: {reason}")]
    Fetch { location: String, reason: String },
    #[error("blocklist {location} is larger than {max} bytes")]
    TooLarge { location: String, max: usize },
}

/// Lists with millions of lines exist; beyond this size it is not a SIP attacker list.
pub const MAX_LIST_BYTES: usize = 64 << 20;

/// The entries of a list, comments and blank lines removed. Each entry is the first word
/// of its line (netsets sometimes append a comment after whitespace).
pub fn parse_list(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or("");
            line.split_whitespace().next()
        })
        .collect()
}

pub async fn fetch(location: &ListLocation, http: &reqwest::Client) -> Result<String, ListError> {
    let fail = |reason: String| ListError::Fetch {
        location: location.to_string(),
        reason,
    };
    match location {
        ListLocation::File(path) => {
            let meta = tokio::fs::metadata(path)
                .await
                .map_err(|e| fail(e.to_string()))?;
            if meta.len() as usize > MAX_LIST_BYTES {
                return Err(ListError::TooLarge {
                    location: location.to_string(),
                    max: MAX_LIST_BYTES,
                });
            }
            let bytes = tokio::fs::read(path)
                .await
                .map_err(|e| fail(e.to_string()))?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
        ListLocation::Url(url) => {
            let mut response = http
                .get(url)
                .send()
                .await
                .map_err(|e| fail(e.without_url().to_string()))?;
            if !response.status().is_success() {
                return Err(fail(format!("HTTP {}", response.status().as_u16())));
            }
            let mut body = Vec::new();
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| fail(e.without_url().to_string()))?
            {
                if body.len() + chunk.len() > MAX_LIST_BYTES {
                    return Err(ListError::TooLarge {
                        location: location.to_string(),
                        max: MAX_LIST_BYTES,
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(String::from_utf8_lossy(&body).into_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netset_and_voipbl_formats() {
        let text = "# FireHOL netset\n;Spamhaus style\n\n1.2.3.4\n5.6.7.0/24 ; SBL123\n  \
                    9.9.9.9\t# trailing\n2a01:4f8::/32\n";
        assert_eq!(
            parse_list(text),
            vec!["1.2.3.4", "5.6.7.0/24", "9.9.9.9", "2a01:4f8::/32"]
        );
        assert_eq!(
            ListLocation::parse("https://x/y.txt"),
            ListLocation::Url("https://x/y.txt".into())
        );
        assert_eq!(
            ListLocation::parse("/etc/apiban/voipbl.txt"),
            ListLocation::File("/etc/apiban/voipbl.txt".into())
        );
    }
}
