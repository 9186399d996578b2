//! The ban API with the SIP proxy operators run: a real Kamailio in the server namespace,
//! configured with the pike + http_client snippet docs/operating.md gives, calls /addip when a
//! source floods it, and the XDP program drops that source from then on. The other calls
//! (removeip, a refused ban, a token) are driven over HTTP like a proxy would.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    time::Duration,
};

use tests::{
    agent::http_get, attackers::Tool, in_netns, require_root, scene::Scene, send_udp, wait_until,
};

const N: usize = 20;
const KAMAILIO_PORT: u16 = 5064;
const BAN_API: &str = "127.0.0.1:18082";
/// The token the package makes at install is 64 hex digits; this one stands for it.
const TOKEN: &str = "5f0c3a9e1b7d24680aceb13579bdf02468ace13579bdf02468ace13579bdf024";

fn kamailio() -> PathBuf {
    let bin = PathBuf::from("/usr/sbin/kamailio");
    assert!(
        bin.exists()
            && Path::new("/usr/lib/x86_64-linux-gnu/kamailio/modules/http_client.so").exists(),
        "Kamailio is missing: `cargo xtask test` installs it (Debian: apt-get install kamailio \
         kamailio-utils-modules)"
    );
    bin
}

/// docs/operating.md's snippet, around a proxy that answers everything else 200.
fn kamailio_cfg(listen: SocketAddr) -> String {
    format!(
        r#"#!KAMAILIO
#!define APIBAN_TOKEN "{TOKEN}"
debug=2
log_stderror=yes
children=2
listen=udp:{listen}
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "kex.so"
loadmodule "pv.so"
loadmodule "sl.so"
loadmodule "xlog.so"
loadmodule "pike.so"
loadmodule "htable.so"
loadmodule "http_client.so"
modparam("pike", "sampling_time_unit", 2)
modparam("pike", "reqs_density_per_unit", 16)
modparam("pike", "remove_latency", 4)
modparam("htable", "htable", "ipban=>size=8;autoexpire=600;")
modparam("http_client", "connection_timeout", 2)

request_route {{
    if ($sht(ipban=>$si) != $null) {{
        exit;
    }}
    if (!pike_check_req()) {{
        xlog("L_ALERT", "ALERT: pike blocking $rm from $fu (IP:$si:$sp)\n");
        $sht(ipban=>$si) = 1;
        $var(auth) = "Authorization: Bearer " + APIBAN_TOKEN;
        http_client_query("http://{BAN_API}/addip/$si", "", "$var(auth)", "$var(apinfo)");
        xlog("L_ALERT", "ban API said: $var(apinfo)\n");
        exit;
    }}
    sl_send_reply("200", "OK");
    exit;
}}

event_route[htable:expired:ipban] {{
    $var(auth) = "Authorization: Bearer " + APIBAN_TOKEN;
    http_client_query("http://{BAN_API}/removeip/$shtrecord(key)", "", "$var(auth)", "$var(apinfo)");
}}
"#
    )
}

/// Whether Kamailio answers an OPTIONS from `src` (in the attacker namespace).
fn answers(s: &Scene, src: IpAddr, kamailio: SocketAddr) -> bool {
    in_netns(&s.topo.attacker, move || {
        // The request's Via names port 5060, where Kamailio sends its answer.
        let socket = UdpSocket::bind(SocketAddr::new(src, 5060)).expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let request = tests::traffic::sip_options(src, kamailio, 0);
        let _ = socket.send_to(request.as_bytes(), kamailio);
        let mut buf = [0u8; 2048];
        matches!(socket.recv_from(&mut buf), Ok((n, _)) if buf[..n].starts_with(b"SIP/2.0 200"))
    })
}

