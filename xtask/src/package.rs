//! `cargo xtask package`: the .deb (cargo-deb) and the RPM (rpmbuild, packaging/rpm), for amd64
//! and arm64. Both carry the same files: the binary, the systemd unit, the config as a
//! conffile, man pages, shell completions, the README and docs/; their scripts behave alike (installing
//! starts nothing, an upgrade restarts a running agent onto the new binary while the program
//! stays attached, the final removal detaches). Both arches are built with cargo-zigbuild
//! against glibc GLIBC_FLOOR's symbols, so that one package runs from Debian 11 to 13 (a plain
//! build on Debian 12 would need glibc 2.34); zig also cross-links arm64, without a cross gcc.
//! The eBPF object inside is the same bytecode on both.

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
    /// The Rust target.
    pub fn triple(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-gnu",
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// Debian's name for it.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// Where `zigbuild` puts the release build (not target/release, this machine's own).
    pub fn release_dir(self, root: &Path) -> PathBuf {
        root.join("target").join(self.triple()).join("release")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Deb,
    Rpm,
}

/// The oldest glibc whose symbols the packaged binary may use: Debian 11's, which Ubuntu 20.04
/// also has. RHEL 9 has 2.34, Ubuntu 22.04 2.35.
pub const GLIBC_FLOOR: &str = "2.31";

/// Builds the release binary for `arch`.
pub fn build(root: &Path, arch: Arch) -> anyhow::Result<()> {
    let mut cmd = zigbuild(root, arch)?;
    cmd.args(["-p", "apiban-user", "--bin", "apiban"]);
    status(cmd).with_context(|| format!("building the {arch:?} release binary failed"))
}

/// A `cargo zigbuild --release` for `arch` against glibc GLIBC_FLOOR, into
/// `arch.release_dir`; the caller adds the packages. Symbols are stripped at link time, as
/// both packagers would (their `strip` cannot read an arm64 binary on this machine).
pub fn zigbuild(root: &Path, arch: Arch) -> anyhow::Result<Command> {
    let tools = setup::ensure_zigbuild(root)?;
    setup::ensure_rust_target(arch.triple())?;
    let mut cmd = Command::new(tools.join("bin/cargo-zigbuild"));
    cmd.current_dir(root)
        .args(["zigbuild", "--release", "--target"])
        .arg(format!("{}.{GLIBC_FLOOR}", arch.triple()))
        // zig from the same virtualenv (`python -m ziglang`).
        .env("CARGO_ZIGBUILD_PYTHON_PATH", tools.join("bin/python"))
        .env(
            format!(
                "CARGO_TARGET_{}_RUSTFLAGS",
                arch.triple().to_uppercase().replace('-', "_")
            ),
            "-C strip=symbols",
        );
    Ok(cmd)
}

/// Builds the package; its path.
pub fn package(root: &Path, arch: Arch, format: Format) -> anyhow::Result<PathBuf> {
    match format {
        Format::Deb => setup::ensure_package_tools()?,
        Format::Rpm => setup::ensure_rpm_tools()?,
    }
    // The man pages and completions come from running the binary: the amd64 build.
    build(root, Arch::Amd64)?;
    if arch != Arch::Amd64 {
        build(root, arch)?;
    }
    assets(root, arch)?;
    match format {
        Format::Deb => deb(root, arch),
        Format::Rpm => rpm(root, arch),
    }
}

/// The unit, man pages and completions, where both packagers read them:
/// `<release dir>/debian-assets` (cargo-deb, given --target, reads the assets its manifest
/// lists under target/release from target/<triple>/release).
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
    let apiban = Arch::Amd64.release_dir(root).join("apiban");
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

fn deb(root: &Path, arch: Arch) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo(root);
    // --no-strip: the build stripped it.
    cmd.args(["deb", "-p", "apiban-user", "--no-build", "--no-strip", "-o"])
        .arg(root.join("target/debian"))
        .args(["--target", arch.triple()]);
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

fn rpm(root: &Path, arch: Arch) -> anyhow::Result<PathBuf> {
    let release = arch.release_dir(root);
    // What the spec installs, in one directory: the .deb's assets, the binary (stripped by
    // the build), the config, the README and docs/.
    let assets = release.join("debian-assets");
    std::fs::copy(release.join("apiban"), assets.join("apiban"))
        .context("cannot copy the binary")?;
    std::fs::copy(
        root.join("packaging/config.toml"),
        assets.join("config.toml"),
    )?;
    std::fs::copy(root.join("README.md"), assets.join("README.md"))?;
    // The README links these; installed beside it, its links hold.
    let docs = assets.join("docs");
    let _ = std::fs::remove_dir_all(&docs);
    std::fs::create_dir_all(&docs).context("cannot create the docs' asset directory")?;
    for entry in std::fs::read_dir(root.join("docs")).context("cannot read docs/")? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md") {
            std::fs::copy(&path, docs.join(path.file_name().unwrap_or_default()))
                .with_context(|| format!("cannot copy {}", path.display()))?;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The .deb's dependency on libc6 names the glibc the build links against.
    #[test]
    fn the_deb_depends_on_the_glibc_it_is_built_for() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let manifest = std::fs::read_to_string(root.join("apiban-user/Cargo.toml")).unwrap();
        let depends = manifest
            .lines()
            .find_map(|l| l.strip_prefix("depends = "))
            .expect("a depends line");
        assert_eq!(depends, format!("\"libc6 (>= {GLIBC_FLOOR})\""));
    }
}
