//! How many times detection has banned each source, kept in the state directory so that a
//! scanner that comes back after a restart still gets the doubled TTL it has earned.

use std::{collections::HashMap, io, net::IpAddr, path::PathBuf};

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
        let saved = path
            .as_deref()
            .and_then(|p| super::saved::read::<Saved>(p, "offence counts", VERSION, |s| s.version));
        let by_addr = saved
            .map(|s| {
                s.offences
                    .iter()
                    .map(|o| (o.addr, (o.count, o.at)))
                    .collect()
            })
            .unwrap_or_default();
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
        super::saved::write(path, &serde_json::to_vec(&saved)?)?;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

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
