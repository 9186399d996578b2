//! packaging/apiban.service: systemd accepts it as written, and the capabilities it grants
//! are enough for the real agent to load, attach and drop.

use std::{net::SocketAddr, path::Path, process::Command};

use tests::{
    BpffsDir, Topology, UdpReceiver,
    agent::{AgentProcess, apiban_bin},
    probe, require_root,
    sync_harness::TempDir,
};

fn unit_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/apiban.service");
    std::fs::read_to_string(&path).expect("packaging/apiban.service")
}

fn unit_value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit has no {key}="))
        .to_owned()
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    // systemd-analyze checks that ExecStart's binary exists: point it at the one just built.
    let text = unit_text().replace("/usr/local/bin/apiban", &apiban_bin().display().to_string());
    let dir = TempDir::new("apiban-unit-");
    let unit = dir.path.join("apiban.service");
    std::fs::write(&unit, text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect(
            "systemd-analyze is needed to verify the unit (Debian: apt-get install systemd; \
             `cargo xtask setup` installs it)",
        );
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys and bad values, and only says so on stderr.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    let text = unit_text();
    assert_eq!(unit_value(&text, "Type"), "notify");
    // After a reboot the saved bans are enforced before the network is configured.
    assert!(
        unit_value(&text, "Before").contains("network-pre.target"),
        "the unit must start before network-pre.target"
    );
    assert!(unit_value(&text, "Wants").contains("network-pre.target"));
    assert!(
        !text.contains("network-online.target"),
        "waiting for the network to be online leaves it unprotected until then"
    );
    assert!(unit_value(&text, "ExecStart").contains("--api-key-file %d/apiban-key"));
    assert!(unit_value(&text, "LoadCredential").starts_with("apiban-key:"));
    assert_eq!(unit_value(&text, "ProtectSystem"), "strict");
}

/// A stand-in for what configures the network (systemd-networkd, ifupdown's
/// networking.service, NetworkManager all order after network-pre.target): a transaction
/// that starts it with apiban must be free of ordering cycles, and apiban comes first.
#[test]
fn the_unit_orders_before_network_configuration_without_a_cycle() {
    let dir = TempDir::new("apiban-unit-order-");
    let text = unit_text().replace("/usr/local/bin/apiban", &apiban_bin().display().to_string());
    std::fs::write(dir.path.join("apiban.service"), text).unwrap();
    let standin = dir.path.join("apiban-test-network.service");
    std::fs::write(
        &standin,
        "[Unit]\nDescription=stands in for the network configuration\n\
         Wants=network-pre.target apiban.service\nAfter=network-pre.target\n\
         Before=network.target\n[Service]\nType=oneshot\nExecStart=/bin/true\n",
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&standin)
        .output()
        .expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    // The same check catches a cycle: make apiban wait for the network it must precede.
    let cyclic = unit_text()
        .replace("/usr/local/bin/apiban", &apiban_bin().display().to_string())
        .replace(
            "Before=network-pre.target",
            "Before=network-pre.target\nAfter=apiban-test-network.service",
        );
    std::fs::write(dir.path.join("apiban.service"), cyclic).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&standin)
        .output()
        .expect("systemd-analyze");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cycl"),
        "the cycle check must be able to fail: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_units_capabilities_are_enough_to_enforce() {
    require_root();
    let caps: Vec<String> = unit_value(&unit_text(), "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect();
    let bounding = format!(
        "--bounding-set=-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let topo = Topology::new();
    let bpffs = BpffsDir::new();
    let state = TempDir::new("apiban-caps-");
    let banned = "45.9.3.3".parse().unwrap();
    topo.add_attacker_source(banned);
    let mut rx = UdpReceiver::bind(&topo.server, SocketAddr::new(topo.server_v4.into(), 5060));
    let sock = state.path.join("control.sock");
    let args = [
        "--iface".to_owned(),
        topo.server_if.clone(),
        "--bpffs-dir".to_owned(),
        bpffs.path.display().to_string(),
        "--state-dir".to_owned(),
        state.path.join("state").display().to_string(),
        "--metrics-addr".to_owned(),
        "off".to_owned(),
        // The socket handed to a group: chown, under the unit's capabilities.
        "--control-group".to_owned(),
        "nogroup".to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = AgentProcess::start_wrapped(
        &["setpriv", &bounding, "--inh-caps=-all"],
        Some(&topo.server),
        &sock,
        &args,
        &[],
    );
    {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(&sock).expect("the control socket");
        assert_eq!(meta.gid(), 65534, "the socket belongs to nogroup");
        assert_eq!(
            meta.mode() & 0o070,
            0o060,
            "the group may use it: {:o}",
            meta.mode()
        );
    }
    agent.cli_ok(&["ban", "45.9.3.3"]);
    let clean = "10.77.0.2".parse().unwrap();
    assert_eq!(probe(&topo, &mut rx, &[banned], clean, 10), vec![0]);
    // The egress classifier too, checked with the kernel without CAP_SYS_ADMIN.
    let status = agent.status_json();
    assert_eq!(
        status["agent"]["interfaces"][0]["egress"],
        "tcx",
        "{status}\n{}",
        agent.log_text()
    );
    assert_eq!(agent.stop(), Some(0));
}
