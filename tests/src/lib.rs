//! Shared support for apiban's kernel-touching tests: a root check that fails loudly, RAII
//! guards that clean up namespaces, veth pairs and pins even when a test panics, and a frame
//! builder for the packets the tests send.

pub mod frame;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// Fails the test, with a message saying why, unless running as root. Privileged tests are
/// never skipped: a skipped test would pass without proving anything.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test loads XDP programs and creates network namespaces: it needs root \
         (CAP_BPF + CAP_NET_ADMIN); run it as root, e.g. via `cargo xtask test` in CI"
    );
}

/// A name unique to this process and call, short enough for an interface (15 bytes max).
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}{n}", std::process::id() % 0xffff)
}

/// Runs a command and panics with its output if it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("could not run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A bpffs directory for one test; everything under it is detached and removed on drop.
pub struct BpffsDir {
    pub path: PathBuf,
}

impl BpffsDir {
    pub fn new() -> Self {
        Self {
            path: PathBuf::from("/sys/fs/bpf").join(unique_name("apiban-test-")),
        }
    }
}

impl Default for BpffsDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        if self.path.exists() {
            // Best effort: a failure here must not mask the test's own panic.
            let _ = apiban::dataplane::loader::detach(&self.path, None);
        }
    }
}

/// A network namespace, deleted with everything in it on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique_name(prefix);
        sh("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.exec("ip", &["link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace and panics if it fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A veth pair with `host` in the test's namespace and `peer` moved into `ns`.
/// Deleting one end deletes both; the namespace guard covers the peer as well.
pub struct Veth {
    pub host: String,
    pub peer: String,
}

impl Veth {
    /// Creates the pair, addresses both ends (`host_addr`/`peer_addr` with prefix) and brings
    /// them up.
    pub fn new(ns: &Netns, host_cidr: &str, peer_cidr: &str) -> Self {
        let host = unique_name("apbh");
        let peer = unique_name("apbp");
        sh("ip", &["link", "add", &host, "type", "veth", "peer", "name", &peer]);
        let veth = Self { host, peer };
        sh("ip", &["link", "set", &veth.peer, "netns", &ns.name]);
        sh("ip", &["addr", "add", host_cidr, "dev", &veth.host]);
        sh("ip", &["link", "set", &veth.host, "up"]);
        ns.exec("ip", &["addr", "add", peer_cidr, "dev", &veth.peer]);
        ns.exec("ip", &["link", "set", &veth.peer, "up"]);
        veth
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host])
            .output();
    }
}

/// Waits until `condition` holds, polling; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` on a thread that has entered network namespace `ns` (setns affects only the
/// calling thread, so the test's own thread stays where it was).
pub fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns.path();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        use std::os::fd::AsRawFd as _;
        // SAFETY: file is an open namespace fd.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread panicked")
}
