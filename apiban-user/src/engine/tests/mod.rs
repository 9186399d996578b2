//! The engine's tests, by behaviour: feeds, the state file and full maps here; operators,
//! observe mode and derived blocks, and the fleet in the files beside.

use super::*;
use crate::trust::MAX_COMMENT_CHARS;

mod fleet;
mod observe;
mod operators;

fn net(s: &str) -> IpNet {
    crate::sanitise::parse_net(s).unwrap()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn temp_store(name: &str) -> (std::path::PathBuf, StateStore) {
    let dir = std::env::temp_dir().join(format!("apiban-engine-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = StateStore::open(&dir).unwrap();
    (dir, store)
}

fn settings(ttl_secs: u64) -> EngineSettings {
    EngineSettings {
        ttl: Duration::from_secs(ttl_secs),
        ..Default::default()
    }
}

#[test]
fn full_pull_then_incremental_then_reconciliation() {
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, settings(1000), 100).unwrap();
    e.begin_full_pull(100);
    let r = e.apiban_batch(
        &strings(&["1.1.1.1", "2.2.2.2", "10.0.0.1", "junk"]),
        "200".into(),
        100,
    );
    assert_eq!((r.received, r.accepted, r.applied.added), (4, 2, 2));
    assert_eq!(r.skipped[&Rejection::SpecialPurpose], 1);
    assert_eq!(r.skipped[&Rejection::Invalid], 1);
    // Protection grows with each batch, before the pull ends.
    assert_eq!(e.enforcer().deny.len(), 2);
    e.apiban_batch(&strings(&["3.3.3.3"]), "300".into(), 101);
    e.apiban_done(102);
    assert_eq!(e.apiban_cursor().next_id.as_deref(), Some("300"));
    assert_eq!(e.apiban_cursor().last_full_pull, Some(102));
    // Incremental: a new address.
    e.apiban_batch(&strings(&["4.4.4.4"]), "400".into(), 200);
    assert_eq!(e.apiban_cursor().next_id.as_deref(), Some("400"));
    // The next full pull no longer lists 1.1.1.1.
    e.begin_full_pull(300);
    e.apiban_batch(
        &strings(&["2.2.2.2", "3.3.3.3", "4.4.4.4"]),
        "500".into(),
        300,
    );
    assert!(
        e.enforcer().deny.contains(&net("1.1.1.1")),
        "still banned mid-pull"
    );
    let done = e.apiban_done(301);
    assert_eq!((done.reconciled, done.applied.removed), (1, 1));
    assert!(!e.enforcer().deny.contains(&net("1.1.1.1")));
    assert_eq!(e.enforcer().deny.len(), 3);
}

#[test]
fn an_empty_full_pull_does_not_empty_the_dataplane() {
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, settings(1000), 0).unwrap();
    e.apiban_batch(&strings(&["1.1.1.1"]), "200".into(), 0);
    e.begin_full_pull(10);
    let done = e.apiban_done(11);
    assert_eq!(done.reconciled, 0);
    assert_eq!(e.enforcer().deny.len(), 1);
}

#[test]
fn expiry_and_reactivation_with_an_injected_clock() {
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, settings(100), 0).unwrap();
    e.apiban_batch(&strings(&["1.1.1.1", "2.2.2.2"]), "2".into(), 0);
    e.apiban_batch(&strings(&["2.2.2.2"]), "3".into(), 60);
    assert_eq!(e.sweep(99).0, 0);
    let (expired, applied) = e.sweep(100);
    assert_eq!((expired, applied.removed), (1, 1));
    assert_eq!(e.enforcer().deny, BTreeSet::from([net("2.2.2.2")]));
    let r = e.apiban_batch(&strings(&["1.1.1.1"]), "4".into(), 150);
    assert_eq!((r.new, r.applied.added), (1, 1));
    assert_eq!(e.sweep(160).0, 1, "2.2.2.2 expires at 160");
    assert_eq!(e.enforcer().deny, BTreeSet::from([net("1.1.1.1")]));
}

