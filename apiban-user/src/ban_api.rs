//! The ban API: lets a SIP proxy ban from its own logic (Kamailio's pike, OpenSIPS' ratelimit)
//! with the calls its configuration already makes to palner/iptables-api, plus a JSON
//! endpoint with a TTL and a comment. Bans go to the ledger's owner as source `api`, so the
//! allowlist wins and the sanitiser's limits apply; nothing here touches the maps.
//!
//! | request | answer |
//! |---|---|
//! | `GET /addip/IP`, `GET /blockip/IP` | 200 `{"success":"added"}`; 400 `{"error":"only valid ip addresses supported"}` or `{"error":"error adding address",...}` |
//! | `GET /removeip/IP`, `GET /unblockip/IP` | 200 `{"success":"removed"}` (also when it was not banned) |
//! | `GET /flushchain` | 200 `{"success":"flushed"}`: every `api` ban goes |
//! | `POST /v1/bans` `{"ip":"CIDR","ttl":"10m","comment":"..."}` | 200 `{"banned":"CIDR","ttl_seconds":N,...}` |
//! | `DELETE /v1/bans/CIDR` | 200 `{"removed":"CIDR"}`, or 404 when `api` has no such ban |
//!
//! A bearer token (`Authorization: Bearer T`) is checked when one is configured; it must be
//! on any address but loopback (the configuration refuses otherwise).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use serde::Deserialize;
use tokio::{net::TcpListener, sync::mpsc};

use crate::sync::{Change, ChangeError, Update};

/// Requests served at once; past this the oldest connection goes (see `conn_slots`).
const MAX_CONNECTIONS: usize = 256;
/// Requests a second one client address may make, and its burst: far above what a SIP
/// proxy bans under attack, far below what floods the owner with saves.
const CLIENT_PER_SEC: u32 = 100;
const CLIENT_BURST: u32 = 200;
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// A JSON ban is a few dozen bytes.
const MAX_BODY: usize = 4096;
/// The longest TTL a JSON ban may ask for: a proxy's ban is for an attack in progress.
pub const TTL_MAX: Duration = Duration::from_secs(30 * 86_400);

/// How the ban API runs; see `ProcessSettings`.
#[derive(Clone, Debug)]
pub struct BanApiSettings {
    /// The bearer token clients must send, if any.
    pub token: Option<String>,
    /// The TTL of the palner-style calls, which carry none.
    pub ttl: Duration,
    /// The longest TTL a JSON ban may ask for.
    pub ttl_max: Duration,
    /// The source its bans get (`api`, or `api:<node>` in a fleet), for its answers.
    pub source: String,
}

