//! `cargo xtask package`: the .deb (cargo-deb) and the RPM (rpmbuild, packaging/rpm), for amd64
//! and arm64. Both carry the same files: the binary, the systemd unit, the config as a
//! conffile, man pages, shell completions, the README; their scripts behave alike (installing
//! starts nothing, an upgrade restarts a running agent onto the new binary while the program
//! stays attached, the final removal detaches). arm64 is cross-built with Debian's
//! gcc-aarch64-linux-gnu; the eBPF object inside is the same bytecode on both.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{cargo, setup, status};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// The Rust target to cross-build for; None for this machine's own.
    pub fn triple(self) -> Option<&'static str> {
        match self {
            Arch::Amd64 => None,
            Arch::Arm64 => Some("aarch64-unknown-linux-gnu"),
        }
    }

    /// Debian's name for it.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// Where cargo puts the release build: target/release, or target/<triple>/release.
    pub fn release_dir(self, root: &Path) -> PathBuf {
        match self.triple() {
            None => root.join("target/release"),
            Some(t) => root.join("target").join(t).join("release"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Deb,
    Rpm,
}

/// Builds the release binary for `arch` (cross-compiled for arm64).
pub fn build(root: &Path, arch: Arch) -> anyhow::Result<()> {
    let mut cmd = cargo(root);
    cmd.args(["build", "--release", "-p", "apiban-user", "--bin", "apiban"]);
    cross(&mut cmd, arch)?;
    status(cmd).with_context(|| format!("building the {arch:?} release binary failed"))
}

/// Makes a cargo build `cmd` cross-compile for `arch` (nothing for this machine's own):
/// the target, and Debian's cross gcc as linker and C compiler (ring builds C).
pub fn cross(cmd: &mut Command, arch: Arch) -> anyhow::Result<()> {
    if let Some(triple) = arch.triple() {
        setup::ensure_cross_tools(triple)?;
        cmd.args(["--target", triple])
            .env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
                "aarch64-linux-gnu-gcc",
            )
            .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc")
            .env("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar");
    }
    Ok(())
}

/// Builds the package; its path.
pub fn package(root: &Path, arch: Arch, format: Format) -> anyhow::Result<PathBuf> {
    match format {
        Format::Deb => setup::ensure_package_tools()?,
        Format::Rpm => setup::ensure_rpm_tools()?,
    }
    // The man pages and completions come from running the binary: this machine's build.
    build(root, Arch::Amd64)?;
    if arch != Arch::Amd64 {
        build(root, arch)?;
    }
    assets(root, arch)?;
    let strip = match arch {
        Arch::Amd64 => "strip",
        Arch::Arm64 => "aarch64-linux-gnu-strip",
    };
    match format {
        Format::Deb => deb(root, arch, strip),
        Format::Rpm => rpm(root, arch, strip),
    }
}

/// The unit, man pages and completions, where both packagers read them:
/// `<release dir>/debian-assets` (cargo-deb reads assets under target/release from
/// target/<triple>/release when cross-building).
fn assets(root: &Path, arch: Arch) -> anyhow::Result<()> {
    let assets = arch.release_dir(root).join("debian-assets");
    let _ = std::fs::remove_dir_all(&assets);
    let man = assets.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("cannot create {}", man.display()))?;
    // The unit as installed by a package: packaged binaries live in /usr/bin.
    let unit = std::fs::read_to_string(root.join("packaging/apiban.service"))
        .context("cannot read packaging/apiban.service")?
        .replace("/usr/local/bin/apiban", "/usr/bin/apiban")
        .replace(
            "# Install: `cargo xtask install` (binary, this unit, /etc/apiban/config.toml), then",
            "# Installed by the apiban package (binary, this unit, /etc/apiban/config.toml); then",
        );
    std::fs::write(assets.join("apiban.service"), unit).context("cannot write the unit")?;
    let apiban = root.join("target/release/apiban");
    status({
        let mut c = Command::new(&apiban);
        c.arg("manpages").arg(&man);
        c
    })
    .context("generating the man pages failed")?;
    // Both distributions ship man pages compressed; -n keeps the build reproducible.
    for page in std::fs::read_dir(&man)? {
        status({
            let mut c = Command::new("gzip");
            c.args(["-9", "-n", "-f"]).arg(page?.path());
            c
        })
        .context("gzip is needed to compress the man pages")?;
    }
    for (shell, file) in [
        ("bash", "apiban.bash"),
        ("zsh", "_apiban"),
        ("fish", "apiban.fish"),
    ] {
        let out = Command::new(&apiban)
            .args(["completions", shell])
            .output()
            .with_context(|| format!("could not run {}", apiban.display()))?;
        anyhow::ensure!(out.status.success(), "apiban completions {shell} failed");
        std::fs::write(assets.join(file), out.stdout)?;
    }
    Ok(())
}

