use clap::Parser;

use ipnet::IpNet;

use super::*;
use crate::{human::RateLimit, source::blocklist::ListLocation};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

/// clap reads APIBAN_* while parsing: tests that parse hold this, and the one test that
/// sets variables holds it while they are set.
static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn args(argv: &[&str]) -> RunArgs {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    Cli::try_parse_from(std::iter::once("apiban").chain(argv.iter().copied()))
        .expect("flags parse")
        .run
}

fn file(text: &str) -> FileConfig {
    parse_file(text).expect("config parses")
}

#[test]
fn defaults_when_only_an_interface_is_given() {
    let c = resolve(&args(&["--iface", "eth0"]), None, FileConfig::default()).unwrap();
    assert_eq!(c.attach.ifaces, ["eth0"]);
    assert_eq!(c.attach.xdp_mode, AttachMode::Auto);
    assert_eq!(c.scope, Scope::All);
    assert_eq!(c.apiban.poll.poll_interval, Duration::from_secs(60));
    assert_eq!(c.engine.ttl, Duration::from_secs(7 * 86_400));
    assert_eq!(c.apiban.poll.resync_interval, Duration::from_secs(86_400));
    assert_eq!(c.apiban.poll.rate_limit, RateLimit::APIBAN);
    assert_eq!(c.apiban.version, ApiVersion::V2);
    assert_eq!(c.apiban.data_set, DataSet::Sip);
    assert_eq!(c.apiban.url, DEFAULT_BASE_URL);
    assert_eq!(c.process.state_dir, PathBuf::from("/var/lib/apiban"));
    assert_eq!(c.attach.bpffs_dir, PathBuf::from("/sys/fs/bpf/apiban"));
    assert_eq!(
        c.process.control_socket,
        PathBuf::from("/run/apiban/control.sock")
    );
    assert_eq!(
        c.process.metrics_addr,
        Some("127.0.0.1:9477".parse().unwrap())
    );
    assert_eq!(c.process.log_format, LogFormat::Text);
    assert!(
        !c.process.dry_run
            && c.apiban.key.is_none()
            && c.engine.allow.is_empty()
            && c.lists.is_empty()
    );
}

#[test]
fn every_flag_parses_as_people_write_it() {
    let a = args(&[
        "--iface",
        "eth0",
        "--iface",
        "eth1",
        "--xdp-mode",
        "skb",
        "--scope",
        "ports",
        "--ports",
        "5060,5080",
        "--poll-interval",
        "90s",
        "--ttl",
        "2d",
        "--resync-interval",
        "12h",
        "--rate-limit",
        "5/1m",
        "--allow",
        "192.0.2.0/24",
        "--allow",
        "2001:db8::/32",
        "--api-version",
        "v1",
        "--set",
        "all",
        "--list",
        "mine=/etc/apiban/mine.txt",
        "--list-refresh",
        "5m",
        "--metrics-addr",
        "off",
        "--dry-run",
        "--log-format",
        "json",
        "--control-socket",
        "/tmp/c.sock",
        "--min-prefix-v4",
        "20",
    ]);
    let c = resolve(&a, None, FileConfig::default()).unwrap();
    assert_eq!(c.attach.ifaces, ["eth0", "eth1"]);
    assert_eq!(c.attach.xdp_mode, AttachMode::Skb);
    assert_eq!(c.scope, Scope::Ports([5060, 5080].into()));
    assert_eq!(c.apiban.poll.poll_interval, Duration::from_secs(90));
    assert_eq!(c.engine.ttl, Duration::from_secs(2 * 86_400));
    assert_eq!(
        c.apiban.poll.resync_interval,
        Duration::from_secs(12 * 3600)
    );
    assert_eq!(c.apiban.poll.rate_limit, "5/60s".parse().unwrap());
    assert_eq!(c.engine.allow.len(), 2);
    assert_eq!(c.apiban.version, ApiVersion::V1);
    assert_eq!(c.apiban.data_set, DataSet::All);
    assert_eq!(c.lists[0].name, "mine");
    assert_eq!(c.lists[0].refresh, Duration::from_secs(300));
    assert_eq!(c.process.metrics_addr, None);
    assert!(c.process.dry_run);
    assert_eq!(c.process.log_format, LogFormat::Json);
    assert_eq!(c.engine.min_prefix_v4, 20);
}

