//! CrowdSec's Local API as a feed: its decision stream, read as a bouncer reads it
//! (`GET /v1/decisions/stream`, header `X-Api-Key`). The first call of an agent's life asks
//! for every active decision (`startup=true`); later calls bring what changed since the
//! previous one, as LAPI keeps each bouncer's position itself.
//!
//! What LAPI sends (Debian's crowdsec 1.4.6, see ../shared/crowdsec.md): `{"new": [...] |
//! null, "deleted": [...] | null}`, each decision `{duration, id, origin, scenario, scope,
//! type, value}` with `duration` a Go duration until its end (negative in `deleted`). Only
//! `ban` decisions of scope `Ip` or `Range` become bans; the others are counted. What cannot
//! be read is never a ban: a decision with an unreadable value or duration is skipped and
//! counted, and an answer that is not the stream's JSON is an error that changes nothing.

use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// Where the stream comes from and what of it is asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrowdsecSpec {
    /// LAPI's base URL, e.g. http://127.0.0.1:8080.
    pub url: String,
    /// The bouncer key (`cscli bouncers add`), sent as `X-Api-Key`; None: the bouncer is
    /// known by the client certificate in `tls`. Never logged.
    pub key: Option<String>,
    pub tls: LapiTls,
    pub interval: Duration,
    /// Only decisions of these origins (LAPI's `origins=`); empty: all.
    pub origins: Vec<String>,
    /// Only decisions whose scenario contains one of these (`scenarios_containing=`).
    pub scenarios: Vec<String>,
}

/// Where this host's bans are posted as alerts, and as which machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertSpec {
    pub url: String,
    pub machine: String,
    /// Never logged.
    pub password: String,
    /// The ban API's bans too, not only detection's.
    pub post_api_bans: bool,
    /// Detection's bans on evidence a forged source address can bring too (the request
    /// rules): off by default, as CrowdSec takes them to every bouncer it feeds.
    pub post_forgeable: bool,
    /// The CA LAPI's certificate is checked against (a machine logs in with its password,
    /// never the bouncer's certificate).
    pub tls: LapiTls,
}

/// How connections to LAPI over https are made, beyond what the system trusts.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct LapiTls {
    /// PEM of the CA that signed LAPI's certificate; None: the system's roots.
    pub ca: Option<Vec<u8>>,
    /// PEM of this bouncer's certificate and its key, presented to LAPI (its
    /// `bouncers_allowed_ou`), instead of a key.
    pub identity: Option<Vec<u8>>,
}

impl std::fmt::Debug for LapiTls {
    // The identity holds a private key: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LapiTls")
            .field("ca", &self.ca.as_ref().map(|c| c.len()))
            .field("identity", &self.identity.as_ref().map(|_| "(set)"))
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("not a PEM certificate and private key reqwest can use")]
    Identity(#[source] reqwest::Error),
    #[error("not a PEM certificate authority")]
    Ca(#[source] reqwest::Error),
    #[error("cannot build an HTTP client with it")]
    Client(#[source] reqwest::Error),
}

/// The HTTP client for LAPI: `tls`'s CA trusted beside the system's roots, its identity
/// presented when the server asks.
pub fn client(tls: &LapiTls) -> Result<reqwest::Client, TlsError> {
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(60));
    if let Some(ca) = &tls.ca {
        for cert in reqwest::Certificate::from_pem_bundle(ca).map_err(TlsError::Ca)? {
            builder = builder.add_root_certificate(cert);
        }
    }
    if let Some(identity) = &tls.identity {
        builder =
            builder.identity(reqwest::Identity::from_pem(identity).map_err(TlsError::Identity)?);
    }
    builder.build().map_err(TlsError::Client)
}

#[derive(Debug, thiserror::Error)]
pub enum CrowdsecError {
    #[error("cannot reach CrowdSec's LAPI at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("CrowdSec's LAPI refused the credentials (HTTP {status}); {check}")]
    KeyRefused { status: u16, check: &'static str },
    #[error("CrowdSec's LAPI answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("CrowdSec's LAPI answered something that is not a decision stream: {0}")]
    Unreadable(String),
}

/// One decision as the stream carries it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct RawDecision {
    #[serde(default)]
    pub duration: String,
    #[serde(default)]
    pub origin: String,
    #[serde(default)]
    pub scenario: String,
    #[serde(default)]
    pub scope: String,
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Default, Deserialize)]
struct RawStream {
    #[serde(default)]
    new: Option<Vec<RawDecision>>,
    #[serde(default)]
    deleted: Option<Vec<RawDecision>>,
}

