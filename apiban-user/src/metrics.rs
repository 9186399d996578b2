//! /metrics: every metric rendered from the same snapshot as `apiban status`, at each scrape,
//! through prometheus-client (a `Collector`), in the OpenMetrics text format or, for clients
//! that do not ask for it, Prometheus' text format 0.0.4; served by hyper, one request per
//! connection, bounded in header size and time, loopback by default.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::{
    status::{Readers, StatusReport},
    sync,
};

/// How long a client has to send its request head, and a whole exchange may take.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; past this the oldest is dropped, so idle connections
/// (slowloris) never keep a scrape out (see `conn_slots`).
const MAX_CONNECTIONS: usize = 512;
/// A request head larger than this is refused by hyper.
const MAX_HEAD: usize = 16 * 1024;

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The exposition format of a scrape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    /// Prometheus' text format 0.0.4: what curl and older scrapers get.
    Text,
}

impl Format {
    /// OpenMetrics when the Accept header offers it (with a non-zero q), else text.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let offered = accept.unwrap_or("").split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        });
        if offered {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::Text => TEXT_CONTENT_TYPE,
        }
    }
}

/// Renders every metric of a status report in `format`.
pub fn render(report: StatusReport, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ReportCollector(Arc::new(report))));
    let mut out = String::new();
    // Writing to a String does not fail; a collector's error would be a bug, shown as is.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        out = format!("# encoding the metrics failed: {e}\n");
    }
    match format {
        Format::OpenMetrics => out,
        Format::Text => openmetrics_to_text(&out),
    }
}

/// The OpenMetrics text as Prometheus' 0.0.4 text: a counter family is named with its
/// `_total` there, and there is no `# EOF` or `# UNIT`. Samples are the same lines.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|tag| {
            let rest = line.strip_prefix(tag)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{tag}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A report, encoded at scrape time.
#[derive(Debug)]
struct ReportCollector(Arc<StatusReport>);

impl Collector for ReportCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut w = Writer { enc: encoder };
        write_report(&mut w, &self.0)
    }
}

type Labels = Vec<(&'static str, String)>;

/// Families by the names the README documents: counters are registered without their
/// `_total`, which the encoder adds to each sample.
struct Writer<'a> {
    enc: DescriptorEncoder<'a>,
}

impl Writer<'_> {
    fn family<M: EncodeMetric>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        samples: Vec<(Labels, M)>,
    ) -> Result<(), std::fmt::Error> {
        if samples.is_empty() {
            return Ok(());
        }
        let name = match kind {
            MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        let mut metric = self.enc.encode_descriptor(name, help, None, kind)?;
        match samples.as_slice() {
            // A family without labels is written `name value`, not `name{} value`.
            [(labels, sample)] if labels.is_empty() => sample.encode(metric),
            _ => {
                for (labels, sample) in &samples {
                    sample.encode(metric.encode_family(labels)?)?;
                }
                Ok(())
            }
        }
    }

    fn gauges<V>(
        &mut self,
        name: &str,
        help: &str,
        samples: Vec<(Labels, V)>,
    ) -> Result<(), std::fmt::Error>
    where
        ConstGauge<V>: EncodeMetric,
    {
        let samples = samples
            .into_iter()
            .map(|(l, v)| (l, ConstGauge::new(v)))
            .collect();
        self.family(name, help, MetricType::Gauge, samples)
    }

    fn counters(
        &mut self,
        name: &str,
        help: &str,
        samples: Vec<(Labels, u64)>,
    ) -> Result<(), std::fmt::Error> {
        let samples = samples
            .into_iter()
            .map(|(l, v)| (l, ConstCounter::new(v)))
            .collect();
        self.family(name, help, MetricType::Counter, samples)
    }

    fn gauge<V>(&mut self, name: &str, help: &str, value: V) -> Result<(), std::fmt::Error>
    where
        ConstGauge<V>: EncodeMetric,
    {
        self.gauges(name, help, vec![(Vec::new(), value)])
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
        self.counters(name, help, vec![(Vec::new(), value)])
    }
}

fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

