//! A local server that speaks APIBAN's protocol, odd corners included, with switchable
//! faults and a log of every request so tests can check the client's rate budget.
//!
//! Addresses are published with IDs that grow by one, like APIBAN's timestamps: a batch's
//! `ID` is the ID of the entry after it, and asking from that ID returns only what was
//! published since.
//!
//! Longer than most files here because it is one thing: a protocol, its faults and its
//! request log, which tests assert against together.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpListener,
};

/// What the server does to a request instead of answering it properly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 429 with the documented body.
    RateLimited,
    /// 400 with "rate limit exceeded", as some clients saw.
    RateLimited400,
    Forbidden,
    ServerError,
    /// Accepts the request and never answers.
    Hang,
    NonJson,
    /// Announces a longer body than it sends, then closes.
    Truncated,
    /// A 4 MiB body.
    Huge,
    /// A 200 whose JSON has the wrong shape.
    WrongShape,
    /// A 200 with an empty list and the very ID the client sent: an answer that does not
    /// move the list on.
    EmptySameId,
}

/// How "no new bans" is written (both forms occur).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoNewBans {
    Array,
    String,
}

#[derive(Clone, Debug)]
pub struct RequestLog {
    pub at: Instant,
    /// The same moment on the wall clock, in ms since the Unix epoch: what a fleet records
    /// in etcd as the request's slot in the budget.
    pub unix_ms: u64,
    pub method: String,
    /// The path with the key replaced by `<key>`.
    pub path: String,
    pub id: Option<String>,
    pub set: Option<String>,
    pub status: u16,
    /// The `X-Api-Key` a CrowdSec bouncer sent: which node read the decision stream.
    pub bouncer: Option<String>,
}

struct Inner {
    key: String,
    entries: Vec<(u64, String)>,
    next_id: u64,
    batch_size: usize,
    persistent_fault: Option<Fault>,
    /// What the next requests meet, in order; None is a normal answer.
    queued_faults: VecDeque<Option<Fault>>,
    /// The server's own limit: over it, 429 (like APIBAN's).
    limit: Option<(usize, Duration)>,
    no_new_bans: NoNewBans,
    log: Vec<RequestLog>,
    lists: BTreeMap<String, String>,
    /// CrowdSec's decision stream, as LAPI answers `startup=true`; later reads get nothing.
    crowdsec_startup: Option<String>,
}

pub struct FakeApiban {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    runtime: Option<tokio::runtime::Runtime>,
    tls: bool,
}

/// A private certificate authority and a certificate it issued for 127.0.0.1, as a mirror
/// or a TLS-inspecting proxy inside a carrier's network would have.
pub struct PrivateCa {
    /// The CA certificate, PEM: what `--api-ca` (or the system's trust store) must hold.
    pub ca_pem: String,
    server: tokio_rustls::rustls::ServerConfig,
}

impl PrivateCa {
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "apiban test private CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("server key");
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("literal")));
        let cert = params.signed_by(&key, &issuer).expect("server certificate");
        let server = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server TLS config");
        Self {
            ca_pem: ca_cert.pem(),
            server,
        }
    }
}

impl Default for PrivateCa {
    fn default() -> Self {
        Self::new()
    }
}

const FIRST_PUBLISHED_ID: u64 = 1_600_000_000;

impl FakeApiban {
    /// Starts on 127.0.0.1, port 0.
    pub fn start(key: &str) -> Self {
        Self::start_on(key, "127.0.0.1:0".parse().expect("literal address"))
    }

    pub fn start_on(key: &str, bind: SocketAddr) -> Self {
        Self::start_with(key, bind, None)
    }

    /// Starts on 127.0.0.1 behind TLS with a certificate from `ca`: `base_url` is https.
    pub fn start_tls(key: &str, ca: &PrivateCa) -> Self {
        Self::start_with(
            key,
            "127.0.0.1:0".parse().expect("literal address"),
            Some(Arc::new(ca.server.clone())),
        )
    }

