//! `cargo xtask compat`: the production programs and the agent on the kernels carriers run.
//! Boots Debian's own kernels (11's 5.10, 12's 6.1, 13's newest: the newest
//! `linux-image-*-amd64-unsigned` of each suite) under qemu, each with an initramfs whose
//! /init is `apiban-kernel-check`: it probes the kernel, loads the program through the
//! verifier with what the kernel has, runs generated frames through BPF_PROG_TEST_RUN against
//! the model, captures and samples where the kernel can (and checks that nothing is copied
//! where it cannot), then starts the real agent on a veth pair: its feature lines, a refusal
//! of a feature the kernel lacks, a ban enforced on a real frame. Its verdict line is read
//! off the serial console. KVM when the machine offers it, software emulation otherwise.
//!
//! The kernels come from Debian's archive through an apt configuration of this check's own
//! (target/compat/apt): the machine's sources and preferences are not touched.

mod apt;
mod guest;
mod userland;

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{package::Arch, setup, status};
use apt::{Apt, Unpacked};
use userland::Userland;

/// A Debian release's kernel: where it is, and what its image package is called.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    /// What `--kernel` calls it.
    pub name: &'static str,
    pub label: &'static str,
    pub arch: Arch,
    suite: &'static str,
    /// An `apt-cache search --names-only` pattern for the generic amd64 image.
    package: &'static str,
    /// The suite's packages the guest's binaries run with: libc6, iproute2 and what `ip`
    /// loads.
    userland: &'static [&'static str],
}

/// Debian 12's C library, and iproute2 with what its `ip` loads.
const BOOKWORM: &[&str] = &[
    "libc6", "iproute2", "libbpf1", "libbsd0", "libmd0", "libcap2", "libelf1", "libmnl0", "zlib1g",
];

pub const KERNELS: [Kernel; 4] = [
    Kernel {
        name: "debian11",
        label: "Debian 11 (bullseye)",
        arch: Arch::Amd64,
        suite: "bullseye",
        package: r"^linux-image-5\.10\.0-[0-9]+-amd64-unsigned$",
        userland: &[
            "libc6", "iproute2", "libbpf0", "libbsd0", "libmd0", "libcap2", "libelf1", "libmnl0",
            "zlib1g",
        ],
    },
    Kernel {
        name: "debian12",
        label: "Debian 12 (bookworm)",
        arch: Arch::Amd64,
        suite: "bookworm",
        package: r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
        userland: BOOKWORM,
    },
    Kernel {
        name: "debian13",
        label: "Debian 13 (trixie)",
        arch: Arch::Amd64,
        suite: "trixie",
        package: r"^linux-image-[0-9.]+\+deb13-amd64-unsigned$",
        userland: &[
            "libc6",
            "iproute2",
            "libbpf1",
            "libcap2",
            "libelf1t64",
            "libmnl0",
            "libselinux1",
            "libpcre2-8-0",
            "libzstd1",
            "zlib1g",
        ],
    },
    Kernel {
        name: "debian12",
        label: "Debian 12 (bookworm), arm64",
        arch: Arch::Arm64,
        suite: "bookworm",
        package: r"^linux-image-6\.1\.0-[0-9]+-arm64-unsigned$",
        userland: BOOKWORM,
    },
];

/// The kernels `--kernel` names for `arch` (all of that architecture's for "all"; arm64 has
/// Debian 12's only).
pub fn select(names: &[String], arch: Arch) -> anyhow::Result<Vec<Kernel>> {
    let of_arch: Vec<Kernel> = KERNELS.into_iter().filter(|k| k.arch == arch).collect();
    if names.is_empty() || names.iter().any(|n| n == "all") {
        return Ok(of_arch);
    }
    names
        .iter()
        .map(|n| {
            of_arch
                .iter()
                .find(|k| k.name == n)
                .copied()
                .with_context(|| {
                    let known: Vec<&str> = of_arch.iter().map(|k| k.name).collect();
                    format!(
                        "no {arch:?} kernel {n}; --kernel takes {} or all",
                        known.join(", ")
                    )
                })
        })
        .collect()
}