/// A ban decision, read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BanDecision {
    pub net: IpNet,
    /// How long it still runs (zero for a deleted one).
    pub remaining: Duration,
    pub origin: String,
    pub scenario: String,
}

impl BanDecision {
    /// What `check` and `list` show of it, in at most 200 printable characters.
    pub fn comment(&self) -> String {
        let text = format!("{} (origin {})", self.scenario, self.origin);
        let printable: String = text
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        printable.chars().take(200).collect()
    }
}

/// One answer of the stream, read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stream {
    pub new: Vec<BanDecision>,
    pub deleted: Vec<BanDecision>,
    /// Decisions of another type (captcha, throttle...) or scope (Country, AS...): left.
    pub other: usize,
    /// Decisions whose value or duration could not be read: never a ban.
    pub unreadable: usize,
}

/// Reads one answer of the stream.
pub fn parse_stream(body: &[u8]) -> Result<Stream, CrowdsecError> {
    // An object: serde would also take an array for the struct.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(CrowdsecError::Unreadable("not a JSON object".into()));
    }
    let raw: RawStream =
        serde_json::from_slice(body).map_err(|e| CrowdsecError::Unreadable(e.to_string()))?;
    let mut stream = Stream::default();
    for (list, deleted) in [(raw.new, false), (raw.deleted, true)] {
        for d in list.unwrap_or_default() {
            match read_decision(&d) {
                Read::Ban(ban) if deleted => stream.deleted.push(ban),
                Read::Ban(ban) => stream.new.push(ban),
                Read::Other => stream.other += 1,
                Read::Unreadable => stream.unreadable += 1,
            }
        }
    }
    Ok(stream)
}

enum Read {
    Ban(BanDecision),
    Other,
    Unreadable,
}

fn read_decision(d: &RawDecision) -> Read {
    // LAPI's own filter compares these exactly; a lower-case "ip" never reaches its stream.
    if d.kind != "ban" || !matches!(d.scope.as_str(), "Ip" | "Range") {
        return Read::Other;
    }
    let net = match d.scope.as_str() {
        "Ip" => d.value.parse::<std::net::IpAddr>().ok().map(IpNet::from),
        _ => d.value.parse::<IpNet>().ok(),
    };
    let (Some(net), Some(remaining)) = (net, go_duration(&d.duration)) else {
        return Read::Unreadable;
    };
    Read::Ban(BanDecision {
        net,
        remaining,
        origin: d.origin.clone(),
        scenario: d.scenario.clone(),
    })
}

/// A Go `time.Duration` string (`3h59m56.701651592s`, `1m58s`, `-13.478036ms`, `0s`, `250µs`)
/// as what is left of it: negative is zero. None for anything else.
pub fn go_duration(text: &str) -> Option<Duration> {
    let (negative, mut rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let (seconds_per_unit, unit_len) = [
            ("ns", 1e-9),
            ("us", 1e-6),
            ("µs", 1e-6),
            ("μs", 1e-6),
            ("ms", 1e-3),
            ("s", 1.0),
            ("m", 60.0),
            ("h", 3600.0),
        ]
        .iter()
        .filter(|(unit, _)| rest.starts_with(unit))
        .map(|(unit, per)| (*per, unit.len()))
        // "ms" before "m", "ns"/"us" before "s": the longest unit that matches.
        .max_by_key(|(_, len)| *len)?;
        total += number * seconds_per_unit;
        rest = &rest[unit_len..];
    }
    if negative || !total.is_finite() {
        return Some(Duration::ZERO);
    }
    // Ten years: longer than any decision, and far from Duration's limits.
    Some(Duration::from_secs_f64(total.min(10.0 * 365.0 * 86_400.0)))
}

