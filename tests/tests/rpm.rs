//! The RPM as an operator uses it, with Debian's rpm (no rpmdb dependencies here, hence
//! --nodeps): `rpm -i` starts nothing, the installed agent drops a banned source, `rpm -U`
//! keeps the program attached and dropping, `rpm -e` detaches and leaves nothing of the
//! package. And what every package holds: the RPMs the .deb's files (at the RPM's paths),
//! rpmlint without errors, the arm64 builds aarch64 binaries, none needs a glibc newer than
//! Debian 11's. `cargo xtask test` builds them
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
    for package in [&deb_arm, &rpm_arm] {
        let binary = unpacked_binary(package, &dir.path);
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

/// /usr/bin/apiban of a .deb or an RPM, unpacked under `dir`.
fn unpacked_binary(package: &Path, dir: &Path) -> PathBuf {
    let name = package.file_name().unwrap().to_string_lossy().into_owned();
    let into = dir.join(&name);
    std::fs::create_dir_all(&into).unwrap();
    let unpack = if name.ends_with(".deb") {
        format!(
            "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}'",
            path(package),
            path(&into)
        )
    } else {
        format!(
            "cd '{}' && rpm2cpio '{}' | cpio -id --quiet",
            path(&into),
            path(package)
        )
    };
    ok("sh", &["-c", &unpack]);
    into.join("usr/bin/apiban")
}

/// Debian 11's glibc, the oldest the packages are for (Ubuntu 20.04 has it too).
const GLIBC_FLOOR: (u32, u32) = (2, 31);

/// The glibc symbol versions an ELF needs, from readelf (any architecture's).
fn glibc_versions(binary: &Path) -> BTreeSet<(u32, u32)> {
    glibc_versions_in(&ok("readelf", &["-V", "-W", &path(binary)]))
        .into_iter()
        .collect()
}

/// Every package runs on Debian 11's C library: its binary needs no symbol newer than glibc
/// 2.31 (a plain build on Debian 12 needs 2.34 and does not start there), and what each
/// package declares matches. The compat check runs this build on Debian 11's glibc itself.
#[test]
fn every_package_needs_no_newer_glibc_than_debian_11s() {
    let dir = TempDir::new("apiban-glibc-");
    let floor = format!("{}.{}", GLIBC_FLOOR.0, GLIBC_FLOOR.1);
    for var in [
        "APIBAN_DEB",
        "APIBAN_DEB_ARM64",
        "APIBAN_RPM",
        "APIBAN_RPM_ARM64",
    ] {
        let package = artifact(var);
        let needed = glibc_versions(&unpacked_binary(&package, &dir.path));
        let newest = needed.iter().max().copied();
        assert!(
            newest.is_some_and(|v| v <= GLIBC_FLOOR),
            "{} needs glibc {newest:?} (all: {needed:?}); Debian 11 has {floor}",
            package.display()
        );
        if var.starts_with("APIBAN_DEB") {
            assert_eq!(
                ok("dpkg-deb", &["-f", &path(&package), "Depends"]).trim(),
                format!("libc6 (>= {floor})"),
                "{}",
                package.display()
            );
        } else {
            // rpm derives its requirements from the symbol versions: none past the floor.
            let requires = ok("rpm", &["-qpR", &path(&package)]);
            let too_new: Vec<&str> = requires
                .lines()
                .filter(|l| glibc_versions_in(l).into_iter().any(|v| v > GLIBC_FLOOR))
                .collect();
            assert!(
                requires.contains("libc.so.6(GLIBC_") && too_new.is_empty(),
                "{} requires {too_new:?}:\n{requires}",
                package.display()
            );
        }
    }
}

/// GLIBC_x.y versions named in `text`.
fn glibc_versions_in(text: &str) -> Vec<(u32, u32)> {
    text.split("GLIBC_")
        .skip(1)
        .filter_map(|rest| {
            let v: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .collect()
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
