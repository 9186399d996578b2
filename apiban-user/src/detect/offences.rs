//! How many times detection has banned each source, kept in the state directory so that a
//! scanner that comes back after a restart still gets the doubled TTL it has earned.

use std::{
    collections::HashMap,
    fs,
    io::{self, Write as _},
    net::IpAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

/// The file's name in the state directory.
pub const FILE: &str = "detect-offences.json";
const VERSION: u32 = 1;
/// Sources remembered at most; the oldest go first.
const MAX: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Offence {
    addr: IpAddr,
    count: u32,
    /// When the last ban was made (Unix seconds).
    at: u64,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    offences: Vec<Offence>,
}

#[derive(Debug, Default)]
pub struct Offences {
    path: Option<PathBuf>,
    by_addr: HashMap<IpAddr, (u32, u64)>,
    dirty: bool,
}

impl Offences {
    /// What the file holds; an unreadable file is reported and started over (it only
    /// lengthens TTLs, so losing it costs no protection).
    pub fn load(path: Option<PathBuf>) -> Self {
        let mut by_addr = HashMap::new();
        if let Some(p) = &path {
            match fs::read(p) {
                Ok(bytes) => match serde_json::from_slice::<Saved>(&bytes) {
                    Ok(saved) if saved.version == VERSION => {
                        by_addr.extend(saved.offences.iter().map(|o| (o.addr, (o.count, o.at))));
                    }
                    Ok(saved) => {
                        tracing::warn!(path = %p.display(), version = saved.version, "detection's offence counts are of another version; starting them over")
                    }
                    Err(e) => {
                        tracing::warn!(path = %p.display(), error = %e, "detection's offence counts are unreadable; starting them over")
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "cannot read detection's offence counts; starting them over")
                }
            }
        }
        Self {
            path,
            by_addr,
            dirty: false,
        }
    }

    /// The number the next ban of `addr` would be.
    pub fn next(&self, addr: IpAddr) -> u32 {
        self.by_addr
            .get(&addr)
            .map_or(1, |(n, _)| n.saturating_add(1))
    }

    pub fn record(&mut self, addr: IpAddr, count: u32, now: u64) {
        self.by_addr.insert(addr, (count, now));
        self.dirty = true;
        if self.by_addr.len() > MAX {
            let mut ages: Vec<u64> = self.by_addr.values().map(|(_, at)| *at).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() - MAX];
            self.by_addr.retain(|_, (_, at)| *at >= cutoff);
        }
    }

    /// Forgets sources last banned longer than `horizon` seconds ago.
    pub fn forget_older_than(&mut self, now: u64, horizon: u64) {
        let before = self.by_addr.len();
        self.by_addr
            .retain(|_, (_, at)| now.saturating_sub(*at) < horizon);
        self.dirty |= self.by_addr.len() != before;
    }

    /// Writes the file if anything changed since the last write: a temporary file, synced,
    /// renamed over the old one.
    pub fn save_if_changed(&mut self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        let saved = Saved {
            version: VERSION,
            offences: self
                .by_addr
                .iter()
                .map(|(addr, (count, at))| Offence {
                    addr: *addr,
                    count: *count,
                    at: *at,
                })
                .collect(),
        };
        write_file(path, &serde_json::to_vec(&saved)?)?;
        self.dirty = false;
        Ok(())
    }
}

/// Writes `bytes` to `path` whole or not at all: a temporary file (owner-only), synced,
/// renamed over the old one.
pub(super) fn write_file(path: &std::path::Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let write = || -> io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    let written = write();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_a_save_and_a_load() {
        let dir = std::env::temp_dir().join(format!("apiban-offences-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE);
        let addr: IpAddr = "198.51.100.7".parse().unwrap();
        let mut o = Offences::load(Some(path.clone()));
        assert_eq!(o.next(addr), 1);
        o.record(addr, 1, 100);
        o.record(addr, 2, 200);
        o.save_if_changed().unwrap();
        let o = Offences::load(Some(path.clone()));
        assert_eq!(o.next(addr), 3);
        fs::write(&path, b"not json").unwrap();
        assert_eq!(Offences::load(Some(path)).next(addr), 1);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn old_offences_are_forgotten() {
        let addr: IpAddr = "198.51.100.8".parse().unwrap();
        let mut o = Offences::load(None);
        o.record(addr, 3, 100);
        o.forget_older_than(100 + 50, 60);
        assert_eq!(o.next(addr), 4);
        o.forget_older_than(100 + 61, 60);
        assert_eq!(o.next(addr), 1);
    }
}
