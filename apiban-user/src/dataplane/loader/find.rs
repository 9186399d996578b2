//! Finding the maps a previous agent left: by their pins, or through the program that runs
//! on a configured interface; and moving the host hashes of versions before the host tables.

use std::{io, path::Path};

use apiban_common::{DenyEntry, map_names, program_names};
use aya::{
    maps::{HashMap as AyaHashMap, Map, MapData},
    programs::{ProgramError, ProgramInfo},
};

use super::{Adoption, LoaderError, ifindex, io_err};
use crate::dataplane::{Dataplane, netlink};

/// Every name a map of ours may have been pinned under, the previous version's host hashes
/// included.
pub(super) fn pinnable_names() -> impl Iterator<Item = &'static str> {
    map_names::PINNED.iter().chain(&LEGACY_HOST_PINS).copied()
}

/// The kernel keeps 15 bytes of an object's name.
fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}

/// The loaded program with this ID, opened by ID (needs CAP_SYS_ADMIN).
pub(super) fn program_by_id(id: u32) -> Result<Option<ProgramInfo>, ProgramError> {
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if info.id() == id {
            return Ok(Some(info));
        }
    }
    Ok(None)
}

/// The IDs of apiban's maps that the program uses, by pinned name.
pub(super) fn program_maps(info: &ProgramInfo) -> Result<Vec<(&'static str, u32)>, ProgramError> {
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

pub(super) fn is_apiban(info: &ProgramInfo) -> bool {
    info.name_as_str() == Some(kernel_name(program_names::APIBAN))
}

/// When nothing is pinned, pins the maps of the apiban program attached to one of
/// `ifaces`, so that the loader reuses them: the bans, hit counts and counters the previous
/// agent left stay, and the swap to this agent's program is atomic.
pub(super) fn adopt_by_interface(
    dir: &Path,
    ifaces: &[String],
) -> Result<Option<Adoption>, LoaderError> {
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

/// Pins of maps earlier versions had: the host hashes before the host tables, and the
/// verdict counters before the `observed` verdict.
const LEGACY_HOST_PINS: [&str; 3] = [
    map_names::LEGACY_DENY_V4_HOSTS,
    map_names::LEGACY_DENY_V6_HOSTS,
    map_names::LEGACY_STATS,
];

/// The counters of a version before the `observed` verdict have a layout of their own; the
/// new program counts in a map of its own from zero, and the old pin goes.
pub(super) fn drop_legacy_stats(dir: &Path) -> Result<(), LoaderError> {
    let path = dir.join(map_names::LEGACY_STATS);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            tracing::info!(
                "verdict counters restart from zero: this version counts `observed` too"
            );
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// After an upgrade from a version with host hashes, their hosts move into the host tables
/// before the new program is attached, so no banned host passes in between. The old program
/// keeps its own reference to the hashes until the interface switches programs; the pins go
/// once their content is safe in the tables.
pub(super) fn adopt_legacy_hosts(dir: &Path, dataplane: &mut Dataplane) -> Result<(), LoaderError> {
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
    drop_legacy_stats(dir)?;
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
