//! The APIBAN REST client (API v2 by default, v1 on request).
//!
//! Every response is untrusted: bodies are capped, parsed leniently (error bodies put a
//! string where success bodies put an array) and any surprise is an error for that request
//! only. The key never leaves this module in printable form.

use std::{fmt, net::IpAddr, path::Path, str::FromStr, time::Duration};

use serde::Deserialize;

/// An APIBAN key. Debug and Display print `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the API key is empty")]
    Empty,
    #[error("the API key contains whitespace, control or non-ASCII characters")]
    BadCharacters,
    #[error("cannot read the API key file {path}")]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ApiKey {
    pub fn new(key: &str) -> Result<Self, KeyError> {
        let key = key.trim();
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        // The key travels in an HTTP header (v2) or a URL path (v1).
        if !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
        {
            return Err(KeyError::BadCharacters);
        }
        Ok(Self(key.to_owned()))
    }

    /// Reads a key file (systemd LoadCredential, or a root-only file): the first line.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::File {
            path: path.to_owned(),
            source,
        })?;
        Self::new(text.lines().next().unwrap_or(""))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ApiVersion {
    V1,
    #[default]
    V2,
}

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DataSet {
    #[default]
    Sip,
    Http,
    All,
}

impl DataSet {
    pub fn name(self) -> &'static str {
        match self {
            DataSet::Sip => "sip",
            DataSet::Http => "http",
            DataSet::All => "all",
        }
    }
}

impl FromStr for DataSet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <Self as clap::ValueEnum>::from_str(s, true)
    }
}

/// The ID that starts a full pull.
pub const FIRST_ID: &str = "100";
pub const DEFAULT_BASE_URL: &str = "https://apiban.org/api/";

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Up to and including `/api/`, e.g. `https://apiban.org/api/`.
    pub base_url: String,
    pub key: ApiKey,
    pub version: ApiVersion,
    pub set: DataSet,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// A batch of 250 addresses is about 5 KB; anything near this cap is not APIBAN.
    pub max_body: usize,
    /// CA certificates (PEM) trusted besides the system's and the bundled web roots.
    pub extra_ca_pem: Option<Vec<u8>>,
}

impl ClientConfig {
    pub fn new(base_url: &str, key: ApiKey) -> Self {
        Self {
            base_url: base_url.to_owned(),
            key,
            version: ApiVersion::V2,
            set: DataSet::Sip,
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
            max_body: 1 << 20,
            extra_ca_pem: None,
        }
    }
}

/// One batch, or the end of the list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Batch {
    Addresses {
        addresses: Vec<String>,
        next_id: String,
    },
    /// "no new bans": the list is exhausted from this ID on.
    Done,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckOutcome {
    Banned,
    NotBanned,
}

/// Why one request failed. None of these carry the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("APIBAN rate limit exceeded")]
    RateLimited,
    #[error(
        "API key rejected by APIBAN (403); check the key, get one at https://apiban.org/getkey.html"
    )]
    KeyRejected,
    #[error("APIBAN server error (HTTP {0})")]
    Server(u16),
    #[error("unexpected HTTP status {0} from APIBAN")]
    Status(u16),
    #[error("APIBAN request timed out")]
    Timeout,
    #[error("cannot reach APIBAN: {0}")]
    Transport(String),
    #[error("APIBAN response larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("malformed APIBAN response: {0}")]
    BadBody(String),
    #[error("the --api-ca file is not usable: {0}")]
    BadCa(String),
}

impl ClientError {
    /// A label for metrics: one per kind, no free text.
    pub fn outcome(&self) -> &'static str {
        match self {
            ClientError::RateLimited => "rate_limited",
            ClientError::KeyRejected => "key_rejected",
            ClientError::Server(_) => "server_error",
            ClientError::Status(_) => "unexpected_status",
            ClientError::Timeout => "timeout",
            ClientError::Transport(_) => "transport_error",
            ClientError::BodyTooLarge(_) => "body_too_large",
            ClientError::BadBody(_) => "bad_body",
            ClientError::BadCa(_) => "bad_ca",
        }
    }
}

