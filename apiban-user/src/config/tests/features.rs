//! What each feature's settings need: the fleet, sources' modes, the ban API, detection,
//! CrowdSec.

use super::*;

#[test]
fn fleet_flags_come_together_or_not_at_all() {
    let err = |a: &[&str]| {
        resolve(&args(a), None, FileConfig::default())
            .unwrap_err()
            .to_string()
    };
    let base = ["--iface", "e", "--node-name", "n1"];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }
    let with = |extra: &[&'static str]| with(&base, extra);
    let c = resolve(
        &args(&with(&[
            "--cluster",
            "http://10.0.0.5:2379,http://10.0.0.6:2379",
        ])),
        None,
        FileConfig::default(),
    )
    .unwrap();
    let cluster = c.cluster.expect("a fleet node");
    assert_eq!(cluster.endpoints.len(), 2);
    assert_eq!(cluster.prefix, DEFAULT_CLUSTER_PREFIX);
    assert!(cluster.tls.is_none() && cluster.user.is_none());
    assert!(err(&with(&["--cluster", "10.0.0.5:2379"])).starts_with("cluster:"));
    assert!(err(&with(&["--cluster", "https://e:2379"])).starts_with("cluster-ca:"));
    assert!(
        err(&with(&[
            "--cluster",
            "http://e:2379",
            "--cluster-ca",
            "/ca.pem"
        ]))
        .starts_with("cluster-ca:")
    );
    assert!(
        err(&with(&[
            "--cluster",
            "https://e:2379",
            "--cluster-ca",
            "/ca.pem",
            "--cluster-cert",
            "/c.pem"
        ]))
        .starts_with("cluster-cert:")
    );
    assert!(
        err(&with(&[
            "--cluster",
            "http://e:2379",
            "--cluster-user",
            "u"
        ]))
        .starts_with("cluster-user:")
    );
    assert!(
        err(&with(&[
            "--cluster",
            "http://e:2379",
            "--cluster-prefix",
            "nope"
        ]))
        .starts_with("cluster-prefix:")
    );
    let c = resolve(
        &args(&with(&[
            "--cluster",
            "https://e:2379",
            "--cluster-ca",
            "/ca.pem",
            "--cluster-cert",
            "/c.pem",
            "--cluster-key",
            "/k.pem",
            "--cluster-user",
            "apiban",
            "--cluster-password-file",
            "/run/pw",
        ])),
        None,
        FileConfig::default(),
    )
    .unwrap();
    let cluster = c.cluster.expect("a fleet node");
    assert!(cluster.tls.as_ref().is_some_and(|t| t.identity.is_some()));
    assert_eq!(cluster.user, Some(("apiban".into(), "/run/pw".into())));
}

#[test]
fn each_source_has_a_mode_from_flags_or_the_file() {
    use crate::ledger::SourceId;
    let a = args(&[
        "--iface",
        "eth0",
        "--list",
        "voipbl=https://example.net/v.txt,mode=observe,local=/etc/l.txt",
        "--apiban-mode",
        "observe",
        "--detect",
        "enforce",
    ]);
    let c = resolve(&a, None, FileConfig::default()).unwrap();
    assert_eq!(c.lists.len(), 2);
    assert_eq!(
        c.engine.observe,
        BTreeSet::from([SourceId::Apiban, SourceId::List("voipbl".into())])
    );
    // Detection's observe mode adds no entries: its source is not among them.
    let f = file(
        "manual-mode = \"observe\"\n[[list]]\nname = \"p\"\nlocation = \"/x\"\nmode = \"observe\"\n",
    );
    let c = resolve(&args(&["--iface", "eth0"]), None, f).unwrap();
    assert_eq!(
        c.engine.observe,
        BTreeSet::from([SourceId::Manual, SourceId::List("p".into())])
    );
    let e = resolve(
        &args(&["--iface", "eth0", "--list", "mode=observe"]),
        None,
        FileConfig::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("mode= follows the list"), "{e}");
}

