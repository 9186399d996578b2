//! /metrics in the Prometheus text exposition format (0.0.4), rendered from the same
//! snapshot as `apiban status`, served by a deliberately small HTTP/1.1 responder: one GET
//! per connection, bounded request size and time, loopback by default.

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::{
    status::{Readers, StatusReport},
    sync,
};

const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a client has to send its request head, and a whole exchange may take.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; past this the oldest is dropped, so idle connections
/// (slowloris) never keep a scrape out (see `conn_slots`).
const MAX_CONNECTIONS: usize = 512;

/// Label values escaped as the format requires.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Writer {
    out: String,
}

impl Writer {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", esc(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Renders every metric from a status snapshot.
pub fn render(r: &StatusReport) -> String {
    let mut w = Writer { out: String::new() };
    w.family(
        "apiban_build_info",
        "gauge",
        "Version of the running agent.",
    );
    w.sample(
        "apiban_build_info",
        &[
            ("version", &r.agent.version),
            ("dry_run", if r.agent.dry_run { "true" } else { "false" }),
        ],
        1,
    );
    w.single(
        "apiban_start_time_seconds",
        "gauge",
        "When the agent started (Unix time).",
        r.agent.started_at,
    );

    w.family(
        "apiban_entries",
        "gauge",
        "Ledger records by source and address family (a prefix held by two sources counts twice).",
    );
    for e in &r.entries {
        w.sample(
            "apiban_entries",
            &[("source", &e.source), ("family", &e.family)],
            e.count,
        );
    }
    w.family(
        "apiban_source_observing",
        "gauge",
        "1 while the source is in observe mode (its entries are matched and counted, not dropped), else 0.",
    );
    for src in &r.sources {
        w.sample(
            "apiban_source_observing",
            &[("source", &src.source)],
            u8::from(src.mode == "observe"),
        );
    }
    w.family(
        "apiban_source_matched_packets",
        "gauge",
        "Packets matched by the source's entries now in the maps, by verdict: dropped, or observed (would have been dropped). An entry's count goes with it, so this can fall.",
    );
    for src in &r.sources {
        for (verdict, n) in [("dropped", src.dropped), ("observed", src.observed)] {
            w.sample(
                "apiban_source_matched_packets",
                &[("source", &src.source), ("verdict", verdict)],
                n,
            );
        }
    }
    w.single(
        "apiban_derived_prefixes",
        "gauge",
        "IPv6 blocks banned by escalation: enough bans of one source inside them.",
        r.derived_prefixes,
    );
    w.family(
        "apiban_enforced_prefixes",
        "gauge",
        "Prefixes in the XDP deny maps by address family.",
    );
    for (family, n) in &r.enforced {
        w.sample("apiban_enforced_prefixes", &[("family", family)], n);
    }
    if !r.capacity.is_empty() {
        w.family(
            "apiban_deny_map_capacity",
            "gauge",
            "Capacity of each deny map (host hash and prefix trie) by address family.",
        );
        for (family, n) in &r.capacity {
            w.sample("apiban_deny_map_capacity", &[("family", family)], n);
        }
        w.family(
            "apiban_deny_map_used_ratio",
            "gauge",
            "Enforced prefixes over deny map capacity, by address family.",
        );
        for (family, cap) in &r.capacity {
            let used = r.enforced.get(family).copied().unwrap_or(0);
            let ratio = if *cap == 0 {
                0.0
            } else {
                used as f64 / f64::from(*cap)
            };
            w.sample("apiban_deny_map_used_ratio", &[("family", family)], ratio);
        }
    }
    w.single(
        "apiban_allowlist_prefixes",
        "gauge",
        "Prefixes on the allowlist (configuration and manual).",
        r.allowlist,
    );

    if !r.traffic.is_empty() {
        w.family(
            "apiban_packets_total",
            "counter",
            "Packets seen by the XDP program by interface and verdict.",
        );
        for (iface, verdicts) in &r.traffic {
            for (verdict, t) in verdicts {
                w.sample(
                    "apiban_packets_total",
                    &[("iface", iface), ("verdict", verdict)],
                    t.packets,
                );
            }
        }
        w.family(
            "apiban_bytes_total",
            "counter",
            "Bytes seen by the XDP program by interface and verdict.",
        );
        for (iface, verdicts) in &r.traffic {
            for (verdict, t) in verdicts {
                w.sample(
                    "apiban_bytes_total",
                    &[("iface", iface), ("verdict", verdict)],
                    t.bytes,
                );
            }
        }
    }

    let s = &r.sync;
    w.family(
        "apiban_api_requests_total",
        "counter",
        "Requests to the APIBAN API by outcome.",
    );
    for (outcome, n) in &s.requests {
        w.sample("apiban_api_requests_total", &[("outcome", outcome)], n);
    }
    w.single(
        "apiban_last_successful_sync_timestamp_seconds",
        "gauge",
        "When the last APIBAN poll or full pull completed (Unix time; 0 = never).",
        s.last_success.unwrap_or(0),
    );
    w.single(
        "apiban_api_key_rejected_since_timestamp_seconds",
        "gauge",
        "Since when APIBAN has rejected the key with 403 (Unix time; 0 = the key is accepted).",
        s.key_rejected_since.unwrap_or(0),
    );
    w.single(
        "apiban_api_next_request_timestamp_seconds",
        "gauge",
        "When the poller sends its next APIBAN request (Unix time; 0 = none scheduled).",
        s.next_request.unwrap_or(0),
    );
    w.single(
        "apiban_rate_limit_waits_total",
        "counter",
        "Times a request waited for the rate budget.",
        s.rate_limit_waits,
    );
    w.single(
        "apiban_rate_budget_remaining",
        "gauge",
        "Requests left in the current rate-limit window.",
        s.budget_left,
    );
    if !s.lists.is_empty() {
        w.family(
            "apiban_list_last_success_timestamp_seconds",
            "gauge",
            "When each blocklist was last read successfully (Unix time; 0 = never).",
        );
        for l in &s.lists {
            w.sample(
                "apiban_list_last_success_timestamp_seconds",
                &[("list", &l.name)],
                l.last_success.unwrap_or(0),
            );
        }
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
        w.single(name, "counter", help, value);
    }
    w.family(
        "apiban_feed_entries_skipped_total",
        "counter",
        "Feed entries the sanitiser refused, by reason.",
    );
    for (reason, n) in &e.skipped {
        w.sample(
            "apiban_feed_entries_skipped_total",
            &[("reason", reason)],
            n,
        );
    }
    w.single(
        "apiban_state_unsaved",
        "gauge",
        "1 while the state file is behind what is enforced (the last save failed).",
        u8::from(e.unsaved),
    );
    w.single(
        "apiban_state_save_duration_seconds",
        "gauge",
        "How long the last state save took.",
        e.last_save_seconds,
    );
    w.single(
        "apiban_dataplane_read_errors",
        "gauge",
        "1 if the last scrape could not read the XDP maps.",
        u8::from(r.dataplane_error.is_some()),
    );
    if let Some(d) = &r.agent.detect {
        detect(&mut w, d);
    }
    if let Some(c) = &r.agent.cluster {
        cluster(&mut w, c);
    }
    w.out
}

/// `apiban_detect_*`: what SIP scanner detection saw and did.
fn detect(w: &mut Writer, d: &crate::status::DetectReport) {
    w.single(
        "apiban_detect_samples_total",
        "counter",
        "Samples of SIP requests the dataplane sent to the agent.",
        d.samples,
    );
    w.single(
        "apiban_detect_rate_reports_total",
        "counter",
        "Sources the dataplane reported over the request-rate threshold.",
        d.rate_reports,
    );
    w.family(
        "apiban_detect_matches_total",
        "counter",
        "Sources a detection rule matched, by rule and mode (observe: would have banned).",
    );
    for m in &d.matches {
        w.sample(
            "apiban_detect_matches_total",
            &[("rule", &m.rule), ("mode", &m.mode)],
            m.count,
        );
    }
    w.single(
        "apiban_detect_bans_total",
        "counter",
        "Bans detection made (enforce mode).",
        d.bans,
    );
    w.single(
        "apiban_detect_refused_total",
        "counter",
        "Matches the ledger refused: allowlisted, this host's, special-purpose.",
        d.refused,
    );
    w.single(
        "apiban_detect_sources",
        "gauge",
        "Sources the detection rules follow now.",
        d.tracked,
    );
}

/// `apiban_cluster_*`: only on a fleet node.
fn cluster(w: &mut Writer, c: &crate::status::ClusterReport) {
    w.family(
        "apiban_cluster_leader",
        "gauge",
        "1 while this node leads the fleet (polls APIBAN and the lists).",
    );
    w.sample(
        "apiban_cluster_leader",
        &[("node", &c.node)],
        u8::from(c.leader),
    );
    w.single(
        "apiban_cluster_watching",
        "gauge",
        "1 while the watch on etcd is up.",
        u8::from(c.watching),
    );
    w.single(
        "apiban_cluster_applied_revision",
        "gauge",
        "The etcd revision this node's ledger reflects.",
        c.applied_revision,
    );
    w.single(
        "apiban_cluster_revision_lag",
        "gauge",
        "Revisions between the newest one this node has seen and the one it applied.",
        c.revision_lag,
    );
    w.single(
        "apiban_cluster_watch_restarts_total",
        "counter",
        "Watches on etcd that ended and were started again.",
        c.watch_restarts,
    );
    w.single(
        "apiban_cluster_etcd_errors_total",
        "counter",
        "Calls to etcd that failed or timed out.",
        c.etcd_errors,
    );
    w.single(
        "apiban_cluster_full_reads_total",
        "counter",
        "Reads of the whole ledger from etcd (a first start, or a compacted revision).",
        c.full_reads,
    );
    w.single(
        "apiban_cluster_expired_deleted_total",
        "counter",
        "Expired records this node deleted from etcd while it led.",
        c.expired_deleted,
    );
    w.single(
        "apiban_cluster_pending_changes",
        "gauge",
        "Operators' changes on this node that etcd has not confirmed yet.",
        c.pending_changes,
    );
}

/// The method and path (without its query) of a request head as a client sent it: any
/// bytes at all, cut at the size bound.
pub fn request_target(head: &[u8]) -> (String, String) {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    (method.to_owned(), path.to_owned())
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
            let _ = tokio::time::timeout(IO_TIMEOUT, respond(stream, readers)).await;
        });
    }
}

async fn respond(mut stream: TcpStream, readers: Readers) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    };
    if tokio::time::timeout(HEAD_TIMEOUT, read_head).await.is_err() {
        return;
    }
    let (method, path) = request_target(&head);
    let (method, path) = (method.as_str(), path.as_str());
    let (status_line, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => match readers.report(sync::unix_now()).await {
            Ok(report) => (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                render(&report),
            ),
            Err(e) => (
                "500 Internal Server Error",
                "text/plain",
                format!("building the metrics failed: {e}\n"),
            ),
        },
        ("GET" | "HEAD", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "apiban agent: metrics at /metrics\n".to_owned(),
        ),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status_line}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
