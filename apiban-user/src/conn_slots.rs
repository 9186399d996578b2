//! A bound on the connections the control socket, /metrics and the ban API serve at once.
//! Past the bound, the connection that has been open longest is dropped, not the new one: a
//! client that connects and sends nothing (or a thousand of them, slowloris) cannot keep a
//! monitoring scrape or an operator's `apiban status` out, and holds at most one slot.
//! Where clients have addresses (the ban API), the one dropped is the oldest of the address
//! holding the most: a flooding client pushes out its own connections, not a SIP proxy's.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::task::AbortHandle;

pub struct ConnSlots {
    cap: usize,
    next: AtomicU64,
    open: Mutex<VecDeque<(u64, Option<IpAddr>, AbortHandle)>>,
}

impl ConnSlots {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            next: AtomicU64::new(0),
            open: Mutex::new(VecDeque::new()),
        })
    }

    /// Serves one connection in a task of its own, dropping the oldest one if all slots are
    /// taken.
    pub fn spawn(self: &Arc<Self>, serve: impl Future<Output = ()> + Send + 'static) {
        self.spawn_for(None, serve)
    }

    /// [`ConnSlots::spawn`] for a connection from `client`: past the bound, the oldest
    /// connection of the client holding the most goes.
    pub fn spawn_for(
        self: &Arc<Self>,
        client: Option<IpAddr>,
        serve: impl Future<Output = ()> + Send + 'static,
    ) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let slots = self.clone();
        // The task is registered under the lock it takes to deregister, so it cannot finish
        // before it is known.
        let mut open = crate::lock(&self.open);
        let task = tokio::spawn(async move {
            serve.await;
            crate::lock(&slots.open).retain(|(i, _, _)| *i != id);
        });
        open.push_back((id, client, task.abort_handle()));
        while open.len() > self.cap {
            let mut held: HashMap<Option<IpAddr>, usize> = HashMap::new();
            for (_, c, _) in open.iter() {
                *held.entry(*c).or_default() += 1;
            }
            let most = held.into_iter().max_by_key(|(_, n)| *n).map(|(c, _)| c);
            let Some(at) = open.iter().position(|(_, c, _)| Some(*c) == most) else {
                break;
            };
            if let Some((_, _, oldest)) = open.remove(at) {
                oldest.abort();
            }
        }
    }

    /// Connections being served now.
    pub fn in_use(&self) -> usize {
        crate::lock(&self.open).len()
    }
}

/// Raises the soft limit on open files to the hard one: every connection costs a
/// descriptor, and the default soft limit (1024) is reached by a few hundred idle clients
/// plus the agent's own maps and sockets.
pub fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_flooding_client_pushes_out_its_own_connections_not_another_clients() {
        let slots = ConnSlots::new(4);
        let (flood, proxy): (IpAddr, IpAddr) =
            ("127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap());
        let (proxy_tx, mut proxy_alive) = tokio::sync::mpsc::channel::<()>(1);
        slots.spawn_for(Some(proxy), async move {
            let _held = proxy_tx;
            std::future::pending::<()>().await
        });
        for _ in 0..10 {
            slots.spawn_for(Some(flood), std::future::pending());
        }
        tokio::task::yield_now().await;
        assert_eq!(slots.in_use(), 4);
        let ids: Vec<Option<IpAddr>> = crate::lock(&slots.open).iter().map(|e| e.1).collect();
        assert_eq!(
            ids.iter().filter(|c| **c == Some(proxy)).count(),
            1,
            "{ids:?}"
        );
        // The proxy's task was not aborted: its channel is still open.
        assert!(
            proxy_alive
                .try_recv()
                .is_err_and(|e| e == tokio::sync::mpsc::error::TryRecvError::Empty)
        );
    }
}
