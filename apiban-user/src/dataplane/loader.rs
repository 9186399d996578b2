//! Loads the XDP program, adopts the maps a previous agent left, attaches the program to
//! interfaces and detaches it.
//!
//! The program is attached through rtnetlink (see [`super::netlink`]): the attachment
//! belongs to the interface, so the program and the maps it holds keep enforcing when the
//! agent stops, crashes or is upgraded, whatever mount namespace it ran in. A starting agent
//! finds those maps and swaps its own program in atomically (`XDP_FLAGS_REPLACE` with the old
//! program as the expected one): no packet meets the interface without a program.
//!
//! Layout under the bpffs directory (default `/sys/fs/bpf/apiban`):
//!   `<MAP>`              every map in `map_names::PINNED`
//!   `attached/<iface>`   the program apiban attached to that interface, so that the next
//!                        agent knows it as its own without opening programs by ID
//!   `links/<iface>@<mode>` XDP links of agents before netlink attachments; they are
//!                        updated in place, never recreated
//!
//! Finding the maps: from the pins when they are there; otherwise (the bpffs was private to
//! the previous agent's mount namespace, e.g. under `ip netns exec`) from the program on the
//! configured interfaces, by the IDs of its maps, as bpftool and xdp-tools find them. That
//! needs CAP_SYS_ADMIN (root).

use std::{
    borrow::Cow,
    ffi::CString,
    io,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use apiban_common::{
    DEFAULT_ALLOW_V4_ENTRIES, DEFAULT_ALLOW_V6_ENTRIES, DEFAULT_DENY_V4_ENTRIES,
    DEFAULT_DENY_V6_ENTRIES, DataplaneConfig, DenyEntry, host_table, map_names, program_names,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as AyaHashMap, Map, MapData},
    programs::{
        ProgramError, ProgramInfo, Xdp,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};

use super::{
    Dataplane, DataplaneError, bpffs,
    netlink::{self, NetlinkError, XdpProgram},
    objects,
};

/// The eBPF object, compiled by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/apiban"));

pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/apiban";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic with one log line.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode: works on every interface, costs an skb allocation per packet.
    Skb,
}

/// The mode an interface's program actually runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Skb,
}

impl AttachedMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Skb => "skb",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "native" => Some(AttachedMode::Native),
            "skb" => Some(AttachedMode::Skb),
            _ => None,
        }
    }
}

impl std::fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Bpffs(#[from] bpffs::BpffsError),
    #[error(
        "another apiban agent ({holder}) uses the maps pinned in {dir}; stop it first, or give \
         this one its own --bpffs-dir"
    )]
    DirInUse { dir: PathBuf, holder: bpffs::Holder },
    #[error(
        "another apiban agent enforces on {iface} (it holds the interface's lock); stop it \
         first: two agents would write the same maps"
    )]
    IfaceInUse { iface: String },
    #[error(
        "loading the XDP program failed; the kernel needs BTF and BPF support (Linux >= \
         5.15) and the agent needs root or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON"
    )]
    Load(#[source] Box<aya::EbpfError>),
    #[error(
        "the maps pinned in {dir} do not match this build; if the capacities changed, run \
         `apiban detach --bpffs-dir {dir}` first (this drops all bans until the agent has \
         restored them)"
    )]
    IncompatiblePins {
        dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("attaching to {iface} in {mode} mode failed")]
    Attach {
        iface: String,
        mode: AttachedMode,
        #[source]
        source: NetlinkError,
    },
    #[error(
        "attaching to {iface} reported success, but the interface runs {found} instead of \
         apiban's program {ours}"
    )]
    NotAttached {
        iface: String,
        ours: u32,
        found: String,
    },
    #[error(
        "{iface} already runs another XDP program (id {prog_id}{}); apiban does not replace \
         it: remove it (`ip link set dev {iface} xdp off`) if it is not needed",
        name.as_deref().map(|n| format!(", named {n}")).unwrap_or_default()
    )]
    Occupied {
        iface: String,
        prog_id: u32,
        name: Option<String>,
    },
    #[error(
        "{iface} runs an apiban program (id {prog_id}) on other maps than those in {dir}: \
         another agent, with another --bpffs-dir, enforces there; stop it, or run \
         `apiban detach --iface {iface}` with its --bpffs-dir"
    )]
    OtherMaps {
        iface: String,
        prog_id: u32,
        dir: PathBuf,
    },
    #[error(
        "cannot tell whether the XDP program on {iface} (id {prog_id}) is apiban's: \
         opening programs by ID needs CAP_SYS_ADMIN (run as root), or detach it first"
    )]
    Unidentified {
        iface: String,
        prog_id: u32,
        #[source]
        source: ProgramError,
    },
    #[error("interface {0} does not exist")]
    NoSuchInterface(String),
    #[error("the pinned link {path} is unusable")]
    PinnedLink {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("rtnetlink")]
    Netlink(#[from] NetlinkError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(
        "cannot read the map {path}; run `apiban detach` and start again (this drops all \
         bans until the agent has restored them)"
    )]
    Legacy {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LoaderError + '_ {
    move |source| LoaderError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Map capacities; they only take effect when the maps are created (not when adopted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub deny_v4: u32,
    pub deny_v6: u32,
    pub allow_v4: u32,
    pub allow_v6: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            deny_v4: DEFAULT_DENY_V4_ENTRIES,
            deny_v6: DEFAULT_DENY_V6_ENTRIES,
            allow_v4: DEFAULT_ALLOW_V4_ENTRIES,
            allow_v6: DEFAULT_ALLOW_V6_ENTRIES,
        }
    }
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub bpffs_dir: PathBuf,
    pub capacities: Capacities,
    /// Emit aya-log events for drops and allowlist matches.
    pub debug_events: bool,
    /// Interfaces whose attached apiban program lends its maps when nothing is pinned.
    pub adopt_from: Vec<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            bpffs_dir: PathBuf::from(DEFAULT_BPFFS_DIR),
            capacities: Capacities::default(),
            debug_events: false,
            adopt_from: Vec::new(),
        }
    }
}

