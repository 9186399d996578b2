//! The egress classifier (see the eBPF crate's `egress`): attached with tcx beside the XDP
//! program on each interface, its link pinned under `<bpffs-dir>/egress/`, so that it stays
//! attached when the agent stops and the next agent swaps its own program in through the
//! same link (`bpf_link_update`: no moment without one). `apiban detach` removes the pin,
//! which detaches it. It only reads what leaves: whether it runs changes no verdict.

use std::{
    io,
    path::{Path, PathBuf},
};

use apiban_common::program_names;
use aya::programs::{
    LinkOrder, SchedClassifier, TcAttach, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
};

use super::{Enforcement, LoaderError, io_err};
use crate::dataplane::objects;

/// The directory of the egress links' pins.
fn dir(bpffs_dir: &Path) -> PathBuf {
    bpffs_dir.join("egress")
}

fn pin(bpffs_dir: &Path, iface: &str) -> PathBuf {
    dir(bpffs_dir).join(objects::pin_name(iface))
}

/// How the egress program is attached to an interface, for `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EgressHook {
    /// Attached through a tcx link, this agent's program checked with the kernel.
    Tcx,
    /// Not attached, and why: response-based detection is off on this interface.
    Off(String),
}

impl EgressHook {
    pub fn describe(&self) -> String {
        match self {
            EgressHook::Tcx => "tcx".to_owned(),
            EgressHook::Off(why) => format!("off: {why}"),
        }
    }
}

fn program_err(source: aya::programs::ProgramError) -> LoaderError {
    LoaderError::Program {
        name: program_names::EGRESS,
        source,
    }
}

impl Enforcement {
    fn egress_program(&mut self) -> Result<&mut SchedClassifier, LoaderError> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program_names::EGRESS)
            .ok_or(LoaderError::MissingProgram(program_names::EGRESS))?
            .try_into()
            .map_err(program_err)?;
        if prog.fd().is_err() {
            prog.load().map_err(program_err)?;
        }
        Ok(prog)
    }

    /// Attaches the egress program to `iface` (tcx, Linux 6.6), or swaps it in through the
    /// link a previous agent pinned. Checked, not assumed: the kernel must list this agent's
    /// program on the interface's egress hook afterwards.
    pub fn attach_egress(&mut self, iface: &str) -> Result<(), LoaderError> {
        let index =
            super::ifindex(iface).ok_or_else(|| LoaderError::NoSuchInterface(iface.to_owned()))?;
        let path = pin(&self.bpffs_dir, iface);
        if path.exists() {
            match self.adopt_egress_link(&path) {
                Ok(()) if self.egress_attached(index)? => return Ok(()),
                // A link whose interface went away (and came back with this name): start
                // over with a new one.
                Ok(()) => tracing::info!(iface, "the pinned egress link is stale; attaching anew"),
                Err(e) => {
                    tracing::info!(iface, error = %crate::error_chain(&e), "cannot reuse the pinned egress link; attaching anew")
                }
            }
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
        let prog = self.egress_program()?;
        let id = prog
            .attach(
                index,
                TcAttach::Tcx {
                    attach_type: TcAttachType::Egress,
                    order: LinkOrder::default(),
                },
            )
            .map_err(program_err)?;
        let link = prog.take_link(id).map_err(program_err)?;
        let fd_link = FdLink::try_from(link).map_err(|source| LoaderError::PinnedLink {
            path: path.clone(),
            source,
        })?;
        let dir = dir(&self.bpffs_dir);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        // The pin keeps the link (and so the attachment) when this process goes.
        fd_link
            .pin(&path)
            .map_err(|e| io_err(&path)(io::Error::other(e)))?;
        if !self.egress_attached(index)? {
            return Err(LoaderError::Io {
                path,
                source: io::Error::other(
                    "the egress link was made, but the kernel does not list the program on the interface",
                ),
            });
        }
        Ok(())
    }

    fn adopt_egress_link(&mut self, path: &Path) -> Result<(), LoaderError> {
        let link_err = |source| LoaderError::PinnedLink {
            path: path.to_owned(),
            source,
        };
        let fd_link: FdLink = PinnedLink::from_pin(path).map_err(link_err)?.into();
        let link = SchedClassifierLink::try_from(fd_link).map_err(link_err)?;
        let prog = self.egress_program()?;
        let id = prog.attach_to_link(link).map_err(program_err)?;
        // The pin keeps the link; the fd we hold must not detach it when the program drops.
        let link = prog.take_link(id).map_err(program_err)?;
        drop(FdLink::try_from(link).map_err(link_err)?);
        Ok(())
    }

    /// Whether the kernel lists this agent's egress program on the interface.
    fn egress_attached(&mut self, index: u32) -> Result<bool, LoaderError> {
        let ours = self.egress_program()?.info().map_err(program_err)?.id();
        let attached = objects::tcx_egress_program_ids(index)
            .map_err(io_err(Path::new("BPF_PROG_QUERY (tcx egress)")))?;
        Ok(attached.contains(&ours))
    }
}

/// Removes the egress link's pin for `iface` (every interface: None), which detaches the
/// program there; the interfaces it was pinned for.
pub fn detach_egress(bpffs_dir: &Path, iface: Option<&str>) -> Result<Vec<String>, LoaderError> {
    let dir = dir(bpffs_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&dir)(e)),
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = objects::unpin_name(&entry.file_name().to_string_lossy());
        if iface.is_some_and(|i| i != name) {
            continue;
        }
        let path = entry.path();
        std::fs::remove_file(&path).map_err(io_err(&path))?;
        removed.push(name);
    }
    if iface.is_none() {
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
    }
    Ok(removed)
}
