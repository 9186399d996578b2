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

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};

use crate::{cargo, package::Arch, setup, status};

/// How long a guest may take from power-on to its verdict, under software emulation.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

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
}

pub const KERNELS: [Kernel; 4] = [
    Kernel {
        name: "debian11",
        label: "Debian 11 (bullseye)",
        arch: Arch::Amd64,
        suite: "bullseye",
        package: r"^linux-image-5\.10\.0-[0-9]+-amd64-unsigned$",
    },
    Kernel {
        name: "debian12",
        label: "Debian 12 (bookworm)",
        arch: Arch::Amd64,
        suite: "bookworm",
        package: r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
    },
    Kernel {
        name: "debian13",
        label: "Debian 13 (trixie)",
        arch: Arch::Amd64,
        suite: "trixie",
        package: r"^linux-image-[0-9.]+\+deb13-amd64-unsigned$",
    },
    Kernel {
        name: "debian12",
        label: "Debian 12 (bookworm), arm64",
        arch: Arch::Arm64,
        suite: "bookworm",
        package: r"^linux-image-6\.1\.0-[0-9]+-arm64-unsigned$",
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
            let outcome = apt
                .kernel(kernel)
                .and_then(|found| check(&work, kernel, &found, &binaries));
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

/// What goes into a guest of `arch`: the check as /init; on amd64 also the agent and `ip`
/// for its start-up on a veth pair (the arm64 guest runs the program checks only).
fn guest_binaries(root: &Path, arch: Arch) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    let mut build = cargo(root);
    build.args([
        "build",
        "--release",
        "-p",
        "tests",
        "--bin",
        "apiban-kernel-check",
    ]);
    if arch == Arch::Amd64 {
        build.args(["-p", "apiban-user", "--bin", "apiban"]);
    }
    crate::package::cross(&mut build, arch)?;
    status(build).context("building apiban-kernel-check failed")?;
    let release = arch.release_dir(root);
    let mut binaries = vec![("init", release.join("apiban-kernel-check"))];
    if arch == Arch::Amd64 {
        binaries.push(("apiban", release.join("apiban")));
        binaries.push(("ip", ip_binary()?));
    }
    Ok(binaries)
}

/// iproute2's `ip`, for the guest's veth pair.
fn ip_binary() -> anyhow::Result<PathBuf> {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("the compat check copies iproute2's ip into its guests (apt-get install iproute2)")
}

/// A kernel unpacked: its image package, vmlinuz and (amd64) the veth module, a .ko.
struct Unpacked {
    package: String,
    vmlinuz: PathBuf,
    veth: Option<PathBuf>,
}

fn check(
    work: &Path,
    kernel: &Kernel,
    found: &Unpacked,
    binaries: &[(&str, PathBuf)],
) -> anyhow::Result<String> {
    eprintln!(
        "[compat] {}: {} ({})",
        kernel.label,
        found.package,
        found.vmlinuz.display()
    );
    let dir = work.join(format!("{}-{:?}", kernel.name, kernel.arch).to_lowercase());
    let initrd = initramfs(&dir, kernel.arch, binaries, found.veth.as_deref())?;
    let console = dir.join("console.log");
    let started = Instant::now();
    boot(kernel.arch, &found.vmlinuz, &initrd, &console)?;
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    // The firmware's screen control codes share the check's first line on the console.
    for line in log
        .lines()
        .filter_map(|l| l.find("apiban-kernel-check").map(|at| &l[at..]))
    {
        eprintln!("[compat] {}", line.trim_end_matches('\r'));
    }
    let took = started.elapsed().as_secs();
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

/// apt with this check's own sources, lists and cache: Debian's archive for the suites of
/// the kernels asked for, nothing of the machine's configuration used or changed.
struct Apt {
    dir: PathBuf,
    arch: Arch,
}

impl Apt {
    fn new(work: &Path, arch: Arch, kernels: &[&Kernel]) -> anyhow::Result<Self> {
        let dir = work.join(format!("apt-{}", arch.debian()));
        for sub in ["lists/partial", "cache/archives/partial", "debs"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let mut sources = String::new();
        for k in kernels {
            sources.push_str(&format!(
                "deb [signed-by={keyring}] http://deb.debian.org/debian {} main\n\
                 deb [signed-by={keyring}] http://deb.debian.org/debian-security {}-security main\n",
                k.suite, k.suite
            ));
        }
        let list = dir.join("sources.list");
        let changed = std::fs::read_to_string(&list).ok().as_deref() != Some(sources.as_str());
        std::fs::write(&list, &sources)?;
        let apt = Self { dir, arch };
        // Security updates bring new kernel packages; a day-old index still finds one.
        let stamp = apt.dir.join("updated");
        let fresh = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < Duration::from_secs(86_400));
        if changed || !fresh {
            status(apt.command("apt-get", &["update", "-q"]))
                .context("apt-get update of Debian's archive for the kernels failed")?;
            std::fs::write(&stamp, b"")?;
        }
        Ok(apt)
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let mut c = Command::new(program);
        c.current_dir(self.dir.join("debs"))
            .arg("-o")
            .arg(format!("Dir::Etc::SourceList={}", d("sources.list")))
            .args(["-o", "Dir::Etc::SourceParts=/dev/null"])
            .args(["-o", "Dir::Etc::Preferences=/dev/null"])
            .args(["-o", "Dir::Etc::PreferencesParts=/dev/null"])
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", d("lists")))
            .arg("-o")
            .arg(format!("Dir::Cache={}", d("cache")))
            .arg("-o")
            .arg(format!("APT::Architecture={}", self.arch.debian()))
            .arg("-o")
            .arg(format!("APT::Architectures={}", self.arch.debian()))
            .args(args);
        c
    }

    /// The newest image package of `kernel`'s suite, downloaded and unpacked once.
    fn kernel(&self, kernel: &Kernel) -> anyhow::Result<Unpacked> {
        let search = self
            .command("apt-cache", &["search", "--names-only", kernel.package])
            .output()
            .context("apt-cache is needed to find Debian's kernels (a Debian machine)")?;
        let mut packages: Vec<String> = String::from_utf8_lossy(&search.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        packages.sort_by_key(|p| version_key(p));
        let Some(package) = packages.pop() else {
            bail!(
                "no package matching {} in {}'s archive (apt-get update in {} failed?)",
                kernel.package,
                kernel.suite,
                self.dir.display()
            );
        };
        let release = package
            .strip_prefix("linux-image-")
            .and_then(|p| p.strip_suffix("-unsigned"))
            .with_context(|| format!("{package} is not named as a kernel image"))?
            .to_owned();
        let kept = self.dir.parent().unwrap_or(&self.dir).join("kernels");
        std::fs::create_dir_all(&kept)?;
        let vmlinuz = kept.join(format!("vmlinuz-{release}"));
        let veth = (self.arch == Arch::Amd64).then(|| kept.join(format!("veth-{release}.ko")));
        if vmlinuz.exists() && veth.as_ref().is_none_or(|v| v.exists()) {
            return Ok(Unpacked {
                package,
                vmlinuz,
                veth,
            });
        }
        let debs = self.dir.join("debs");
        status(self.command("apt-get", &["download", "-q", &package]))
            .with_context(|| format!("cannot download {package}"))?;
        let deb = std::fs::read_dir(&debs)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
            .with_context(|| format!("apt-get download left no {package}_*.deb"))?;
        let unpacked = self.dir.join("unpacked");
        let _ = std::fs::remove_dir_all(&unpacked);
        std::fs::create_dir_all(&unpacked)?;
        // Only what the guest needs: the image and the veth module (xz'd from Debian 13).
        let script = format!(
            "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' --wildcards '*/vmlinuz-*' \
             '*/drivers/net/veth.ko*'",
            deb.display(),
            unpacked.display()
        );
        status({
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        })
        .with_context(|| format!("cannot unpack {}", deb.display()))?;
        let image = find_file(&unpacked, &format!("vmlinuz-{release}"))
            .with_context(|| format!("no vmlinuz-{release} in {package}"))?;
        std::fs::copy(&image, &vmlinuz)?;
        if let Some(veth) = &veth {
            let module = find_file(&unpacked, "veth.ko")
                .or_else(|| find_file(&unpacked, "veth.ko.xz"))
                .with_context(|| format!("no veth module in {package}"))?;
            if module.extension().is_some_and(|e| e == "xz") {
                let out = Command::new("xz")
                    .args(["-dc"])
                    .arg(&module)
                    .output()
                    .context("xz decompresses Debian 13's modules")?;
                if !out.status.success() {
                    bail!("xz could not decompress {}", module.display());
                }
                std::fs::write(veth, out.stdout)?;
            } else {
                std::fs::copy(&module, veth)?;
            }
        }
        let _ = std::fs::remove_dir_all(&unpacked);
        let _ = std::fs::remove_file(&deb);
        Ok(Unpacked {
            package,
            vmlinuz,
            veth,
        })
    }
}

/// Numbers in a package name, in order: 5.10.0-46 sorts after 5.10.0-9.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}

/// A gzip'd newc cpio: the check as /init, the agent, ip, the veth module, and the shared
/// libraries they link.
fn initramfs(
    dir: &Path,
    arch: Arch,
    binaries: &[(&str, PathBuf)],
    veth: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    let tree = dir.join("initramfs");
    let _ = std::fs::remove_dir_all(&tree);
    for sub in ["proc", "sys", "dev", "tmp", "run"] {
        std::fs::create_dir_all(tree.join(sub))?;
    }
    for (name, binary) in binaries {
        std::fs::copy(binary, tree.join(name))
            .with_context(|| format!("cannot copy {} into the initramfs", binary.display()))?;
        for (lib, at) in libraries(arch, binary)? {
            let target = tree.join(at.trim_start_matches('/'));
            if target.exists() {
                continue;
            }
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            // Follows the symlinks: the guest gets the files themselves under the linked names.
            std::fs::copy(&lib, &target)
                .with_context(|| format!("cannot copy {}", lib.display()))?;
        }
    }
    if let Some(veth) = veth {
        std::fs::copy(veth, tree.join("veth.ko"))?;
    }
    let initrd = dir.join("initrd.gz");
    let script = format!(
        "cd {} && find . | cpio --quiet -o -H newc | gzip -1 > {}",
        tree.display(),
        initrd.display()
    );
    status({
        let mut c = Command::new("sh");
        c.args(["-c", &script]);
        c
    })
    .context("cpio and gzip build the initramfs")?;
    Ok(initrd)
}

/// The shared libraries `binary` links, each with where the guest looks for it. This
/// machine's own: ldd. arm64: the ELF's NEEDED entries and interpreter, from Debian's
/// cross libc (libc6-arm64-cross), all under /lib, which the guest's loader searches.
fn libraries(arch: Arch, binary: &Path) -> anyhow::Result<Vec<(PathBuf, String)>> {
    if arch == Arch::Amd64 {
        let ldd = Command::new("ldd")
            .arg(binary)
            .output()
            .context("ldd is needed to find the binaries' libraries")?;
        return Ok(String::from_utf8_lossy(&ldd.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
            .map(|lib| (PathBuf::from(lib), lib.to_owned()))
            .collect());
    }
    let elf = Command::new("aarch64-linux-gnu-readelf")
        .args(["-d", "-l"])
        .arg(binary)
        .output()
        .context("aarch64-linux-gnu-readelf (binutils-aarch64-linux-gnu) reads the arm64 build")?;
    let text = String::from_utf8_lossy(&elf.stdout);
    let cross = Path::new("/usr/aarch64-linux-gnu/lib");
    let mut libs = Vec::new();
    for line in text.lines() {
        if let Some(name) = line
            .split("Shared library: [")
            .nth(1)
            .and_then(|r| r.split(']').next())
        {
            libs.push((cross.join(name), format!("/lib/{name}")));
        }
        if let Some(interp) = line
            .split("[Requesting program interpreter: ")
            .nth(1)
            .and_then(|r| r.split(']').next())
        {
            let name = Path::new(interp)
                .file_name()
                .context("an interpreter path")?;
            libs.push((cross.join(name), interp.to_owned()));
        }
    }
    anyhow::ensure!(
        !libs.is_empty(),
        "no libraries found in {}",
        binary.display()
    );
    Ok(libs)
}

/// Boots under KVM when the machine offers a working one, else (or when the KVM attempt
/// dies before the guest says anything, as under some nested hypervisors) software emulation.
fn boot(arch: Arch, vmlinuz: &Path, initrd: &Path, console: &Path) -> anyhow::Result<()> {
    if arch == Arch::Arm64 {
        return boot_with(arch, vmlinuz, initrd, console, "tcg");
    }
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm {
        match boot_with(arch, vmlinuz, initrd, console, "kvm") {
            Ok(()) => return Ok(()),
            Err(e)
                if !std::fs::read_to_string(console)
                    .unwrap_or_default()
                    .contains("apiban-kernel-check") =>
            {
                eprintln!("[compat] KVM did not work here ({e:#}); software emulation instead");
            }
            Err(e) => return Err(e),
        }
    }
    boot_with(arch, vmlinuz, initrd, console, "tcg")
}

fn boot_with(
    arch: Arch,
    vmlinuz: &Path,
    initrd: &Path,
    console: &Path,
    accel: &str,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(console);
    let (program, machine, cpu, tty) = match arch {
        Arch::Amd64 => (
            "qemu-system-x86_64",
            "pc",
            if accel == "kvm" { "host" } else { "max" },
            "ttyS0",
        ),
        // cortex-a72: "max" emulates pointer authentication, slowly, under software emulation.
        Arch::Arm64 => ("qemu-system-aarch64", "virt", "cortex-a72", "ttyAMA0"),
    };
    let mut qemu = Command::new(program);
    qemu.args(["-m", "2048", "-smp", "2", "-nographic", "-no-reboot"])
        .args(["-machine", machine])
        .args(["-accel", accel])
        .args(["-cpu", cpu])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            &format!("console={tty} rdinit=/init panic=-1 quiet loglevel=4"),
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(["-monitor", "none", "-display", "none"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    eprintln!(
        "[compat] booting under qemu ({}); up to {}s",
        if accel == "kvm" {
            "KVM"
        } else {
            "software emulation"
        },
        BOOT_TIMEOUT.as_secs()
    );
    let mut child = qemu
        .spawn()
        .with_context(|| format!("cannot start {program} (`cargo xtask setup` installs it)"))?;
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        if let Some(st) = child.try_wait()? {
            if !st.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read as _;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("qemu exited with {st}: {}", err.trim());
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the guest did not power off within {}s (console: {})",
                BOOT_TIMEOUT.as_secs(),
                console.display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_abi_sorts_last() {
        let mut names = [
            "linux-image-5.10.0-46-amd64-unsigned",
            "linux-image-5.10.0-9-amd64-unsigned",
            "linux-image-5.10.0-38-amd64-unsigned",
        ];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names[2], "linux-image-5.10.0-46-amd64-unsigned");
        let mut trixie = [
            "linux-image-6.12.117+deb13-amd64-unsigned",
            "linux-image-6.12.57+deb13-amd64-unsigned",
        ];
        trixie.sort_by_key(|n| version_key(n));
        assert_eq!(trixie[1], "linux-image-6.12.117+deb13-amd64-unsigned");
    }
}
