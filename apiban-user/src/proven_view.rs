//! The peers detection holds proven now (its own proofs and the fleet's), as the ledger's
//! owner reads them: another node's detection ban of one of them is not enforced here, as
//! this node's detection would not have made it (see `engine::cluster`). The detection task
//! is the one writer; it replaces the whole set at most once a second. Below both, so that
//! neither imports the other.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

/// Address -> proven until (Unix seconds).
#[derive(Clone, Debug, Default)]
pub struct ProvenView(Arc<RwLock<HashMap<IpAddr, u64>>>);

impl ProvenView {
    pub fn covers(&self, addr: IpAddr, now: u64) -> bool {
        self.0
            .read()
            .map(|set| set.get(&addr).is_some_and(|until| *until > now))
            .unwrap_or(false)
    }

    pub fn replace(&self, set: HashMap<IpAddr, u64>) {
        if let Ok(mut held) = self.0.write() {
            *held = set;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_covered_until_its_proof_runs_out() {
        let view = ProvenView::default();
        let addr: IpAddr = "198.51.100.7".parse().unwrap();
        assert!(!view.covers(addr, 10));
        view.clone().replace(HashMap::from([(addr, 100)]));
        assert!(view.covers(addr, 99));
        assert!(!view.covers(addr, 100));
    }
}
