//! A guest of the compat check: its initramfs (the check as /init, the agent, ip, the veth
//! module, the libraries they load) and its boot under qemu.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::userland::Userland;
use crate::{package::Arch, status};

/// How long a guest may take from power-on to its verdict, under software emulation.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// A gzip'd newc cpio: the check as /init, the agent, ip, the veth module, and the shared
/// libraries they link.
pub fn initramfs(
    dir: &Path,
    userland: &Userland,
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
    }
    let elves: Vec<&Path> = binaries.iter().map(|(_, b)| b.as_path()).collect();
    for (lib, at) in userland.libraries(&elves)? {
        let target = tree.join(at.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // The file itself under the name the loader looks for.
        std::fs::copy(&lib, &target).with_context(|| format!("cannot copy {}", lib.display()))?;
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

/// Boots under KVM when the machine offers a working one, else (or when the KVM attempt
/// dies before the guest says anything, as under some nested hypervisors) software emulation.
pub fn boot(arch: Arch, vmlinuz: &Path, initrd: &Path, console: &Path) -> anyhow::Result<()> {
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
