//! `apiban capture` the way an operator runs it: the real agent in a server namespace, floods
//! of SIP OPTIONS from banned, observed and clean sources over a veth pair, and the capture
//! read back by Debian's tshark, from a file and through a pipe. The program's capture switch
//! is read from the pinned CONFIG map: on only while a capture runs, off however it ended.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use apiban_common::{DataplaneConfig, map_names};
use aya::maps::{Array, Map, MapData};
use tests::{attackers::Tool, require_root, scene::Scene, send_udp, wait_until};

fn tshark() -> PathBuf {
    let bin = PathBuf::from("/usr/bin/tshark");
    assert!(
        bin.exists(),
        "tshark is missing: `cargo xtask test` installs it (Debian: apt-get install tshark)"
    );
    bin
}

/// Whether the program's capture switch is on, from the pinned CONFIG map.
fn capturing(s: &Scene) -> bool {
    let pin = s.bpffs.path.join(map_names::CONFIG);
    let map = MapData::from_pin(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    let config: Array<MapData, DataplaneConfig> =
        Array::try_from(Map::Array(map)).expect("CONFIG is an array");
    config.get(&0, 0).expect("CONFIG[0]").flags & DataplaneConfig::CAPTURE != 0
}

/// `apiban capture ARGS` against the scene's agent, in the background.
fn capture(s: &Scene, args: &[&str], log: &str) -> Tool {
    let socket = s.control_socket().display().to_string();
    let mut full: Vec<&str> = vec!["capture"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--control-socket", &socket]);
    let bin = tests::agent::apiban_bin();
    let tool = Tool::start(&s.topo.server, bin, &full, s.dir.path.join(log));
    wait_started(&tool);
    tool
}

/// Through a shell, for pipes: `apiban` is the agent's binary.
fn capture_sh(s: &Scene, script: &str, log: &str) -> Tool {
    let script = format!(
        "set -o pipefail; apiban() {{ {} \"$@\" --control-socket {}; }}; {script}",
        tests::agent::apiban_bin().display(),
        s.control_socket().display()
    );
    let tool = Tool::start(
        &s.topo.server,
        Path::new("/bin/bash"),
        &["-c", &script],
        s.dir.path.join(log),
    );
    wait_started(&tool);
    tool
}

fn wait_started(tool: &Tool) {
    wait_until("the capture to start", Duration::from_secs(10), || {
        tool.output().contains("Ctrl-C stops")
    });
}

fn unix_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// `tshark -r FILE -T fields -e ...`: one Vec of fields per packet.
fn tshark_fields(file: &Path, fields: &[&str]) -> Vec<Vec<String>> {
    let mut args = vec!["-r".to_owned(), file.display().to_string()];
    args.extend(["-T".to_owned(), "fields".to_owned()]);
    for f in fields {
        args.extend(["-e".to_owned(), (*f).to_owned()]);
    }
    let out = std::process::Command::new(tshark())
        .args(&args)
        .output()
        .expect("run tshark");
    assert!(
        out.status.success(),
        "tshark -r {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

#[test]
fn a_flood_captured_to_pcap_reads_back_in_tshark_with_its_sources_and_method() {
    require_root();
    tshark();
    let mut s = Scene::new();
    s.api.publish(&["45.95.7.1"]);
    let apiban_src = s.source("45.95.7.1");
    let manual_src = s.source("45.95.8.9");
    let trial_src = s.source("45.96.0.1");
    let clean = s.source("45.95.9.9");
    let list = s.dir.path.join("trial.txt");
    std::fs::write(&list, "45.96.0.1\n").expect("write the list");
    let list_arg = format!("trial={},mode=observe", list.display());
    // The probes' User-Agent is a scanner's: detection stays out of this test.
    s.start(&["--detect", "off", "--list", &list_arg]);
    s.wait_synced(Duration::from_secs(20));
    s.agent().cli_ok(&["ban", "45.95.8.0/24"]);
    s.wait_verdict(apiban_src, "banned", Duration::from_secs(10));
    s.wait_verdict(trial_src, "observed", Duration::from_secs(20));
    let dst = SocketAddr::new(s.topo.server_v4.into(), 5060);
    assert!(
        !capturing(&s),
        "the capture switch is on with no capture running"
    );

    // To a file, the first 50 dropped packets: from the banned sources only.
    let pcap = s.dir.path.join("drops.pcap");
    let pcap_arg = pcap.display().to_string();
    let mut file = capture(&s, &["-w", &pcap_arg, "--count", "50"], "capture-file.log");
    assert!(capturing(&s), "no capture switch while a capture runs");
    let from = unix_secs();
    for src in [apiban_src, manual_src, clean, trial_src] {
        send_udp(&s.topo.attacker, src, dst, 40);
    }
    assert_eq!(
        file.wait(Duration::from_secs(20)),
        Some(0),
        "{}",
        file.output()
    );
    let to = unix_secs();
    assert!(
        file.output().contains("50 packets captured") && file.output().contains("count reached"),
        "{}",
        file.output()
    );
    wait_until("the capture switch off", Duration::from_secs(5), || {
        !capturing(&s)
    });
    let rows = tshark_fields(
        &pcap,
        &["frame.time_epoch", "ip.src", "udp.dstport", "sip.Method"],
    );
    assert_eq!(rows.len(), 50, "{rows:?}");
    let mut by_source = std::collections::BTreeMap::<String, usize>::new();
    for row in &rows {
        let at: f64 = row[0].parse().expect("a time");
        // The program's own time of each packet, within the flood's window.
        assert!(
            at >= from - 1.0 && at <= to + 1.0,
            "time {at} outside {from}..{to}"
        );
        assert_eq!((&row[2][..], &row[3][..]), ("5060", "OPTIONS"), "{row:?}");
        *by_source.entry(row[1].clone()).or_default() += 1;
    }
    assert_eq!(
        by_source,
        [("45.95.7.1".to_owned(), 40), ("45.95.8.9".to_owned(), 10)].into(),
        "only banned sources, in the order they came"
    );
    // What docs/operating.md shows.
    let summary = std::process::Command::new(tshark())
        .args(["-r", &pcap_arg, "-c", "2"])
        .output()
        .expect("tshark");
    println!(
        "$ apiban capture -w drops.pcap --count 50\n{}$ tshark -r drops.pcap -c 2\n{}",
        file.output(),
        String::from_utf8_lossy(&summary.stdout)
    );

    // Through a pipe into tshark, one source only.
    let mut piped = capture_sh(
        &s,
        "apiban capture -w - --source manual --count 10 | /usr/bin/tshark -r - -T fields -e ip.src -e sip.Method",
        "capture-pipe.log",
    );
    for src in [apiban_src, manual_src] {
        send_udp(&s.topo.attacker, src, dst, 20);
    }
    assert_eq!(
        piped.wait(Duration::from_secs(20)),
        Some(0),
        "{}",
        piped.output()
    );
    let out = piped.output();
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("45.")).collect();
    assert_eq!(lines, vec!["45.95.8.9\tOPTIONS"; 10], "{out}");
    assert!(out.contains("20 of other sources left out"), "{out}");

    // Observed packets, one line each; then a second capture is refused while one runs.
    let mut lines = capture(
        &s,
        &["--verdict", "observed", "--count", "5"],
        "capture-lines.log",
    );
    let busy = s.agent().cli(&["capture", "-w", "/dev/null"]);
    assert_eq!(busy.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("a capture is already running"),
        "{busy:?}"
    );
    send_udp(&s.topo.attacker, trial_src, dst, 5);
    assert_eq!(
        lines.wait(Duration::from_secs(20)),
        Some(0),
        "{}",
        lines.output()
    );
    let out = lines.output();
    let observed: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(" observed 45.96.0.1:"))
        .collect();
    assert_eq!(observed.len(), 5, "{out}");
    let server = s.topo.server_v4;
    assert!(
        observed.iter().all(|l| l.ends_with("[list:trial]")
            && l.contains(&format!("> {server}:5060 UDP"))
            && l.contains(&format!("\"OPTIONS sip:{server} SIP/2.0\""))),
        "{out}"
    );
    println!("$ apiban capture --verdict observed --count 5\n{out}");
}

#[test]
fn the_rate_cap_holds_and_the_switch_goes_off_however_the_capture_ends() {
    require_root();
    let mut s = Scene::new();
    let banned = s.source("45.97.0.1");
    s.start(&["--detect", "off"]);
    s.agent().cli_ok(&["ban", "45.97.0.1"]);
    s.wait_verdict(banned, "banned", Duration::from_secs(10));
    let dst = SocketAddr::new(s.topo.server_v4.into(), 5060);

    // Ten a second at most: a flood of 2,000 in well under two seconds gives at most 30.
    let pcap = s.dir.path.join("capped.pcap");
    let pcap_arg = pcap.display().to_string();
    let mut capped = capture(&s, &["-w", &pcap_arg, "--rate", "10"], "capture-capped.log");
    send_udp(&s.topo.attacker, banned, dst, 2000);
    std::thread::sleep(Duration::from_millis(300));
    // Ctrl-C: the client asks the agent to stop and prints the summary.
    capped.signal(libc::SIGINT);
    assert_eq!(
        capped.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        capped.output()
    );
    let out = capped.output();
    let captured: u64 = out
        .split(" packets captured")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {out}"));
    assert!((1..=30).contains(&captured), "{out}");
    let over: u64 = out
        .split(" over the rate cap")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no over-cap count in {out}"));
    assert_eq!(captured + over, 2000, "{out}");
    assert_eq!(tshark_fields(&pcap, &["ip.src"]).len() as u64, captured);
    assert!(!capturing(&s), "the switch stayed on after Ctrl-C");

    // A client killed outright: the agent sees the socket close and switches off.
    let killed = capture(&s, &["-w", "/dev/null"], "capture-killed.log");
    assert!(capturing(&s));
    drop(killed);
    wait_until(
        "the switch off after the client died",
        Duration::from_secs(5),
        || !capturing(&s),
    );
    // An agent stopped mid-capture leaves the program attached, not capturing.
    let _running = capture(&s, &["-w", "/dev/null"], "capture-stopped.log");
    assert!(capturing(&s));
    assert_eq!(s.stop(), Some(0));
    assert!(
        !capturing(&s),
        "the program left attached goes on capturing"
    );
}

/// A client that stops reading (Ctrl-Z) no longer holds the capture: after 10 s the agent
/// ends it and switches the copy off, and the next capture starts. The pcap file holds SIP
/// payloads and digests: it is created readable by its owner alone, whatever the umask.
#[test]
fn a_stopped_client_is_cut_off_and_its_pcap_is_private() {
    use std::os::unix::fs::PermissionsExt as _;
    require_root();
    let mut s = Scene::new();
    let banned = s.source("45.97.0.2");
    s.start(&["--detect", "off"]);
    s.agent().cli_ok(&["ban", "45.97.0.2"]);
    s.wait_verdict(banned, "banned", Duration::from_secs(10));
    let dst = SocketAddr::new(s.topo.server_v4.into(), 5060);
    let pcap = s.dir.path.join("private.pcap");
    let pcap_arg = pcap.display().to_string();
    let stopped = capture_sh(
        &s,
        &format!("umask 022; apiban capture -w {pcap_arg} --rate 100000"),
        "capture-stopped-client.log",
    );
    let mode = std::fs::metadata(&pcap)
        .expect("the pcap")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the pcap's mode: {mode:o}");
    stopped.signal(libc::SIGSTOP);
    // Far more than the socket holds: the agent's writes block.
    send_udp(&s.topo.attacker, banned, dst, 20_000);
    let started = std::time::Instant::now();
    wait_until(
        "the agent to end the stalled capture",
        Duration::from_secs(30),
        || !capturing(&s),
    );
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "ended before the client could be called stalled"
    );
    wait_until("the agent to say why", Duration::from_secs(5), || {
        s.agent().log_text().contains("the client stopped reading")
    });
    // The session lets go of the capture right after it switched the copy off.
    std::thread::sleep(Duration::from_millis(500));
    let next = capture(&s, &["-w", "/dev/null"], "capture-next.log");
    assert!(capturing(&s), "{}", next.output());
    stopped.signal(libc::SIGCONT);
}
