//! Attaching the program to interfaces, swapping it in where a previous agent's runs, and
//! checking with the kernel that it stays attached.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use apiban_common::{map_names, program_names};
use aya::{
    Ebpf,
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};

use super::{
    AttachMode, AttachedMode, Attachment, AttachmentKind, LoaderError,
    find::{is_apiban, program_by_id, program_maps},
    io_err, program_mut,
};
use crate::dataplane::{
    bpffs,
    netlink::{self, XdpProgram},
    objects,
};

/// Holds an interface for one agent: an abstract Unix socket named after the interface
/// index. Abstract names belong to the network namespace, as the interface does, so this
/// holds across mount namespaces and bpffs instances where the directory lock cannot.
#[derive(Debug)]
pub struct IfaceLock {
    _socket: std::os::unix::net::UnixListener,
}

impl IfaceLock {
    fn name(index: u32) -> String {
        format!("apiban/xdp/{index}")
    }

    /// Takes the lock for the interface with this index; None if another process holds it.
    pub fn acquire(index: u32) -> io::Result<Option<Self>> {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(Self::name(index))?;
        match std::os::unix::net::UnixListener::bind_addr(&addr) {
            Ok(socket) => Ok(Some(Self { _socket: socket })),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// What keeps an agent's program enforcing, and lets it check that it does: the program
/// object, its ID, the attachments and the locks. Dropping it changes nothing in the kernel.
pub struct Enforcement {
    pub(super) ebpf: Ebpf,
    pub(super) prog_id: u32,
    /// The kernel's ID of the IPv4 deny trie, which tells apiban's programs on these maps
    /// from those on others.
    pub(super) deny_v4_map_id: u32,
    pub(super) bpffs_dir: PathBuf,
    pub(super) attachments: Vec<Attachment>,
    pub(super) _dir_lock: bpffs::DirLock,
    pub(super) iface_locks: Vec<(u32, IfaceLock)>,
}

/// What [`Enforcement::check`] found on one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachmentState {
    /// This agent's program runs there, and nothing about it depends on this process.
    Enforcing { mode: AttachedMode },
    /// Another program runs there now, or none.
    Replaced { found: Option<XdpProgram> },
    /// The interface is gone.
    Gone,
    /// The check itself failed, or found the program held by something that goes away.
    Unknown(String),
}

impl Enforcement {
    pub fn program_id(&self) -> u32 {
        self.prog_id
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Asks the kernel what runs on each interface now. A netlink attachment stays after the
    /// agent exits; a pinned link stays while its pin does, which this checks too.
    pub fn check(&self) -> Vec<(Attachment, AttachmentState)> {
        self.attachments
            .iter()
            .map(|a| {
                let state = match netlink::link(a.index) {
                    Ok(None) => AttachmentState::Gone,
                    Ok(Some(link)) if link.name != a.iface => AttachmentState::Gone,
                    Ok(Some(link)) => match (link.xdp, &a.kind) {
                        (Some(p), AttachmentKind::PinnedLink(pin))
                            if p.id == self.prog_id && !pin.exists() =>
                        {
                            AttachmentState::Unknown(format!(
                                "the link pin {} is gone: the program detaches with this process",
                                pin.display()
                            ))
                        }
                        (Some(p), _) if p.id == self.prog_id => {
                            AttachmentState::Enforcing { mode: p.mode }
                        }
                        (found, _) => AttachmentState::Replaced { found },
                    },
                    Err(e) => AttachmentState::Unknown(crate::error_chain(&e)),
                };
                (a.clone(), state)
            })
            .collect()
    }
}

/// A link pin of an agent before netlink attachments: `links/<iface>@<mode>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedAttachment {
    pub iface: String,
    pub mode: AttachedMode,
    pub path: PathBuf,
}

/// The interface's index, or None if there is no such interface.
pub fn ifindex(iface: &str) -> Option<u32> {
    let name = CString::new(iface).ok()?;
    // SAFETY: name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// An interface whose frames carry no Ethernet header is refused: the program would read
/// its IP bytes as one and pass everything, while `status` said it enforced.
pub fn refuse_if_not_ethernet(iface: &str, index: u32) -> Result<(), LoaderError> {
    match netlink::link(index)? {
        Some(link) => match link.not_ethernet {
            Some(what) => Err(LoaderError::NotEthernet {
                iface: iface.to_owned(),
                what,
            }),
            None => Ok(()),
        },
        None => Err(LoaderError::NoSuchInterface(iface.to_owned())),
    }
}

fn read_dir_names(dir: &Path) -> Result<Vec<(String, PathBuf)>, LoaderError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        found.push((objects::unpin_name(&name), entry.path()));
    }
    found.sort();
    Ok(found)
}

/// The interfaces with a pinned XDP link (from an agent before netlink attachments).
pub fn pinned_attachments(bpffs_dir: &Path) -> Result<Vec<PinnedAttachment>, LoaderError> {
    Ok(read_dir_names(&bpffs_dir.join("links"))?
        .into_iter()
        .filter_map(|(name, path)| {
            let (iface, mode) = name.rsplit_once('@')?;
            Some(PinnedAttachment {
                iface: iface.to_owned(),
                mode: AttachedMode::parse(mode)?,
                path,
            })
        })
        .collect())
}

/// The interfaces apiban attached its program to, by the program pins under `attached/`.
pub fn attached_pins(bpffs_dir: &Path) -> Result<Vec<(String, PathBuf)>, LoaderError> {
    read_dir_names(&bpffs_dir.join("attached"))
}

/// The program pinned at `path` and its ID, if the pin is there.
pub(super) fn pinned_program(path: &Path) -> Result<Option<(OwnedFd, u32)>, LoaderError> {
    match objects::open_pinned(path) {
        Ok(fd) => {
            let id = objects::program_id(fd.as_fd()).map_err(io_err(path))?;
            Ok(Some((fd, id)))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Who runs on an interface, as far as apiban is concerned.
pub(super) enum Occupant {
    Nobody,
    /// apiban's program on the same maps: safe to swap, with this descriptor as the
    /// program expected there.
    Ours(OwnedFd, XdpProgram),
}

impl Enforcement {
    /// Attaches to `iface`, or, where apiban's program already runs (a previous agent's),
    /// swaps this one in atomically. The interface may be down: the program runs from the
    /// moment it comes up. Fill the maps first: from this call on, the program decides.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<AttachedMode, LoaderError> {
        let index = ifindex(iface).ok_or_else(|| LoaderError::NoSuchInterface(iface.into()))?;
        refuse_if_not_ethernet(iface, index)?;
        if !self.iface_locks.iter().any(|(i, _)| *i == index) {
            let lock = IfaceLock::acquire(index)
                .map_err(io_err(Path::new("@apiban/xdp")))?
                .ok_or_else(|| LoaderError::IfaceInUse {
                    iface: iface.to_owned(),
                })?;
            self.iface_locks.push((index, lock));
        }
        let attachment = match pinned_attachments(&self.bpffs_dir)?
            .into_iter()
            .find(|p| p.iface == iface)
        {
            Some(pinned) => {
                warn_mode_kept(iface, mode, pinned.mode);
                self.replace_pinned_link(&pinned)?;
                Attachment {
                    iface: iface.to_owned(),
                    index,
                    mode: pinned.mode,
                    kind: AttachmentKind::PinnedLink(pinned.path),
                }
            }
            None => {
                let mode = self.attach_netlink(iface, index, mode)?;
                Attachment {
                    iface: iface.to_owned(),
                    index,
                    mode,
                    kind: AttachmentKind::Netlink,
                }
            }
        };
        // Checked, not assumed: the kernel says which program the interface runs now.
        let found = netlink::link(index)?.and_then(|l| l.xdp);
        if found.map(|p| p.id) != Some(self.prog_id) {
            return Err(LoaderError::NotAttached {
                iface: iface.to_owned(),
                ours: self.prog_id,
                found: found
                    .map(|p| format!("program {}", p.id))
                    .unwrap_or_else(|| "no program".into()),
            });
        }
        self.pin_attached(iface)?;
        let attached = attachment.mode;
        self.attachments.retain(|a| a.iface != iface);
        self.attachments.push(attachment);
        Ok(attached)
    }

    fn prog_fd(&mut self) -> Result<OwnedFd, LoaderError> {
        let prog = program_mut(&mut self.ebpf, program_names::APIBAN)?;
        let fd = prog.fd().map_err(|source| LoaderError::Program {
            name: program_names::APIBAN,
            source,
        })?;
        fd.as_fd()
            .try_clone_to_owned()
            .map_err(io_err(&self.bpffs_dir))
    }

    /// The program now on `iface`: nobody, or apiban's on these maps. Anything else is an
    /// error that says what runs there.
    fn occupant(&self, iface: &str, index: u32) -> Result<Occupant, LoaderError> {
        let Some(current) = netlink::link(index)?.and_then(|l| l.xdp) else {
            return Ok(Occupant::Nobody);
        };
        let pin = self.attached_pin(iface);
        if let Some((fd, id)) = pinned_program(&pin)?
            && id == current.id
        {
            return Ok(Occupant::Ours(fd, current));
        }
        let unidentified = |source| LoaderError::Unidentified {
            iface: iface.to_owned(),
            prog_id: current.id,
            source,
        };
        let Some(info) = program_by_id(current.id).map_err(unidentified)? else {
            // Gone between the two questions: the interface has no program now.
            return Ok(Occupant::Nobody);
        };
        if !is_apiban(&info) {
            return Err(LoaderError::Occupied {
                iface: iface.to_owned(),
                prog_id: current.id,
                name: info.name_as_str().map(str::to_owned),
            });
        }
        let ours = self.deny_v4_map_id;
        let maps = program_maps(&info).map_err(unidentified)?;
        if !maps
            .iter()
            .any(|(name, id)| *name == map_names::DENY_V4 && *id == ours)
        {
            return Err(LoaderError::OtherMaps {
                iface: iface.to_owned(),
                prog_id: current.id,
                dir: self.bpffs_dir.clone(),
            });
        }
        let fd = info.fd().map_err(unidentified)?;
        let fd = fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(io_err(&self.bpffs_dir))?;
        Ok(Occupant::Ours(fd, current))
    }

    fn attach_netlink(
        &mut self,
        iface: &str,
        index: u32,
        mode: AttachMode,
    ) -> Result<AttachedMode, LoaderError> {
        let ours = self.prog_fd()?;
        match self.occupant(iface, index)? {
            Occupant::Ours(old, current) => {
                warn_mode_kept(iface, mode, current.mode);
                netlink::set_xdp(
                    index,
                    Some(ours.as_fd()),
                    Some(old.as_fd()),
                    netlink::mode_flag(current.mode),
                )
                .map_err(|source| LoaderError::Attach {
                    iface: iface.to_owned(),
                    mode: current.mode,
                    source,
                })?;
                Ok(current.mode)
            }
            Occupant::Nobody => {
                let try_mode = |mode: AttachedMode| {
                    netlink::set_xdp(
                        index,
                        Some(ours.as_fd()),
                        None,
                        netlink::XDP_FLAGS_UPDATE_IF_NOEXIST | netlink::mode_flag(mode),
                    )
                    .map(|()| mode)
                    .map_err(|source| LoaderError::Attach {
                        iface: iface.to_owned(),
                        mode,
                        source,
                    })
                };
                match mode {
                    AttachMode::Native => try_mode(AttachedMode::Native),
                    AttachMode::Skb => try_mode(AttachedMode::Skb),
                    AttachMode::Auto => try_mode(AttachedMode::Native).or_else(|e| {
                        tracing::info!(
                            iface,
                            reason = %crate::error_chain(&e),
                            "native XDP unavailable; using generic (skb) mode"
                        );
                        try_mode(AttachedMode::Skb)
                    }),
                }
            }
        }
    }

    fn attached_pin(&self, iface: &str) -> PathBuf {
        self.bpffs_dir
            .join("attached")
            .join(objects::pin_name(iface))
    }

    /// Pins this agent's program as the one attached to `iface`.
    fn pin_attached(&mut self, iface: &str) -> Result<(), LoaderError> {
        let dir = self.bpffs_dir.join("attached");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = self.attached_pin(iface);
        let tmp = self.bpffs_dir.join("attaching");
        let fd = self.prog_fd()?;
        objects::repin(fd.as_fd(), &path, &tmp).map_err(io_err(&path))
    }

    fn replace_pinned_link(&mut self, pinned: &PinnedAttachment) -> Result<(), LoaderError> {
        let link_err = |source| LoaderError::PinnedLink {
            path: pinned.path.clone(),
            source,
        };
        let fd_link: FdLink = PinnedLink::from_pin(&pinned.path).map_err(link_err)?.into();
        let xdp_link = XdpLink::try_from(fd_link).map_err(link_err)?;
        let program_err = |source| LoaderError::Program {
            name: program_names::APIBAN,
            source,
        };
        let prog = program_mut(&mut self.ebpf, program_names::APIBAN)?;
        let id = prog.attach_to_link(xdp_link).map_err(program_err)?;
        // The pin keeps the link; the fd we hold must not detach it when the program drops.
        let link = prog.take_link(id).map_err(program_err)?;
        drop(FdLink::try_from(link).map_err(link_err)?);
        Ok(())
    }
}

fn warn_mode_kept(iface: &str, wanted: AttachMode, running: AttachedMode) {
    if matches!(
        (wanted, running),
        (AttachMode::Native, AttachedMode::Skb) | (AttachMode::Skb, AttachedMode::Native)
    ) {
        tracing::warn!(
            iface,
            %running,
            "keeping the mode the program runs in: changing it needs `apiban detach --iface {iface}` first"
        );
    }
}
