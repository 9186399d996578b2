//! Loads the XDP program, adopts what a previous agent pinned, attaches it to interfaces and
//! detaches it.
//!
//! Layout under the bpffs directory (default `/sys/fs/bpf/apiban`):
//!   `<MAP>`              every map in `map_names::PINNED`
//!   `links/<iface>@<mode>` the XDP link of each interface (native or skb)
//!
//! The pinned link keeps the program attached and the pinned maps keep the bans while no agent
//! runs, so a stop, crash or upgrade never opens a gap. A starting agent reuses the pinned maps
//! and swaps its freshly loaded program into the pinned link atomically (`bpf_link_update`).

use std::{
    borrow::Cow,
    ffi::CString,
    io,
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
        ProgramError, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};

use super::{Dataplane, DataplaneError, bpffs};

/// The eBPF object, compiled by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/apiban"));

pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/apiban";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
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

    fn xdp_mode(self) -> XdpMode {
        match self {
            AttachedMode::Native => XdpMode::Driver,
            AttachedMode::Skb => XdpMode::Skb,
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
        "loading the XDP program failed: {0}; the kernel needs BTF and BPF support \
         (Linux >= 5.15) and the agent needs root or CAP_BPF + CAP_NET_ADMIN"
    )]
    Load(#[source] Box<aya::EbpfError>),
    #[error(
        "the maps pinned in {dir} do not match this build ({source}); if the capacities \
         changed, run `apiban detach --bpffs-dir {dir}` first (this drops all bans until \
         the agent has restored them)"
    )]
    IncompatiblePins {
        dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("attaching to {iface} in {mode} mode failed: {source}")]
    Attach {
        iface: String,
        mode: AttachedMode,
        #[source]
        source: ProgramError,
    },
    #[error("interface {0} does not exist")]
    NoSuchInterface(String),
    #[error("the pinned link {path} is unusable: {source}")]
    PinnedLink {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(
        "cannot read the previous version's host hash {path}: {source}; run `apiban detach` \
         and start again (this drops all bans until the agent has restored them)"
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
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            bpffs_dir: PathBuf::from(DEFAULT_BPFFS_DIR),
            capacities: Capacities::default(),
            debug_events: false,
        }
    }
}

/// A loaded program with its maps. Dropping it leaves pinned links and maps in place, so the
/// program keeps enforcing: that is how the agent stops without a gap.
pub struct Loaded {
    ebpf: Ebpf,
    pub dataplane: Dataplane,
    bpffs_dir: PathBuf,
    /// True when the maps came from a previous agent's pins.
    pub adopted: bool,
}

/// Loads the program, reusing maps pinned under `options.bpffs_dir` if there are any.
pub fn load(options: &LoadOptions) -> Result<Loaded, LoaderError> {
    let dir = &options.bpffs_dir;
    bpffs::ensure_dir(dir)?;
    let links = dir.join("links");
    std::fs::create_dir_all(&links).map_err(io_err(&links))?;
    let adopted = dir.join(map_names::DENY_V4).exists();

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
        tracing::warn!(error = %e, "dataplane debug events unavailable");
    }
    program_mut(&mut ebpf, program_names::APIBAN)?
        .load()
        .map_err(|source| LoaderError::Program {
            name: program_names::APIBAN,
            source,
        })?;
    let mut dataplane = Dataplane::from_ebpf(&mut ebpf)?;
    adopt_legacy_hosts(dir, &mut dataplane)?;
    dataplane.set_flag(DataplaneConfig::DEBUG_EVENTS, options.debug_events)?;
    Ok(Loaded {
        ebpf,
        dataplane,
        bpffs_dir: dir.clone(),
        adopted,
    })
}

/// Pins of the host hashes that versions before the host tables used.
const LEGACY_HOST_PINS: [&str; 2] = [
    map_names::LEGACY_DENY_V4_HOSTS,
    map_names::LEGACY_DENY_V6_HOSTS,
];

/// After an upgrade from a version with host hashes, their hosts move into the host tables
/// before the new program is attached, so no banned host passes in between. The old program
/// keeps its own reference to the hashes until the link switches programs; the pins go once
/// their content is safe in the tables.
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

/// A link pin: `links/<iface>@<mode>`.
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

/// The interfaces with a pinned XDP link under `bpffs_dir`.
pub fn pinned_attachments(bpffs_dir: &Path) -> Result<Vec<PinnedAttachment>, LoaderError> {
    let links = bpffs_dir.join("links");
    let entries = match std::fs::read_dir(&links) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&links)(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(&links))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((iface, mode)) = name.rsplit_once('@')
            && let Some(mode) = AttachedMode::parse(mode)
        {
            found.push(PinnedAttachment {
                iface: iface.to_owned(),
                mode,
                path: entry.path(),
            });
        }
    }
    found.sort_by(|a, b| a.iface.cmp(&b.iface));
    Ok(found)
}

