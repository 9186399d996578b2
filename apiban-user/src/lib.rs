//! apiban's agent as a library: the dataplane (XDP maps and loader), the sources, the
//! sanitiser, the ledger and its engine, the state store and the sync tasks.

pub mod agent;
pub mod config;
pub mod conn_slots;
pub mod control;
pub mod dataplane;
pub mod engine;
pub mod host_addresses;
pub mod human;
pub mod ledger;
pub mod metrics;
pub mod notify;
pub mod rate_budget;
pub mod sanitise;
pub mod source;
pub mod state;
pub mod status;
pub mod sync;