#[test]
fn a_full_map_is_counted_and_existing_bans_stay() {
    let enforcer = MemoryEnforcer {
        capacity: Some(3),
        ..Default::default()
    };
    let (mut e, _) = Engine::start(enforcer, None, settings(100), 0).unwrap();
    e.apiban_batch(&strings(&["1.1.1.1", "1.1.1.2"]), "1".into(), 0);
    let r = e.apiban_batch(&strings(&["1.1.1.3", "1.1.1.4", "1.1.1.5"]), "2".into(), 0);
    assert_eq!((r.applied.added, r.applied.not_enforced), (1, 2));
    assert_eq!(e.enforcer().deny.len(), 3);
    assert_eq!(e.counters().map_full, 1);
    // Room again after an unban: the same change enforces one that was waiting.
    let (_, applied) = e.unban(net("1.1.1.1"), 1);
    assert_eq!(
        (applied.removed, applied.added, applied.not_enforced),
        (1, 1, 1)
    );
    assert_eq!(e.enforcer().deny.len(), 3);
    assert!(!e.enforcer().deny.contains(&net("1.1.1.1")));
}

#[test]
fn restart_restores_before_any_request_and_resumes_the_pull() {
    let (dir, store) = temp_store("restart");
    let (mut e, _) =
        Engine::start(MemoryEnforcer::default(), Some(store), settings(1000), 0).unwrap();
    e.begin_full_pull(0);
    e.apiban_batch(&strings(&["1.1.1.1", "2a01:4f8::1"]), "250".into(), 0);
    e.ban(net("9.9.9.0/24"), None, Some("ops".into()), false, 0)
        .unwrap();
    e.allow_add(net("3.3.3.3"), 0);
    drop(e);
    // A new process: empty maps (a reboot), the state file only.
    let store = StateStore::open(&dir).unwrap();
    let (e, report) =
        Engine::start(MemoryEnforcer::default(), Some(store), settings(1000), 5).unwrap();
    assert_eq!(report.restored_entries, 3);
    assert_eq!(report.applied.added, 3);
    assert!(e.enforcer().allow.contains(&net("3.3.3.3")));
    let pull = e.apiban_cursor().full_pull.clone().unwrap();
    assert_eq!((pull.next_id.as_str(), pull.seen), ("250", 2));
    drop(e);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Maps that fill up and, read back, hold more than the engine put there.
#[derive(Default)]
struct CrowdedMaps {
    deny: BTreeSet<IpNet>,
}

impl Enforcer for CrowdedMaps {
    fn denied(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        Ok(self.deny.clone())
    }
    fn allowed(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        Ok(BTreeSet::new())
    }
    fn observed(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        Ok(BTreeSet::new())
    }
    fn mark(&mut self, _: &[IpNet], _: bool) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn deny(&mut self, nets: &[IpNet], _: bool) -> Result<(), DataplaneError> {
        // Half goes in, then the map is full; meanwhile a previous agent's program put
        // three entries of its own there.
        self.deny.extend(nets.iter().take(nets.len() / 2).copied());
        self.deny
            .extend(["9.9.9.1", "9.9.9.2", "9.9.9.3"].iter().map(|s| net(s)));
        Err(DataplaneError::MapFull {
            list: crate::dataplane::List::Deny,
            family: crate::dataplane::Family::V4,
            capacity: 4,
        })
    }
    fn undeny(&mut self, nets: &[IpNet]) -> Result<(), DataplaneError> {
        for n in nets {
            self.deny.remove(n);
        }
        Ok(())
    }
    fn allow(&mut self, _: IpNet) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn unallow(&mut self, _: IpNet) -> Result<(), DataplaneError> {
        Ok(())
    }
}

#[test]
fn a_full_map_holding_foreign_entries_does_not_break_the_count() {
    let (mut e, _) = Engine::start(CrowdedMaps::default(), None, settings(100), 0).unwrap();
    let r = e.apiban_batch(&strings(&["1.1.1.1", "1.1.1.2"]), "1".into(), 0);
    assert_eq!((r.applied.added, r.applied.not_enforced), (1, 1));
    assert_eq!(e.counters().map_full, 1);
}

#[test]
fn pinned_bans_without_state_are_kept_until_a_pull_settles_them() {
    let pinned = MemoryEnforcer {
        deny: BTreeSet::from([net("1.1.1.1"), net("2.2.2.2")]),
        ..Default::default()
    };
    let (mut e, report) = Engine::start(pinned, None, settings(1000), 50).unwrap();
    assert_eq!(report.applied.removed, 0);
    assert_eq!(e.enforcer().deny.len(), 2);
    e.begin_full_pull(50);
    e.apiban_batch(&strings(&["2.2.2.2"]), "9".into(), 50);
    e.apiban_done(51);
    assert_eq!(e.enforcer().deny, BTreeSet::from([net("2.2.2.2")]));
}