#[test]
fn the_ban_api_needs_a_token_beyond_loopback() {
    let c = resolve(
        &args(&["--iface", "eth0", "--ban-api", "127.0.0.1:8082"]),
        None,
        FileConfig::default(),
    )
    .unwrap();
    assert_eq!(c.process.ban_api, Some("127.0.0.1:8082".parse().unwrap()));
    assert_eq!(c.process.ban_api_ttl, Duration::from_secs(3600));
    let e = resolve(
        &args(&["--iface", "eth0", "--ban-api", "0.0.0.0:8082"]),
        None,
        FileConfig::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("ban-api-token-file"), "{e}");
    let c = resolve(
        &args(&["--iface", "eth0", "--ban-api", "off"]),
        None,
        file("ban-api = \"0.0.0.0:8082\"\nban-api-token-file = \"/etc/apiban/t\"\n"),
    )
    .unwrap();
    assert_eq!(c.process.ban_api, None, "the flag's off wins over the file");
    // A proxy's ban is capped like a JSON ban's TTL.
    let e = resolve(
        &args(&["--iface", "eth0", "--ban-api-ttl", "31d"]),
        None,
        FileConfig::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("ban-api-ttl"), "{e}");
}

#[test]
fn detection_rates_are_per_method_and_tls_ports_are_apart() {
    use apiban_common::detect::{METHOD_INVITE, METHOD_OPTIONS, METHOD_OTHER, METHOD_REGISTER};
    let c = resolve(&args(&["--iface", "eth0"]), None, FileConfig::default()).unwrap();
    assert_eq!(
        (c.detect.ports, c.detect.tls_ports),
        (vec![5060], vec![5061])
    );
    assert_eq!(c.detect.rate.per_method, [300, 1_000, 100, 1_000]);
    let c = resolve(
        &args(&[
            "--iface",
            "eth0",
            "--detect-rate",
            "50/5s",
            "--detect-rate-invite",
            "off",
        ]),
        None,
        file(
            "detect-rate-register = 600\ndetect-rate-other = \"off\"\ndetect-tls-ports = [5071]\n",
        ),
    )
    .unwrap();
    let rate = c.detect.rate;
    assert_eq!(rate.window, Duration::from_secs(5));
    assert_eq!(rate.per_method[usize::from(METHOD_REGISTER)], 600);
    assert_eq!(rate.per_method[usize::from(METHOD_INVITE)], 0);
    assert_eq!(rate.per_method[usize::from(METHOD_OPTIONS)], 50);
    assert_eq!(rate.per_method[usize::from(METHOD_OTHER)], 0);
    assert_eq!(c.detect.tls_ports, vec![5071]);
    // A port is SIP in the clear or over TLS, not both; 0 requests is written "off".
    let e = resolve(
        &args(&["--iface", "eth0", "--detect-ports", "5060,5061"]),
        None,
        FileConfig::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("5061 is in detect-ports and detect-tls-ports"),
        "{e}"
    );
    let e = parse_file("detect-rate-register = 0\n").unwrap_err();
    assert!(e.contains("write \"off\""), "{e}");
    // The program counts in 16 bits: a threshold it could never reach is refused.
    let e = resolve(
        &args(&["--iface", "eth0", "--detect-rate", "70000/10s"]),
        None,
        FileConfig::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("detect-rate"), "{e}");
    assert!(e.to_string().contains("at most 65535 requests"), "{e}");
    // A key this version removed does not stop the agent: it is reported.
    let c = resolve(
        &args(&["--iface", "eth0"]),
        None,
        file("detect-malformed = \"10/60s\"\n"),
    )
    .unwrap();
    assert!(c.detect.notices[0].starts_with("detect-malformed in the config file is ignored"));
}