/// Where the maps of a loaded program came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Adoption {
    /// Created now: nothing was pinned or attached.
    Fresh,
    /// The maps pinned under the bpffs directory.
    Pins,
    /// The maps of the apiban program attached to `iface`, found by their IDs: the pins had
    /// gone with the previous agent's bpffs.
    Interface { iface: String, prog_id: u32 },
}

impl std::fmt::Display for Adoption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Adoption::Fresh => f.write_str("no (new maps)"),
            Adoption::Pins => f.write_str("from the pins"),
            Adoption::Interface { iface, prog_id } => {
                write!(f, "from the program attached to {iface} (id {prog_id})")
            }
        }
    }
}

/// How the program is attached to an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachmentKind {
    /// Through rtnetlink: it belongs to the interface.
    Netlink,
    /// A bpf_link pinned by an agent before netlink attachments, updated in place: it lasts
    /// as long as its pin.
    PinnedLink(PathBuf),
}

/// One interface the program was attached to, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub iface: String,
    pub index: u32,
    pub mode: AttachedMode,
    pub kind: AttachmentKind,
}

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
    ebpf: Ebpf,
    prog_id: u32,
    /// The kernel's ID of the IPv4 deny trie, which tells apiban's programs on these maps
    /// from those on others.
    deny_v4_map_id: u32,
    bpffs_dir: PathBuf,
    attachments: Vec<Attachment>,
    _dir_lock: bpffs::DirLock,
    iface_locks: Vec<(u32, IfaceLock)>,
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

/// A loaded program with its maps, attached to the interfaces given to [`Loaded::attach`].
pub struct Loaded {
    enforcement: Enforcement,
    pub dataplane: Dataplane,
    pub adoption: Adoption,
}

/// Every name a map of ours may have been pinned under, the previous version's host hashes
/// included.
fn pinnable_names() -> impl Iterator<Item = &'static str> {
    map_names::PINNED.iter().chain(&LEGACY_HOST_PINS).copied()
}

/// The kernel keeps 15 bytes of an object's name.
fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}

/// The loaded program with this ID, opened by ID (needs CAP_SYS_ADMIN).
fn program_by_id(id: u32) -> Result<Option<ProgramInfo>, ProgramError> {
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if info.id() == id {
            return Ok(Some(info));
        }
    }
    Ok(None)
}

/// The IDs of apiban's maps that the program uses, by pinned name.
fn program_maps(info: &ProgramInfo) -> Result<Vec<(&'static str, u32)>, ProgramError> {
    let mut found = Vec::new();
    for id in info.map_ids()?.unwrap_or_default() {
        let Ok(map) = aya::maps::MapInfo::from_id(id) else {
            continue;
        };
        let Some(name) = map.name_as_str() else {
            continue;
        };
        if let Some(ours) = pinnable_names().find(|n| kernel_name(n) == name) {
            found.push((ours, id));
        }
    }
    Ok(found)
}

fn is_apiban(info: &ProgramInfo) -> bool {
    info.name_as_str() == Some(kernel_name(program_names::APIBAN))
}

