//! `apiban detach`: removes apiban's program, and with no interface named, its pins too.

use std::{
    io,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use apiban_common::map_names;

use super::{
    IfaceLock, LoaderError, PinnedAttachment,
    attach::pinned_program,
    attached_pins,
    find::{is_apiban, pinnable_names, program_by_id},
    ifindex, io_err, pinned_attachments,
};
use crate::dataplane::{
    bpffs,
    netlink::{self, XdpProgram},
};

/// What `detach` removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DetachReport {
    pub interfaces: Vec<String>,
    pub maps_removed: bool,
    /// Interfaces whose program was found through the interface rather than a pin.
    pub found_by_interface: Vec<String>,
    /// Interfaces with a pin but not in this network namespace: deleted, or the agent ran in
    /// another namespace, where its program still runs.
    pub not_here: Vec<String>,
    /// Interfaces whose egress classifier's link was unpinned, which detached it.
    pub egress: Vec<String>,
}

/// Detaches apiban's program from `iface` (or from every interface it is attached to in
/// this network namespace). With no interface given, also removes the pinned maps and the
/// directory: nothing is left behind. Only apiban's own program is ever removed, never
/// another one that runs on an interface of the same name. While an agent runs on these
/// maps or interfaces, it refuses unless `force`: the agent would go on writing maps that no
/// interface uses.
pub fn detach(
    bpffs_dir: &Path,
    iface: Option<&str>,
    force: bool,
) -> Result<DetachReport, LoaderError> {
    let _lock = if bpffs_dir.exists() {
        match bpffs::DirLock::acquire(bpffs_dir)? {
            Ok(lock) => Some(lock),
            Err(holder) if !force => {
                return Err(LoaderError::DirInUse {
                    dir: bpffs_dir.to_owned(),
                    holder,
                });
            }
            Err(_) => None,
        }
    } else {
        None
    };
    let wanted = |name: &str| iface.is_none_or(|i| i == name);
    let links: Vec<PinnedAttachment> = pinned_attachments(bpffs_dir)?
        .into_iter()
        .filter(|p| wanted(&p.iface))
        .collect();
    let attached: Vec<(String, PathBuf)> = attached_pins(bpffs_dir)?
        .into_iter()
        .filter(|(name, _)| wanted(name))
        .collect();
    let pinned_somewhere = |name: &str| {
        links.iter().any(|p| p.iface == name) || attached.iter().any(|(n, _)| n == name)
    };
    // Pins that went with an agent's private bpffs: find apiban's program on the interface.
    let by_interface: Vec<netlink::Link> = match iface {
        Some(i) if !pinned_somewhere(i) => ifindex(i)
            .map(netlink::link)
            .transpose()?
            .flatten()
            .into_iter()
            .collect(),
        None if links.is_empty()
            && attached.is_empty()
            && !bpffs_dir.join(map_names::DENY_V4).exists() =>
        {
            netlink::links()?
        }
        _ => Vec::new(),
    };
    if !force {
        let names = links
            .iter()
            .map(|p| p.iface.as_str())
            .chain(attached.iter().map(|(n, _)| n.as_str()))
            .chain(
                by_interface
                    .iter()
                    .filter(|l| l.xdp.is_some())
                    .map(|l| l.name.as_str()),
            );
        for name in names {
            if let Some(index) = ifindex(name)
                && IfaceLock::acquire(index)
                    .map_err(io_err(Path::new("@apiban/xdp")))?
                    .is_none()
            {
                return Err(LoaderError::IfaceInUse {
                    iface: name.to_owned(),
                });
            }
        }
    }

    let mut report = DetachReport {
        egress: super::detach_egress(bpffs_dir, iface)?,
        ..DetachReport::default()
    };
    for pinned in links {
        std::fs::remove_file(&pinned.path).map_err(io_err(&pinned.path))?;
        report.interfaces.push(pinned.iface);
    }
    for (name, pin) in attached {
        match ifindex(&name) {
            None => report.not_here.push(name.clone()),
            Some(index) => {
                if let Some((fd, id)) = pinned_program(&pin)?
                    && let Some(current) = netlink::link(index)?.and_then(|l| l.xdp)
                    && current.id == id
                {
                    detach_program(&name, index, fd.as_fd(), current)?;
                    report.interfaces.push(name.clone());
                }
            }
        }
        std::fs::remove_file(&pin).map_err(io_err(&pin))?;
    }
    for link in by_interface {
        let Some(current) = link.xdp else { continue };
        let Ok(Some(info)) = program_by_id(current.id) else {
            continue;
        };
        if !is_apiban(&info) {
            continue;
        }
        let Ok(fd) = info.fd() else { continue };
        detach_program(&link.name, link.index, fd.as_fd(), current)?;
        report.interfaces.push(link.name.clone());
        report.found_by_interface.push(link.name);
    }
    if iface.is_none() && bpffs_dir.exists() {
        for name in pinnable_names() {
            let path = bpffs_dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => report.maps_removed = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        // A pin left half-way through `Loaded::pin_attached`.
        let _ = std::fs::remove_file(bpffs_dir.join("attaching"));
        let links = bpffs_dir.join("links");
        let attached = bpffs_dir.join("attached");
        for sub in [&links, &attached] {
            if let Ok(entries) = std::fs::read_dir(sub) {
                for entry in entries.flatten() {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        for dir in [links.as_path(), attached.as_path(), bpffs_dir] {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(dir)(e)),
            }
        }
    }
    Ok(report)
}

/// Removes `prog` from the interface only if it is still the one attached there.
fn detach_program(
    iface: &str,
    index: u32,
    prog: BorrowedFd<'_>,
    current: XdpProgram,
) -> Result<(), LoaderError> {
    netlink::set_xdp(index, None, Some(prog), netlink::mode_flag(current.mode)).map_err(|source| {
        LoaderError::Attach {
            iface: iface.to_owned(),
            mode: current.mode,
            source,
        }
    })
}