#[test]
fn crowdsec_needs_a_url_and_a_key_file_and_reads_the_key_each_time() {
    let none = resolve(&args(&["--iface", "eth0"]), None, FileConfig::default()).unwrap();
    assert_eq!(none.crowdsec, None);
    let e = resolve(
        &args(&["--iface", "eth0", "--crowdsec", "http://127.0.0.1:8080"]),
        None,
        FileConfig::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("crowdsec-key-file"), "{e}");
    let e = resolve(
        &args(&["--iface", "eth0"]),
        None,
        file("crowdsec-key-file = \"/etc/apiban/crowdsec.key\"\n"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("crowdsec"), "{e}");
    let e = resolve(
        &args(&["--iface", "eth0", "--crowdsec", "127.0.0.1:8080"]),
        None,
        file("crowdsec-key-file = \"/k\"\n"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("http://"), "{e}");

    let dir = std::env::temp_dir().join(format!("apiban-cs-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("key");
    let c = resolve(
        &args(&["--iface", "eth0", "--crowdsec-origins", "crowdsec,cscli"]),
        None,
        file(&format!(
            "crowdsec = \"http://127.0.0.1:8080/\"\ncrowdsec-key-file = \"{}\"\n\
             crowdsec-interval = \"30s\"\ncrowdsec-scenarios = [\"sip\", \"asterisk\"]\n\
             crowdsec-mode = \"observe\"\n",
            key.display()
        )),
    )
    .unwrap();
    let settings = c.crowdsec.clone().unwrap();
    assert_eq!(settings.interval, Duration::from_secs(30));
    assert_eq!(settings.origins, ["crowdsec", "cscli"]);
    assert_eq!(settings.scenarios, ["sip", "asterisk"]);
    assert!(c.engine.observe.contains(&SourceId::Crowdsec));
    // The key is read when it is used: missing, empty, then there.
    assert!(settings.spec().is_err());
    std::fs::write(&key, "\n").unwrap();
    assert!(settings.spec().is_err());
    std::fs::write(&key, "0123abcd\nignored\n").unwrap();
    assert_eq!(settings.spec().unwrap().key.as_deref(), Some("0123abcd"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_crowdsec_client_certificate_replaces_the_key_over_https_only() {
    let dir = std::env::temp_dir().join(format!("apiban-cs-cert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key, ca) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    let with = |url: &str, extra: &str| {
        resolve(
            &args(&["--iface", "eth0"]),
            None,
            file(&format!("crowdsec = \"{url}\"\n{extra}")),
        )
    };
    let cert_keys = format!(
        "crowdsec-cert = \"{}\"\ncrowdsec-cert-key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    for (url, extra, flag) in [
        ("http://127.0.0.1:8080", cert_keys.as_str(), "https://"),
        (
            "https://lapi:8080",
            "crowdsec-cert = \"/c\"\n",
            "crowdsec-cert-key",
        ),
        (
            "https://lapi:8080",
            &format!("{cert_keys}crowdsec-key-file = \"/k\"\n"),
            "both",
        ),
        (
            "http://127.0.0.1:8080",
            "crowdsec-key-file = \"/k\"\ncrowdsec-ca = \"/ca\"\n",
            "crowdsec-ca",
        ),
    ] {
        let e = with(url, extra).unwrap_err();
        assert!(e.to_string().contains(flag), "{url} {extra}: {e}");
    }
    let e = resolve(
        &args(&["--iface", "eth0", "--crowdsec-cert", "/c"]),
        None,
        FileConfig::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("crowdsec (the LAPI's URL) is not"),
        "{e}"
    );

    let settings = with(
        "https://lapi:8080",
        &format!("{cert_keys}crowdsec-ca = \"{}\"\n", ca.display()),
    )
    .unwrap()
    .crowdsec
    .unwrap();
    // Read and checked when used: missing, not PEM, then a real certificate and key.
    let e = settings.spec().unwrap_err();
    assert!(e.to_string().contains("crowdsec-ca"), "{e}");
    let key_pair = rcgen::KeyPair::generate().unwrap();
    let issued = rcgen::CertificateParams::new(vec!["apiban".to_owned()])
        .unwrap()
        .self_signed(&key_pair)
        .unwrap();
    std::fs::write(&ca, issued.pem()).unwrap();
    std::fs::write(&cert, "not a certificate").unwrap();
    std::fs::write(&key, "not a key").unwrap();
    let e = settings.spec().unwrap_err();
    assert!(e.to_string().contains("crowdsec-cert"), "{e}");
    std::fs::write(&cert, issued.pem()).unwrap();
    std::fs::write(&key, key_pair.serialize_pem()).unwrap();
    let spec = settings.spec().unwrap();
    assert_eq!(spec.key, None);
    assert!(spec.tls.identity.is_some() && spec.tls.ca.is_some());
    // The private key is never printed.
    assert!(!format!("{spec:?}").contains("PRIVATE KEY"), "{spec:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