/// When nothing is pinned, pins the maps of the apiban program attached to one of
/// `ifaces`, so that the loader reuses them: the bans, hit counts and counters the previous
/// agent left stay, and the swap to this agent's program is atomic.
fn adopt_by_interface(dir: &Path, ifaces: &[String]) -> Result<Option<Adoption>, LoaderError> {
    for iface in ifaces {
        let Some(index) = ifindex(iface) else {
            continue;
        };
        let Some(prog) = netlink::link(index)?.and_then(|l| l.xdp) else {
            continue;
        };
        let unidentified = |source| LoaderError::Unidentified {
            iface: iface.clone(),
            prog_id: prog.id,
            source,
        };
        let info = match program_by_id(prog.id).map_err(unidentified)? {
            Some(info) if is_apiban(&info) => info,
            _ => continue,
        };
        let maps = program_maps(&info).map_err(unidentified)?;
        if !maps.iter().any(|(name, _)| *name == map_names::DENY_V4) {
            continue;
        }
        for (name, id) in maps {
            let path = dir.join(name);
            let map = MapData::from_id(id).map_err(|source| LoaderError::Legacy {
                path: path.clone(),
                source,
            })?;
            map.pin(&path).map_err(|e| LoaderError::Io {
                path: path.clone(),
                source: io::Error::other(e),
            })?;
        }
        return Ok(Some(Adoption::Interface {
            iface: iface.clone(),
            prog_id: prog.id,
        }));
    }
    Ok(None)
}

/// Loads the program, reusing the maps pinned under `options.bpffs_dir`, or those of the
/// apiban program on one of `options.adopt_from` when nothing is pinned.
pub fn load(options: &LoadOptions) -> Result<Loaded, LoaderError> {
    let dir = &options.bpffs_dir;
    bpffs::ensure_dir(dir)?;
    let lock = match bpffs::DirLock::acquire(dir)? {
        Ok(lock) => lock,
        Err(holder) => {
            return Err(LoaderError::DirInUse {
                dir: dir.clone(),
                holder,
            });
        }
    };
    let mut adoption = if dir.join(map_names::DENY_V4).exists() {
        Adoption::Pins
    } else {
        Adoption::Fresh
    };
    if adoption == Adoption::Fresh
        && let Some(found) = adopt_by_interface(dir, &options.adopt_from)?
    {
        adoption = found;
    }

    let pin_paths: Vec<(&str, PathBuf)> = map_names::PINNED
        .iter()
        .map(|name| (*name, dir.join(name)))
        .collect();
    let mut loader = EbpfLoader::new();
    let caps = options.capacities;
    let v4_buckets = host_table::buckets(caps.deny_v4, host_table::V4_SLOTS);
    let v6_buckets = host_table::buckets(caps.deny_v6, host_table::V6_SLOTS);
    loader
        .map_max_entries(map_names::DENY_V4_HOST_KEYS, v4_buckets)
        .map_max_entries(
            map_names::DENY_V4_HOST_HITS,
            v4_buckets * host_table::V4_SLOTS,
        )
        .map_max_entries(map_names::DENY_V6_HOST_KEYS, v6_buckets)
        .map_max_entries(
            map_names::DENY_V6_HOST_HITS,
            v6_buckets * host_table::V6_SLOTS,
        )
        .map_max_entries(map_names::DENY_V4, caps.deny_v4)
        .map_max_entries(map_names::DENY_V6, caps.deny_v6)
        .map_max_entries(map_names::ALLOW_V4, caps.allow_v4)
        .map_max_entries(map_names::ALLOW_V6, caps.allow_v6);
    for (name, path) in &pin_paths {
        loader.map_pin_path(name, Cow::Borrowed(path.as_path()));
    }
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(|source| match source {
        aya::EbpfError::MapError(aya::maps::MapError::IncompatiblePinnedMap { .. }) => {
            LoaderError::IncompatiblePins {
                dir: dir.clone(),
                source: Box::new(source),
            }
        }
        other => LoaderError::Load(Box::new(other)),
    })?;
    if options.debug_events
        && let Err(e) = aya_log::EbpfLogger::init(&mut ebpf)
    {
        tracing::warn!(error = %crate::error_chain(&e), "dataplane debug events unavailable");
    }
    let program_err = |source| LoaderError::Program {
        name: program_names::APIBAN,
        source,
    };
    let prog = program_mut(&mut ebpf, program_names::APIBAN)?;
    prog.load().map_err(program_err)?;
    let prog_id = prog.info().map_err(program_err)?.id();
    let mut dataplane = Dataplane::from_ebpf(&mut ebpf)?;
    adopt_legacy_hosts(dir, &mut dataplane)?;
    dataplane.set_flag(DataplaneConfig::DEBUG_EVENTS, options.debug_events)?;
    let deny_v4_map_id = dataplane.deny_v4_map_id()?;
    Ok(Loaded {
        enforcement: Enforcement {
            ebpf,
            prog_id,
            deny_v4_map_id,
            bpffs_dir: dir.clone(),
            attachments: Vec::new(),
            _dir_lock: lock,
            iface_locks: Vec::new(),
        },
        dataplane,
        adoption,
    })
}

