//! Keeps the sanitiser's view of this host's own addresses current: a feed must never ban
//! the host itself, and its addresses change while the agent runs (DHCP, a failover VIP
//! moving in, an address added by hand). A thread listens to rtnetlink's address groups and
//! tells the ledger's owner whenever the set changes; should the subscription fail, it reads
//! the addresses every 30 seconds instead.

use std::{net::IpAddr, time::Duration};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::sync::mpsc;

use crate::{sanitise::host_addresses, sync::Update};

/// `RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR` from linux/rtnetlink.h.
const ADDRESS_GROUPS: u32 = 0x10 | 0x100;
/// Address events come in bursts (an interface with several addresses going up): one
/// read of the addresses after the burst is enough.
const SETTLE: Duration = Duration::from_millis(100);
const POLL_WITHOUT_NETLINK: Duration = Duration::from_secs(30);

/// Starts the watcher; it ends when the owner stops listening. `known` is the set the
/// engine started with.
pub fn watch(known: Vec<IpAddr>, updates: mpsc::Sender<Update>) {
    let spawned = std::thread::Builder::new()
        .name("apiban-addrs".into())
        .spawn(move || run(known, updates));
    if let Err(e) = spawned {
        tracing::warn!(error = %crate::error_chain(&e), "cannot watch this host's addresses; they are read once");
    }
}

fn subscribe() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind(&SocketAddr::new(0, ADDRESS_GROUPS))?;
    Ok(socket)
}

fn run(mut known: Vec<IpAddr>, updates: mpsc::Sender<Update>) {
    let socket = match subscribe() {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(
                error = %crate::error_chain(&e),
                "cannot subscribe to address changes; reading this host's addresses every 30s"
            );
            None
        }
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match &socket {
            Some(socket) => {
                // Any message in these groups is an address change; the content does not
                // matter, the whole set is read again. An overrun (ENOBUFS) is a change too.
                let _ = socket.recv(&mut &mut buf[..], 0);
                std::thread::sleep(SETTLE);
                drain(socket, &mut buf);
            }
            None => std::thread::sleep(POLL_WITHOUT_NETLINK),
        }
        let now = match host_addresses() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "cannot read this host's addresses");
                continue;
            }
        };
        if now == known {
            continue;
        }
        known = now.clone();
        if updates.blocking_send(Update::OwnAddresses(now)).is_err() {
            return;
        }
    }
}

/// Reads whatever else has queued without blocking.
fn drain(socket: &Socket, buf: &mut [u8]) {
    if socket.set_non_blocking(true).is_err() {
        return;
    }
    while socket.recv(&mut &mut buf[..], 0).is_ok_and(|n| n > 0) {}
    let _ = socket.set_non_blocking(false);
}