#[test]
fn flags_beat_the_file_and_the_file_beats_defaults() {
    let f = file(
        r#"
        iface = ["eth9"]
        poll-interval = "5m"
        ttl = "1d"
        allow = ["198.51.100.0/24"]
        api-key = "from-file"
        metrics-addr = "127.0.0.1:9999"
        scope = "ports"
        ports = [5060]
        [[list]]
        name = "local"
        location = "/etc/apiban/local.txt"
        refresh = "10m"
        "#,
    );
    let c = resolve(&args(&["--iface", "eth0", "--ttl", "3d"]), None, f.clone()).unwrap();
    assert_eq!(c.attach.ifaces, ["eth0"], "flag wins");
    assert_eq!(c.engine.ttl, Duration::from_secs(3 * 86_400), "flag wins");
    assert_eq!(
        c.apiban.poll.poll_interval,
        Duration::from_secs(300),
        "file beats default"
    );
    assert_eq!(
        c.engine.allow,
        vec!["198.51.100.0/24".parse::<IpNet>().unwrap()]
    );
    assert_eq!(c.apiban.key, Some(KeySource::Value("from-file".into())));
    assert_eq!(
        c.process.metrics_addr,
        Some("127.0.0.1:9999".parse().unwrap())
    );
    assert_eq!(c.scope, Scope::Ports([5060].into()));
    assert_eq!(c.lists[0].refresh, Duration::from_secs(600));
    assert_eq!(
        c.lists[0].location,
        ListLocation::File("/etc/apiban/local.txt".into())
    );
    // A key file on the command line beats a key in the file.
    let c = resolve(&args(&["--api-key-file", "/run/key"]), None, f).unwrap();
    assert_eq!(c.apiban.key, Some(KeySource::File("/run/key".into())));
    assert_eq!(c.attach.ifaces, ["eth9"], "file supplies the interface");
}

#[test]
fn environment_sits_between_flags_and_the_file() {
    let parse = |argv: &[&str]| {
        Cli::try_parse_from(std::iter::once("apiban").chain(argv.iter().copied()))
            .expect("flags parse")
            .run
    };
    let (env_args, flag_args) = {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: every reader of these variables in this binary holds ENV.
        unsafe {
            std::env::set_var("APIBAN_TTL", "4d");
            std::env::set_var("APIBAN_IFACE", "enve0,enve1");
        }
        let parsed = (parse(&[]), parse(&["--ttl", "2d"]));
        // SAFETY: as above, ENV is still held.
        unsafe {
            std::env::remove_var("APIBAN_TTL");
            std::env::remove_var("APIBAN_IFACE");
        }
        parsed
    };
    let f = file("ttl = \"1d\"\niface = [\"filee0\"]\n");
    let from_env = resolve(&env_args, None, f.clone());
    let from_flag = resolve(&flag_args, None, f);
    let from_env = from_env.unwrap();
    assert_eq!(from_env.engine.ttl, Duration::from_secs(4 * 86_400));
    assert_eq!(from_env.attach.ifaces, ["enve0", "enve1"]);
    assert_eq!(
        from_flag.unwrap().engine.ttl,
        Duration::from_secs(2 * 86_400)
    );
}

