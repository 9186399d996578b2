//! Shared support for apiban's kernel-touching tests: a root check that fails loudly, RAII
//! guards that clean up namespaces, veth pairs and pins even when a test panics, and a frame
//! builder for the packets the tests send ([`traffic`] sends and counts them).

pub mod agent;
pub mod attackers;
pub mod bench_mode;
pub mod crowd;
pub mod crowdsec;
pub mod differential;
pub mod fake_apiban;
pub mod fleet;
pub mod frame;
pub mod framegen;
pub mod kamailio;
pub mod reference;
pub mod scene;
pub mod sync_harness;
pub mod traffic;

pub use traffic::{
    Delivered, PacketSocket, SteadyTraffic, UdpReceiver, frame_source, probe, send_udp, sip_options,
};

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// The production program's XDP action on `frame`, through BPF_PROG_TEST_RUN.
pub fn run_frame(loaded: &mut apiban::dataplane::loader::Loaded, frame: &[u8]) -> u32 {
    use aya::programs::TestRun as _;
    let prog: &mut aya::programs::Xdp = loaded
        .ebpf_mut()
        .program_mut(apiban_common::program_names::APIBAN)
        .expect("the program")
        .try_into()
        .expect("XDP");
    let mut opts = aya::programs::TestRunOptions::new();
    opts.data_in = Some(frame);
    prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
}

/// Runs a program to its end and returns what it did (the package tests' commands).
pub fn run_program(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs a program that must succeed; its stdout and stderr, together.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run_program(program, args);
    assert!(
        out.status.success(),
        "{program} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

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
        Self::at(PathBuf::from("/sys/fs/bpf").join(unique_name("apiban-test-")))
    }

    pub fn at(path: PathBuf) -> Self {
        Self { path }
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
            let _ = apiban::dataplane::loader::detach(&self.path, None, true);
        }
    }
}

/// A tmpfs of a given size mounted on a directory, unmounted on drop: a state directory that
/// fills up, or goes read-only, on demand.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).expect("the mount point");
        sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
                &path.display().to_string(),
            ],
        );
        Self {
            path: path.to_owned(),
        }
    }

    /// `mount -o remount,<options>`, e.g. `ro` or `rw`.
    pub fn remount(&self, options: &str) {
        sh(
            "mount",
            &[
                "-o",
                &format!("remount,{options}"),
                &self.path.display().to_string(),
            ],
        );
    }

    /// Writes a file until the filesystem is full; returns its path.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write as _;
        let path = self.path.join("filler");
        let mut file = std::fs::File::create(&path).expect("the filler file");
        let chunk = [0u8; 4096];
        while file.write_all(&chunk).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
    }
}

/// A network namespace, deleted with everything in it on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        Self::named(&unique_name(prefix))
    }

    pub fn named(name: &str) -> Self {
        let name = name.to_owned();
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
        Self::named(
            &unique_name("apbs"),
            &unique_name("apba"),
            &unique_name("apbs"),
            &unique_name("apba"),
        )
    }

    /// The same, with fixed names (the demo removes a killed run's leftovers by name).
    pub fn named(server_ns: &str, attacker_ns: &str, server_if: &str, attacker_if: &str) -> Self {
        let server = Netns::named(server_ns);
        let attacker = Netns::named(attacker_ns);
        let (server_if, attacker_if) = (server_if.to_owned(), attacker_if.to_owned());
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

    /// The server interface's MAC address, for frames built by hand.
    pub fn server_mac(&self) -> [u8; 6] {
        // `ip netns exec` mounts the namespace's own /sys.
        let path = format!("/sys/class/net/{}/address", self.server_if);
        let out = self.server.exec("cat", &[&path]);
        let octets: Vec<u8> = out
            .trim()
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).expect("a hex octet"))
            .collect();
        octets.try_into().expect("six octets")
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
            &["addr", "replace", &cidr, "dev", &self.attacker_if, "nodad"],
        );
        self.server
            .exec("ip", &["route", "replace", &cidr, "via", &via]);
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
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
    spawn_in_netns(ns, f)
        .join()
        .expect("namespace thread panicked")
}

/// Like [`in_netns`], without waiting: the closure runs on its own thread in `ns`.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    spawn_in_netns_at(ns.path(), f)
}

/// [`spawn_in_netns`] by the namespace's path, for a helper that keeps only its name.
pub fn spawn_in_netns_at<T: Send + 'static>(
    path: PathBuf,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        let file =
            std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        use std::os::fd::AsRawFd as _;
        // SAFETY: file is an open namespace fd.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}