pub fn run(root: &Path, kernels: &[Kernel]) -> anyhow::Result<()> {
    setup::ensure_compat_tools(kernels.iter().any(|k| k.arch == Arch::Arm64))?;
    let work = root.join("target/compat");
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let mut failed = Vec::new();
    for arch in [Arch::Amd64, Arch::Arm64] {
        let of_arch: Vec<&Kernel> = kernels.iter().filter(|k| k.arch == arch).collect();
        if of_arch.is_empty() {
            continue;
        }
        let binaries = guest_binaries(root, arch)?;
        let apt = Apt::new(&work, arch, &of_arch)?;
        for kernel in of_arch {
            let outcome = apt.kernel(kernel).and_then(|found| {
                let userland = apt.userland(kernel)?;
                let mut binaries = binaries.clone();
                binaries.push(("ip", userland.ip()?));
                check(&work, kernel, &found, &userland, &binaries)
            });
            match outcome {
                Ok(line) => eprintln!("[compat] {}: {line}", kernel.label),
                Err(e) => {
                    eprintln!("[compat] {}: FAILED: {e:#}", kernel.label);
                    failed.push(kernel.label);
                }
            }
        }
    }
    if !failed.is_empty() {
        bail!("the kernel check did not pass on {}", failed.join(", "));
    }
    Ok(())
}

/// What goes into a guest of `arch`: the check as /init and the agent (and, per kernel,
/// `ip`) for its start-up on a veth pair. Both come from the packages' build, against glibc
/// 2.31: the agent in the guest is the binary the packages ship.
fn guest_binaries(root: &Path, arch: Arch) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    let release = arch.release_dir(root);
    let mut build = crate::package::zigbuild(root, arch)?;
    build.args(["-p", "tests", "--bin", "apiban-kernel-check"]);
    status(build).context("building apiban-kernel-check failed")?;
    // Apart: built with the tests crate, the agent would get its features (cargo unifies
    // them within one build), and differ from the packaged one.
    crate::package::build(root, arch)?;
    Ok(vec![
        ("init", release.join("apiban-kernel-check")),
        ("apiban", release.join("apiban")),
    ])
}

fn check(
    work: &Path,
    kernel: &Kernel,
    found: &Unpacked,
    userland: &Userland,
    binaries: &[(&str, PathBuf)],
) -> anyhow::Result<String> {
    eprintln!(
        "[compat] {}: {} ({}), with {} userland",
        kernel.label,
        found.package,
        found.vmlinuz.display(),
        userland.label
    );
    let dir = work.join(format!("{}-{:?}", kernel.name, kernel.arch).to_lowercase());
    let initrd = guest::initramfs(&dir, userland, binaries, found.veth.as_deref())?;
    let console = dir.join("console.log");
    let started = Instant::now();
    guest::boot(kernel.arch, &found.vmlinuz, &initrd, &console)?;
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    // The firmware's screen control codes share the check's first line on the console.
    for line in log
        .lines()
        .filter_map(|l| l.find("apiban-kernel-check").map(|at| &l[at..]))
    {
        eprintln!("[compat] {}", line.trim_end_matches('\r'));
    }
    let took = started.elapsed().as_secs();
    let glibc = &userland.glibc;
    if !log.contains(&format!("C library glibc {glibc}\r"))
        && !log.contains(&format!("C library glibc {glibc}\n"))
    {
        bail!(
            "the guest did not run with {} glibc {glibc} (console: {})",
            userland.label,
            console.display()
        );
    }
    if log.contains("apiban-kernel-check: PASS") {
        return Ok(format!(
            "{}: passed ({took}s from power-on to power-off)",
            found.package
        ));
    }
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    bail!(
        "the kernel check did not pass on {} (console: {}); its last lines:\n{}",
        found.package,
        console.display(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}
