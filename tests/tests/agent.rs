//! The `apiban` binary as an operator uses it: `apiban run` in a server namespace, fed by the
//! local APIBAN server, driven through its control socket by the client commands, scraped at
//! /metrics, reloaded with SIGHUP and stopped with SIGTERM; real datagrams decide.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    time::Duration,
};

use tests::{
    BpffsDir, Topology, UdpReceiver,
    agent::{AgentProcess, apiban, apiban_env, http_get},
    fake_apiban::FakeApiban,
    in_netns, probe, require_root,
    sync_harness::TempDir,
    wait_until,
};

const KEY: &str = "agentTestKey";
const N: usize = 20;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal address")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn usage_errors_exit_2_runtime_failures_exit_1() {
    let dir = TempDir::new("apiban-cli-");
    // No interface anywhere: bad usage.
    let missing = dir.path.join("missing.toml");
    let out = apiban(&["run", "--config", &missing.display().to_string()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("missing.toml"), "{}", stderr(&out));
    let out = apiban(&["run", "--iface", "lo", "--ttl", "7x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("7x"), "{}", stderr(&out));
    let typo = dir.path.join("typo.toml");
    std::fs::write(&typo, "iface = [\"lo\"]\npol-interval = \"60s\"\n").unwrap();
    let out = apiban(&["run", "--config", &typo.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("pol-interval"), "{}", stderr(&out));
    // No agent behind the socket: a runtime failure that says what to do.
    let sock = dir.path.join("none.sock").display().to_string();
    for cmd in [
        vec!["status"],
        vec!["check", "192.0.2.1"],
        vec!["list"],
        vec!["ban", "45.9.0.1"],
        vec!["unban", "45.9.0.1"],
        vec!["allow", "list"],
    ] {
        let mut args = cmd.clone();
        args.extend_from_slice(&["--control-socket", &sock]);
        let out = apiban(&args);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no agent is listening") && stderr(&out).contains("apiban run"),
            "{cmd:?}: {}",
            stderr(&out)
        );
    }
    let out = apiban(&["ban", "not-a-cidr", "--control-socket", &sock]);
    assert_eq!(out.status.code(), Some(2));
    // A TTL that has run out before the ban starts, and a comment past the limit.
    for ttl in ["0s", "0", "500ms"] {
        let out = apiban(&["ban", "45.9.0.1", "--ttl", ttl, "--control-socket", &sock]);
        assert_eq!(out.status.code(), Some(2), "--ttl {ttl}: {}", stderr(&out));
        assert!(stderr(&out).contains("expires at once"), "{}", stderr(&out));
    }
    let long = "x".repeat(201);
    let out = apiban(&[
        "ban",
        "45.9.0.1",
        "--comment",
        &long,
        "--control-socket",
        &sock,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("at most 200"), "{}", stderr(&out));
    // check --remote asks the API directly, with the key and URL from the environment.
    let server = FakeApiban::start(KEY);
    server.publish(&["45.9.0.66"]);
    let url = server.base_url();
    let env = [("APIBAN_KEY", KEY), ("APIBAN_API_URL", url.as_str())];
    let out = apiban_env(&["check", "45.9.0.66", "--remote"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("LISTED"));
    let out = apiban_env(&["check", "45.9.9.9", "--remote"], &env);
    assert!(String::from_utf8_lossy(&out.stdout).contains("not listed"));
    let out = apiban_env(&["check", "45.9.0.66", "--remote"], &env[1..]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("getkey"), "{}", stderr(&out));
    // Every command explains itself with an example.
    for cmd in [
        "run", "status", "check", "list", "ban", "unban", "allow", "detach",
    ] {
        let out = apiban(&[cmd, "--help"]);
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Example"),
            "{cmd} --help has no example"
        );
    }
}

/// Samples by (metric name, sorted labels).
type Samples = BTreeMap<(String, Vec<(String, String)>), f64>;

/// A Prometheus scrape, parsed by a real text-format parser.
fn scrape(topo: &Topology, addr: SocketAddr) -> Samples {
    let (code, body) = http_get(Some(&topo.server), addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
    // The parser is lenient; also hold the format's rules: HELP and TYPE once per family,
    // before its samples.
    let mut typed = std::collections::BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().unwrap().to_owned();
            assert!(typed.insert(name.clone()), "TYPE {name} twice");
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(typed.contains(name), "sample {name} before its TYPE");
        }
    }
    parsed
        .samples
        .into_iter()
        .map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                other => panic!("unexpected sample type {other:?}"),
            };
            let mut labels: Vec<(String, String)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            labels.sort();
            ((s.metric, labels), value)
        })
        .collect()
}

