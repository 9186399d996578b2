//! A bound on the connections the control socket and /metrics serve at once. Past the
//! bound, the connection that has been open longest is dropped, not the new one: a client
//! that connects and sends nothing (or a thousand of them, slowloris) cannot keep a
//! monitoring scrape or an operator's `apiban status` out, and holds at most one slot.

use std::{
    collections::VecDeque,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::task::AbortHandle;

pub struct ConnSlots {
    cap: usize,
    next: AtomicU64,
    open: Mutex<VecDeque<(u64, AbortHandle)>>,
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
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let slots = self.clone();
        // The task is registered under the lock it takes to deregister, so it cannot finish
        // before it is known.
        let mut open = crate::lock(&self.open);
        let task = tokio::spawn(async move {
            serve.await;
            crate::lock(&slots.open).retain(|(i, _)| *i != id);
        });
        open.push_back((id, task.abort_handle()));
        while open.len() > self.cap {
            if let Some((_, oldest)) = open.pop_front() {
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
