//! One end-to-end setup shared by the end-to-end tests and `cargo xtask demo`: a server and
//! an attacker namespace joined by a veth pair, the local APIBAN server inside the server
//! namespace, UDP receivers on the SIP port, and the real agent with its own state dir,
//! bpffs dir and control socket. Every part is a guard: dropping the scene (also on panic)
//! kills the agent and removes pins, namespaces and files.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{
    BpffsDir, Topology, UdpReceiver, agent::AgentProcess, fake_apiban::FakeApiban, in_netns, probe,
    sync_harness::TempDir,
};

pub const KEY: &str = "e2eTestKey";

/// How the agent is started: the ways operators really do it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// Into the server's network namespace only (setns), keeping the host's mount
    /// namespace: what a systemd unit with NetworkNamespacePath= does.
    Setns,
    /// `ip netns exec NS apiban run`: its own mount namespace with a fresh /sys, where
    /// /sys/fs/bpf is not the host's bpffs.
    IpNetnsExec,
    /// `unshare --mount apiban run` inside the network namespace: a private copy of the
    /// mount table (as containers have).
    UnshareMount,
}
pub const SIP_PORT: u16 = 5060;

pub struct Scene {
    // Field order is drop order: the agent goes first, the namespaces last.
    agent: Option<AgentProcess>,
    pub api: FakeApiban,
    pub rx: UdpReceiver,
    pub rx6: UdpReceiver,
    pub dir: TempDir,
    pub bpffs: BpffsDir,
    pub topo: Topology,
    /// Extra interfaces the agent attaches to (beyond the topology's server side).
    pub extra_ifaces: Vec<String>,
    /// Where the agent looks for APIBAN instead of the local server (e.g. nowhere).
    pub api_url: Option<String>,
}

impl Default for Scene {
    fn default() -> Self {
        Self::new()
    }
}

impl Scene {
    pub fn new() -> Self {
        Self::build(
            Topology::new(),
            BpffsDir::new(),
            TempDir::new("apiban-e2e-"),
        )
    }

    pub fn build(topo: Topology, bpffs: BpffsDir, dir: TempDir) -> Self {
        let api = in_netns(&topo.server, || {
            FakeApiban::start_on(KEY, "127.0.0.1:0".parse().expect("literal"))
        });
        let rx = UdpReceiver::bind(
            &topo.server,
            SocketAddr::new(topo.server_v4.into(), SIP_PORT),
        );
        let rx6 = UdpReceiver::bind(
            &topo.server,
            SocketAddr::new(topo.server_v6.into(), SIP_PORT),
        );
        Self {
            agent: None,
            api,
            rx,
            rx6,
            dir,
            bpffs,
            topo,
            extra_ifaces: Vec::new(),
            api_url: None,
        }
    }

