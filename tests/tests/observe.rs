//! Observe mode, the way an operator trials a list: the real agent in a server namespace, a
//! list in observe mode beside APIBAN in enforce mode, real datagrams over a veth pair. What
//! arrives is the ground truth; `check`, `status` and /metrics must say the same, and the
//! switch to enforce (config file + SIGHUP) must keep the entry and the program in place.

use std::{net::SocketAddr, time::Duration};

use tests::{agent::http_get, require_root, scene::Scene};

const N: usize = 20;
const FAST: [&str; 4] = ["--poll-interval", "1s", "--rate-limit", "20/2s"];

fn config(list: &std::path::Path, mode: &str) -> String {
    format!(
        "manual-mode = \"observe\"\nlist-refresh = \"1s\"\n\n[[list]]\nname = \"trial\"\n\
         location = \"{}\"\nmode = \"{mode}\"\n",
        list.display()
    )
}

/// The ID of the XDP program on the scene's server interface.
fn xdp_prog_id(s: &Scene) -> u64 {
    let out = s
        .topo
        .server
        .exec("ip", &["-j", "link", "show", "dev", &s.topo.server_if]);
    let links: serde_json::Value = serde_json::from_str(&out).expect("ip -j answers JSON");
    links[0]["xdp"]["prog"]["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no XDP program on {}: {out}", s.topo.server_if))
}

fn source_row(status: &serde_json::Value, source: &str) -> serde_json::Value {
    status["sources"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["source"] == source).cloned())
        .unwrap_or_else(|| panic!("no {source} in status sources: {status}"))
}

#[test]
fn a_list_on_trial_is_counted_not_dropped_then_enforced_in_place() {
    require_root();
    let mut s = Scene::new();
    s.api.publish(&["45.90.0.2"]);
    let trial4 = s.source("45.90.0.1");
    let trial6 = s.source("2a01:4f8:90::1");
    let enforced = s.source("45.90.0.2");
    let manual = s.source("45.90.0.5");
    let list = s.dir.path.join("trial.txt");
    std::fs::write(&list, "45.90.0.1\n2a01:4f8:90::/64\n").expect("write the list");
    let config_file = s.dir.path.join("config.toml");
    std::fs::write(&config_file, config(&list, "observe")).expect("write the config");
    let metrics: SocketAddr = "127.0.0.1:19491".parse().expect("literal");
    let config_arg = config_file.display().to_string();
    // The probes' User-Agent is a scanner's: detection stays out of this test.
    let mut args = vec![
        "--config",
        &config_arg,
        "--metrics-addr",
        "127.0.0.1:19491",
        "--detect",
        "off",
    ];
    args.extend(FAST);
    s.start(&args);
    s.wait_synced(Duration::from_secs(20));
    s.wait_verdict(trial4, "observed", Duration::from_secs(20));
    s.wait_verdict(trial6, "observed", Duration::from_secs(20));

    // Observed sources get through; APIBAN's, in enforce mode, does not.
    assert_eq!(s.probe(&[trial4, enforced], N), vec![N, 0]);
    assert_eq!(s.probe(&[trial6], N), vec![N]);

    let text = s.agent().cli_ok(&["check", "45.90.0.1"]);
    assert!(
        text.contains("45.90.0.1 is OBSERVED: would be dropped by list:trial (observe)"),
        "{text}"
    );
    let check = s.check("45.90.0.1");
    assert_eq!(check["hits"], N, "{check}");
    let status = s.status();
    let iface = &status["traffic"][&s.topo.server_if];
    // IPv6 adds the attacker's neighbour solicitations from the observed source.
    let observed = iface["observed"]["packets"].as_u64().expect("a count");
    assert!(
        (2 * N as u64..2 * N as u64 + 5).contains(&observed),
        "{status}"
    );
    assert_eq!(iface["dropped"]["packets"], N, "{status}");
    let trial = source_row(&status, "list:trial");
    assert_eq!(
        (&trial["mode"], &trial["observed"], &trial["dropped"]),
        (&"observe".into(), &observed.into(), &0.into()),
        "{status}"
    );
    let apiban = source_row(&status, "apiban");
    assert_eq!(
        (&apiban["mode"], &apiban["dropped"]),
        (&"enforce".into(), &N.into()),
        "{status}"
    );
    let text = s.agent().cli_ok(&["status"]);
    assert!(text.contains("observed: would be dropped"), "{text}");
    // What docs/operating.md shows (run with --nocapture).
    println!("{}\n{text}", s.agent().cli_ok(&["check", "45.90.0.1"]));
    let (code, body) = http_get(Some(&s.topo.server), metrics, "/metrics");
    assert_eq!(code, 200);
    for line in [
        format!(
            "apiban_packets_total{{iface=\"{}\",verdict=\"observed\"}} {observed}",
            s.topo.server_if,
        ),
        "apiban_source_observing{source=\"list:trial\"} 1".to_owned(),
        "apiban_source_observing{source=\"apiban\"} 0".to_owned(),
        format!(
            "apiban_source_matched_packets{{source=\"list:trial\",verdict=\"observed\"}} {observed}"
        ),
    ] {
        assert!(body.contains(&line), "no `{line}` in:\n{body}");
    }

    // Manual bans observe too in this configuration.
    let said = s.agent().cli_ok(&["ban", "45.90.0.5"]);
    assert!(said.contains("manual bans observe"), "{said}");
    assert_eq!(s.check("45.90.0.5")["verdict"], "observed");
    assert_eq!(s.probe(&[manual], N), vec![N]);

    // Observe -> enforce by a reload: the same entry, hit count and program, now dropping.
    let prog = xdp_prog_id(&s);
    std::fs::write(&config_file, config(&list, "enforce")).expect("rewrite the config");
    s.agent().signal(libc::SIGHUP);
    s.wait_verdict(trial4, "banned", Duration::from_secs(10));
    s.wait_verdict(trial6, "banned", Duration::from_secs(10));
    assert_eq!(s.probe(&[trial4], N), vec![0]);
    assert_eq!(s.probe(&[trial6], N), vec![0]);
    assert_eq!(xdp_prog_id(&s), prog, "switching re-attached the program");
    let check = s.check("45.90.0.1");
    assert_eq!(
        check["hits"],
        2 * N,
        "the entry's count went on: it never left the map ({check})"
    );
    let status = s.status();
    let iface = &status["traffic"][&s.topo.server_if];
    // Only the manual ban's probe observed since; the rest dropped.
    let observed_now = iface["observed"]["packets"].as_u64().expect("a count");
    assert!(
        (observed + N as u64..observed + N as u64 + 5).contains(&observed_now),
        "{status}"
    );
    let dropped = iface["dropped"]["packets"].as_u64().expect("a count");
    assert!(
        (3 * N as u64..3 * N as u64 + 5).contains(&dropped),
        "{status}"
    );
    let trial = source_row(&status, "list:trial");
    assert_eq!(trial["mode"], "enforce", "{status}");
}
