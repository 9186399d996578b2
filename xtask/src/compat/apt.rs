//! The compat check's apt: Debian's archive for the suites of the kernels asked for, with
//! sources, lists and cache of its own (target/compat/apt-<arch>): the machine's apt
//! configuration is neither used nor changed. It fetches the kernels and the guests' userlands.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};

use super::{Kernel, userland::Userland};
use crate::{package::Arch, status};

/// A kernel unpacked: its image package, vmlinuz and (amd64) the veth module, a .ko.
pub struct Unpacked {
    pub package: String,
    pub vmlinuz: PathBuf,
    pub veth: Option<PathBuf>,
}

/// apt with this check's own sources, lists and cache: Debian's archive for the suites of
/// the kernels asked for, nothing of the machine's configuration used or changed.
pub struct Apt {
    dir: PathBuf,
    arch: Arch,
}

impl Apt {
    pub fn new(work: &Path, arch: Arch, kernels: &[&Kernel]) -> anyhow::Result<Self> {
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
            // Root downloads into target/, which apt's sandbox user cannot write.
            .args(["-o", "APT::Sandbox::User=root"])
            .args(args);
        c
    }

    /// The newest image package of `kernel`'s suite, downloaded and unpacked once.
    pub fn kernel(&self, kernel: &Kernel) -> anyhow::Result<Unpacked> {
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
        let veth = Some(kept.join(format!("veth-{release}.ko")));
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

impl Apt {
    /// What `kernel`'s guest runs its binaries with: its suite's packages unpacked (once)
    /// under target/compat/userland-<suite>-<arch>.
    pub fn userland(&self, kernel: &Kernel) -> anyhow::Result<Userland> {
        let work = self.dir.parent().unwrap_or(&self.dir);
        let root = work.join(format!("userland-{}-{}", kernel.suite, self.arch.debian()));
        let label = format!("{}'s", kernel.label);
        // The packages unpacked, then libc6's upstream version, as a stamp: a changed list
        // unpacks again.
        let stamp = root.join(".packages");
        let want = kernel.userland.join("\n");
        if let Some((packed, glibc)) = std::fs::read_to_string(&stamp).ok().and_then(|s| {
            s.rsplit_once('\n')
                .map(|(p, g)| (p.to_owned(), g.to_owned()))
        }) && packed == want
        {
            return Ok(Userland::unpacked(label, root, glibc, self.arch));
        }
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let debs = self.dir.join("debs");
        for old in std::fs::read_dir(&debs)?.flatten() {
            let _ = std::fs::remove_file(old.path());
        }
        // pkg/suite: the suite's version, whatever newer suites the sources also list.
        let wanted: Vec<String> = kernel
            .userland
            .iter()
            .map(|p| format!("{p}/{}", kernel.suite))
            .collect();
        let mut args = vec!["download", "-q"];
        args.extend(wanted.iter().map(String::as_str));
        status(self.command("apt-get", &args))
            .with_context(|| format!("cannot download {}'s {}", kernel.suite, wanted.join(" ")))?;
        let mut glibc = None;
        for deb in std::fs::read_dir(&debs)?.flatten() {
            // libc6_2.31-13+deb11u11_amd64.deb: glibc 2.31.
            let name = deb.file_name().to_string_lossy().into_owned();
            if let Some(version) = name.strip_prefix("libc6_") {
                glibc = version.split(['-', '_']).next().map(str::to_owned);
            }
            status({
                let mut c = Command::new("dpkg-deb");
                c.arg("-x").arg(deb.path()).arg(&root);
                c
            })
            .with_context(|| format!("cannot unpack {}", deb.path().display()))?;
            let _ = std::fs::remove_file(deb.path());
        }
        let glibc =
            glibc.with_context(|| format!("apt-get download left no {}'s libc6", kernel.suite))?;
        std::fs::write(&stamp, format!("{want}\n{glibc}"))?;
        Ok(Userland::unpacked(label, root, glibc, self.arch))
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
