//! The RPM as an operator uses it, with Debian's rpm (no rpmdb dependencies here, hence
//! --nodeps): `rpm -i` starts nothing, the installed agent drops a banned source, `rpm -U`
//! keeps the program attached and dropping, `rpm -e` detaches and leaves nothing of the
//! package. And what every package holds: the RPMs the .deb's files (at the RPM's paths),
//! rpmlint without errors, the arm64 builds aarch64 binaries. `cargo xtask test` builds them
//! and names them in APIBAN_RPM, APIBAN_RPM_ARM64, APIBAN_DEB and APIBAN_DEB_ARM64.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use tests::{
    BpffsDir, Topology, agent::use_apiban_bin, require_root, run_ok as ok, run_program as run,
    scene::Scene, sync_harness::TempDir,
};

const PINS: &str = "/sys/fs/bpf/apiban";
const TOKEN: &str = "/etc/apiban/ban-api-token";
const N: usize = 20;

fn artifact(var: &str) -> PathBuf {
    let path = PathBuf::from(std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: `cargo xtask package [--arch arm64] [--rpm]` builds it, \
             `cargo xtask test` builds all four and sets the variables"
        )
    }));
    assert!(path.exists(), "{} does not exist", path.display());
    path
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// The files an RPM holds (not its directories).
fn rpm_files(rpm: &Path) -> BTreeSet<String> {
    ok(
        "rpm",
        &[
            "-qp",
            "--qf",
            "[%{FILEMODES:perms} %{FILENAMES}\n]",
            &path(rpm),
        ],
    )
    .lines()
    .filter(|l| !l.starts_with('d'))
    .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
    .collect()
}

/// The files a .deb holds, at the paths an RPM distribution keeps them: units under
/// /usr/lib/systemd, zsh's completions in site-functions.
fn deb_files_as_rpm(deb: &Path) -> BTreeSet<String> {
    ok("dpkg-deb", &["-c", &path(deb)])
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|f| {
            f.trim_start_matches('.')
                .replace("/lib/systemd/system/", "/usr/lib/systemd/system/")
                .replace(
                    "/usr/share/zsh/vendor-completions/",
                    "/usr/share/zsh/site-functions/",
                )
        })
        .filter(|f| !f.starts_with("/usr/share/doc/apiban/changelog"))
        .filter(|f| f != "/usr/share/doc/apiban/copyright")
        .collect()
}

fn rpmlint_errors(rpm: &Path) -> String {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/rpm/rpmlint.toml");
    let out = run("rpmlint", &["-c", &path(&config), &path(rpm)]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains(" 0 errors"),
        "rpmlint found errors in {}:\n{text}",
        rpm.display()
    );
    text
}

#[test]
fn every_package_holds_the_same_files_and_the_arm64_ones_carry_arm64_binaries() {
    let (rpm, rpm_arm) = (artifact("APIBAN_RPM"), artifact("APIBAN_RPM_ARM64"));
    let (deb, deb_arm) = (artifact("APIBAN_DEB"), artifact("APIBAN_DEB_ARM64"));
    let files = rpm_files(&rpm);
    assert_eq!(files, deb_files_as_rpm(&deb), "the RPM and the .deb differ");
    assert_eq!(rpm_files(&rpm_arm), files, "the aarch64 RPM differs");
    assert_eq!(deb_files_as_rpm(&deb_arm), files, "the arm64 .deb differs");
    for r in [&rpm, &rpm_arm] {
        rpmlint_errors(r);
    }
    assert_eq!(
        ok("rpm", &["-qp", "--qf", "%{ARCH}", &path(&rpm_arm)]).trim(),
        "aarch64"
    );
    assert_eq!(
        ok("dpkg-deb", &["-f", &path(&deb_arm), "Architecture"]).trim(),
        "arm64"
    );
    let dir = TempDir::new("apiban-arm64-");
    for (package, unpack) in [
        (
            &deb_arm,
            format!(
                "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}'",
                path(&deb_arm),
                path(&dir.path)
            ),
        ),
        (
            &rpm_arm,
            format!(
                "mkdir -p '{0}/rpm' && cd '{0}/rpm' && rpm2cpio '{1}' | cpio -id --quiet",
                path(&dir.path),
                path(&rpm_arm)
            ),
        ),
    ] {
        ok("sh", &["-c", &unpack]);
        let binary = if package == &deb_arm {
            dir.path.join("usr/bin/apiban")
        } else {
            dir.path.join("rpm/usr/bin/apiban")
        };
        let kind = ok("file", &["-b", &path(&binary)]);
        assert!(
            kind.contains("ARM aarch64")
                && kind.contains("stripped")
                && !kind.contains("not stripped"),
            "{}: {kind}",
            package.display()
        );
    }
}