fn write_report(w: &mut Writer, r: &StatusReport) -> Result<(), std::fmt::Error> {
    w.gauges(
        "apiban_build_info",
        "Version of the running agent.",
        vec![(
            labels([
                ("version", &r.agent.version),
                ("dry_run", if r.agent.dry_run { "true" } else { "false" }),
            ]),
            1,
        )],
    )?;
    w.gauges(
        "apiban_feature_enabled",
        "1 when this kernel runs the feature (enforcement, detection, detection-answers, capture), 0 when it lacks what the feature needs (status says what).",
        r.agent
            .features
            .iter()
            .map(|f| (labels([("feature", f.feature.name())]), u32::from(f.enabled)))
            .collect(),
    )?;
    w.gauge(
        "apiban_start_time_seconds",
        "When the agent started (Unix time).",
        r.agent.started_at,
    )?;
    w.gauges(
        "apiban_entries",
        "Ledger records by source and address family (a prefix held by two sources counts twice).",
        r.entries
            .iter()
            .map(|e| {
                (
                    labels([("source", &e.source), ("family", &e.family)]),
                    e.count,
                )
            })
            .collect(),
    )?;
    w.gauges(
        "apiban_source_observing",
        "1 while the source is in observe mode (its entries are matched and counted, not dropped), else 0.",
        r.sources
            .iter()
            .map(|s| (labels([("source", &s.source)]), u32::from(s.mode == "observe")))
            .collect(),
    )?;
    w.gauges(
        "apiban_source_matched_packets",
        "Packets matched by the source's entries now in the maps, by verdict: dropped, or observed (would have been dropped). An entry's count goes with it, so this can fall.",
        r.sources
            .iter()
            .flat_map(|s| {
                [("dropped", s.dropped), ("observed", s.observed)]
                    .map(|(verdict, n)| (labels([("source", &s.source), ("verdict", verdict)]), n))
            })
            .collect(),
    )?;
    w.gauge(
        "apiban_derived_prefixes",
        "IPv6 blocks banned by escalation: enough bans of one source inside them.",
        r.derived_prefixes,
    )?;
    w.gauges(
        "apiban_enforced_prefixes",
        "Prefixes in the XDP deny maps by address family.",
        r.enforced
            .iter()
            .map(|(family, n)| (labels([("family", family)]), *n))
            .collect(),
    )?;
    w.gauges(
        "apiban_deny_map_capacity",
        "Capacity of each deny map (host hash and prefix trie) by address family.",
        r.capacity
            .iter()
            .map(|(family, n)| (labels([("family", family)]), *n))
            .collect(),
    )?;
    w.gauges(
        "apiban_deny_map_used_ratio",
        "Enforced prefixes over deny map capacity, by address family.",
        r.capacity
            .iter()
            .map(|(family, cap)| {
                let used = r.enforced.get(family).copied().unwrap_or(0);
                let ratio = if *cap == 0 {
                    0.0
                } else {
                    used as f64 / f64::from(*cap)
                };
                (labels([("family", family)]), ratio)
            })
            .collect(),
    )?;
    w.gauge(
        "apiban_allowlist_prefixes",
        "Prefixes on the allowlist (configuration and manual).",
        r.allowlist,
    )?;
    let traffic = |pick: fn(&crate::status::Traffic) -> u64| {
        r.traffic
            .iter()
            .flat_map(|(iface, verdicts)| {
                verdicts.iter().map(move |(verdict, t)| {
                    (labels([("iface", iface), ("verdict", verdict)]), pick(t))
                })
            })
            .collect()
    };
    w.counters(
        "apiban_packets_total",
        "Packets seen by the XDP program by interface and verdict.",
        traffic(|t| t.packets),
    )?;
    w.counters(
        "apiban_bytes_total",
        "Bytes seen by the XDP program by interface and verdict.",
        traffic(|t| t.bytes),
    )?;

    let s = &r.sync;
    w.counters(
        "apiban_api_requests_total",
        "Requests to the APIBAN API by outcome.",
        s.requests
            .iter()
            .map(|(outcome, n)| (labels([("outcome", outcome)]), *n))
            .collect(),
    )?;
    w.gauge(
        "apiban_last_successful_sync_timestamp_seconds",
        "When the last APIBAN poll or full pull completed (Unix time; 0 = never).",
        s.last_success.unwrap_or(0),
    )?;
    if let Some(ms) = s.apiban_clock_offset_ms {
        w.gauge(
            "apiban_api_clock_offset_seconds",
            "This host's clock against the Date of APIBAN's last answer (positive: ahead; to the second).",
            ms as f64 / 1000.0,
        )?;
    }
    w.gauge(
        "apiban_api_key_rejected_since_timestamp_seconds",
        "Since when APIBAN has rejected the key with 403 (Unix time; 0 = the key is accepted).",
        s.key_rejected_since.unwrap_or(0),
    )?;
    w.gauge(
        "apiban_api_next_request_timestamp_seconds",
        "When the poller sends its next APIBAN request (Unix time; 0 = none scheduled).",
        s.next_request.unwrap_or(0),
    )?;
    w.counter(
        "apiban_rate_limit_waits_total",
        "Times a request waited for the rate budget.",
        s.rate_limit_waits,
    )?;
    w.gauge(
        "apiban_rate_budget_remaining",
        "Requests left in the current rate-limit window.",
        s.budget_left,
    )?;
    w.gauges(
        "apiban_list_last_success_timestamp_seconds",
        "When each blocklist was last read successfully (Unix time; 0 = never).",
        s.lists
            .iter()
            .map(|l| (labels([("list", &l.name)]), l.last_success.unwrap_or(0)))
            .collect(),
    )?;

    if let Some(c) = &s.crowdsec {
        w.gauge(
            "apiban_crowdsec_last_success_timestamp_seconds",
            "When CrowdSec's decision stream was last read (Unix time; 0 = never).",
            c.last_success.unwrap_or(0),
        )?;
        w.counters(
            "apiban_crowdsec_decisions_left_total",
            "CrowdSec decisions not taken as bans: of another type or scope, or unreadable.",
            vec![
                (labels([("reason", "not_a_ban")]), c.other_decisions),
                (labels([("reason", "unreadable")]), c.unreadable_decisions),
            ],
        )?;
        w.counters(
            "apiban_crowdsec_alerts_total",
            "This node's bans offered to CrowdSec as alerts, by what became of them.",
            vec![
                (labels([("outcome", "posted")]), c.alerts_posted),
                (labels([("outcome", "already_banned")]), c.alerts_skipped),
                (labels([("outcome", "forgeable")]), c.alerts_forgeable),
                (labels([("outcome", "dropped")]), c.alerts_dropped),
            ],
        )?;
    }
    let e = &r.engine;
    for (name, help, value) in [
        (
            "apiban_prefixes_added_total",
            "Prefixes added to the deny maps.",
            e.added,
        ),
        (
            "apiban_prefixes_removed_total",
            "Prefixes removed from the deny maps.",
            e.removed,
        ),
        (
            "apiban_records_expired_total",
            "Ledger records that expired.",
            e.expired,
        ),
        (
            "apiban_records_reconciled_total",
            "Ledger records removed because a full pull no longer listed them.",
            e.reconciled,
        ),
        (
            "apiban_map_full_total",
            "Prefixes that did not fit in a full deny map.",
            e.map_full,
        ),
        ("apiban_state_saves_total", "State file saves.", e.saves),
        (
            "apiban_state_save_failures_total",
            "State file saves that failed.",
            e.save_failures,
        ),
    ] {
        w.counter(name, help, value)?;
    }
    w.counters(
        "apiban_feed_entries_skipped_total",
        "Feed entries the sanitiser refused, by reason.",
        e.skipped
            .iter()
            .map(|(reason, n)| (labels([("reason", reason)]), *n))
            .collect(),
    )?;
    w.gauge(
        "apiban_state_unsaved",
        "1 while the state file is behind what is enforced (the last save failed).",
        u32::from(e.unsaved),
    )?;
    w.gauge(
        "apiban_state_save_duration_seconds",
        "How long the last state save took.",
        e.last_save_seconds,
    )?;
    w.gauge(
        "apiban_dataplane_read_errors",
        "1 if the last scrape could not read the XDP maps.",
        u32::from(r.dataplane_error.is_some()),
    )?;
    if let Some(d) = &r.agent.detect {
        detect(w, d)?;
    }
    if let Some(c) = &r.agent.cluster {
        cluster(w, c)?;
    }
    Ok(())
}

