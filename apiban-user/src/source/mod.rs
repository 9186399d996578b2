//! Where bans come from: the APIBAN service, plain-text blocklists and CrowdSec's LAPI. Sources only fetch and
//! parse; what they return goes through the sanitiser into the ledger.

pub mod apiban;
pub mod blocklist;
pub mod crowdsec;