/// A stream of 60,000 decisions is about 10 MB; twenty times that is not LAPI's.
pub const MAX_STREAM_BYTES: usize = 200 << 20;

/// Asks LAPI for the stream: every active decision with `startup`, else what changed.
pub async fn pull(
    spec: &CrowdsecSpec,
    http: &reqwest::Client,
    startup: bool,
) -> Result<Stream, CrowdsecError> {
    let url = format!("{}/v1/decisions/stream", spec.url.trim_end_matches('/'));
    let mut query: Vec<(&str, String)> = vec![("startup", startup.to_string())];
    if !spec.origins.is_empty() {
        query.push(("origins", spec.origins.join(",")));
    }
    if !spec.scenarios.is_empty() {
        query.push(("scenarios_containing", spec.scenarios.join(",")));
    }
    let mut request = http.get(&url).query(&query);
    if let Some(key) = &spec.key {
        request = request.header("X-Api-Key", key);
    }
    let body = send(&spec.url, request, CHECK_BOUNCER).await?;
    parse_stream(&body)
}

/// A ban of this host's to tell CrowdSec of, as an alert with its decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub net: IpNet,
    pub ttl: Duration,
    /// `apiban/<rule>` (detection) or `apiban/ban-api`.
    pub scenario: String,
    /// The evidence, printable.
    pub message: String,
    /// When it was banned (Unix seconds).
    pub at: u64,
}

impl Alert {
    /// The alert as LAPI takes it (`POST /v1/alerts`, an array of these): every key it
    /// requires, the source and one ban decision of scope `Ip` or `Range`, origin `apiban`.
    pub fn to_json(&self) -> serde_json::Value {
        let (scope, value) = match self.net {
            IpNet::V4(n) if n.prefix_len() == 32 => ("Ip", n.addr().to_string()),
            IpNet::V6(n) if n.prefix_len() == 128 => ("Ip", n.addr().to_string()),
            net => ("Range", net.trunc().to_string()),
        };
        let at =
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(self.at))
                .to_string();
        serde_json::json!({
            "scenario": self.scenario,
            "scenario_hash": "",
            "scenario_version": "",
            "message": self.message,
            "events_count": 1,
            "start_at": at,
            "stop_at": at,
            "capacity": 0,
            "leakspeed": "0",
            "simulated": false,
            "events": [],
            "source": {"scope": scope, "value": value},
            "decisions": [{
                "type": "ban",
                "duration": format!("{}s", self.ttl.as_secs().max(1)),
                "scope": scope,
                "value": value,
                "origin": "apiban",
                "scenario": self.scenario,
            }],
        })
    }
}

/// A machine's login (`cscli machines add`): its token, valid about an hour.
pub async fn login(
    url: &str,
    machine: &str,
    password: &str,
    http: &reqwest::Client,
) -> Result<String, CrowdsecError> {
    #[derive(Deserialize)]
    struct Token {
        token: String,
    }
    let body = serde_json::json!({"machine_id": machine, "password": password});
    let answer = send(
        url,
        http.post(format!("{}/v1/watchers/login", url.trim_end_matches('/')))
            .json(&body),
        CHECK_MACHINE,
    )
    .await?;
    serde_json::from_slice::<Token>(&answer)
        .map(|t| t.token)
        .map_err(|e| CrowdsecError::Unreadable(e.to_string()))
}