#[test]
fn kamailio_pike_bans_a_flooding_source_through_the_api_and_xdp_drops_it() {
    require_root();
    let bin = kamailio();
    let mut s = Scene::new();
    let flooder = s.source("45.95.0.1");
    let caller = s.source("45.95.0.2");
    // The probes' User-Agent is a scanner's: detection stays out of this test.
    let token_file = s.dir.path.join("ban-api-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write the token");
    let token_arg = token_file.display().to_string();
    s.start(&[
        "--ban-api",
        BAN_API,
        "--ban-api-token-file",
        &token_arg,
        "--detect",
        "off",
        "--allow",
        "45.95.9.0/24",
    ]);
    let kamailio_addr = SocketAddr::new(s.topo.server_v4.into(), KAMAILIO_PORT);
    let cfg = s.dir.path.join("kamailio.cfg");
    std::fs::write(&cfg, kamailio_cfg(kamailio_addr)).expect("write kamailio.cfg");
    let cfg_arg = cfg.display().to_string();
    let mut check = Tool::start(
        &s.topo.server,
        &bin,
        &["-c", "-f", &cfg_arg],
        s.dir.path.join("kamailio-check.log"),
    );
    assert_eq!(
        check.wait(Duration::from_secs(10)),
        Some(0),
        "kamailio -c rejects the config:\n{}",
        check.output()
    );
    let mut proxy = Tool::start(
        &s.topo.server,
        &bin,
        &["-DD", "-E", "-f", &cfg_arg],
        s.dir.path.join("kamailio.log"),
    );
    let mut tries = 0;
    while !answers(&s, caller, kamailio_addr) {
        tries += 1;
        assert!(
            proxy.running() && tries < 30,
            "Kamailio does not answer:\n{}",
            proxy.output()
        );
    }

    // A flood past pike's 16 requests per 2 s: Kamailio bans it through the API...
    send_udp(&s.topo.attacker, flooder, kamailio_addr, 200);
    s.wait_verdict(flooder, "banned", Duration::from_secs(10));
    // What docs/operating.md shows (run with --nocapture).
    println!("{}", s.agent().cli_ok(&["check", "45.95.0.1"]));
    let said = s.check("45.95.0.1");
    assert_eq!(said["records"][0]["source"], "api", "{said}");
    wait_until(
        "Kamailio logs the API's answer",
        Duration::from_secs(5),
        || {
            proxy
                .output()
                .contains(r#"ban API said: {"success":"added"}"#)
        },
    );
    for line in proxy.output().lines().filter(|l| l.contains("ALERT")) {
        println!("{line}");
    }
    // ...and XDP drops it from then on; the caller still gets through.
    assert_eq!(s.probe(&[flooder], N), vec![0]);
    assert!(
        !answers(&s, flooder, kamailio_addr),
        "the flooder reached Kamailio"
    );
    assert!(answers(&s, caller, kamailio_addr));

    // What a proxy's other calls get, the way iptables-api answers them.
    let api: SocketAddr = BAN_API.parse().expect("literal");
    let bearer = format!("Bearer {TOKEN}");
    let get = |s: &Scene, path: &str| {
        let r = tests::agent::http_request(
            Some(&s.topo.server),
            api,
            "GET",
            path,
            &[("Authorization", &bearer)],
        );
        (r.code, r.body)
    };
    // Without the token, nothing: a local user or a forged request from a local web
    // application bans nothing.
    let (code, body) = http_get(Some(&s.topo.server), api, "/addip/45.95.0.8");
    assert_eq!(code, 401, "{body}");
    assert_eq!(s.check("45.95.0.8")["verdict"], "not banned");
    let (code, body) = get(&s, "/blockip/45.95.9.9");
    assert_eq!(code, 400, "the allowlist wins: {body}");
    assert!(
        body.starts_with(r#"{"error":"error adding address""#) && body.contains("allowlisted"),
        "{body}"
    );
    assert_eq!(
        get(&s, "/addip/nonsense"),
        (
            400,
            "{\"error\":\"only valid ip addresses supported\"}\n".to_owned()
        )
    );
    assert_eq!(
        get(&s, "/removeip/45.95.0.1"),
        (200, "{\"success\":\"removed\"}\n".to_owned())
    );
    s.wait_verdict(flooder, "not banned", Duration::from_secs(5));
    assert_eq!(s.probe(&[flooder], N), vec![N]);
    assert_eq!(
        get(&s, "/removeip/45.95.0.1"),
        (200, "{\"success\":\"removed\"}\n".to_owned()),
        "removing what is not there succeeds, as iptables-api's does"
    );
    assert_eq!(get(&s, "/addip/45.95.0.3").0, 200);
    assert_eq!(
        get(&s, "/flushchain"),
        (200, "{\"success\":\"flushed\"}\n".to_owned())
    );
    assert_eq!(s.check("45.95.0.3")["verdict"], "not banned");

    // Reloads, by SIGHUP and by `apiban reload`, keep the agent and its ban API serving.
    s.agent().signal(libc::SIGHUP);
    s.agent().cli_ok(&["reload"]);
    assert!(
        s.agent_running(),
        "the agent stopped on reload:\n{}",
        s.agent().log_text()
    );
    assert_eq!(get(&s, "/addip/45.95.0.4").0, 200);
    assert_eq!(s.check("45.95.0.4")["verdict"], "banned");
}
