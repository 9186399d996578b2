//! Every metric family /metrics exposes, written from one status report: the dataplane's
//! counters, the sources, detection and the fleet. What each means is in docs/operating.md's
//! metrics table.

use super::*;

fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

pub(super) fn write_report(w: &mut Writer, r: &StatusReport) -> Result<(), std::fmt::Error> {
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