fn installed() -> bool {
    run("rpm", &["-q", "apiban"]).status.success()
}

/// Erases the package however the test ends.
struct Package;

impl Drop for Package {
    fn drop(&mut self) {
        if installed() {
            let _ = run("rpm", &["-e", "--nodeps", "apiban"]);
        }
    }
}

#[test]
fn the_rpm_installs_runs_upgrades_and_erases_to_nothing() {
    require_root();
    let rpm = artifact("APIBAN_RPM");
    assert!(
        !installed() && !Path::new("/usr/bin/apiban").exists(),
        "apiban is already installed on this machine: this test installs and erases it"
    );
    assert!(
        !Path::new(PINS).exists(),
        "{PINS} exists: an agent's pins are on this machine; this test needs the default \
         directory to itself"
    );
    let _package = Package;

    // Install: nothing starts, the operator is told what to configure.
    let said = ok("rpm", &["-i", "--nodeps", &path(&rpm)]);
    assert!(
        said.contains("put your APIBAN key in /etc/apiban/key"),
        "{said}"
    );
    assert!(
        !run("pgrep", &["-f", "/usr/bin/apiban run"])
            .status
            .success(),
        "the package started an agent"
    );
    ok("rpm", &["-V", "--nodeps", "apiban"]);
    let config = ok("rpm", &["-qc", "apiban"]);
    assert!(config.contains("/etc/apiban/config.toml"), "{config}");
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let mode = |p: &str| std::fs::metadata(p).expect(p).permissions().mode() & 0o777;
    assert_eq!(mode("/etc/apiban/config.toml"), 0o600);
    assert_eq!(mode(TOKEN), 0o640);
    let group = ok("getent", &["group", "apiban"]);
    assert_eq!(
        group.split(':').nth(2),
        Some(
            std::fs::metadata(TOKEN)
                .expect("token")
                .gid()
                .to_string()
                .as_str()
        )
    );
    let token = std::fs::read_to_string(TOKEN).expect("the token");
    let verify = run(
        "systemd-analyze",
        &["verify", "/usr/lib/systemd/system/apiban.service"],
    );
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // The installed binary on a veth, with the default pin directory.
    use_apiban_bin(PathBuf::from("/usr/bin/apiban"));
    let mut s = Scene::build(
        Topology::new(),
        BpffsDir::at(PathBuf::from(PINS)),
        TempDir::new("apiban-rpm-"),
    );
    let banned: IpAddr = s.source("45.99.1.1");
    s.start(&["--detect", "off"]);
    s.agent().cli_ok(&["ban", "45.99.1.1"]);
    s.wait_verdict(banned, "banned", Duration::from_secs(10));
    assert_eq!(s.probe(&[banned], N), vec![0]);
    assert_eq!(s.stop(), Some(0));

    // Upgrade (the same package again): the old version's scripts see an upgrade, the
    // program and its pins stay, the token is kept.
    ok("rpm", &["-U", "--replacepkgs", "--nodeps", &path(&rpm)]);
    assert!(installed());
    assert!(Path::new(PINS).exists(), "the upgrade took the pins");
    assert!(s.xdp_attached(), "the upgrade detached the program");
    assert_eq!(s.probe(&[banned], N), vec![0]);
    assert_eq!(std::fs::read_to_string(TOKEN).expect("the token"), token);

    // Erase, where the agent ran: `apiban detach`, then nothing of the package is left.
    let netns = format!("--net={}", s.topo.server.path().display());
    let said = ok("nsenter", &[&netns, "rpm", "-e", "--nodeps", "apiban"]);
    assert!(said.contains("detached from"), "{said}");
    assert!(!installed());
    for gone in [
        "/usr/bin/apiban",
        "/usr/lib/systemd/system/apiban.service",
        "/usr/share/man/man1/apiban.1.gz",
        TOKEN,
        "/etc/apiban",
        "/var/lib/apiban",
        PINS,
    ] {
        assert!(!Path::new(gone).exists(), "{gone} is left after the erase");
    }
    assert!(
        !run("getent", &["group", "apiban"]).status.success(),
        "the erase left the group apiban"
    );
    assert!(!s.xdp_attached(), "the erase left the program attached");
    assert_eq!(s.probe(&[banned], N), vec![N]);
}
