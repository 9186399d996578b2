//! What the engine writes its decisions to: the XDP maps, or a set in memory for `--dry-run`
//! and tests. Only the engine holds one, so only the ledger's owner writes the maps.

use std::collections::BTreeSet;

use ipnet::IpNet;

use crate::dataplane::{Dataplane, DataplaneError};

/// What enforces the ban list: the XDP maps, or an in-memory set for `--dry-run` and tests.
pub trait Enforcer {
    fn denied(&self) -> Result<BTreeSet<IpNet>, DataplaneError>;
    /// The deny entries that only observe: matching packets pass and are counted.
    fn observed(&self) -> Result<BTreeSet<IpNet>, DataplaneError>;
    fn allowed(&self) -> Result<BTreeSet<IpNet>, DataplaneError>;
    /// Adds deny entries; `observed` ones only observe from their first packet on.
    fn deny(&mut self, nets: &[IpNet], observed: bool) -> Result<(), DataplaneError>;
    /// Switches present deny entries between observing and enforcing, in place.
    fn mark(&mut self, nets: &[IpNet], observed: bool) -> Result<(), DataplaneError>;
    /// Whether any entry observes; off, enforcing entries cost nothing for the mode.
    fn set_observing(&mut self, _on: bool) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// Whether the program copies packets to a running capture; a dry run has no packets.
    fn set_capture(&mut self, _on: bool) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn undeny(&mut self, nets: &[IpNet]) -> Result<(), DataplaneError>;
    fn allow(&mut self, net: IpNet) -> Result<(), DataplaneError>;
    fn unallow(&mut self, net: IpNet) -> Result<(), DataplaneError>;
    /// Which packets a ban applies to; a dry run has no packets.
    fn set_scope(&mut self, _scope: &crate::dataplane::Scope) -> Result<(), DataplaneError> {
        Ok(())
    }
}

impl Enforcer for Dataplane {
    fn denied(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        Ok(self.deny_hits()?.into_iter().map(|h| h.net).collect())
    }

    fn observed(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        Ok(self
            .deny_hits()?
            .into_iter()
            .filter(|h| h.observed)
            .map(|h| h.net)
            .collect())
    }

    fn allowed(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        Ok(self.allow_entries()?.into_iter().collect())
    }

    fn deny(&mut self, nets: &[IpNet], observed: bool) -> Result<(), DataplaneError> {
        self.deny_batch(nets, observed).map(drop)
    }

    fn mark(&mut self, nets: &[IpNet], observed: bool) -> Result<(), DataplaneError> {
        self.mark_batch(nets, observed)
    }

    fn set_observing(&mut self, on: bool) -> Result<(), DataplaneError> {
        Dataplane::set_observing(self, on)
    }

    fn set_capture(&mut self, on: bool) -> Result<(), DataplaneError> {
        self.set_flag(apiban_common::DataplaneConfig::CAPTURE, on)
    }

    fn undeny(&mut self, nets: &[IpNet]) -> Result<(), DataplaneError> {
        self.undeny_batch(nets).map(drop)
    }

    fn allow(&mut self, net: IpNet) -> Result<(), DataplaneError> {
        Dataplane::allow(self, net)
    }

    fn unallow(&mut self, net: IpNet) -> Result<(), DataplaneError> {
        Dataplane::unallow(self, net)
    }

    fn set_scope(&mut self, scope: &crate::dataplane::Scope) -> Result<(), DataplaneError> {
        Dataplane::set_scope(self, scope)
    }
}

/// An enforcer that only remembers: `apiban run --dry-run` reports what it would block.
#[derive(Clone, Debug, Default)]
pub struct MemoryEnforcer {
    pub deny: BTreeSet<IpNet>,
    /// The entries of `deny` that only observe.
    pub observed: BTreeSet<IpNet>,
    pub allow: BTreeSet<IpNet>,
    /// Deny capacity, to behave like a full map; None is unbounded.
    pub capacity: Option<usize>,
}

impl Enforcer for MemoryEnforcer {
    fn denied(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        Ok(self.deny.clone())
    }

    fn observed(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        Ok(self.observed.clone())
    }

    fn allowed(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        Ok(self.allow.clone())
    }

    fn mark(&mut self, nets: &[IpNet], observed: bool) -> Result<(), DataplaneError> {
        for net in nets.iter().filter(|n| self.deny.contains(n)) {
            if observed {
                self.observed.insert(*net);
            } else {
                self.observed.remove(net);
            }
        }
        Ok(())
    }

    fn deny(&mut self, nets: &[IpNet], observed: bool) -> Result<(), DataplaneError> {
        for net in nets {
            if self.capacity.is_some_and(|c| self.deny.len() >= c) {
                return Err(DataplaneError::MapFull {
                    list: crate::dataplane::List::Deny,
                    family: match net {
                        IpNet::V4(_) => crate::dataplane::Family::V4,
                        IpNet::V6(_) => crate::dataplane::Family::V6,
                    },
                    capacity: self.capacity.unwrap_or(0) as u32,
                });
            }
            if self.deny.insert(*net) && observed {
                self.observed.insert(*net);
            }
        }
        Ok(())
    }

    fn undeny(&mut self, nets: &[IpNet]) -> Result<(), DataplaneError> {
        for net in nets {
            self.deny.remove(net);
            self.observed.remove(net);
        }
        Ok(())
    }

    fn allow(&mut self, net: IpNet) -> Result<(), DataplaneError> {
        self.allow.insert(net);
        Ok(())
    }

    fn unallow(&mut self, net: IpNet) -> Result<(), DataplaneError> {
        self.allow.remove(&net);
        Ok(())
    }
}