/// What a request asks for, decided before anything is sent to the owner.
#[derive(Debug, PartialEq)]
enum Route {
    Ban {
        net: IpNet,
        ttl: Duration,
        comment: Option<String>,
        /// The palner-compatible call, whose answers are fixed strings.
        legacy: bool,
    },
    Unban {
        net: IpNet,
        legacy: bool,
    },
    Flush,
    Answer(StatusCode, serde_json::Value),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonBan {
    ip: String,
    ttl: Option<String>,
    comment: Option<String>,
}

fn error(status: StatusCode, text: impl Into<String>) -> Route {
    Route::Answer(status, serde_json::json!({ "error": text.into() }))
}

/// A single address, as palner/iptables-api takes it (no prefix length).
fn legacy_addr(text: &str) -> Option<IpNet> {
    text.parse::<std::net::IpAddr>().ok().map(IpNet::from)
}

/// Decides what a request is. Pure, so that every path, method and mistake is unit-tested.
fn route(
    method: &Method,
    path: &str,
    authorization: Option<&str>,
    body: &[u8],
    settings: &BanApiSettings,
) -> Route {
    if let Some(token) = &settings.token {
        let presented = authorization.and_then(|a| a.strip_prefix("Bearer "));
        if !presented.is_some_and(|p| constant_time_eq(p.trim().as_bytes(), token.as_bytes())) {
            return error(
                StatusCode::UNAUTHORIZED,
                "a bearer token is required: Authorization: Bearer <token>",
            );
        }
    }
    let segments: Vec<&str> = path.trim_start_matches('/').splitn(3, '/').collect();
    let bad_ip = || error(StatusCode::BAD_REQUEST, "only valid ip addresses supported");
    match (method.clone(), segments.as_slice()) {
        (Method::GET, ["addip" | "blockip", ip]) => match legacy_addr(ip) {
            Some(net) => Route::Ban {
                net,
                ttl: settings.ttl,
                comment: None,
                legacy: true,
            },
            None => bad_ip(),
        },
        (Method::GET, ["removeip" | "unblockip", ip]) => match legacy_addr(ip) {
            Some(net) => Route::Unban { net, legacy: true },
            None => bad_ip(),
        },
        (Method::GET, ["flushchain"]) => Route::Flush,
        (Method::POST, ["v1", "bans"]) => json_ban(body, settings),
        (Method::DELETE, ["v1", "bans", cidr]) => {
            // A prefix length arrives percent-encoded by most clients.
            let cidr = cidr.replace("%2F", "/").replace("%2f", "/");
            match crate::sanitise::parse_net(&cidr) {
                Some(net) => Route::Unban { net, legacy: false },
                None => error(
                    StatusCode::BAD_REQUEST,
                    format!("`{cidr}` is not an address or CIDR"),
                ),
            }
        }
        (_, ["addip" | "blockip" | "removeip" | "unblockip", _] | ["flushchain"]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "use GET")
        }
        (_, ["v1", "bans", ..]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST /v1/bans to ban, DELETE /v1/bans/<cidr> to unban",
        ),
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

fn json_ban(body: &[u8], settings: &BanApiSettings) -> Route {
    let ban: JsonBan = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body must be JSON like {{\"ip\":\"192.0.2.7\",\"ttl\":\"10m\",\"comment\":\"pike\"}}: {e}"
                ),
            );
        }
    };
    let Some(net) = crate::sanitise::parse_net(&ban.ip) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("`{}` is not an address or CIDR", ban.ip),
        );
    };
    let ttl = match ban
        .ttl
        .as_deref()
        .map(str::parse::<crate::human::HumanDuration>)
    {
        None => settings.ttl,
        Some(Ok(t)) if !t.0.is_zero() && t.0 <= settings.ttl_max => t.0,
        Some(Ok(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "ttl must be from 1s to {}",
                    crate::human::format_duration(settings.ttl_max)
                ),
            );
        }
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("ttl: {e}")),
    };
    Route::Ban {
        net,
        ttl,
        comment: ban.comment.filter(|c| !c.is_empty()),
        legacy: false,
    }
}

/// Compares without an early exit, so the time taken does not tell how much of a guess was
/// right.
/// Whether `presented` is `token`, in a time that depends on the presented value's length
/// only: neither how much of it matched nor how long the token is shows in the answer's
/// timing.
fn constant_time_eq(presented: &[u8], token: &[u8]) -> bool {
    if token.is_empty() {
        return presented.is_empty();
    }
    let mut diff = presented.len() ^ token.len();
    for (i, p) in presented.iter().enumerate() {
        diff |= usize::from(p ^ token[i % token.len()]);
    }
    diff == 0
}

