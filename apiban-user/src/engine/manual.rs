//! What operators change by hand: bans, unbans and the manual allowlist, refused when they
//! would cut the host off from itself or have no effect.

use std::{sync::Arc, time::Duration};

use ipnet::IpNet;

use super::{Applied, Enforcer, Engine, EngineError};
use crate::{ledger::SourceId, trust::Provenance};

impl<E: Enforcer> Engine<E> {
    /// `apiban ban`: any prefix, the operator's own TTL or none. What would cut the host off
    /// from itself (loopback, its own addresses) or have no effect (the allowlist wins) is
    /// refused, naming why, unless `force`.
    pub fn ban(
        &mut self,
        net: IpNet,
        ttl: Option<Duration>,
        comment: Option<String>,
        force: bool,
        now: u64,
    ) -> Result<Applied, EngineError> {
        let net = net.trunc();
        if ttl.is_some_and(|t| t.as_secs() == 0) {
            return Err(EngineError::Refused(
                net,
                "a TTL under 1s expires at once; omit --ttl for a ban until unbanned".into(),
            ));
        }
        self.admit(Provenance::Operator { force }, net, comment.as_deref(), now)
            .map_err(|why| EngineError::Refused(net, why.to_string()))?;
        Arc::make_mut(&mut self.ledger).observe(
            net,
            &SourceId::Manual,
            now,
            ttl.map(|t| t.as_secs()),
            comment,
        );
        Ok(self.commit(now))
    }

    /// `apiban unban`: removes the prefix from every source. A feed that lists it again bans
    /// it again; `apiban allow add` is the lasting way. Returns the sources that held it.
    pub fn unban(&mut self, net: IpNet, now: u64) -> (Vec<SourceId>, Applied) {
        let net = net.trunc();
        let sources: Vec<SourceId> = self
            .ledger
            .get(&net)
            .map(|r| r.iter().map(|(s, _)| s.clone()).collect())
            .unwrap_or_default();
        if !sources.is_empty() {
            let ledger = Arc::make_mut(&mut self.ledger);
            for source in &sources {
                ledger.remove(&net, source);
            }
        }
        (sources, self.commit(now))
    }

    /// A SIP proxy's ban through the ban API: as a feed's, the allowlist wins and the
    /// sanitiser's limits apply (this host, special-purpose ranges, prefix lengths), since
    /// what a proxy asks for comes from what a remote party sent it.
    pub fn api_ban(
        &mut self,
        net: IpNet,
        ttl: Duration,
        comment: Option<String>,
        now: u64,
    ) -> Result<Applied, EngineError> {
        let net = net.trunc();
        self.admit(Provenance::BanApi, net, comment.as_deref(), now)
            .map_err(|why| EngineError::Refused(net, why.to_string()))?;
        Arc::make_mut(&mut self.ledger).observe(
            net,
            &self.api_source,
            now,
            Some(ttl.as_secs().max(1)),
            comment,
        );
        Ok(self.commit(now))
    }

    /// Removes the ban API's record of `net`, not other sources': a proxy lifts what it
    /// banned (in a fleet, what this node's proxies banned). Returns whether there was one.
    pub fn api_unban(&mut self, net: IpNet, now: u64) -> (bool, Applied) {
        let removed = Arc::make_mut(&mut self.ledger).remove(&net.trunc(), &self.api_source);
        (removed, self.commit(now))
    }

    /// Removes every record this node's ban API made (a Kamailio that flushes at start
    /// lifts its own node's bans, not the fleet's).
    pub fn api_flush(&mut self, now: u64) -> (usize, Applied) {
        let removed = Arc::make_mut(&mut self.ledger).remove_source(&self.api_source);
        (removed, self.commit(now))
    }

    /// Makes this node's ban API ban as `api:<node>` (a fleet node whose proxies own
    /// their bans), or as `api` (None).
    pub fn set_api_source(&mut self, node: Option<String>) {
        self.api_source = node.map_or(SourceId::Api, SourceId::ApiNode);
    }

    /// The source this node's ban API bans as.
    pub fn api_source(&self) -> &SourceId {
        &self.api_source
    }

    pub fn allow_add(&mut self, net: IpNet, now: u64) -> Applied {
        Arc::make_mut(&mut self.manual_allow).insert(net.trunc());
        self.set_config_allow(self.config_allow.iter().copied().collect());
        self.commit(now)
    }

    /// Removes a manual allow entry; configured ones stay (they come back on every reload).
    pub fn allow_remove(&mut self, net: IpNet, now: u64) -> Result<Applied, EngineError> {
        let net = net.trunc();
        if !Arc::make_mut(&mut self.manual_allow).remove(&net) {
            let why = if self.config_allow.contains(&net) {
                "it comes from the configuration; remove it there and reload"
            } else {
                "it is not on the allowlist"
            };
            return Err(EngineError::Refused(net, why.into()));
        }
        self.set_config_allow(self.config_allow.iter().copied().collect());
        Ok(self.commit(now))
    }
}
