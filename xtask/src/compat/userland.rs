//! The C library and `ip` a guest's binaries run with. The kernel alone does not make a
//! Debian 11 host: its glibc (2.31) does too, and the agent shipped in the packages has to
//! start on it. So each guest gets its suite's libc6, iproute2 and the libraries `ip` loads,
//! for its architecture, unpacked from Debian's archive (nothing installed).
//!
//! Libraries are found the way the guest's loader will: each binary's NEEDED entries and
//! interpreter, read with readelf, looked up in the userland's library directories, then the
//! same for what those load. A library that is not there fails the build of the initramfs,
//! naming it, rather than the guest's boot.

use std::{
    collections::BTreeMap,
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::package::Arch;

/// Where a guest's binaries find their libraries on this machine, and where the guest keeps
/// them.
pub struct Userland {
    /// What the check's output calls it.
    pub label: String,
    /// The file system the libraries come from.
    root: PathBuf,
    /// Searched in order, relative to `root`.
    lib_dirs: Vec<PathBuf>,
    /// The directory the guest's loader searches, where every library goes.
    guest_lib_dir: String,
    /// The glibc version the guest must report.
    pub glibc: String,
}

impl Userland {
    /// Packages of a Debian suite for `arch` unpacked under `root`, with its `glibc` version.
    pub fn unpacked(label: String, root: PathBuf, glibc: String, arch: Arch) -> Self {
        // Debian's multiarch directories: bullseye and bookworm keep libraries under /lib,
        // trixie under /usr/lib; the guest has them all in one.
        let triple = match arch {
            Arch::Amd64 => "x86_64-linux-gnu",
            Arch::Arm64 => "aarch64-linux-gnu",
        };
        Self {
            label,
            root,
            lib_dirs: vec![
                Path::new("lib").join(triple),
                Path::new("usr/lib").join(triple),
            ],
            guest_lib_dir: format!("/lib/{triple}"),
            glibc,
        }
    }

    /// iproute2's `ip` of this userland.
    pub fn ip(&self) -> anyhow::Result<PathBuf> {
        ["usr/sbin/ip", "sbin/ip", "usr/bin/ip", "bin/ip"]
            .into_iter()
            .find_map(|p| self.resolve(Path::new(p)).ok())
            .with_context(|| format!("no iproute2 `ip` in {}", self.root.display()))
    }

    /// The libraries `binaries` load, directly or through each other, with the interpreter:
    /// (the file here, where the guest has it).
    pub fn libraries(&self, binaries: &[&Path]) -> anyhow::Result<Vec<(PathBuf, String)>> {
        let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut queue: Vec<PathBuf> = binaries.iter().map(|b| b.to_path_buf()).collect();
        while let Some(elf) = queue.pop() {
            let (needed, interpreter) = dynamic_section(&elf)?;
            for name in needed {
                let at = format!("{}/{name}", self.guest_lib_dir);
                if found.contains_key(&at) {
                    continue;
                }
                let file = self.find_library(&name).with_context(|| {
                    format!(
                        "{} needs {name}, which {} userland does not have",
                        elf.display(),
                        self.label
                    )
                })?;
                queue.push(file.clone());
                found.insert(at, file);
            }
            if let Some(interp) = interpreter {
                let name = Path::new(&interp)
                    .file_name()
                    .context("an interpreter path names a file")?
                    .to_string_lossy()
                    .into_owned();
                let file = self
                    .find_library(&name)
                    .with_context(|| format!("{} userland has no loader {interp}", self.label))?;
                found.insert(interp, file);
            }
        }
        Ok(found.into_iter().map(|(at, file)| (file, at)).collect())
    }

    fn find_library(&self, name: &str) -> Option<PathBuf> {
        self.lib_dirs
            .iter()
            .find_map(|dir| self.resolve(&dir.join(name)).ok())
    }

    /// `path` inside `root`, its symlinks followed inside `root` too: an absolute link in an
    /// unpacked package (/lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/...) means the
    /// userland's file, not this machine's.
    fn resolve(&self, path: &Path) -> anyhow::Result<PathBuf> {
        let mut inside = PathBuf::new();
        let mut pending: Vec<PathBuf> = vec![path.to_path_buf()];
        let mut links = 0;
        while let Some(next) = pending.pop() {
            let parts: Vec<Component> = next.components().collect();
            for (at, part) in parts.iter().enumerate() {
                match part {
                    Component::RootDir => inside = PathBuf::new(),
                    Component::ParentDir => {
                        inside.pop();
                    }
                    Component::Normal(p) => {
                        inside.push(p);
                        let here = self.root.join(&inside);
                        let meta = std::fs::symlink_metadata(&here)
                            .with_context(|| format!("no {}", here.display()))?;
                        if meta.file_type().is_symlink() {
                            links += 1;
                            if links > 40 {
                                bail!("too many symbolic links at {}", here.display());
                            }
                            inside.pop();
                            // The link's target first, then the rest of `next` after it.
                            pending.push(parts[at + 1..].iter().collect());
                            pending.push(std::fs::read_link(&here)?);
                            break;
                        }
                    }
                    Component::CurDir | Component::Prefix(_) => {}
                }
            }
        }
        let file = self.root.join(&inside);
        anyhow::ensure!(file.is_file(), "{} is not a file", file.display());
        Ok(file)
    }
}

/// An ELF's NEEDED entries and program interpreter (none for a library), read with readelf,
/// which reads any architecture's ELF.
fn dynamic_section(elf: &Path) -> anyhow::Result<(Vec<String>, Option<String>)> {
    let out = Command::new("readelf")
        .args(["-d", "-l", "-W"])
        .arg(elf)
        .output()
        .context("readelf (binutils) reads the guest's binaries")?;
    anyhow::ensure!(
        out.status.success(),
        "readelf cannot read {}: {}",
        elf.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let between = |line: &str, open: &str| {
        line.split(open)
            .nth(1)
            .and_then(|r| r.split(']').next())
            .map(str::to_owned)
    };
    let needed = text
        .lines()
        .filter_map(|l| between(l, "Shared library: ["))
        .collect();
    let interpreter = text
        .lines()
        .find_map(|l| between(l, "[Requesting program interpreter: "));
    Ok((needed, interpreter))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An absolute link inside the userland stays inside it, as in an unpacked libc6.
    #[test]
    fn links_resolve_inside_the_userland() {
        let root = std::env::temp_dir().join(format!("apiban-userland-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("lib/x86_64-linux-gnu")).unwrap();
        std::fs::create_dir_all(root.join("lib64")).unwrap();
        std::fs::write(root.join("lib/x86_64-linux-gnu/ld-2.31.so"), b"loader").unwrap();
        std::os::unix::fs::symlink(
            "ld-2.31.so",
            root.join("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            "/lib/x86_64-linux-gnu/ld-2.31.so",
            root.join("lib64/ld-linux-x86-64.so.2"),
        )
        .unwrap();
        let userland = Userland::unpacked("test".into(), root.clone(), "2.31".into(), Arch::Amd64);
        let want = root.join("lib/x86_64-linux-gnu/ld-2.31.so");
        assert_eq!(
            userland
                .resolve(Path::new("lib64/ld-linux-x86-64.so.2"))
                .unwrap(),
            want
        );
        assert_eq!(userland.find_library("ld-linux-x86-64.so.2").unwrap(), want);
        assert!(userland.find_library("libc.so.6").is_none());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