/// Carries a route out: the owner's answer, in the shape the caller expects.
async fn carry_out(
    route: Route,
    updates: &mpsc::Sender<Update>,
    source: &str,
) -> (StatusCode, serde_json::Value) {
    use serde_json::json;
    let change = match &route {
        Route::Answer(status, body) => return (*status, body.clone()),
        Route::Ban {
            net, ttl, comment, ..
        } => Change::ApiBan {
            net: *net,
            ttl: *ttl,
            comment: comment.clone(),
        },
        Route::Unban { net, .. } => Change::ApiUnban { net: *net },
        Route::Flush => Change::ApiFlush,
    };
    let answer = crate::sync::send_change(updates, change).await;
    match (route, answer) {
        (Route::Ban { legacy: true, .. }, Ok(_)) => (StatusCode::OK, json!({"success": "added"})),
        (Route::Ban { legacy: true, .. }, Err(e)) => (
            StatusCode::BAD_REQUEST,
            json!({"error": "error adding address", "reason": e.to_string()}),
        ),
        (Route::Ban { net, ttl, .. }, Ok(said)) => (
            StatusCode::OK,
            json!({"banned": net.trunc().to_string(), "ttl_seconds": ttl.as_secs(), "source": source, "said": said}),
        ),
        // iptables-api answers a removal of what is not there as a success.
        (Route::Unban { legacy: true, .. }, Ok(_) | Err(ChangeError::Refused(_))) => {
            (StatusCode::OK, json!({"success": "removed"}))
        }
        (Route::Unban { .. }, Err(ChangeError::Refused(why))) => {
            (StatusCode::NOT_FOUND, json!({"error": why}))
        }
        (Route::Unban { net, .. }, Ok(said)) => (
            StatusCode::OK,
            json!({"removed": net.trunc().to_string(), "said": said}),
        ),
        (Route::Flush, Ok(_)) => (StatusCode::OK, json!({"success": "flushed"})),
        (_, Err(ChangeError::Refused(why))) => (StatusCode::BAD_REQUEST, json!({"error": why})),
        (_, Err(ChangeError::Failed(why))) => {
            (StatusCode::SERVICE_UNAVAILABLE, json!({"error": why}))
        }
        (Route::Answer(..), _) => unreachable_answer(),
    }
}

/// `carry_out` returns early for answers; kept as a value rather than a panic.
fn unreachable_answer() -> (StatusCode, serde_json::Value) {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        serde_json::json!({"error": "internal error"}),
    )
}

async fn handle(
    request: Request<Incoming>,
    settings: Arc<BanApiSettings>,
    updates: mpsc::Sender<Update>,
    peer: SocketAddr,
    rate: Arc<crate::client_rate::ClientRate>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if !rate.allow(peer.ip(), std::time::Instant::now()) {
        tracing::debug!(%peer, "ban API: over the per-client rate");
        let mut response = json_response(
            StatusCode::TOO_MANY_REQUESTS,
            &serde_json::json!({"error": format!(
                "too many requests from {}: at most {CLIENT_PER_SEC} a second (bursts of {CLIENT_BURST})",
                peer.ip()
            )}),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return Ok(response);
    }
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(json_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                &serde_json::json!({"error": format!("the body is over {MAX_BODY} bytes")}),
            ));
        }
    };
    let route = route(&method, &path, authorization.as_deref(), &body, &settings);
    let (status, answer) = carry_out(route, &updates, &settings.source).await;
    if status.is_success() {
        tracing::info!(%peer, %method, %path, "ban API: {}", answer);
    } else {
        tracing::info!(%peer, %method, %path, status = status.as_u16(), "ban API refused: {}", answer);
    }
    Ok(json_response(status, &answer))
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut text = body.to_string();
    text.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