    /// In a directory of its own that the agent creates, as /run/apiban is.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.path.join("run").join("control.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path.join("state")
    }

    /// `apiban run` flags for this scene, before the test's own.
    pub fn base_args(&self) -> Vec<String> {
        let mut args = vec![
            "--iface".to_owned(),
            self.topo.server_if.clone(),
            "--bpffs-dir".to_owned(),
            self.bpffs.path.display().to_string(),
            "--state-dir".to_owned(),
            self.state_dir().display().to_string(),
            "--api-url".to_owned(),
            self.api_url.clone().unwrap_or_else(|| self.api.base_url()),
        ];
        for iface in &self.extra_ifaces {
            args.extend(["--iface".to_owned(), iface.clone()]);
        }
        args
    }

    /// Starts the agent with the scene's flags, then `extra`, and APIBAN_KEY set; waits until
    /// its control socket answers.
    pub fn start(&mut self, extra: &[&str]) -> &AgentProcess {
        self.start_with_env(extra, &[("APIBAN_KEY", KEY)])
    }

    pub fn start_with_env(&mut self, extra: &[&str], env: &[(&str, &str)]) -> &AgentProcess {
        self.start_via(Launcher::Setns, extra, env)
    }

    /// Starts the agent the way `launcher` says, with the scene's flags, then `extra`.
    pub fn start_via(
        &mut self,
        launcher: Launcher,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> &AgentProcess {
        assert!(self.agent.is_none(), "an agent is already running");
        let mut args = self.base_args();
        if !extra.contains(&"--metrics-addr") {
            args.extend(["--metrics-addr".to_owned(), "off".to_owned()]);
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = self.topo.server.name.clone();
        let (wrapper, netns): (Vec<&str>, _) = match launcher {
            Launcher::Setns => (vec![], Some(&self.topo.server)),
            Launcher::IpNetnsExec => (vec!["ip", "netns", "exec", &server], None),
            Launcher::UnshareMount => (vec!["unshare", "--mount"], Some(&self.topo.server)),
        };
        let agent =
            AgentProcess::start_wrapped(&wrapper, netns, &self.control_socket(), &args, env);
        self.agent.insert(agent)
    }

    pub fn agent(&self) -> &AgentProcess {
        self.agent.as_ref().expect("the agent is running")
    }

    pub fn agent_running(&self) -> bool {
        self.agent.is_some()
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        self.agent.take().expect("the agent is running").stop()
    }

    /// SIGTERM and wait; returns the exit code and what the agent logged.
    pub fn stop_with_log(&mut self) -> (Option<i32>, String) {
        self.agent
            .take()
            .expect("the agent is running")
            .stop_with_log()
    }

    /// SIGKILL: no chance to save anything.
    pub fn kill9(&mut self) {
        let agent = self.agent.take().expect("the agent is running");
        agent.signal(libc::SIGKILL);
        drop(agent);
    }

    /// `apiban detach` for the scene's bpffs directory, run in the server's network
    /// namespace (where the interfaces are), as an operator would after stopping the agent.
    pub fn detach(&self) {
        let dir = self.bpffs.path.display().to_string();
        let out = crate::agent::apiban_in(&self.topo.server, &["detach", "--bpffs-dir", &dir]);
        assert!(
            out.status.success(),
            "apiban detach: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Gives the attacker `addr` as a source address.
    pub fn source(&self, addr: &str) -> IpAddr {
        let ip: IpAddr = addr.parse().expect("an address");
        self.topo.add_attacker_source(ip);
        ip
    }

    /// Gives the attacker `addr` and makes it the source of what the attacker sends to
    /// `server` without choosing one (a tool that does not bind its socket, a TCP client).
    pub fn source_by_route(&self, addr: &str, server: &str) -> IpAddr {
        let src = self.source(addr);
        self.topo.attacker.exec(
            "ip",
            &[
                "route",
                "replace",
                &format!("{server}/32"),
                "dev",
                &self.topo.attacker_if,
                "src",
                addr,
            ],
        );
        src
    }

    /// The attacker's own (clean) address of the same family.
    pub fn clean(&self, family_of: IpAddr) -> IpAddr {
        match family_of {
            IpAddr::V4(_) => "10.77.0.2".parse().expect("literal"),
            IpAddr::V6(_) => "fd77::2".parse().expect("literal"),
        }
    }

    /// Sends `n` SIP OPTIONS from each source (one family) and then from the clean address;
    /// returns how many of each source's arrived.
    pub fn probe(&mut self, sources: &[IpAddr], n: usize) -> Vec<usize> {
        let first = *sources.first().expect("at least one source");
        let clean = self.clean(first);
        let rx = if first.is_ipv4() {
            &mut self.rx
        } else {
            &mut self.rx6
        };
        probe(&self.topo, rx, sources, clean, n)
    }

    /// Polls `apiban check` until `addr` has `verdict` ("banned", "not banned", "allowed").
    /// Returns how long it took.
    pub fn wait_verdict(&self, addr: IpAddr, verdict: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        let addr = addr.to_string();
        loop {
            let v = self.check(&addr);
            // `check` reads the maps, which the owner writes before it publishes the ledger:
            // a ban is only seen whole once its records (or its derivation) are there too.
            let explained = verdict == "not banned"
                || v["records"].as_array().is_some_and(|r| !r.is_empty())
                || v["derived"].as_array().is_some_and(|d| !d.is_empty());
            if v["verdict"] == verdict && explained {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "{addr} still {} after {timeout:?}, not {verdict}:\n{}",
                v["verdict"],
                self.agent().log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether an XDP program is attached to the server interface, as `ip -d link` says.
    pub fn xdp_attached(&self) -> bool {
        self.topo
            .server
            .exec("ip", &["-d", "link", "show", "dev", &self.topo.server_if])
            .contains("prog/xdp")
    }

    pub fn check(&self, addr: &str) -> serde_json::Value {
        serde_json::from_str(&self.agent().cli_ok(&["check", addr, "--json"]))
            .expect("check answers JSON")
    }

    pub fn status(&self) -> serde_json::Value {
        self.agent().status_json()
    }

    /// `check` once the ledger's record of a ban is published.
    pub fn check_recorded(&self, addr: &str) -> serde_json::Value {
        let mut check = self.check(addr);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while check["records"].as_array().is_none_or(Vec::is_empty) {
            assert!(
                std::time::Instant::now() < deadline,
                "no record of the ban: {check}"
            );
            std::thread::sleep(Duration::from_millis(10));
            check = self.check(addr);
        }
        check
    }

    /// Waits until the agent has completed a full pull (or poll cycle) at least once.
    pub fn wait_synced(&self, timeout: Duration) {
        crate::wait_until("a completed APIBAN sync", timeout, || {
            self.status()["sync"]["last_success"].is_u64()
        });
    }
}
