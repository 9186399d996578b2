//! Shared support for apiban's kernel-touching tests: a root check that fails loudly, RAII
//! guards that clean up namespaces, veth pairs and pins even when a test panics, and a frame
//! builder for the packets the tests send.

pub mod agent;
pub mod fake_apiban;
pub mod frame;
pub mod sync_harness;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
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

/// Two namespaces joined by a veth pair: `server` (where XDP attaches and receivers listen)
/// and `attacker` (which sends from as many source addresses as a test adds). Nothing is
/// linked to the host's network; dropping the topology deletes both namespaces and the pair.
pub struct Topology {
    pub server: Netns,
    pub attacker: Netns,
    /// The server's end of the pair (in `server`).
    pub server_if: String,
    /// The attacker's end of the pair (in `attacker`).
    pub attacker_if: String,
    pub server_v4: Ipv4Addr,
    pub server_v6: Ipv6Addr,
}

impl Topology {
    /// Addresses: server 10.77.0.1/24 and fd77::1/64, attacker 10.77.0.2/24 and fd77::2/64.
    pub fn new() -> Self {
        let server = Netns::new("apbs");
        let attacker = Netns::new("apba");
        let server_if = unique_name("apbs");
        let attacker_if = unique_name("apba");
        sh(
            "ip",
            &[
                "link",
                "add",
                &server_if,
                "netns",
                &server.name,
                "type",
                "veth",
                "peer",
                "name",
                &attacker_if,
                "netns",
                &attacker.name,
            ],
        );
        let topo = Self {
            server,
            attacker,
            server_if,
            attacker_if,
            server_v4: Ipv4Addr::new(10, 77, 0, 1),
            server_v6: "fd77::1".parse().expect("literal"),
        };
        for (ns, ifname, v4, v6) in [
            (&topo.server, &topo.server_if, "10.77.0.1/24", "fd77::1/64"),
            (
                &topo.attacker,
                &topo.attacker_if,
                "10.77.0.2/24",
                "fd77::2/64",
            ),
        ] {
            ns.exec("ip", &["addr", "add", v4, "dev", ifname]);
            ns.exec("ip", &["addr", "add", v6, "dev", ifname, "nodad"]);
            ns.exec("ip", &["link", "set", ifname, "up"]);
        }
        topo
    }

    /// Gives the attacker another source address (an IPv4 /32 or IPv6 /128), routed back
    /// from the server so replies and reverse-path checks work.
    pub fn add_attacker_source(&self, addr: IpAddr) {
        let (cidr, via) = match addr {
            IpAddr::V4(a) => (format!("{a}/32"), "10.77.0.2".to_owned()),
            IpAddr::V6(a) => (format!("{a}/128"), "fd77::2".to_owned()),
        };
        self.attacker.exec(
            "ip",
            &["addr", "add", &cidr, "dev", &self.attacker_if, "nodad"],
        );
        self.server
            .exec("ip", &["route", "add", &cidr, "via", &via]);
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

/// A UDP receiver in the server namespace that counts datagrams per source address.
pub struct UdpReceiver {
    socket: UdpSocket,
    pub counts: HashMap<IpAddr, usize>,
}

impl UdpReceiver {
    pub fn bind(ns: &Netns, addr: SocketAddr) -> Self {
        let socket = in_netns(ns, move || UdpSocket::bind(addr).expect("bind receiver"));
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("read timeout");
        Self {
            socket,
            counts: HashMap::new(),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("local addr")
    }

    /// Reads whatever has arrived into `counts`.
    pub fn drain(&mut self) {
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = self.socket.recv_from(&mut buf) {
            *self.counts.entry(from.ip()).or_default() += 1;
        }
    }

    pub fn count(&self, from: IpAddr) -> usize {
        self.counts.get(&from).copied().unwrap_or(0)
    }

    /// Waits until `from` has delivered `n` datagrams in total.
    pub fn wait_for(&mut self, from: IpAddr, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            let got = self.count(from);
            if got >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?}: {got} of {n} datagrams from {from} arrived"
            );
        }
    }
}

/// Sends `n` datagrams from `src` (an attacker address) to `dst`, from the attacker namespace.
pub fn send_udp(ns: &Netns, src: IpAddr, dst: SocketAddr, n: usize) {
    in_netns(ns, move || {
        let socket =
            UdpSocket::bind(SocketAddr::new(src, 0)).unwrap_or_else(|e| panic!("bind {src}: {e}"));
        for _ in 0..n {
            socket
                .send_to(b"OPTIONS sip:probe@apiban.test SIP/2.0\r\n\r\n", dst)
                .unwrap_or_else(|e| panic!("send {src} -> {dst}: {e}"));
        }
    });
}

/// Sends `n` datagrams from each banned source and then from a clean one, waits until all
/// the clean ones arrived (they travel the same veth after the banned ones, so anything
/// banned that got through has arrived too) and returns how many arrived per banned source.
pub fn probe(
    topo: &Topology,
    rx: &mut UdpReceiver,
    banned: &[IpAddr],
    clean: IpAddr,
    n: usize,
) -> Vec<usize> {
    let dst = rx.local_addr();
    let before: Vec<usize> = banned.iter().map(|b| rx.count(*b)).collect();
    let clean_before = rx.count(clean);
    for b in banned {
        send_udp(&topo.attacker, *b, dst, n);
    }
    send_udp(&topo.attacker, clean, dst, n);
    rx.wait_for(clean, clean_before + n, Duration::from_secs(10));
    banned
        .iter()
        .zip(before)
        .map(|(b, before)| rx.count(*b) - before)
        .collect()
}

/// Waits until `condition` holds, polling; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` on a thread that has entered network namespace `ns` (setns affects only the
/// calling thread, so the test's own thread stays where it was).
pub fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns.path();
    std::thread::spawn(move || {
        let file =
            std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        use std::os::fd::AsRawFd as _;
        // SAFETY: file is an open namespace fd.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread panicked")
}