/// Posts alerts with a machine's token; `KeyRefused` when the token has expired.
pub async fn post_alerts(
    url: &str,
    token: &str,
    alerts: &[Alert],
    http: &reqwest::Client,
) -> Result<(), CrowdsecError> {
    let body: Vec<serde_json::Value> = alerts.iter().map(Alert::to_json).collect();
    send(
        url,
        http.post(format!("{}/v1/alerts", url.trim_end_matches('/')))
            .bearer_auth(token)
            .json(&body),
        CHECK_MACHINE,
    )
    .await
    .map(drop)
}

/// What the operator checks when LAPI refuses the bouncer.
const CHECK_BOUNCER: &str = "check --crowdsec-key-file against `cscli bouncers list`, or --crowdsec-cert's OU against LAPI's api.server.tls.bouncers_allowed_ou";
/// What the operator checks when LAPI refuses the machine.
const CHECK_MACHINE: &str =
    "check --crowdsec-machine and --crowdsec-password-file against `cscli machines list`";

/// Sends `request` to LAPI at `url`: the answer's body when it is a 2xx, read up to
/// [`MAX_STREAM_BYTES`]; a refusal of the credentials (`check` says what to look at) or
/// another status as errors.
async fn send(
    url: &str,
    request: reqwest::RequestBuilder,
    check: &'static str,
) -> Result<Vec<u8>, CrowdsecError> {
    let unreachable = |e: reqwest::Error| CrowdsecError::Unreachable {
        url: url.to_owned(),
        reason: crate::error_chain(&e),
    };
    let mut answer = request
        .header("User-Agent", concat!("apiban/", env!("CARGO_PKG_VERSION")))
        .send()
        .await
        .map_err(unreachable)?;
    let status = answer.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = answer.chunk().await.map_err(unreachable)? {
        if body.len() + chunk.len() > MAX_STREAM_BYTES {
            return Err(CrowdsecError::Unreadable(format!(
                "an answer over {MAX_STREAM_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    match status {
        200..=299 => Ok(body),
        401 | 403 => Err(CrowdsecError::KeyRefused { status, check }),
        _ => Err(CrowdsecError::Status {
            status,
            body: String::from_utf8_lossy(&body[..body.len().min(200)])
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_as_lapi_writes_them() {
        let d = |s| go_duration(s).map(|d| d.as_secs_f64());
        assert_eq!(d("3h59m56.5s"), Some(14_396.5));
        assert_eq!(
            d("1m58.038702248s").map(|s| (s * 1000.0).round()),
            Some(118_039.0)
        );
        assert_eq!(d("-13.478036ms"), Some(0.0));
        assert_eq!(d("-2.636631206s"), Some(0.0));
        assert_eq!(d("0s"), Some(0.0));
        assert_eq!(d("0"), Some(0.0));
        assert_eq!(d("250µs"), Some(0.00025));
        assert_eq!(d("1h0m0s"), Some(3600.0));
        assert_eq!(d("1.5h"), Some(5400.0));
        for bad in ["", "1d", "h", "1", "1.2.3s", "s1", "4 h", "-"] {
            assert_eq!(go_duration(bad), None, "{bad:?}");
        }
    }

    /// The answer LAPI gave in ../shared/crowdsec.md: bans of both scopes and families, a
    /// captcha left, nulls for empty lists.
    #[test]
    fn reads_the_stream_lapi_sends() {
        let body = br#"{"deleted":null,"new":[
 {"duration":"1m58.038702248s","id":1,"origin":"cscli","scenario":"test","scope":"Ip","type":"ban","value":"45.91.1.2"},
 {"duration":"2m58.0387s","id":5,"origin":"cscli","scenario":"cap","scope":"Ip","type":"captcha","value":"45.91.9.9"},
 {"duration":"4m58.0386s","id":2,"origin":"cscli","scenario":"manual 'ban' from 'cscli-local'","scope":"Range","type":"ban","value":"45.92.0.0/24"},
 {"duration":"4m58.0386s","id":3,"origin":"cscli","scenario":"v6","scope":"Ip","type":"ban","value":"2001:db8::7"},
 {"duration":"4m58.0386s","id":4,"origin":"cscli","scenario":"v6","scope":"Range","type":"ban","value":"2001:db8:1::/48"}]}"#;
        let s = parse_stream(body).unwrap();
        let nets: Vec<String> = s.new.iter().map(|b| b.net.to_string()).collect();
        assert_eq!(
            nets,
            [
                "45.91.1.2/32",
                "45.92.0.0/24",
                "2001:db8::7/128",
                "2001:db8:1::/48"
            ]
        );
        assert_eq!(s.new[0].remaining.as_secs(), 118);
        assert_eq!(s.new[0].comment(), "test (origin cscli)");
        assert_eq!((s.other, s.unreadable), (1, 0));
        assert!(s.deleted.is_empty());

        let gone = br#"{"deleted":[{"duration":"-13.478036ms","id":3,"origin":"cscli","scenario":"v6","scope":"Ip","type":"ban","value":"2001:db8::7"}],"new":null}"#;
        let s = parse_stream(gone).unwrap();
        assert_eq!(s.deleted.len(), 1);
        assert_eq!(s.deleted[0].remaining, Duration::ZERO);
        assert!(s.new.is_empty());
        assert_eq!(
            parse_stream(br#"{"deleted":null,"new":null}"#).unwrap(),
            Stream::default()
        );
    }

    /// What cannot be read is never a ban, and a body that is not the stream is an error.
    #[test]
    fn what_cannot_be_read_bans_nothing() {
        let body = br#"{"new":[
 {"duration":"1h","scope":"Ip","type":"ban","value":"45.91.1.300"},
 {"duration":"1d","scope":"Ip","type":"ban","value":"45.91.1.3"},
 {"duration":"1h","scope":"Range","type":"ban","value":"garbage"},
 {"duration":"1h","scope":"ip","type":"ban","value":"45.91.1.4"},
 {"duration":"1h","scope":"Country","type":"ban","value":"FR"}]}"#;
        let s = parse_stream(body).unwrap();
        assert!(s.new.is_empty(), "{s:?}");
        assert_eq!((s.unreadable, s.other), (3, 2));
        for bad in [&b"<html>"[..], b"[]", b"{\"new\":{}}", b""] {
            assert!(parse_stream(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn comments_are_printable_and_bounded() {
        let b = BanDecision {
            net: "45.91.1.2/32".parse().unwrap(),
            remaining: Duration::from_secs(1),
            origin: "x\u{1b}]0;t\u{7}".into(),
            scenario: "y".repeat(300),
        };
        let c = b.comment();
        assert!(c.chars().all(|c| !c.is_control()), "{c:?}");
        assert_eq!(c.chars().count(), 200);
    }

    /// The shape ../shared/crowdsec.md found LAPI to accept (201).
    #[test]
    fn alerts_carry_what_lapi_requires() {
        let alert = Alert {
            net: "45.93.0.7/32".parse().unwrap(),
            ttl: Duration::from_secs(600),
            scenario: "apiban/scanner-user-agent".into(),
            message: "OPTIONS 3 in 60s".into(),
            at: 1_765_065_132,
        };
        let j = alert.to_json();
        for key in [
            "scenario",
            "scenario_hash",
            "scenario_version",
            "message",
            "events_count",
            "start_at",
            "stop_at",
            "capacity",
            "leakspeed",
            "simulated",
            "events",
            "source",
        ] {
            assert!(j.get(key).is_some(), "{key} missing: {j}");
        }
        assert_eq!(
            j["source"],
            serde_json::json!({"scope": "Ip", "value": "45.93.0.7"})
        );
        assert_eq!(j["start_at"], "2025-12-06T23:52:12Z");
        assert_eq!(j["decisions"][0]["duration"], "600s");
        assert_eq!(j["decisions"][0]["origin"], "apiban");
        let range = Alert {
            net: "2a0e:97c0::/48".parse().unwrap(),
            ..alert
        };
        assert_eq!(
            range.to_json()["decisions"][0]["scope"],
            "Range",
            "{}",
            range.to_json()
        );
    }
}
