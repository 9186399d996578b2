//! Configuration's tests: how flags, the environment, the file and defaults combine here;
//! what each feature's settings need in `features.rs`.

use clap::Parser;

use ipnet::IpNet;

use super::*;
use crate::{human::RateLimit, source::blocklist::ListLocation};

mod features;

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
