//! /metrics as Prometheus scrapes it: the real agent after real drops, scraped in both
//! exposition formats, each checked by Debian's promtool: `promtool check metrics` lints the
//! text format, and the OpenMetrics scrape goes through Prometheus' own OpenMetrics parser
//! (`promtool tsdb create-blocks-from openmetrics`) into a block whose series are read back.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use tests::{agent::http_request, require_root, scene::Scene, send_udp};

const METRICS: &str = "127.0.0.1:19477";
const OPENMETRICS: &str =
    "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

fn promtool() -> PathBuf {
    let bin = PathBuf::from("/usr/bin/promtool");
    assert!(
        bin.exists(),
        "promtool is missing: `cargo xtask test` installs it (Debian: apt-get install prometheus)"
    );
    bin
}

/// `promtool ARGS` with `stdin`; its exit code and output.
fn run_promtool(args: &[&str], stdin: &str) -> (Option<i32>, String) {
    use std::io::Write as _;
    let mut child = Command::new(promtool())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// The OpenMetrics scrape with each sample stamped with the scrape time (the backfill needs
/// timestamps; a scraper adds them the same way).
fn stamped(openmetrics: &str, unix: u64) -> String {
    openmetrics
        .lines()
        .map(|l| {
            if l.starts_with('#') {
                format!("{l}\n")
            } else {
                format!("{l} {unix}\n")
            }
        })
        .collect()
}

#[test]
fn both_exposition_formats_pass_promtool_after_real_drops() {
    require_root();
    promtool();
    let mut s = Scene::new();
    let banned = s.source("45.98.0.1");
    s.start(&["--metrics-addr", METRICS, "--detect", "off"]);
    s.agent().cli_ok(&["ban", "45.98.0.1"]);
    s.wait_verdict(banned, "banned", Duration::from_secs(10));
    let dst = SocketAddr::new(s.topo.server_v4.into(), 5060);
    send_udp(&s.topo.attacker, banned, dst, 25);
    let addr: SocketAddr = METRICS.parse().expect("literal");
    let ns = Some(&s.topo.server);
    let dropped_line = format!(
        "apiban_packets_total{{iface=\"{}\",verdict=\"dropped\"}} 25",
        s.topo.server_if
    );
    tests::wait_until("the drops in /metrics", Duration::from_secs(5), || {
        http_request(ns, addr, "GET", "/metrics", &[])
            .body
            .lines()
            .any(|l| l == dropped_line)
    });

    // The text format, what curl and older scrapers get.
    let text = http_request(ns, addr, "GET", "/metrics", &[]);
    assert_eq!(text.code, 200);
    assert_eq!(
        text.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let (code, said) = run_promtool(&["check", "metrics"], &text.body);
    assert_eq!(
        code,
        Some(0),
        "promtool check metrics:\n{said}\n{}",
        text.body
    );
    assert!(said.trim().is_empty(), "promtool lints:\n{said}");
    assert!(text.body.contains("# TYPE apiban_packets_total counter"));

    // OpenMetrics, what Prometheus asks for; the same samples.
    let om = http_request(ns, addr, "GET", "/metrics", &[("Accept", OPENMETRICS)]);
    assert_eq!(om.code, 200);
    assert_eq!(
        om.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    assert!(om.body.lines().any(|l| l == dropped_line), "{}", om.body);
    let file = s.dir.path.join("scrape.om");
    let blocks = s.dir.path.join("blocks");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    std::fs::write(&file, stamped(&om.body, now)).expect("write the scrape");
    let (code, said) = run_promtool(
        &[
            "tsdb",
            "create-blocks-from",
            "openmetrics",
            &file.display().to_string(),
            &blocks.display().to_string(),
        ],
        "",
    );
    assert!(
        code == Some(0) && !said.contains("error") && !said.contains("expected"),
        "Prometheus' OpenMetrics parser refused the scrape:\n{said}\n{}",
        om.body
    );
    // `tsdb dump` opens the directory as a database, which has a WAL.
    std::fs::create_dir_all(blocks.join("wal")).expect("an empty WAL");
    let (code, dump) = run_promtool(
        &[
            "tsdb",
            "dump",
            &blocks.display().to_string(),
            "--match",
            "{__name__=\"apiban_packets_total\",verdict=\"dropped\"}",
        ],
        "",
    );
    assert_eq!(code, Some(0), "{dump}");
    assert!(
        dump.lines().any(|l| l.contains("apiban_packets_total")
            && l.contains(&format!("iface=\"{}\"", s.topo.server_if))
            && l.contains(" 25 ")),
        "the dropped packets are not in the block:\n{dump}"
    );

    // HEAD, other paths and methods, as before.
    let head = http_request(ns, addr, "HEAD", "/metrics", &[]);
    assert_eq!((head.code, head.body.as_str()), (200, ""));
    assert_eq!(http_request(ns, addr, "GET", "/nope", &[]).code, 404);
    let post = http_request(ns, addr, "POST", "/metrics", &[]);
    assert_eq!(post.code, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    // What docs/operating.md shows (run with --nocapture).
    println!("{}", text.body);
}

/// APIBAN's answers carry a `Date`: the agent shows its clock against it in `status` and
/// /metrics, and says once in its log when it is far off (here APIBAN's `Date` is an hour
/// behind this host's clock).
#[test]
fn the_agent_shows_its_clock_against_apibans_and_warns_when_far_off() {
    require_root();
    let mut s = Scene::new();
    s.api.set_clock_skew(3600);
    s.start(&["--metrics-addr", METRICS, "--detect", "off"]);
    s.wait_synced(Duration::from_secs(20));
    let offset = s.status()["sync"]["apiban_clock_offset_ms"].as_i64();
    assert!(
        offset.is_some_and(|ms| (3_598_000..=3_602_000).contains(&ms)),
        "status: {offset:?}"
    );
    let addr: SocketAddr = METRICS.parse().expect("literal");
    let body = http_request(Some(&s.topo.server), addr, "GET", "/metrics", &[]).body;
    assert!(
        body.lines()
            .any(|l| l.starts_with("apiban_api_clock_offset_seconds 3") && l.len() > 35),
        "{body}"
    );
    let log = s.agent().log_text();
    assert_eq!(
        log.matches("far from APIBAN's").count(),
        1,
        "said once:\n{log}"
    );
    assert!(s.agent().cli_ok(&["status"]).contains("against APIBAN's"));
    s.api.set_clock_skew(0);
}