/// Pins of the host hashes that versions before the host tables used.
const LEGACY_HOST_PINS: [&str; 2] = [
    map_names::LEGACY_DENY_V4_HOSTS,
    map_names::LEGACY_DENY_V6_HOSTS,
];

/// After an upgrade from a version with host hashes, their hosts move into the host tables
/// before the new program is attached, so no banned host passes in between. The old program
/// keeps its own reference to the hashes until the interface switches programs; the pins go
/// once their content is safe in the tables.
fn adopt_legacy_hosts(dir: &Path, dataplane: &mut Dataplane) -> Result<(), LoaderError> {
    fn read<const N: usize>(path: &Path) -> Result<Vec<([u8; N], DenyEntry)>, LoaderError> {
        if !path.exists() {
            return Ok(Vec::new());
        }
        let legacy = |source| LoaderError::Legacy {
            path: path.to_owned(),
            source,
        };
        let map = MapData::from_pin(path).map_err(legacy)?;
        let hash: AyaHashMap<MapData, [u8; N], DenyEntry> =
            AyaHashMap::try_from(Map::HashMap(map)).map_err(legacy)?;
        hash.iter().collect::<Result<_, _>>().map_err(legacy)
    }
    let v4_path = dir.join(map_names::LEGACY_DENY_V4_HOSTS);
    let v6_path = dir.join(map_names::LEGACY_DENY_V6_HOSTS);
    let (v4, v6) = (read::<4>(&v4_path)?, read::<16>(&v6_path)?);
    if !v4_path.exists() && !v6_path.exists() {
        return Ok(());
    }
    tracing::info!(
        v4 = v4.len(),
        v6 = v6.len(),
        "moving banned hosts from the previous version's host hashes into the host tables"
    );
    dataplane.adopt_legacy_hosts(v4, v6)?;
    for path in [v4_path, v6_path] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    Ok(())
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, LoaderError> {
    ebpf.program_mut(name)
        .ok_or(LoaderError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoaderError::Program { name, source })
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
fn pinned_program(path: &Path) -> Result<Option<(OwnedFd, u32)>, LoaderError> {
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
enum Occupant {
    Nobody,
    /// apiban's program on the same maps: safe to swap, with this descriptor as the
    /// program expected there.
    Ours(OwnedFd, XdpProgram),
}

impl Loaded {
    /// The kernel's ID of this agent's program.
    pub fn program_id(&self) -> u32 {
        self.enforcement.prog_id
    }

    pub fn adopted(&self) -> bool {
        self.adoption != Adoption::Fresh
    }

    /// Splits off the maps so that their owner (the engine) can hold them; what attaches
    /// the program, keeps it enforcing and checks that it does goes to the caller.
    pub fn into_parts(self) -> (Enforcement, Dataplane) {
        (self.enforcement, self.dataplane)
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.enforcement.ebpf
    }

    /// The interfaces attached so far.
    pub fn attachments(&self) -> &[Attachment] {
        &self.enforcement.attachments
    }

    /// Gives each interface a counter slot of its own (see
    /// [`Dataplane::assign_counter_slot`]), before its program runs: a slot starts at zero.
    pub fn reserve_counter_slots(&mut self, ifaces: &[String]) -> Result<(), LoaderError> {
        let mut indexes: Vec<u32> = ifaces.iter().filter_map(|i| ifindex(i)).collect();
        for (name, _) in attached_pins(&self.enforcement.bpffs_dir)? {
            if let Some(i) = ifindex(&name) {
                indexes.push(i);
            }
        }
        indexes.extend(self.enforcement.attachments.iter().map(|a| a.index));
        for iface in ifaces {
            let index = ifindex(iface).ok_or_else(|| LoaderError::NoSuchInterface(iface.into()))?;
            let others: Vec<u32> = indexes.iter().copied().filter(|i| *i != index).collect();
            self.dataplane.assign_counter_slot(index, &others)?;
        }
        Ok(())
    }

    /// Reserves the interface's counter slot and attaches (see [`Enforcement::attach`]).
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<AttachedMode, LoaderError> {
        self.reserve_counter_slots(&[iface.to_owned()])?;
        self.enforcement.attach(iface, mode)
    }
}

impl Enforcement {
    /// Attaches to `iface`, or, where apiban's program already runs (a previous agent's),
    /// swaps this one in atomically. The interface may be down: the program runs from the
    /// moment it comes up. Fill the maps first: from this call on, the program decides.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<AttachedMode, LoaderError> {
        let index = ifindex(iface).ok_or_else(|| LoaderError::NoSuchInterface(iface.into()))?;
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

    let mut report = DetachReport::default();
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