/// `ipaddress` is an array on success and a string in error bodies; `ID` a string (seen as
/// a number too).
#[derive(Deserialize)]
struct Body {
    ipaddress: StringOrList,
    #[serde(rename = "ID")]
    id: StringOrNumber,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    fn says(&self, what: &str) -> bool {
        match self {
            StringOrList::One(s) => s.eq_ignore_ascii_case(what),
            StringOrList::Many(v) => v.len() == 1 && v[0].eq_ignore_ascii_case(what),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StringOrNumber {
    S(String),
    N(u64),
}

impl StringOrNumber {
    fn into_string(self) -> String {
        match self {
            StringOrNumber::S(s) => s,
            StringOrNumber::N(n) => n.to_string(),
        }
    }
}

#[derive(Clone)]
pub struct ApibanClient {
    http: reqwest::Client,
    config: ClientConfig,
    /// This host's clock against the `Date` of APIBAN's last answer, ms (positive: ahead);
    /// `i64::MIN` before an answer carried one.
    server_offset_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl fmt::Debug for ApibanClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApibanClient")
            .field("config", &self.config)
            .finish()
    }
}

impl ApibanClient {
    /// The key this client sends (to tell whether a reload changed it).
    pub fn key(&self) -> &ApiKey {
        &self.config.key
    }

    pub fn new(config: ClientConfig) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            .user_agent(concat!("apiban/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = &config.extra_ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| ClientError::BadCa(e.without_url().to_string()))?;
            if certs.is_empty() {
                return Err(ClientError::BadCa("no PEM certificate in it".into()));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Transport(e.without_url().to_string()))?;
        Ok(Self {
            http,
            config,
            server_offset_ms: std::sync::Arc::new(std::sync::atomic::AtomicI64::new(i64::MIN)),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// This host's clock against APIBAN's, from the `Date` of its last answer (to the
    /// second: what a `Date` says); None before an answer carried one.
    pub fn server_clock_offset_ms(&self) -> Option<i64> {
        let ms = self
            .server_offset_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        (ms != i64::MIN).then_some(ms)
    }

    fn url(&self, tail: &str) -> String {
        let base = self.config.base_url.trim_end_matches('/');
        format!("{base}/{tail}")
    }

    /// One batch starting at `id` ([`FIRST_ID`] for a full pull).
    pub async fn fetch(&self, id: &str) -> Result<Batch, ClientError> {
        let request = match self.config.version {
            ApiVersion::V2 => self
                .http
                .post(self.url("get"))
                .bearer_auth(self.config.key.expose())
                .json(&serde_json::json!({"set": self.config.set.name(), "id": id})),
            ApiVersion::V1 => {
                // v1 has no set parameter for banned: the sip set is the default list.
                let id = id.trim();
                if !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err(ClientError::BadBody(format!("unusable ID `{id}`")));
                }
                self.http
                    .get(self.url(&format!("{}/banned/{id}", self.config.key.expose())))
            }
        };
        let (status, body) = self.send(request).await?;
        interpret_batch(status, &body)
    }

    /// Asks the API whether `addr` is banned.
    pub async fn check(&self, addr: IpAddr) -> Result<CheckOutcome, ClientError> {
        let request = match self.config.version {
            ApiVersion::V2 => self
                .http
                .post(self.url("check"))
                .bearer_auth(self.config.key.expose())
                .json(&serde_json::json!({"set": self.config.set.name(), "ipaddress": addr.to_string()})),
            ApiVersion::V1 => self
                .http
                .get(self.url(&format!("{}/check/{addr}", self.config.key.expose()))),
        };
        let (status, body) = self.send(request).await?;
        interpret_check(status, &body, addr)
    }

    /// Sends a request and reads at most `max_body` bytes of the answer.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<(u16, Vec<u8>), ClientError> {
        let mut response = request
            .send()
            .await
            .map_err(|e| transport_error(e, &self.config.key))?;
        let status = response.status().as_u16();
        if let Some(offset) = response
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(clock_offset_ms)
        {
            self.server_offset_ms
                .store(offset, std::sync::atomic::Ordering::Relaxed);
        }
        let max = self.config.max_body;
        if response
            .content_length()
            .is_some_and(|len| len as usize > max)
        {
            return Err(ClientError::BodyTooLarge(max));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| transport_error(e, &self.config.key))?
        {
            if body.len() + chunk.len() > max {
                return Err(ClientError::BodyTooLarge(max));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, body))
    }
}

/// This host's clock minus an HTTP `Date`, ms; None when it is not one.
pub fn clock_offset_ms(date: &str) -> Option<i64> {
    let theirs = httpdate::parse_http_date(date).ok()?;
    let ms = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    };
    Some(ms(std::time::SystemTime::now()) - ms(theirs))
}

/// What an answer to `/get` (`/banned` in v1) means: a batch, the end of the list, or why
/// not. Every byte of it comes from the network.
pub fn interpret_batch(status: u16, bytes: &[u8]) -> Result<Batch, ClientError> {
    let body = parse_body(status, bytes)?;
    if body.ipaddress.says("no new bans") {
        return Ok(Batch::Done);
    }
    if status == 200 {
        let id = body.id.into_string();
        return match body.ipaddress {
            StringOrList::Many(addresses) if id != "none" && !id.is_empty() => {
                Ok(Batch::Addresses {
                    addresses,
                    next_id: id,
                })
            }
            StringOrList::Many(addresses) if addresses.is_empty() => Ok(Batch::Done),
            _ => Err(ClientError::BadBody("200 without a list and an ID".into())),
        };
    }
    Err(ClientError::Status(status))
}

/// What an answer to `/check` means for `addr`.
pub fn interpret_check(
    status: u16,
    bytes: &[u8],
    addr: IpAddr,
) -> Result<CheckOutcome, ClientError> {
    let body = parse_body(status, bytes)?;
    let listed = match &body.ipaddress {
        StringOrList::Many(v) => v.iter().any(|s| s.parse::<IpAddr>().ok() == Some(addr)),
        StringOrList::One(s) => s.eq_ignore_ascii_case("blocked"),
    };
    match status {
        200 if listed => Ok(CheckOutcome::Banned),
        200 | 400 | 404 if body.ipaddress.says("not blocked") || body.ipaddress.says("ok") => {
            Ok(CheckOutcome::NotBanned)
        }
        200 => Err(ClientError::BadBody(
            "check answer names another address".into(),
        )),
        s => Err(ClientError::Status(s)),
    }
}

/// Classifies the status codes whose meaning does not depend on the body, then parses it.
fn parse_body(status: u16, bytes: &[u8]) -> Result<Body, ClientError> {
    match status {
        403 => return Err(ClientError::KeyRejected),
        429 => return Err(ClientError::RateLimited),
        500..=599 => return Err(ClientError::Server(status)),
        200 | 400 | 404 => {}
        s => return Err(ClientError::Status(s)),
    }
    let body: Body = serde_json::from_slice(bytes)
        .map_err(|e| ClientError::BadBody(format!("HTTP {status}, {} bytes: {e}", bytes.len())))?;
    if body.ipaddress.says("rate limit exceeded") {
        return Err(ClientError::RateLimited);
    }
    if status != 200
        && !body.ipaddress.says("no new bans")
        && !body.ipaddress.says("not blocked")
        && !body.ipaddress.says("ok")
    {
        return Err(ClientError::Status(status));
    }
    Ok(body)
}

/// reqwest's errors print the URL, which holds the key in API v1: strip it, keep the causes
/// (connection refused, DNS failure) that tell the operator what is wrong, and scrub the key
/// from them too in case a layer below quotes the request.
fn transport_error(e: reqwest::Error, key: &ApiKey) -> ClientError {
    if e.is_timeout() {
        return ClientError::Timeout;
    }
    let mut text = crate::error_chain(&e.without_url()).replace(key.expose(), "[redacted]");
    if text.len() > 300 {
        let cut = (0..=300)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
    }
    ClientError::Transport(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_date_header_gives_this_hosts_clock_offset() {
        let behind = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        let ms = clock_offset_ms(&httpdate::fmt_http_date(behind)).unwrap();
        assert!((59_000..=61_000).contains(&ms), "{ms}");
        assert_eq!(clock_offset_ms("yesterday, about noon"), None);
    }

    #[test]
    fn the_key_never_prints() {
        let key = ApiKey::new("abc123secret").unwrap();
        assert_eq!(format!("{key} {key:?}"), "[redacted] ApiKey([redacted])");
        let config = ClientConfig::new("http://127.0.0.1:1/api/", key);
        assert!(!format!("{config:?}").contains("abc123secret"));
        assert!(ApiKey::new("  ").is_err());
        assert!(ApiKey::new("a b").is_err());
        assert!(ApiKey::new("a/b").is_err());
    }

    fn body(status: u16, json: &str) -> Result<Body, ClientError> {
        parse_body(status, json.as_bytes())
    }

    #[test]
    fn documented_error_shapes() {
        assert!(matches!(
            body(
                429,
                r#"{"ipaddress":"rate limit exceeded","ID":"unauthorized"}"#
            ),
            Err(ClientError::RateLimited)
        ));
        assert!(matches!(
            body(
                400,
                r#"{"ipaddress":"rate limit exceeded","ID":"unauthorized"}"#
            ),
            Err(ClientError::RateLimited)
        ));
        assert!(matches!(
            body(403, r#"{"ipaddress":"none","ID":"unauthorized"}"#),
            Err(ClientError::KeyRejected)
        ));
        assert!(matches!(body(502, "<html>"), Err(ClientError::Server(502))));
        assert!(matches!(body(200, "<html>"), Err(ClientError::BadBody(_))));
        assert!(matches!(
            body(200, r#"{"ipaddress":["1.2.3.4"]"#),
            Err(ClientError::BadBody(_))
        ));
        assert!(matches!(
            body(400, r#"{"ipaddress":"what","ID":"none"}"#),
            Err(ClientError::Status(400))
        ));
        assert!(body(400, r#"{"ipaddress":["no new bans"],"ID":"none"}"#).is_ok());
        assert!(body(400, r#"{"ipaddress":"no new bans","ID":"none"}"#).is_ok());
        assert!(body(200, r#"{"ipaddress":["1.2.3.4"],"ID":1636221410}"#).is_ok());
    }
}
