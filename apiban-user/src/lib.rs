//! apiban's agent as a library: the dataplane (XDP maps and loader), the sources, the
//! sanitiser, the ledger and its engine, the state store and the sync tasks.

pub mod agent;
pub mod ban_api;
pub mod capture;
pub mod client_rate;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conn_slots;
pub mod control;
pub mod dataplane;
pub mod detect;
pub mod engine;
pub mod host_addresses;
pub mod human;
pub mod ledger;
pub mod metrics;
pub mod notify;
pub mod proven_view;
pub mod rate_budget;
pub mod sanitise;
pub mod snapshot;
pub mod source;
pub mod state;
pub mod status;
pub mod sync;
pub mod trust;

/// An error and its causes on one line, for log fields and answers to clients.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A panic while holding a mutex poisons it; what these mutexes guard (agent facts, slot
/// lists, a map reader) stays consistent between statements, so keep going.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