    fn start_with(
        key: &str,
        bind: SocketAddr,
        tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    ) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("fake APIBAN runtime");
        // Bound with std so this works from inside a test's own runtime too.
        let listener = std::net::TcpListener::bind(bind)
            .unwrap_or_else(|e| panic!("fake APIBAN cannot bind {bind}: {e}"));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("bound address");
        let inner = Arc::new(Mutex::new(Inner {
            key: key.to_owned(),
            entries: Vec::new(),
            next_id: FIRST_PUBLISHED_ID,
            batch_size: 250,
            persistent_fault: None,
            queued_faults: VecDeque::new(),
            limit: None,
            no_new_bans: NoNewBans::Array,
            log: Vec::new(),
            lists: BTreeMap::new(),
            crowdsec_startup: None,
        }));
        let shared = inner.clone();
        let is_tls = tls.is_some();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        // A client that does not trust the CA hangs up in the handshake.
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = serve(stream, shared).await;
                            }
                        }
                        None => {
                            let _ = serve(stream, shared).await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            inner,
            runtime: Some(runtime),
            tls: is_tls,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().expect("fake APIBAN state"))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>/api/`
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/api/", self.addr)
    }

    /// URL of a plain-text list set with [`set_list`](Self::set_list).
    pub fn list_url(&self, name: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/lists/{name}", self.addr)
    }

    /// Publishes addresses (or any text: feeds carry junk too). An address already listed
    /// moves to the end with a new ID, as a reactivation does.
    pub fn publish<S: AsRef<str>>(&self, items: &[S]) {
        self.with(|s| {
            for item in items {
                let item = item.as_ref().to_owned();
                s.entries.retain(|(_, e)| *e != item);
                let id = s.next_id;
                s.next_id += 1;
                s.entries.push((id, item));
            }
        })
    }

    /// Takes addresses off the list (they left the active set).
    pub fn unpublish<S: AsRef<str>>(&self, items: &[S]) {
        self.with(|s| {
            s.entries
                .retain(|(_, e)| !items.iter().any(|i| i.as_ref() == e))
        })
    }

    pub fn set_batch_size(&self, n: usize) {
        self.with(|s| s.batch_size = n.max(1))
    }

    pub fn set_fault(&self, fault: Option<Fault>) {
        self.with(|s| s.persistent_fault = fault)
    }

    /// The next `n` requests get `fault`, then service resumes.
    pub fn fail_next(&self, fault: Fault, n: usize) {
        self.with(|s| s.queued_faults.extend(std::iter::repeat_n(Some(fault), n)))
    }

    /// The next `served` requests are answered, the one after them gets `fault`.
    pub fn fail_after(&self, served: usize, fault: Fault) {
        self.with(|s| {
            s.queued_faults.extend(std::iter::repeat_n(None, served));
            s.queued_faults.push_back(Some(fault));
        })
    }

    /// Queued answers and faults that no request has met yet.
    pub fn faults_pending(&self) -> usize {
        self.with(|s| s.queued_faults.len())
    }

    /// Makes every fake server's `Date` run `secs` behind the real clock (negative: ahead),
    /// as APIBAN's would look from a host whose clock is off.
    pub fn set_clock_skew(&self, secs: i64) {
        CLOCK_SKEW_SECS.store(secs, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn set_rate_limit(&self, limit: Option<(usize, Duration)>) {
        self.with(|s| s.limit = limit)
    }

    pub fn set_no_new_bans(&self, form: NoNewBans) {
        self.with(|s| s.no_new_bans = form)
    }

    /// Answers `GET /v1/decisions/stream?startup=true` with `body` (CrowdSec's LAPI, for
    /// loads larger than a test's `cscli` can make); later reads say nothing changed.
    pub fn set_crowdsec_startup(&self, body: String) {
        self.with(|s| s.crowdsec_startup = Some(body))
    }

    pub fn set_list(&self, name: &str, text: &str) {
        self.with(|s| {
            s.lists.insert(name.to_owned(), text.to_owned());
        })
    }

    pub fn requests(&self) -> Vec<RequestLog> {
        self.with(|s| s.log.clone())
    }

    /// The most requests the server saw inside any window of length `window`.
    /// The request log as lines of time since the first request, ID and status, for
    /// assertion messages.
    pub fn log_table(&self) -> String {
        let log = self.requests();
        let Some(first) = log.first().map(|r| r.at) else {
            return "no requests".into();
        };
        log.iter()
            .map(|r| {
                let at = r.at.duration_since(first).as_secs_f64();
                let id = r.id.as_deref().unwrap_or("-");
                format!("{at:9.3}s {} {id} {}", r.path, r.status)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn max_in_window(&self, window: Duration) -> usize {
        let times: Vec<Instant> = self.with(|s| {
            s.log
                .iter()
                .filter(|r| !r.path.starts_with("/lists/"))
                .map(|r| r.at)
                .collect()
        });
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|t| t.duration_since(times[i]) < window)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }
}

impl Drop for FakeApiban {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

/// How far the fake server's `Date` is behind the real time, seconds (see
/// [`FakeApiban::set_clock_skew`]). One for the process: only the test of the clock sets it.
static CLOCK_SKEW_SECS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// The `Date` header APIBAN sends, from this (skewed) clock.
fn http_date() -> String {
    let skew = CLOCK_SKEW_SECS.load(std::sync::atomic::Ordering::Relaxed);
    let now = std::time::SystemTime::now();
    let at = if skew >= 0 {
        now - Duration::from_secs(skew as u64)
    } else {
        now + Duration::from_secs(skew.unsigned_abs())
    };
    httpdate::fmt_http_date(at)
}

async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    content_type: &str,
    body: &[u8],
) {
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Date: {}\r\nConnection: close\r\n\r\n",
        body.len(),
        http_date()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body).await;
    let _ = stream.shutdown().await;
}

enum Reply {
    Json(u16, String),
    Text(u16, String),
    Fault(Fault),
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    shared: Arc<Mutex<Inner>>,
) -> Option<()> {
    let request = read_request(&mut stream).await?;
    let reply = {
        let mut s = shared.lock().ok()?;
        decide(&mut s, &request)
    };
    match reply {
        Reply::Json(status, body) => {
            respond(&mut stream, status, "application/json", body.as_bytes()).await
        }
        Reply::Text(status, body) => {
            respond(&mut stream, status, "text/plain", body.as_bytes()).await
        }
        Reply::Fault(fault) => match fault {
            Fault::RateLimited => {
                respond(
                    &mut stream,
                    429,
                    "application/json",
                    RATE_LIMITED.as_bytes(),
                )
                .await
            }
            Fault::RateLimited400 => {
                respond(
                    &mut stream,
                    400,
                    "application/json",
                    RATE_LIMITED.as_bytes(),
                )
                .await
            }
            Fault::Forbidden => {
                respond(&mut stream, 403, "application/json", FORBIDDEN.as_bytes()).await
            }
            Fault::ServerError => {
                respond(
                    &mut stream,
                    500,
                    "text/html",
                    b"<h1>Internal Server Error</h1>",
                )
                .await
            }
            Fault::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Fault::NonJson => {
                respond(&mut stream, 200, "text/html", b"<html>maintenance</html>").await
            }
            Fault::WrongShape => {
                respond(
                    &mut stream,
                    200,
                    "application/json",
                    br#"{"banned":{"a":1}}"#,
                )
                .await
            }
            Fault::Truncated => {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                            Content-Length: 4000\r\nConnection: close\r\n\r\n";
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(br#"{"ipaddress":["1.2.3.4","5.6."#).await;
                let _ = stream.shutdown().await;
            }
            Fault::EmptySameId => unreachable!("answered in route"),
            Fault::Huge => {
                let mut body = String::from(r#"{"ipaddress":["#);
                while body.len() < 4 << 20 {
                    body.push_str(r#""9.9.9.9","#);
                }
                body.push_str(r#""9.9.9.9"],"ID":"1"}"#);
                respond(&mut stream, 200, "application/json", body.as_bytes()).await
            }
        },
    }
    Some(())
}

const RATE_LIMITED: &str = r#"{"ipaddress":"rate limit exceeded","ID":"unauthorized"}"#;
const FORBIDDEN: &str = r#"{"ipaddress":"none","ID":"unauthorized"}"#;

fn decide(s: &mut Inner, req: &Request) -> Reply {
    let now = Instant::now();
    let redacted = if s.key.is_empty() {
        req.path.clone()
    } else {
        req.path.replace(&s.key, "<key>")
    };
    let mut log = RequestLog {
        at: now,
        unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        method: req.method.clone(),
        path: redacted,
        id: None,
        set: None,
        status: 0,
        bouncer: req
            .headers
            .iter()
            .find(|(k, _)| k == "x-api-key")
            .map(|(_, v)| v.clone()),
    };
    let reply = route(s, req, &mut log, now);
    log.status = match &reply {
        Reply::Json(st, _) | Reply::Text(st, _) => *st,
        Reply::Fault(Fault::RateLimited) => 429,
        Reply::Fault(Fault::Forbidden) => 403,
        Reply::Fault(Fault::ServerError) => 500,
        Reply::Fault(Fault::RateLimited400) => 400,
        Reply::Fault(_) => 200,
    };
    s.log.push(log);
    reply
}

fn route(s: &mut Inner, req: &Request, log: &mut RequestLog, now: Instant) -> Reply {
    if req.path.starts_with("/v1/decisions/stream") {
        return match &s.crowdsec_startup {
            Some(body) if req.path.contains("startup=true") => Reply::Json(200, body.clone()),
            Some(_) => Reply::Json(200, r#"{"deleted":null,"new":null}"#.into()),
            None => Reply::Text(404, "not found".into()),
        };
    }
    if let Some(name) = req.path.strip_prefix("/lists/") {
        return match s.lists.get(name) {
            Some(text) => Reply::Text(200, text.clone()),
            None => Reply::Text(404, "not found".into()),
        };
    }
    // What the client asked for is logged even when the reply is a fault: tests check which
    // ID a client resumes from, whether or not the server answered.
    let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
    let field = |name: &str| body.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("POST", ["api", "get"]) => {
            log.id = field("id");
            log.set = field("set");
        }
        ("GET", ["api", _, "banned", rest @ ..]) => {
            log.id = Some(rest.first().copied().unwrap_or("100").to_owned());
        }
        _ => {}
    }
    if let Some((n, window)) = s.limit {
        let recent = s
            .log
            .iter()
            .filter(|r| !r.path.starts_with("/lists/") && now.duration_since(r.at) < window)
            .count();
        if recent >= n {
            return Reply::Fault(Fault::RateLimited);
        }
    }
    if let Some(f) = s.queued_faults.pop_front().flatten().or(s.persistent_fault) {
        if f == Fault::EmptySameId {
            let id = log.id.clone().unwrap_or_else(|| "100".into());
            return Reply::Json(
                200,
                serde_json::json!({"ipaddress": [], "ID": id}).to_string(),
            );
        }
        return Reply::Fault(f);
    }
    let v2_key = req
        .headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .and_then(|(_, v)| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    match (req.method.as_str(), parts.as_slice()) {
        ("POST", ["api", "get"]) => {
            if v2_key.as_deref() != Some(s.key.as_str()) {
                return Reply::Fault(Fault::Forbidden);
            }
            banned(s, log.id.as_deref().unwrap_or("100"))
        }
        ("POST", ["api", "check"]) => {
            if v2_key.as_deref() != Some(s.key.as_str()) {
                return Reply::Fault(Fault::Forbidden);
            }
            check(s, field("ipaddress").as_deref().unwrap_or(""))
        }
        ("GET", ["api", key, "banned", rest @ ..]) => {
            if *key != s.key {
                return Reply::Fault(Fault::Forbidden);
            }
            let id = rest.first().copied().unwrap_or("100").to_owned();
            banned(s, &id)
        }
        ("GET", ["api", key, "check", ip]) => {
            if *key != s.key {
                return Reply::Fault(Fault::Forbidden);
            }
            check(s, ip)
        }
        _ => Reply::Text(404, "no such endpoint".into()),
    }
}

fn banned(s: &Inner, id: &str) -> Reply {
    let from = match id {
        "100" => 0,
        other => match other.parse::<u64>() {
            Ok(n) => n,
            Err(_) => return Reply::Json(400, r#"{"ipaddress":"bad id","ID":"none"}"#.into()),
        },
    };
    let batch: Vec<&(u64, String)> = s
        .entries
        .iter()
        .filter(|(i, _)| *i >= from)
        .take(s.batch_size)
        .collect();
    let Some(last) = batch.last() else {
        return Reply::Json(
            400,
            match s.no_new_bans {
                NoNewBans::Array => r#"{"ipaddress":["no new bans"],"ID":"none"}"#.into(),
                NoNewBans::String => r#"{"ipaddress":"no new bans","ID":"none"}"#.into(),
            },
        );
    };
    let next = s
        .entries
        .iter()
        .find(|(i, _)| *i > last.0)
        .map(|(i, _)| *i)
        .unwrap_or(last.0 + 1);
    let ips: Vec<&str> = batch.iter().map(|(_, ip)| ip.as_str()).collect();
    Reply::Json(
        200,
        serde_json::json!({"ipaddress": ips, "ID": next.to_string()}).to_string(),
    )
}

fn check(s: &Inner, ip: &str) -> Reply {
    if s.entries.iter().any(|(_, e)| e == ip) {
        Reply::Json(
            200,
            serde_json::json!({"ipaddress": [ip], "ID": "987654321"}).to_string(),
        )
    } else {
        Reply::Json(404, r#"{"ipaddress":["not blocked"],"ID":"none"}"#.into())
    }
}
