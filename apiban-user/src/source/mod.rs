//! Where bans come from: the APIBAN service and plain-text blocklists. Sources only fetch and
//! parse; what they return goes through the sanitiser into the ledger.

pub mod apiban;
pub mod blocklist;
