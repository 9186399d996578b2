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

mod attach;
mod detach;
mod egress;
mod find;

pub use self::{
    attach::{
        AttachmentState, Enforcement, IfaceLock, PinnedAttachment, attached_pins, ifindex,
        pinned_attachments,
    },
    detach::{DetachReport, detach},
    egress::{EgressHook, detach_egress},
};
use std::{
    borrow::Cow,
    io,
    path::{Path, PathBuf},
};

use apiban_common::{
    DEFAULT_ALLOW_V4_ENTRIES, DEFAULT_ALLOW_V6_ENTRIES, DEFAULT_DENY_V4_ENTRIES,
    DEFAULT_DENY_V6_ENTRIES, DataplaneConfig, host_table, kernel_features, map_names,
    program_names,
};
use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, Xdp, links::LinkError},
};

use self::find::{adopt_by_interface, adopt_legacy_hosts};
use super::{
    Dataplane, DataplaneError, bpffs,
    kernel::{Feature, KernelFeatures},
    netlink::NetlinkError,
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
        "loading the XDP program failed; the kernel needs BPF support (Linux >= {}) and the \
         agent needs root or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON",
        super::kernel::OLDEST_SUPPORTED
    )]
    Load(#[source] Box<aya::EbpfError>),
    /// The kernel lacks what the program uses; the text names each piece.
    #[error("{0}")]
    KernelTooOld(String),
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
    #[error(
        "{iface} is {what}, not Ethernet: the XDP program reads an Ethernet header first and \
         would let every packet through; attach to the Ethernet interface the traffic arrives \
         on (the one under the tunnel)"
    )]
    NotEthernet { iface: String, what: String },
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

/// A loaded program with its maps, attached to the interfaces given to [`Loaded::attach`].
pub struct Loaded {
    enforcement: Enforcement,
    pub dataplane: Dataplane,
    pub adoption: Adoption,
    /// What this kernel lets the program do, probed before the load.
    pub features: KernelFeatures,
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
    let features = KernelFeatures::probe();
    if !features.has(Feature::Enforcement) {
        return Err(LoaderError::KernelTooOld(super::kernel::describe_missing(
            &features,
        )));
    }
    let program_features = features.program_mask();
    let mut loader = EbpfLoader::new();
    // Before the verifier: what is off here is never looked at (see `kernel_features`).
    loader.override_global(kernel_features::GLOBAL, &program_features, true);
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
        features,
    })
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, LoaderError> {
    ebpf.program_mut(name)
        .ok_or(LoaderError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoaderError::Program { name, source })
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
