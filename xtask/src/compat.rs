//! `cargo xtask compat`: the production XDP program on the kernel carriers run. Boots
//! Debian 12's own kernel (the newest `linux-image-6.1.0-*-amd64-unsigned` in its archive)
//! under qemu, with an initramfs whose /init is `apiban-kernel-check`: it probes the kernel,
//! loads the program through the verifier, runs generated frames through BPF_PROG_TEST_RUN
//! against the model, and captures a dropped frame; its verdict line is read off the serial
//! console. KVM when the machine offers it, software emulation otherwise.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cargo, setup, status};

/// How long the guest may take from power-on to its verdict, under software emulation.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

pub fn run(root: &Path) -> anyhow::Result<()> {
    setup::ensure_compat_tools()?;
    let work = root.join("target/compat");
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let (package, vmlinuz) = debian_kernel(&work)?;
    eprintln!("[compat] kernel: {package} ({})", vmlinuz.display());
    let mut build = cargo(root);
    build.args([
        "build",
        "--release",
        "-p",
        "tests",
        "--bin",
        "apiban-kernel-check",
    ]);
    status(build).context("building apiban-kernel-check failed")?;
    let check = root.join("target/release/apiban-kernel-check");
    let initrd = initramfs(&work, &check)?;
    let console = work.join("console.log");
    let started = Instant::now();
    boot(&vmlinuz, &initrd, &console)?;
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
        eprintln!("[compat] {package}: passed ({took}s from power-on to power-off)");
        return Ok(());
    }
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    bail!(
        "the kernel check did not pass on {package} (console: {}); its last lines:\n{}",
        console.display(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// The newest Debian 12 kernel image package, downloaded (once) and unpacked: its name and
/// the vmlinuz path.
fn debian_kernel(work: &Path) -> anyhow::Result<(String, PathBuf)> {
    let search = Command::new("apt-cache")
        .args([
            "search",
            "--names-only",
            r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
        ])
        .output()
        .context("apt-cache is needed to find Debian's kernel (a Debian machine)")?;
    let mut packages: Vec<(u32, String)> = String::from_utf8_lossy(&search.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| {
            let abi = name
                .strip_prefix("linux-image-6.1.0-")?
                .strip_suffix("-amd64-unsigned")?;
            Some((abi.parse().ok()?, name.to_owned()))
        })
        .collect();
    packages.sort();
    let Some((abi, package)) = packages.pop() else {
        bail!(
            "no linux-image-6.1.0-*-amd64-unsigned in the apt archive; this needs Debian 12's \
             package lists (`apt-get update`)"
        );
    };
    let vmlinuz = work.join(format!("vmlinuz-6.1.0-{abi}-amd64"));
    if vmlinuz.exists() {
        return Ok((package, vmlinuz));
    }
    let downloads = work.join("debs");
    std::fs::create_dir_all(&downloads)?;
    status({
        let mut c = Command::new("apt-get");
        c.current_dir(&downloads).args(["download", "-q", &package]);
        c
    })
    .with_context(|| format!("cannot download {package}"))?;
    let deb = std::fs::read_dir(&downloads)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .with_context(|| format!("apt-get download left no {package}_*.deb"))?;
    let unpacked = work.join("unpacked");
    status({
        let mut c = Command::new("dpkg-deb");
        c.arg("-x").arg(&deb).arg(&unpacked);
        c
    })?;
    let inside = unpacked.join(format!("boot/vmlinuz-6.1.0-{abi}-amd64"));
    std::fs::copy(&inside, &vmlinuz)
        .with_context(|| format!("{} is not in {package}", inside.display()))?;
    let _ = std::fs::remove_dir_all(&unpacked);
    let _ = std::fs::remove_file(&deb);
    Ok((package, vmlinuz))
}

/// A gzip'd newc cpio with the check as /init and the shared libraries it links.
fn initramfs(work: &Path, check: &Path) -> anyhow::Result<PathBuf> {
    let tree = work.join("initramfs");
    let _ = std::fs::remove_dir_all(&tree);
    for dir in ["proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(tree.join(dir))?;
    }
    std::fs::copy(check, tree.join("init")).context("cannot copy the check into the initramfs")?;
    let ldd = Command::new("ldd")
        .arg(check)
        .output()
        .context("ldd is needed to find the check's libraries")?;
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let target = tree.join(lib.trim_start_matches('/'));
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // Follows the symlinks: the guest gets the files themselves under the linked names.
        std::fs::copy(lib, &target).with_context(|| format!("cannot copy {lib}"))?;
    }
    let initrd = work.join("initrd.gz");
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

/// Boots under KVM when the machine offers a working one, else (or when the KVM attempt
/// dies before the guest says anything, as under some nested hypervisors) software emulation.
fn boot(vmlinuz: &Path, initrd: &Path, console: &Path) -> anyhow::Result<()> {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm {
        match boot_with(vmlinuz, initrd, console, "kvm") {
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
    boot_with(vmlinuz, initrd, console, "tcg")
}

fn boot_with(vmlinuz: &Path, initrd: &Path, console: &Path, accel: &str) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(console);
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-m", "2048", "-smp", "2", "-nographic", "-no-reboot"])
        .args(["-accel", accel])
        .args(["-cpu", if accel == "kvm" { "host" } else { "max" }])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=4",
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
        .context("cannot start qemu-system-x86_64 (`cargo xtask setup` installs it)")?;
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