/// Serves the ban API until aborted.
pub async fn serve(listener: TcpListener, settings: BanApiSettings, updates: mpsc::Sender<Update>) {
    let settings = Arc::new(settings);
    let slots = crate::conn_slots::ConnSlots::new(MAX_CONNECTIONS);
    let rate = Arc::new(crate::client_rate::ClientRate::new(
        CLIENT_PER_SEC,
        CLIENT_BURST,
    ));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "ban API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (settings, updates, rate) = (settings.clone(), updates.clone(), rate.clone());
        slots.spawn_for(Some(peer.ip()), async move {
            let service = hyper::service::service_fn(move |req| {
                handle(req, settings.clone(), updates.clone(), peer, rate.clone())
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(token: Option<&str>) -> BanApiSettings {
        BanApiSettings {
            token: token.map(str::to_owned),
            ttl: Duration::from_secs(3600),
            ttl_max: Duration::from_secs(86_400),
            source: "api".into(),
        }
    }

    fn net(s: &str) -> IpNet {
        crate::sanitise::parse_net(s).unwrap()
    }

    #[test]
    fn palner_paths_methods_and_answers() {
        let s = settings(None);
        for path in ["/addip/192.0.2.7", "/blockip/192.0.2.7"] {
            assert_eq!(
                route(&Method::GET, path, None, b"", &s),
                Route::Ban {
                    net: net("192.0.2.7"),
                    ttl: Duration::from_secs(3600),
                    comment: None,
                    legacy: true
                }
            );
        }
        for path in ["/removeip/2001:db8::1", "/unblockip/2001:db8::1"] {
            assert_eq!(
                route(&Method::GET, path, None, b"", &s),
                Route::Unban {
                    net: net("2001:db8::1"),
                    legacy: true
                }
            );
        }
        assert_eq!(
            route(&Method::GET, "/flushchain", None, b"", &s),
            Route::Flush
        );
        for bad in ["/addip/not-an-ip", "/addip/192.0.2.0%2F24", "/removeip/"] {
            assert_eq!(
                route(&Method::GET, bad, None, b"", &s),
                error(StatusCode::BAD_REQUEST, "only valid ip addresses supported"),
                "{bad}"
            );
        }
        assert!(matches!(
            route(&Method::POST, "/addip/192.0.2.7", None, b"", &s),
            Route::Answer(StatusCode::METHOD_NOT_ALLOWED, _)
        ));
        assert!(matches!(
            route(&Method::GET, "/nope", None, b"", &s),
            Route::Answer(StatusCode::NOT_FOUND, _)
        ));
    }

    #[test]
    fn json_bans_carry_a_ttl_and_a_comment_within_bounds() {
        let s = settings(None);
        let body = br#"{"ip":"198.51.100.0/24","ttl":"10m","comment":"pike"}"#;
        assert_eq!(
            route(&Method::POST, "/v1/bans", None, body, &s),
            Route::Ban {
                net: net("198.51.100.0/24"),
                ttl: Duration::from_secs(600),
                comment: Some("pike".into()),
                legacy: false
            }
        );
        for (body, wants) in [
            (&br#"{"ip":"x"}"#[..], "not an address"),
            (br#"{"ip":"192.0.2.1","ttl":"2d"}"#, "ttl must be"),
            (br#"{"ip":"192.0.2.1","ttl":"0s"}"#, "ttl must be"),
            (br#"{"ip":"192.0.2.1","ttl":"soon"}"#, "ttl:"),
            (br#"{"ip":"192.0.2.1","extra":1}"#, "must be JSON"),
            (b"not json", "must be JSON"),
        ] {
            match route(&Method::POST, "/v1/bans", None, body, &s) {
                Route::Answer(StatusCode::BAD_REQUEST, v) => {
                    assert!(v["error"].as_str().unwrap().contains(wants), "{v}")
                }
                other => panic!("{}: {other:?}", String::from_utf8_lossy(body)),
            }
        }
        assert_eq!(
            route(&Method::DELETE, "/v1/bans/198.51.100.0%2F24", None, b"", &s),
            Route::Unban {
                net: net("198.51.100.0/24"),
                legacy: false
            }
        );
    }

    #[test]
    fn the_token_comparison_needs_every_byte_and_the_length() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        for wrong in [&b"s3cre"[..], b"s3cret!", b"s3creT", b"", b"s3crets3cret"] {
            assert!(!constant_time_eq(wrong, b"s3cret"), "{wrong:?}");
        }
        assert!(!constant_time_eq(b"x", b""));
    }

    #[test]
    fn a_configured_token_is_required_on_every_path() {
        let s = settings(Some("s3cret"));
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("s3cret"),
            Some("Bearer s3cre"),
        ] {
            assert!(
                matches!(
                    route(&Method::GET, "/addip/192.0.2.7", auth, b"", &s),
                    Route::Answer(StatusCode::UNAUTHORIZED, _)
                ),
                "{auth:?}"
            );
        }
        assert!(matches!(
            route(
                &Method::GET,
                "/addip/192.0.2.7",
                Some("Bearer s3cret"),
                b"",
                &s
            ),
            Route::Ban { .. }
        ));
    }
}