/// `apiban_detect_*`: what SIP scanner detection saw and did.
fn detect(w: &mut Writer, d: &crate::status::DetectReport) -> Result<(), std::fmt::Error> {
    w.counter(
        "apiban_detect_samples_total",
        "Samples of SIP requests the dataplane sent to the agent.",
        d.samples,
    )?;
    w.counter(
        "apiban_detect_rate_reports_total",
        "Sources the dataplane reported over the request-rate threshold.",
        d.rate_reports,
    )?;
    w.counters(
        "apiban_detect_matches_total",
        "Sources a detection rule matched, by rule and mode (observe: would have banned).",
        d.matches
            .iter()
            .map(|m| (labels([("rule", &m.rule), ("mode", &m.mode)]), m.count))
            .collect(),
    )?;
    w.counter(
        "apiban_detect_bans_total",
        "Bans detection made (enforce mode).",
        d.bans,
    )?;
    w.counter(
        "apiban_detect_refused_total",
        "Matches the ledger refused: allowlisted, this host's, special-purpose.",
        d.refused,
    )?;
    w.counter(
        "apiban_detect_exempted_total",
        "Matches on proven peers (--detect-exempt, or proven by the server's answers), reported and not banned.",
        d.exempted,
    )?;
    w.counter(
        "apiban_detect_responses_total",
        "SIP responses to followed sources the egress classifier sent to the agent.",
        d.responses,
    )?;
    w.gauge(
        "apiban_detect_proven_peers",
        "Sources proven by a 2xx to their authenticated REGISTER or INVITE, never banned by detection.",
        d.proven,
    )?;
    w.counters(
        "apiban_detect_passed_over_total",
        "Packets to SIP ports detection counted without reading them as requests: keep-alives (CRLF, STUN), TLS records.",
        vec![
            (labels([("kind", "keepalive")]), d.keepalives),
            (labels([("kind", "tls")]), d.tls_packets),
        ],
    )?;
    w.counter(
        "apiban_detect_untracked_total",
        "Requests from sources the program's per-source table had no room for: sampled within the cap, not counted against a rate, their answers not followed.",
        d.untracked,
    )?;
    w.counter(
        "apiban_detect_unreadable_total",
        "Samples that were no SIP request the parser could read; never a reason to ban.",
        d.unreadable,
    )?;
    w.gauge(
        "apiban_detect_sources",
        "Sources the detection rules follow now.",
        d.tracked,
    )
}