fn deb(root: &Path, arch: Arch, strip: &str) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo(root);
    cmd.args(["deb", "-p", "apiban-user", "--no-build", "-o"])
        .arg(root.join("target/debian"));
    if let Some(triple) = arch.triple() {
        cmd.args(["--target", triple])
            .env("CARGO_DEB_STRIP", strip)
            // cargo-deb strips with the target's strip when it finds one by this name.
            .env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_STRIP",
                "aarch64-linux-gnu-strip",
            );
    }
    let out = cmd
        .output()
        .context("could not run cargo deb (`cargo xtask setup` installs cargo-deb)")?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "cargo deb failed");
    let deb = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    anyhow::ensure!(
        !deb.is_empty(),
        "cargo deb did not say where the package is"
    );
    Ok(PathBuf::from(deb))
}

fn rpm(root: &Path, arch: Arch, strip: &str) -> anyhow::Result<PathBuf> {
    let release = arch.release_dir(root);
    // What the spec installs, in one directory: the .deb's assets, the binary stripped (as
    // cargo-deb strips it), the config and the README.
    let assets = release.join("debian-assets");
    let binary = assets.join("apiban");
    std::fs::copy(release.join("apiban"), &binary).context("cannot copy the binary")?;
    status({
        let mut c = Command::new(strip);
        c.arg(&binary);
        c
    })
    .with_context(|| format!("{strip} failed"))?;
    std::fs::copy(
        root.join("packaging/config.toml"),
        assets.join("config.toml"),
    )?;
    std::fs::copy(root.join("README.md"), assets.join("README.md"))?;
    let top = root.join("target/rpm");
    let rpm_arch = match arch {
        Arch::Amd64 => "x86_64",
        Arch::Arm64 => "aarch64",
    };
    let _ = std::fs::remove_dir_all(top.join("RPMS").join(rpm_arch));
    let define = |k: &str, v: &Path| format!("{k} {}", v.display());
    let version = apiban_version(root)?;
    status({
        let mut c = Command::new("rpmbuild");
        c.args(["-bb", "--quiet"])
            .args(["--target", &format!("{rpm_arch}-linux")])
            .args(["--define", &define("_topdir", &top)])
            .args(["--define", &format!("version {version}")])
            .args(["--define", &define("assets", &assets)])
            .args(["--define", &define("scripts", &root.join("packaging/rpm"))])
            .arg(root.join("packaging/rpm/apiban.spec"));
        c
    })
    .context("rpmbuild failed (Debian's rpm package has it; `cargo xtask setup` installs it)")?;
    let rpm = top
        .join("RPMS")
        .join(rpm_arch)
        .join(format!("apiban-{version}-1.{rpm_arch}.rpm"));
    anyhow::ensure!(rpm.exists(), "rpmbuild made no {}", rpm.display());
    Ok(rpm)
}

/// apiban-user's version, from its manifest.
fn apiban_version(root: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(root.join("apiban-user/Cargo.toml"))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("version = \""))
        .and_then(|rest| rest.split('"').next())
        .map(str::to_owned)
        .context("no version in apiban-user/Cargo.toml")
}
