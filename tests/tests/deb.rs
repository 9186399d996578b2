//! The Debian package as an operator uses it: `dpkg -i`, the installed binary, its man page
//! and unit, the installed agent on a veth dropping a banned source, then `dpkg -r` (the XDP
//! program and its pins stay, so do the drops) and `dpkg --purge` (`apiban detach`, and
//! nothing of the package is left). The .deb is `cargo xtask package`'s, which `cargo xtask
//! test` builds first and names in APIBAN_DEB.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use tests::{
    BpffsDir, Topology,
    agent::{http_get, http_request, use_apiban_bin},
    require_root, run_ok as ok, run_program as run,
    scene::Scene,
    sync_harness::TempDir,
};

const PINS: &str = "/sys/fs/bpf/apiban";
const N: usize = 20;

fn installed() -> bool {
    run("dpkg-query", &["-W", "-f=${Status}", "apiban"])
        .stdout
        .starts_with(b"install ok installed")
}

/// Purges the package however the test ends.
struct Package;

impl Drop for Package {
    fn drop(&mut self) {
        if run("dpkg-query", &["-W", "apiban"]).status.success() {
            let _ = run("dpkg", &["--purge", "apiban"]);
        }
    }
}

/// What the package installs, besides the conffile's directory.
/// The ban API's token, which the package makes at install (not a packaged file).
const TOKEN: &str = "/etc/apiban/ban-api-token";

const FILES: [&str; 7] = [
    "/usr/bin/apiban",
    "/lib/systemd/system/apiban.service",
    "/usr/share/man/man1/apiban.1.gz",
    "/usr/share/man/man1/apiban-capture.1.gz",
    "/usr/share/bash-completion/completions/apiban",
    "/usr/share/doc/apiban/README.md",
    "/usr/share/doc/apiban/docs/fleet.md",
];

