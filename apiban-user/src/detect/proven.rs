//! Proven peers: sources that showed, in a way a forged source address cannot, that they
//! are the server's real customers or peers: the server answered 2xx to a request of theirs
//! that carried credentials for a nonce the server had issued to that very address (seen on
//! egress). Detection never bans them for as long as the proof lasts (`--detect-proven-ttl`,
//! 7 days by default), reporting what it would have done instead. Kept in the state
//! directory, so that an office re-registering after a power cut (and a restart of the agent)
//! is still known.

use std::{collections::HashMap, io, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// The file's name in the state directory.
pub const FILE: &str = "detect-proven.json";
const VERSION: u32 = 1;
/// Peers remembered at most; the oldest proofs go first.
const MAX: usize = 100_000;

/// How a peer proved itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    pub addr: IpAddr,
    /// When (Unix seconds); renewed by every new proof.
    pub at: u64,
    /// What was seen, e.g. `200 to an authenticated REGISTER for 201`.
    pub how: String,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    proven: Vec<Proof>,
}

#[derive(Debug, Default)]
pub struct ProvenPeers {
    path: Option<PathBuf>,
    by_addr: HashMap<IpAddr, Proof>,
    dirty: bool,
}

impl ProvenPeers {
    /// What the file holds; an unreadable file is reported and started over (peers prove
    /// themselves again at their next registration).
    pub fn load(path: Option<PathBuf>) -> Self {
        let saved = path
            .as_deref()
            .and_then(|p| super::saved::read::<Saved>(p, "proven peers", VERSION, |s| s.version));
        let by_addr = saved
            .map(|s| s.proven.into_iter().map(|p| (p.addr, p)).collect())
            .unwrap_or_default();
        Self {
            path,
            by_addr,
            dirty: false,
        }
    }

    /// Records a proof; true when the peer was not proven before.
    pub fn prove(&mut self, proof: Proof) -> bool {
        let new = self.by_addr.insert(proof.addr, proof).is_none();
        self.dirty = true;
        if self.by_addr.len() > MAX {
            let mut ages: Vec<u64> = self.by_addr.values().map(|p| p.at).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() - MAX];
            self.by_addr.retain(|_, p| p.at >= cutoff);
        }
        new
    }

    /// Records another node's proof unless this node holds a newer one for the address;
    /// true when the peer was not proven before.
    pub fn prove_if_newer(&mut self, proof: Proof) -> bool {
        match self.by_addr.get(&proof.addr) {
            Some(held) if held.at >= proof.at => false,
            held => {
                let new = held.is_none();
                self.prove(proof);
                new
            }
        }
    }

    /// The proof that covers `addr` now, if any is younger than `ttl` seconds.
    pub fn get(&self, addr: IpAddr, now: u64, ttl: u64) -> Option<&Proof> {
        self.by_addr
            .get(&addr)
            .filter(|p| now.saturating_sub(p.at) < ttl)
    }

    /// Every peer with the time its proof runs out, under `ttl` seconds.
    pub fn until(&self, ttl: u64) -> HashMap<IpAddr, u64> {
        self.by_addr
            .iter()
            .map(|(addr, p)| (*addr, p.at.saturating_add(ttl)))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    /// Forgets proofs older than `ttl` seconds.
    pub fn forget_older_than(&mut self, now: u64, ttl: u64) {
        let before = self.by_addr.len();
        self.by_addr.retain(|_, p| now.saturating_sub(p.at) < ttl);
        self.dirty |= self.by_addr.len() != before;
    }

    /// Writes the file if anything changed since the last write.
    pub fn save_if_changed(&mut self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        let saved = Saved {
            version: VERSION,
            proven: self.by_addr.values().cloned().collect(),
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
    fn proofs_survive_a_save_and_a_load_and_expire() {
        let dir = std::env::temp_dir().join(format!("apiban-proven-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE);
        let addr: IpAddr = "198.51.100.7".parse().unwrap();
        let mut p = ProvenPeers::load(Some(path.clone()));
        assert!(p.prove(Proof {
            addr,
            at: 100,
            how: "200 to an authenticated REGISTER for 201".into(),
        }));
        p.save_if_changed().unwrap();
        let mut p = ProvenPeers::load(Some(path.clone()));
        assert_eq!(p.get(addr, 150, 60).map(|p| p.at), Some(100));
        assert_eq!(p.get(addr, 161, 60), None, "past its TTL");
        p.forget_older_than(161, 60);
        assert!(p.is_empty());
        // Another node's proof counts only when it is newer than the one held.
        let older = Proof {
            addr,
            at: 50,
            how: "200 to an authenticated REGISTER for 202 (at edge-2)".into(),
        };
        assert!(p.prove_if_newer(older.clone()), "new to this node");
        assert!(!p.prove_if_newer(Proof {
            at: 40,
            ..older.clone()
        }));
        assert_eq!(p.get(addr, 60, 60).map(|p| p.at), Some(50));
        fs::write(&path, b"not json").unwrap();
        assert!(ProvenPeers::load(Some(path)).is_empty());
        let _ = fs::remove_dir_all(&dir);
    }
}