impl Loaded {
    /// Splits off the maps so that their owner (the engine) can hold them; the program object
    /// must be kept alive alongside while links are managed through it.
    pub fn into_parts(self) -> (Ebpf, Dataplane) {
        (self.ebpf, self.dataplane)
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Attaches to `iface`, or, if a previous agent left a pinned link there, swaps this
    /// program into it without a moment of the interface running without one.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<AttachedMode, LoaderError> {
        let attached = self.attach_link(iface, mode)?;
        let others: Vec<u32> = pinned_attachments(&self.bpffs_dir)?
            .iter()
            .filter(|p| p.iface != iface)
            .filter_map(|p| ifindex(&p.iface))
            .collect();
        if let Some(index) = ifindex(iface) {
            self.dataplane.assign_counter_slot(index, &others)?;
        }
        Ok(attached)
    }

    fn attach_link(&mut self, iface: &str, mode: AttachMode) -> Result<AttachedMode, LoaderError> {
        if let Some(pinned) = pinned_attachments(&self.bpffs_dir)?
            .into_iter()
            .find(|p| p.iface == iface)
        {
            if mode_conflicts(mode, pinned.mode) {
                tracing::warn!(
                    iface,
                    pinned = %pinned.mode,
                    "keeping the pinned {} mode attachment: changing mode needs `apiban detach` first",
                    pinned.mode
                );
            }
            self.replace_pinned(&pinned)?;
            return Ok(pinned.mode);
        }
        if ifindex(iface).is_none() {
            return Err(LoaderError::NoSuchInterface(iface.into()));
        }
        let attached = match mode {
            AttachMode::Native => self.attach_new(iface, AttachedMode::Native)?,
            AttachMode::Skb => self.attach_new(iface, AttachedMode::Skb)?,
            AttachMode::Auto => match self.attach_new(iface, AttachedMode::Native) {
                Ok(m) => m,
                Err(e) => {
                    tracing::info!(iface, reason = %e, "native XDP unavailable; using generic (skb) mode");
                    self.attach_new(iface, AttachedMode::Skb)?
                }
            },
        };
        Ok(attached)
    }

    fn attach_new(&mut self, iface: &str, mode: AttachedMode) -> Result<AttachedMode, LoaderError> {
        let attach_err = |source| LoaderError::Attach {
            iface: iface.to_owned(),
            mode,
            source,
        };
        let prog = program_mut(&mut self.ebpf, program_names::APIBAN)?;
        let if_name =
            CString::new(iface).map_err(|_| LoaderError::NoSuchInterface(iface.into()))?;
        let id = prog
            .attach(if_name.as_c_str(), mode.xdp_mode())
            .map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        let fd_link = FdLink::try_from(link).map_err(|source| LoaderError::PinnedLink {
            path: self.link_path(iface, mode),
            source,
        })?;
        let path = self.link_path(iface, mode);
        fd_link.pin(&path).map_err(|e| LoaderError::Io {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        Ok(mode)
    }

    fn replace_pinned(&mut self, pinned: &PinnedAttachment) -> Result<(), LoaderError> {
        let link_err = |source| LoaderError::PinnedLink {
            path: pinned.path.clone(),
            source,
        };
        let fd_link: FdLink = PinnedLink::from_pin(&pinned.path).map_err(link_err)?.into();
        let xdp_link = XdpLink::try_from(fd_link).map_err(link_err)?;
        let prog = program_mut(&mut self.ebpf, program_names::APIBAN)?;
        let id = prog
            .attach_to_link(xdp_link)
            .map_err(|source| LoaderError::Attach {
                iface: pinned.iface.clone(),
                mode: pinned.mode,
                source,
            })?;
        // The pin keeps the link; the fd we hold must not detach it when the program drops.
        let link = prog.take_link(id).map_err(|source| LoaderError::Attach {
            iface: pinned.iface.clone(),
            mode: pinned.mode,
            source,
        })?;
        drop(FdLink::try_from(link).map_err(link_err)?);
        Ok(())
    }

    fn link_path(&self, iface: &str, mode: AttachedMode) -> PathBuf {
        self.bpffs_dir.join("links").join(format!("{iface}@{mode}"))
    }
}

fn mode_conflicts(wanted: AttachMode, pinned: AttachedMode) -> bool {
    matches!(
        (wanted, pinned),
        (AttachMode::Native, AttachedMode::Skb) | (AttachMode::Skb, AttachedMode::Native)
    )
}

/// What `detach` removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DetachReport {
    pub interfaces: Vec<String>,
    pub maps_removed: bool,
}

/// Detaches the program from `iface` (or from every interface) by removing link pins. With no
/// interface given, also removes the pinned maps and the directory: nothing is left behind.
pub fn detach(bpffs_dir: &Path, iface: Option<&str>) -> Result<DetachReport, LoaderError> {
    let mut report = DetachReport::default();
    for pinned in pinned_attachments(bpffs_dir)? {
        if iface.is_some_and(|i| i != pinned.iface) {
            continue;
        }
        std::fs::remove_file(&pinned.path).map_err(io_err(&pinned.path))?;
        report.interfaces.push(pinned.iface);
    }
    if iface.is_none() && bpffs_dir.exists() {
        for name in map_names::PINNED.iter().chain(&LEGACY_HOST_PINS) {
            let path = bpffs_dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => report.maps_removed = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        let links = bpffs_dir.join("links");
        for dir in [links.as_path(), bpffs_dir] {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(dir)(e)),
            }
        }
    }
    Ok(report)
}