#[test]
fn mistakes_are_reported_with_the_key_that_holds_them() {
    // A bad value in the file is refused while the file is read, with its line and why.
    let bad_value = |f: &str| parse_file(f).unwrap_err();
    let e = bad_value("ttl = \"forever\"");
    assert!(
        e.contains("ttl = \"forever\"") && e.contains("line 1"),
        "{e}"
    );
    assert!(bad_value("scope = \"some\"").contains("all, ports"));
    assert!(bad_value("allow = [\"10.0.0.0/33\"]").contains("not an address or CIDR"));
    assert!(bad_value("metrics-addr = \"9477\"").contains("ADDRESS:PORT"));
    assert!(bad_value("pol-interval = \"60s\"").contains("pol-interval"));
    // Values that are wrong only together are named by key.
    let err = |a: &[&str], f: &str| resolve(&args(a), None, file(f)).unwrap_err().to_string();
    assert!(err(&[], "").contains("--iface"));
    assert!(err(&["--iface", "e"], "scope = \"ports\"\nports = []").starts_with("ports:"));
    assert!(err(&["--iface", "e"], "poll-interval = \"0s\"").starts_with("poll-interval:"));
    let dup =
        "[[list]]\nname = \"a\"\nlocation = \"/x\"\n[[list]]\nname = \"a\"\nlocation = \"/y\"\n";
    assert!(err(&["--iface", "e"], dup).starts_with("list:"));
    // Bad flag values are clap's usage errors, in the words the file's parser uses.
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let usage = |argv: &[&str]| {
        Cli::try_parse_from(std::iter::once("apiban").chain(argv.iter().copied()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(usage(&["--ttl", "7x"]).contains("7x"));
    assert!(usage(&["--xdp-mode", "fast"]).contains("fast"));
    assert!(usage(&["--list", "nolocation"]).contains("NAME=PATH"));
    assert!(usage(&["--allow", "10.0.0.0/33"]).contains("not an address or CIDR"));
    assert!(usage(&["--metrics-addr", "9477"]).contains("ADDRESS:PORT"));
}

#[test]
fn the_file_spells_choices_as_flags_do() {
    let f = file("xdp-mode = \"SKB\"\nscope = \"Ports\"\nlog-format = \"json\"\nset = \"all\"\n");
    let c = resolve(&args(&["--iface", "e"]), None, f).unwrap();
    assert_eq!(c.attach.xdp_mode, AttachMode::Skb);
    assert_eq!(c.scope, Scope::Ports([5060, 5061].into()));
    assert_eq!(c.process.log_format, LogFormat::Json);
    assert_eq!(c.apiban.data_set, DataSet::All);
}

/// A reload names every restart-only key that differs, and keeps what runs.
#[test]
fn a_reload_names_what_only_a_restart_changes() {
    let old = resolve(&args(&["--iface", "e"]), None, FileConfig::default()).unwrap();
    let f = file(
        "xdp-mode = \"skb\"\ncontrol-group = \"adm\"\nmetrics-addr = \"off\"\nttl = \"1d\"\npoll-interval = \"5m\"\n",
    );
    let new = resolve(&args(&["--iface", "e"]), None, f).unwrap();
    let mut changed = old.restart_only_changes(&new);
    changed.sort();
    assert_eq!(changed, ["control-group", "metrics-addr", "xdp-mode"]);
    let applied = old.reloaded(new.clone());
    assert_eq!(applied.attach, old.attach);
    assert_eq!(applied.process, old.process);
    assert_eq!(applied.engine, new.engine);
    assert_eq!(applied.apiban, new.apiban);
    assert!(applied.restart_only_changes(&old).is_empty());
    let renamed = resolve(&args(&["--iface", "e,f"]), None, FileConfig::default()).unwrap();
    assert_eq!(old.restart_only_changes(&renamed), ["iface"]);
}

#[test]
fn dry_run_needs_no_interface() {
    let c = resolve(&args(&["--dry-run"]), None, FileConfig::default()).unwrap();
    assert!(c.process.dry_run && c.attach.ifaces.is_empty());
}

/// packaging/config.toml is what operators start from: it must parse, and document
/// every `apiban run` flag as a key.
#[test]
fn the_packaged_config_parses_and_documents_every_flag() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config.toml");
    let text = std::fs::read_to_string(&path).expect("packaging/config.toml");
    let parsed = parse_file(&text).expect("the packaged config parses");
    assert_eq!(parsed.iface, Some(vec!["eth0".to_owned()]));
    // Uncommented, every documented key must still parse as its type.
    let uncommented: String = text
        .lines()
        .map(|l| {
            let t = l.trim_start_matches("# ");
            if t.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') && t.contains(['=', ']'])
            {
                t.to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace("iface = [\"eth0\"]\n", "");
    let all = parse_file(&uncommented).expect("every documented key parses");
    assert!(all.ttl.is_some() && all.list.as_ref().is_some_and(|l| l.len() == 2));
    let cmd = <RunArgs as clap::Args>::augment_args(clap::Command::new("run"));
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long == "config" || long == "help" {
            continue;
        }
        let key = if long == "list" {
            "[[list]]".to_owned()
        } else {
            format!("{long} =")
        };
        assert!(
            text.contains(&format!("\n{key}")) || text.contains(&format!("# {key}")),
            "--{long} is not documented in packaging/config.toml"
        );
    }
}

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
