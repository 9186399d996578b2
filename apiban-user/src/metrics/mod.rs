//! /metrics: every metric rendered from the same snapshot as `apiban status`, at each scrape,
//! through prometheus-client (a `Collector`), in the OpenMetrics text format or, for clients
//! that do not ask for it, Prometheus' text format 0.0.4; served by hyper, one request per
//! connection, bounded in header size and time, loopback by default.

mod families;

use families::write_report;
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

/// Families by the names docs/operating.md documents: counters are registered without their
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