/// `apiban_cluster_*`: only on a fleet node.
fn cluster(w: &mut Writer, c: &crate::status::ClusterReport) -> Result<(), std::fmt::Error> {
    w.gauges(
        "apiban_cluster_leader",
        "1 while this node leads the fleet (polls APIBAN and the lists).",
        vec![(labels([("node", &c.node)]), u32::from(c.leader))],
    )?;
    w.gauge(
        "apiban_cluster_watching",
        "1 while the watch on etcd is up.",
        u32::from(c.watching),
    )?;
    w.gauge(
        "apiban_cluster_applied_revision",
        "The etcd revision this node's ledger reflects.",
        c.applied_revision,
    )?;
    w.gauge(
        "apiban_cluster_revision_lag",
        "Revisions between the newest one this node has seen and the one it applied.",
        c.revision_lag,
    )?;
    w.counter(
        "apiban_cluster_watch_restarts_total",
        "Watches on etcd that ended and were started again.",
        c.watch_restarts,
    )?;
    w.counter(
        "apiban_cluster_etcd_errors_total",
        "Calls to etcd that failed or timed out.",
        c.etcd_errors,
    )?;
    w.counter(
        "apiban_cluster_full_reads_total",
        "Reads of the whole ledger from etcd (a first start, or a compacted revision).",
        c.full_reads,
    )?;
    w.counter(
        "apiban_cluster_expired_deleted_total",
        "Expired records this node deleted from etcd while it led.",
        c.expired_deleted,
    )?;
    if let Some(ms) = c.clock_offset_ms {
        w.gauge(
            "apiban_cluster_clock_offset_seconds",
            "This node's clock against the median of the other nodes' heartbeats (positive: ahead).",
            ms as f64 / 1000.0,
        )?;
    }
    w.gauge(
        "apiban_cluster_clock_off",
        "1 while this node's clock is past --cluster-max-clock-offset: it does not lead.",
        u32::from(c.clock_off),
    )?;
    w.gauge(
        "apiban_cluster_etcd_nospace",
        "1 while etcd's NOSPACE alarm is raised: it refuses every write.",
        u32::from(c.etcd_nospace),
    )?;
    w.counters(
        "apiban_cluster_records_refused_total",
        "Records and allowlist entries in etcd this node refused to enforce, by reason.",
        crate::cluster::REFUSAL_REASONS
            .iter()
            .map(|reason| {
                let n = c.records_refused.get(*reason).copied().unwrap_or(0);
                (labels([("reason", reason)]), n)
            })
            .collect(),
    )?;
    w.gauge(
        "apiban_cluster_outbox_queued",
        "Changes waiting for the writer to etcd (at most 256).",
        c.outbox_queued,
    )?;
    w.counter(
        "apiban_cluster_outbox_shed_total",
        "Changes the full queue to etcd could not take: sent again later from the ledger.",
        c.outbox_shed,
    )?;
    w.gauge(
        "apiban_cluster_etcd_members",
        "etcd endpoints this node is configured with.",
        c.etcd_members,
    )?;
    w.gauge(
        "apiban_cluster_etcd_members_answering",
        "etcd members that answered a linearizable read in the last round (every 2 s).",
        c.etcd_members_answering,
    )?;
    w.gauge(
        "apiban_cluster_pending_changes",
        "Operators' changes on this node that etcd has not confirmed yet.",
        c.pending_changes,
    )
}

