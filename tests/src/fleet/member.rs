//! One etcd member of the fleet's cluster, as a process in the hub namespace that a test
//! can kill and start again on its data directory.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

/// One etcd member, in the hub namespace.
pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub(super) child: Option<Child>,
    pub log: PathBuf,
    /// `ip netns exec <hub> etcd ...`: what starts it again on its data directory.
    pub(super) command: Vec<String>,
}

impl EtcdMember {
    /// Starts the member again on its data directory: it rejoins the cluster.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(spawn_member(&self.command, &self.log));
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The member's process (`ip netns exec` execs etcd in place).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `ip` with `command`, appending to `log`.
pub(super) fn spawn_member(command: &[String], log: &std::path::Path) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("etcd log");
    Command::new("ip")
        .args(command)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start etcd (Debian etcd-server; `cargo xtask setup`): {e}")
        })
}