#[test]
fn the_package_installs_runs_and_purges_to_nothing() {
    require_root();
    let deb = PathBuf::from(std::env::var("APIBAN_DEB").unwrap_or_else(|_| {
        panic!(
            "APIBAN_DEB is not set: run `cargo xtask package` and set it to the .deb \
             (`cargo xtask test` does both)"
        )
    }));
    assert!(deb.exists(), "{} does not exist", deb.display());
    assert!(
        !run("dpkg-query", &["-W", "apiban"]).status.success(),
        "the apiban package is already on this machine: this test installs and purges it, \
         so remove it first"
    );
    assert!(
        !Path::new(PINS).exists(),
        "{PINS} exists: an agent's pins are on this machine; this test needs the default \
         directory to itself"
    );
    let version = ok("dpkg-deb", &["-f", &deb.display().to_string(), "Version"]);
    let _package = Package;

    // Install: nothing starts, the operator is told what to configure.
    let said = ok("dpkg", &["-i", &deb.display().to_string()]);
    assert!(
        said.contains("put your APIBAN key in /etc/apiban/key"),
        "{said}"
    );
    assert!(installed());
    assert!(
        !Path::new("/etc/systemd/system/multi-user.target.wants/apiban.service").exists(),
        "the package enabled the service"
    );
    assert!(
        !run("pgrep", &["-f", "/usr/bin/apiban run"])
            .status
            .success(),
        "the package started an agent"
    );
    for file in FILES {
        assert!(Path::new(file).exists(), "{file} is not installed");
    }
    assert_eq!(
        ok("/usr/bin/apiban", &["--version"]).trim(),
        format!("apiban {}", version.trim())
    );
    let man = Command::new("man")
        .arg("apiban")
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .expect("man (Debian: man-db)");
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(
        man.status.success() && page.contains("APIBAN(1)") && page.contains("capture"),
        "man apiban: {page}{}",
        String::from_utf8_lossy(&man.stderr)
    );
    let verify = run(
        "systemd-analyze",
        &["verify", "/lib/systemd/system/apiban.service"],
    );
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let conffiles = ok("dpkg-query", &["-W", "-f=${Conffiles}", "apiban"]);
    assert!(conffiles.contains("/etc/apiban/config.toml"), "{conffiles}");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata("/etc/apiban/config.toml")
        .expect("the config")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The ban API's token, made at install for the proxy's group.
    let token_meta = std::fs::metadata(TOKEN).expect("the package makes the ban API's token");
    assert_eq!(token_meta.permissions().mode() & 0o777, 0o640);
    let group = ok("getent", &["group", "apiban"]);
    use std::os::unix::fs::MetadataExt as _;
    assert!(
        group.split(':').nth(2) == Some(&token_meta.gid().to_string()),
        "the token belongs to the group apiban: {group}"
    );
    let token = std::fs::read_to_string(TOKEN).expect("the token");
    assert_eq!(token.trim().len(), 64, "32 random bytes in hex");
    let completions = std::fs::read_to_string("/usr/share/bash-completion/completions/apiban")
        .expect("bash completions");
    assert!(completions.contains("capture"));

    // The installed binary on a veth, with the default pin directory, for a few seconds.
    use_apiban_bin(PathBuf::from("/usr/bin/apiban"));
    let mut s = Scene::build(
        Topology::new(),
        BpffsDir::at(PathBuf::from(PINS)),
        TempDir::new("apiban-deb-"),
    );
    let banned: IpAddr = s.source("45.99.0.1");
    s.start(&[
        "--detect",
        "off",
        "--ban-api",
        "127.0.0.1:18083",
        "--ban-api-token-file",
        TOKEN,
    ]);
    // The installed package's API: nothing without its token, a ban with it.
    let api: std::net::SocketAddr = "127.0.0.1:18083".parse().expect("literal");
    let (code, body) = http_get(Some(&s.topo.server), api, "/addip/45.99.0.7");
    assert_eq!(code, 401, "{body}");
    let bearer = format!("Bearer {}", token.trim());
    let with = http_request(
        Some(&s.topo.server),
        api,
        "GET",
        "/addip/45.99.0.7",
        &[("Authorization", &bearer)],
    );
    assert_eq!(with.code, 200, "{}", with.body);
    s.agent().cli_ok(&["ban", "45.99.0.1"]);
    s.wait_verdict(banned, "banned", Duration::from_secs(10));
    assert_eq!(s.probe(&[banned], N), vec![0]);
    std::thread::sleep(Duration::from_secs(2));
    let status = s.status();
    assert_eq!(
        status["traffic"][&s.topo.server_if]["dropped"]["packets"], N,
        "{status}"
    );
    assert_eq!(s.stop(), Some(0));

    // Removal: the program and its pins stay, and so do the drops.
    ok("dpkg", &["-r", "apiban"]);
    assert!(!Path::new("/usr/bin/apiban").exists());
    assert!(
        Path::new("/etc/apiban/config.toml").exists(),
        "removal took the conffile"
    );
    assert!(Path::new(PINS).exists(), "removal took the pins");
    assert!(s.xdp_attached(), "removal detached the program");
    assert_eq!(s.probe(&[banned], N), vec![0]);

    // Purge, where the agent ran (its network namespace, the host's mounts): `apiban
    // detach`, then nothing of the package is left.
    let netns = format!("--net={}", s.topo.server.path().display());
    let said = ok("nsenter", &[&netns, "dpkg", "--purge", "apiban"]);
    assert!(said.contains("detached from"), "{said}");
    assert!(!run("dpkg-query", &["-W", "apiban"]).status.success());
    for gone in FILES
        .iter()
        .chain(&["/etc/apiban", "/var/lib/apiban", PINS])
    {
        assert!(!Path::new(gone).exists(), "{gone} is left after the purge");
    }
    assert!(
        !run("getent", &["group", "apiban"]).status.success(),
        "the purge left the group apiban"
    );
    assert!(!s.xdp_attached(), "the purge left the program attached");
    assert_eq!(s.probe(&[banned], N), vec![N]);
}
