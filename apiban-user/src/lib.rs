//! The apiban agent: keeps the addresses of known SIP attackers off a host's network with an
//! XDP program fed from APIBAN.
//!
//! Data flows one way: sources -> sanitiser -> ledger -> diff -> [`dataplane`] maps.

pub mod dataplane;