fn metric(m: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    want.sort();
    *m.get(&(name.to_owned(), want.clone()))
        .unwrap_or_else(|| panic!("no {name}{want:?} in {:#?}", m.keys().collect::<Vec<_>>()))
}

#[test]
fn control_socket_metrics_reload_and_stop_with_real_packets() {
    require_root();
    let topo = Topology::new();
    let bpffs = BpffsDir::new();
    let state = TempDir::new("apiban-agent-state-");
    let feed = ip("45.9.0.66");
    let manual = ip("45.9.0.77");
    let clean = ip("10.77.0.2");
    for a in [feed, manual] {
        topo.add_attacker_source(a);
    }
    let server = {
        let key = KEY.to_owned();
        in_netns(&topo.server, move || {
            FakeApiban::start_on(&key, "127.0.0.1:0".parse().unwrap())
        })
    };
    server.publish(&["45.9.0.66", "45.10.0.0/24", "2a01:4f8:1::1"]);
    let mut rx = UdpReceiver::bind(&topo.server, SocketAddr::new(topo.server_v4.into(), 5060));
    let metrics_addr: SocketAddr = "127.0.0.1:19477".parse().unwrap();
    let config = state.path.join("config.toml");
    std::fs::write(&config, "allow = [\"45.10.0.9\"]\n").unwrap();
    let sock = state.path.join("run").join("control.sock");
    let args = [
        "--iface",
        &topo.server_if,
        "--bpffs-dir",
        &bpffs.path.display().to_string(),
        "--state-dir",
        &state.path.join("state").display().to_string(),
        "--api-url",
        &server.base_url(),
        "--poll-interval",
        "1s",
        "--metrics-addr",
        &metrics_addr.to_string(),
        "--config",
        &config.display().to_string(),
    ]
    .map(str::to_owned);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = AgentProcess::start(Some(&topo.server), &sock, &args, &[("APIBAN_KEY", KEY)]);

    // The socket is root-only, in a directory only root can enter.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(mode(sock.parent().unwrap()), 0o700);

    wait_until("the full pull", Duration::from_secs(20), || {
        agent.status_json()["sync"]["last_success"].is_u64()
    });
    assert_eq!(probe(&topo, &mut rx, &[feed, manual], clean, N), vec![0, N]);

    // ban: takes effect at once, and persists.
    let out = agent.cli_ok(&[
        "ban",
        "45.9.0.77",
        "--ttl",
        "1d",
        "--comment",
        "REGISTER flood",
    ]);
    assert!(out.contains("banned 45.9.0.77/32 for 1d"), "{out}");
    assert_eq!(probe(&topo, &mut rx, &[feed, manual], clean, N), vec![0, 0]);

    // check: the entry, its source and its hits.
    let check: serde_json::Value =
        serde_json::from_str(&agent.cli_ok(&["check", "45.9.0.66", "--json"])).unwrap();
    assert_eq!(check["verdict"], "banned");
    assert_eq!(check["entry"], "45.9.0.66/32");
    assert_eq!(check["records"][0]["source"], "apiban");
    assert_eq!(check["hits"], serde_json::json!(2 * N));
    let text = agent.cli_ok(&["check", "45.9.0.77"]);
    assert!(
        text.contains("BANNED") && text.contains("manual") && text.contains("REGISTER flood"),
        "{text}"
    );
    let text = agent.cli_ok(&["check", "45.10.0.9"]);
    // Inside a banned /24, but the allowlist carves it out.
    assert!(
        text.contains("ALLOWED") && text.contains("45.10.0.0/24") && text.contains("allowlist"),
        "{text}"
    );

    // list, whole and by source.
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&agent.cli_ok(&["list", "--json"])).unwrap();
    assert_eq!(all.len(), 4, "{all:?}");
    let manual_rows: Vec<serde_json::Value> =
        serde_json::from_str(&agent.cli_ok(&["list", "--json", "--source", "manual"])).unwrap();
    assert_eq!(manual_rows.len(), 1);
    assert_eq!(manual_rows[0]["comment"], "REGISTER flood");

    // status: interfaces, entries, counters, top sources, sync.
    let status = agent.status_json();
    assert_eq!(
        status["agent"]["interfaces"][0]["name"],
        topo.server_if.as_str()
    );
    assert_eq!(status["agent"]["interfaces"][0]["mode"], "native");
    assert_eq!(status["enforced"]["ipv4"], 3);
    assert_eq!(status["enforced"]["ipv6"], 1);
    let dropped = &status["traffic"][topo.server_if.as_str()]["dropped"]["packets"];
    assert_eq!(dropped, &serde_json::json!(3 * N), "{status:#}");
    assert_eq!(status["top"][0]["net"], "45.9.0.66/32");
    assert_eq!(
        status["sync"]["requests"]["ok"].as_u64().map(|n| n >= 2),
        Some(true)
    );
    let text = agent.cli_ok(&["status"]);
    assert!(
        text.contains(&topo.server_if) && text.contains("45.9.0.66/32"),
        "{text}"
    );

    // /metrics agrees, in the Prometheus text format.
    let m = scrape(&topo, metrics_addr);
    let iface = topo.server_if.as_str();
    assert_eq!(
        metric(
            &m,
            "apiban_packets_total",
            &[("iface", iface), ("verdict", "dropped")]
        ),
        (3 * N) as f64
    );
    assert!(
        metric(
            &m,
            "apiban_bytes_total",
            &[("iface", iface), ("verdict", "dropped")]
        ) > 0.0
    );
    assert_eq!(
        metric(
            &m,
            "apiban_entries",
            &[("source", "apiban"), ("family", "ipv4")]
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "apiban_entries",
            &[("source", "manual"), ("family", "ipv4")]
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "apiban_enforced_prefixes", &[("family", "ipv6")]),
        1.0
    );
    assert!(metric(&m, "apiban_api_requests_total", &[("outcome", "ok")]) >= 2.0);
    assert!(metric(&m, "apiban_last_successful_sync_timestamp_seconds", &[]) > 1.7e9);
    assert!(metric(&m, "apiban_state_save_duration_seconds", &[]) > 0.0);
    assert!(metric(&m, "apiban_deny_map_used_ratio", &[("family", "ipv4")]) > 0.0);
    assert_eq!(http_get(Some(&topo.server), metrics_addr, "/nope").0, 404);

    // unban a feed entry: gone now; allow add keeps it out for good.
    let out = agent.cli_ok(&["unban", "45.9.0.66"]);
    assert!(out.contains("held by apiban"), "{out}");
    assert_eq!(probe(&topo, &mut rx, &[feed], clean, N), vec![N]);
    agent.cli_ok(&["allow", "add", "45.9.0.66"]);
    let allow = agent.cli_ok(&["allow", "list"]);
    assert!(
        allow.contains("45.9.0.66/32") && allow.contains("manual"),
        "{allow}"
    );
    assert!(
        allow.contains("45.10.0.9/32") && allow.contains("config"),
        "{allow}"
    );
    let refused = agent.cli(&["allow", "remove", "45.10.0.9"]);
    assert_eq!(refused.status.code(), Some(2), "a refusal is a usage error");
    assert!(
        stderr(&refused).contains("configuration"),
        "{}",
        stderr(&refused)
    );
    agent.cli_ok(&["allow", "remove", "45.9.0.66"]);

    // SIGHUP: the file now allows the manual ban's address; no re-attach, packets pass.
    std::fs::write(&config, "allow = [\"45.10.0.9\", \"45.9.0.77\"]\n").unwrap();
    agent.signal(libc::SIGHUP);
    wait_until("the reload", Duration::from_secs(10), || {
        agent.log_text().contains("configuration reloaded")
    });
    assert_eq!(probe(&topo, &mut rx, &[manual], clean, N), vec![N]);
    // A broken file is refused and changes nothing.
    std::fs::write(&config, "allow = [\"not an address\"]\n").unwrap();
    agent.signal(libc::SIGHUP);
    wait_until("the refused reload", Duration::from_secs(10), || {
        agent.log_text().contains("reload refused")
    });
    assert_eq!(probe(&topo, &mut rx, &[manual], clean, N), vec![N]);
    std::fs::write(&config, "").unwrap();
    agent.signal(libc::SIGHUP);
    wait_until("the second reload", Duration::from_secs(10), || {
        agent.log_text().matches("configuration reloaded").count() == 2
    });
    let got = probe(&topo, &mut rx, &[manual], clean, N);
    assert_eq!(
        got,
        vec![0],
        "{}\n{}",
        agent.cli_ok(&["check", "45.9.0.77"]),
        agent.log_text()
    );

    // SIGTERM: clean exit, the socket is gone, the program keeps enforcing.
    let log = agent.log_text();
    assert!(!log.contains(KEY), "the key appeared in the log");
    let code = agent.stop();
    assert_eq!(code, Some(0));
    assert!(!sock.exists());
    assert_eq!(probe(&topo, &mut rx, &[manual], clean, N), vec![0]);

    // A restart adopts the pins and the state: the manual ban is still there.
    let agent = AgentProcess::start(Some(&topo.server), &sock, &args, &[("APIBAN_KEY", KEY)]);
    let check: serde_json::Value =
        serde_json::from_str(&agent.cli_ok(&["check", "45.9.0.77", "--json"])).unwrap();
    assert_eq!(check["verdict"], "banned");
    assert_eq!(probe(&topo, &mut rx, &[manual], clean, N), vec![0]);
    assert_eq!(agent.stop(), Some(0));
}