/// Binds the metrics address; a clear error when it is taken.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves /metrics until aborted.
pub async fn serve(listener: TcpListener, readers: Readers) {
    let slots = crate::conn_slots::ConnSlots::new(MAX_CONNECTIONS);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let readers = readers.clone();
        slots.spawn(async move {
            let service = hyper::service::service_fn(move |req| respond(req, readers.clone()));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(IO_TIMEOUT, connection).await;
        });
    }
}

fn plain(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn respond<B>(
    req: Request<B>,
    readers: Readers,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            let format = Format::negotiate(
                req.headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            match readers.report(sync::unix_now()).await {
                Ok(report) => {
                    let mut response =
                        Response::new(Full::new(Bytes::from(render(report, format))));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(format.content_type()),
                    );
                    response
                }
                Err(e) => plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("building the metrics failed: {e}\n"),
                ),
            }
        }
        "/" => plain(StatusCode::OK, "apiban agent: metrics at /metrics\n"),
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Traffic;

    fn report() -> StatusReport {
        let mut r = StatusReport::default();
        r.agent.version = "0.1.0".into();
        r.traffic.insert(
            "eth9".into(),
            [(
                "dropped".to_owned(),
                Traffic {
                    packets: 5,
                    bytes: 320,
                },
            )]
            .into(),
        );
        r.enforced.insert("ipv4".into(), 1);
        r.capacity.insert("ipv4".into(), 4);
        r.agent.features = crate::dataplane::kernel::KernelFeatures::with_missing(
            "5.10.0-33-amd64".into(),
            crate::dataplane::kernel::REQUIREMENTS
                .into_iter()
                .filter(|r| r.since == "5.18")
                .collect(),
        )
        .report();
        r.engine.skipped.insert("own_address".into(), 2);
        r.sync.lists.push(crate::status::ListReport {
            name: "odd \"list\"\\\n".into(),
            last_success: None,
            last_error: None,
        });
        r.sync.crowdsec = Some(crate::status::CrowdsecReport {
            last_success: Some(1_700_000_000),
            last_error: None,
            other_decisions: 1,
            unreadable_decisions: 0,
            ..Default::default()
        });
        r
    }

    #[test]
    fn scrapers_that_ask_for_openmetrics_get_it() {
        for (accept, want) in [
            (None, Format::Text),
            (Some("text/plain"), Format::Text),
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                Format::OpenMetrics,
            ),
            (Some("application/openmetrics-text; q=0"), Format::Text),
            (Some("Application/OpenMetrics-Text"), Format::OpenMetrics),
        ] {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn both_formats_carry_the_documented_names() {
        let text = render(report(), Format::Text);
        for line in [
            "# TYPE apiban_packets_total counter",
            "apiban_packets_total{iface=\"eth9\",verdict=\"dropped\"} 5",
            "apiban_bytes_total{iface=\"eth9\",verdict=\"dropped\"} 320",
            "apiban_feed_entries_skipped_total{reason=\"own_address\"} 2",
            "# TYPE apiban_enforced_prefixes gauge",
            "apiban_enforced_prefixes{family=\"ipv4\"} 1",
            "apiban_deny_map_used_ratio{family=\"ipv4\"} 0.25",
            "apiban_build_info{version=\"0.1.0\",dry_run=\"false\"} 1",
            "apiban_allowlist_prefixes 0",
            "apiban_feature_enabled{feature=\"enforcement\"} 1",
            "apiban_feature_enabled{feature=\"detection\"} 0",
            "apiban_feature_enabled{feature=\"capture\"} 0",
            "# TYPE apiban_rate_limit_waits_total counter",
            "apiban_rate_limit_waits_total 0",
            "apiban_list_last_success_timestamp_seconds{list=\"odd \\\"list\\\"\\\\\\n\"} 0",
            "apiban_crowdsec_last_success_timestamp_seconds 1700000000",
            "apiban_crowdsec_decisions_left_total{reason=\"not_a_ban\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        assert!(!text.contains("# EOF"));
        let om = render(report(), Format::OpenMetrics);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.lines().any(|l| l == "# TYPE apiban_packets counter"));
        assert!(
            om.lines()
                .any(|l| l == "apiban_packets_total{iface=\"eth9\",verdict=\"dropped\"} 5")
        );
        // Samples are the same lines in both.
        let samples = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&text), samples(&om));
    }
}