/// Under systemd: READY once serving, watchdog pings, RELOADING then READY on SIGHUP,
/// STOPPING on SIGTERM; JSON logs on request. A dry run needs no root and attaches nothing.
#[test]
fn systemd_notify_watchdog_and_json_logs() {
    let dir = TempDir::new("apiban-notify-");
    let notify_path = dir.path.join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("notify socket");
    systemd
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let notify = notify_path.display().to_string();
    let sock = dir.path.join("control.sock");
    let agent = AgentProcess::start(
        None,
        &sock,
        &["--dry-run", "--metrics-addr", "off", "--log-format", "json"],
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "400000")],
    );
    let try_next = || {
        let mut buf = [0u8; 512];
        let n = systemd.recv(&mut buf).ok()?;
        // sd_notify(3) allows a trailing newline; the sd-notify crate sends one.
        Some(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
    };
    let next = || try_next().expect("a notification from the agent within 10s");
    let mut seen = Vec::new();
    while !seen.iter().any(|m: &String| m.starts_with("READY=1")) {
        seen.push(next());
    }
    // Pings at half the watchdog interval: several within a second.
    let mut pings = 0;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        if next() == "WATCHDOG=1" {
            pings += 1;
        }
    }
    assert!(pings >= 3, "{pings} watchdog pings in a second");
    agent.signal(libc::SIGHUP);
    let mut after_hup = Vec::new();
    while !after_hup.iter().any(|m: &String| m.starts_with("READY=1")) {
        let m = next();
        if m != "WATCHDOG=1" {
            after_hup.push(m);
        }
    }
    assert!(
        after_hup[0].starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{after_hup:?}"
    );
    let log = agent.log_text();
    let code = agent.stop();
    assert_eq!(code, Some(0));
    let mut stopping = false;
    while let Some(m) = try_next() {
        if m.starts_with("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1");
    for line in log.lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
}

/// An interface without Ethernet headers (tun, WireGuard) is refused at start, naming what
/// it is: the program would read IP bytes as an Ethernet header and let everything pass
/// while `status` said it enforced.
#[test]
fn a_tun_interface_is_refused_naming_what_it_is() {
    require_root();
    let topo = Topology::new();
    topo.server
        .exec("ip", &["tuntap", "add", "dev", "aptun0", "mode", "tun"]);
    topo.server.exec("ip", &["link", "set", "aptun0", "up"]);
    let bpffs = BpffsDir::new();
    let dir = TempDir::new("apiban-tun-");
    let path = |p: &str| dir.path.join(p).display().to_string();
    let key = path("key");
    std::fs::write(&key, KEY).expect("a key file");
    let out = tests::agent::apiban_in(
        &topo.server,
        &[
            "run",
            "--iface",
            "aptun0",
            "--bpffs-dir",
            &bpffs.path.display().to_string(),
            "--state-dir",
            &path("state"),
            "--control-socket",
            &path("control.sock"),
            "--metrics-addr",
            "off",
            "--api-key-file",
            &key,
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("aptun0") && err.contains("not Ethernet") && err.contains("tun"),
        "{err}"
    );
}
