//! A fleet for the end-to-end tests: a three-member etcd cluster and one local APIBAN server
//! in a hub namespace, and nodes that each are a whole [`Scene`] (server and attacker
//! namespaces, the real agent with XDP on the server's interface) plus a veth link from the
//! node's server namespace to the hub. Nothing links to the host's network. Every part is a
//! guard: dropping the fleet (also on panic) kills the agents and etcd and deletes the
//! namespaces, pins and files.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{
    BpffsDir, Netns, Topology, fake_apiban::FakeApiban, in_netns, scene::Scene,
    sync_harness::TempDir, unique_name,
};

mod member;
mod security;

pub use member::EtcdMember;
use member::spawn_member;
pub use security::Security;

pub const MEMBERS: usize = 3;
/// Client port of etcd member `i` is `CLIENT_PORT + i`, peer port `PEER_PORT + i`.
const CLIENT_PORT: u16 = 23790;
const PEER_PORT: u16 = 23800;

/// One node: its scene, and its link to the hub.
pub struct Node {
    pub name: String,
    pub scene: Scene,
    /// The node's end of its hub link (in the node's server namespace).
    pub hub_if: String,
    /// The hub's address on this node's link: where the node reaches etcd and APIBAN.
    pub hub_ip: Ipv4Addr,
}

impl Node {
    /// The etcd endpoints as this node reaches them.
    pub fn endpoints(&self) -> String {
        (0..MEMBERS)
            .map(|i| format!("http://{}:{}", self.hub_ip, CLIENT_PORT + i as u16))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Cuts the node off from the hub (etcd and APIBAN), or links it again; its attacker
    /// link stays up.
    pub fn set_hub_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        self.scene
            .topo
            .server
            .exec("ip", &["link", "set", &self.hub_if, state]);
    }
}

pub struct Fleet {
    // Field order is drop order: agents first, then etcd, the hub namespace last.
    pub nodes: Vec<Node>,
    pub etcd: Vec<EtcdMember>,
    pub api: FakeApiban,
    pub hub: Netns,
    pub dir: TempDir,
    pub prefix: String,
    /// Set by [`Fleet::secured`]: etcd speaks TLS, wants client certificates and a password.
    pub security: Option<Security>,
    /// etcd's auth is on: the test's own client logs in too.
    auth_on: std::cell::Cell<bool>,
}

impl Fleet {
    /// The hub with its etcd cluster and APIBAN server, and `nodes` nodes (agents not started).
    pub fn new(nodes: usize) -> Self {
        Self::build(nodes, false)
    }

    /// A fleet whose etcd wants TLS with client certificates, and auth with a password.
    pub fn secured(nodes: usize) -> Self {
        Self::build(nodes, true)
    }

    fn build(nodes: usize, secured: bool) -> Self {
        let hub = Netns::new("apfh");
        let dir = TempDir::new("apiban-fleet-");
        let security = secured.then(|| Security::new(&dir.path, nodes));
        let api = in_netns(&hub, || {
            FakeApiban::start_on(crate::scene::KEY, "0.0.0.0:0".parse().expect("literal"))
        });
        let mut fleet = Self {
            nodes: Vec::new(),
            etcd: Vec::new(),
            api,
            hub,
            dir,
            prefix: format!("/{}/", unique_name("fleet")),
            security,
            auth_on: std::cell::Cell::new(false),
        };
        fleet.start_etcd();
        for i in 0..nodes {
            fleet.add_node(i);
        }
        fleet.wait_etcd_healthy(Duration::from_secs(30));
        if let Some(s) = &fleet.security {
            let password = s.password.clone();
            fleet.etcd_client(async move |c| {
                c.user_add("root", password, None).await.expect("add root");
                c.user_grant_role("root", "root").await.expect("grant root");
                c.auth_enable().await.expect("enable auth");
            });
            fleet.auth_on.set(true);
        }
        fleet
    }

    fn scheme(&self) -> &'static str {
        if self.security.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn start_etcd(&mut self) {
        let cluster: Vec<String> = (0..MEMBERS)
            .map(|i| format!("m{i}=http://127.0.0.1:{}", PEER_PORT + i as u16))
            .collect();
        let cluster = cluster.join(",");
        let token = unique_name("etcd");
        for i in 0..MEMBERS {
            let name = format!("m{i}");
            let client_port = CLIENT_PORT + i as u16;
            let peer = format!("http://127.0.0.1:{}", PEER_PORT + i as u16);
            let data = self.dir.path.join(&name);
            let log = self.dir.path.join(format!("{name}.log"));
            let scheme = self.scheme();
            let mut tls: Vec<String> = Vec::new();
            if let Some(s) = &self.security {
                let path = |p: &PathBuf| p.display().to_string();
                tls = vec![
                    "--cert-file".into(),
                    path(&s.server_cert),
                    "--key-file".into(),
                    path(&s.server_key),
                    "--trusted-ca-file".into(),
                    path(&s.ca),
                    "--client-cert-auth".into(),
                ];
            }
            let mut command: Vec<String> = ["netns", "exec", &self.hub.name, "etcd"]
                .map(String::from)
                .into();
            command.extend(tls);
            command.extend(
                [
                    "--name",
                    &name,
                    "--data-dir",
                    &data.display().to_string(),
                    "--listen-client-urls",
                    &format!("{scheme}://0.0.0.0:{client_port}"),
                    "--advertise-client-urls",
                    &format!("{scheme}://127.0.0.1:{client_port}"),
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                    "--initial-cluster",
                    &cluster,
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    &token,
                    // Elections within about a second, as on a LAN.
                    "--heartbeat-interval",
                    "100",
                    "--election-timeout",
                    "1000",
                ]
                .map(String::from),
            );
            let child = spawn_member(&command, &log);
            self.etcd.push(EtcdMember {
                name,
                client_port,
                child: Some(child),
                log,
                command,
            });
        }
    }

    fn add_node(&mut self, i: usize) {
        let name = format!("node-{}", (b'a' + i as u8) as char);
        let mut scene = Scene::build(
            Topology::new(),
            BpffsDir::new(),
            TempDir::new("apiban-node-"),
        );
        let hub_if = unique_name("aph");
        let node_if = unique_name("apn");
        crate::sh(
            "ip",
            &[
                "link",
                "add",
                &hub_if,
                "netns",
                &self.hub.name,
                "type",
                "veth",
                "peer",
                "name",
                &node_if,
                "netns",
                &scene.topo.server.name,
            ],
        );
        let hub_ip = Ipv4Addr::new(10, 88, i as u8, 1);
        self.hub.exec(
            "ip",
            &["addr", "add", &format!("{hub_ip}/30"), "dev", &hub_if],
        );
        self.hub.exec("ip", &["link", "set", &hub_if, "up"]);
        let server = &scene.topo.server;
        server.exec(
            "ip",
            &["addr", "add", &format!("10.88.{i}.2/30"), "dev", &node_if],
        );
        server.exec("ip", &["link", "set", &node_if, "up"]);
        scene.api_url = Some(format!("http://{hub_ip}:{}/api/", self.api.addr().port()));
        self.nodes.push(Node {
            name,
            scene,
            hub_if: node_if,
            hub_ip,
        });
    }

    /// Waits until every member says it serves clients.
    fn wait_etcd_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        if self.security.is_some() {
            for member in &self.etcd {
                while !std::fs::read_to_string(&member.log)
                    .unwrap_or_default()
                    .contains("ready to serve client requests")
                {
                    assert!(
                        Instant::now() < deadline,
                        "etcd member {} not ready within {timeout:?}",
                        member.name
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            // Ready members still elect their Raft leader.
            self.etcd_client(async |c| {
                for _ in 0..100 {
                    if c.put("/apiban-test/ready", "1", None).await.is_ok() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                panic!("etcd takes no write");
            });
            return;
        }
        for member in &self.etcd {
            let url = format!("http://127.0.0.1:{}/health", member.client_port);
            loop {
                let healthy = in_netns(&self.hub, {
                    let url = url.clone();
                    move || http_get(&url).is_some_and(|body| body.contains("\"health\":\"true\""))
                });
                if healthy {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd member {} not healthy within {timeout:?}:\n{}",
                    member.name,
                    std::fs::read_to_string(&member.log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The running members' client URLs as seen from inside the hub namespace.
    pub fn hub_endpoints(&self) -> Vec<String> {
        let scheme = self.scheme();
        self.etcd
            .iter()
            .filter(|m| m.is_running())
            .map(|m| format!("{scheme}://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// Runs `f` with an etcd client on the hub's members, in the hub namespace.
    pub fn etcd_client<T: Send + 'static>(
        &self,
        f: impl AsyncFnOnce(&mut etcd_client::Client) -> T + Send + 'static,
    ) -> T {
        let endpoints = self.hub_endpoints();
        let options = self.security.as_ref().map(|s| {
            let read = |p: &PathBuf| std::fs::read(p).expect("a TLS file");
            let tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&s.ca)))
                .identity(etcd_client::Identity::from_pem(
                    read(&s.client_cert),
                    read(&s.client_key),
                ));
            (tls, s.password.clone())
        });
        let auth_enabled = self.auth_on.get();
        in_netns(&self.hub, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let options = options.map(|(tls, password)| {
                    let o = etcd_client::ConnectOptions::new().with_tls(tls);
                    if auth_enabled {
                        o.with_user("root", password)
                    } else {
                        o
                    }
                });
                let mut client = etcd_client::Client::connect(&endpoints, options)
                    .await
                    .expect("connect to etcd");
                f(&mut client).await
            })
        })
    }

    /// Compacts etcd's history up to its current revision; that revision.
    pub fn compact(&self) -> i64 {
        self.etcd_client(async |c| {
            let head = c.get("/", None).await.expect("read etcd's revision");
            let revision = head.header().map_or(0, |h| h.revision());
            c.compact(
                revision,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await
            .expect("compact etcd");
            revision
        })
    }

    /// The member that leads etcd's Raft group now.
    pub fn etcd_leader(&self) -> usize {
        let leader_id = self.etcd_client(async |c| c.status().await.expect("etcd status").leader());
        let ids: Vec<(String, u64)> = self.etcd_client(async |c| {
            c.member_list()
                .await
                .expect("etcd members")
                .members()
                .iter()
                .map(|m| (m.name().to_owned(), m.id()))
                .collect()
        });
        let name = ids
            .iter()
            .find(|(_, id)| *id == leader_id)
            .map(|(n, _)| n.clone())
            .expect("the leader is a member");
        self.etcd
            .iter()
            .position(|m| m.name == name)
            .expect("a member of ours")
    }

    /// `apiban run` flags that make node `i` a member of this fleet.
    pub fn node_args(&self, i: usize) -> Vec<String> {
        let node = &self.nodes[i];
        let endpoints = node
            .endpoints()
            .replace("http://", &format!("{}://", self.scheme()));
        let mut args = vec![
            "--cluster".into(),
            endpoints,
            "--cluster-prefix".into(),
            self.prefix.clone(),
            "--node-name".into(),
            node.name.clone(),
        ];
        if let Some(s) = &self.security {
            args.extend(s.args());
        }
        args
    }

    /// Starts node `i`'s agent with the fleet's flags and `extra`.
    pub fn start(&mut self, i: usize, extra: &[&str]) {
        let mut args = self.node_args(i);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.nodes[i].scene.start(&args);
    }

    /// Restarts every member with a backend quota of `bytes` (`--quota-backend-bytes`), so
    /// that a test can fill it.
    pub fn set_etcd_quota(&mut self, bytes: u64) {
        for member in &mut self.etcd {
            member
                .command
                .extend(["--quota-backend-bytes".to_owned(), bytes.to_string()]);
            member.restart();
        }
        self.wait_etcd_healthy(Duration::from_secs(30));
    }

    /// What docs/fleet.md tells an operator to do about a NOSPACE alarm: compact to the current
    /// revision, defragment every member, disarm the alarms. (Without etcdctl, which Debian
    /// ships apart from the server: the same calls through the client.)
    pub fn clear_nospace(&self) {
        use etcd_client::{AlarmAction, AlarmOptions, AlarmType, Client, CompactionOptions};
        let endpoints = self.hub_endpoints();
        in_netns(&self.hub, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let mut all = Client::connect(&endpoints, None).await.expect("connect");
                let head = all.get("/", None).await.expect("a revision");
                let revision = head.header().expect("a header").revision();
                all.compact(revision, Some(CompactionOptions::new().with_physical()))
                    .await
                    .expect("compact");
                for endpoint in &endpoints {
                    let mut one = Client::connect([endpoint], None).await.expect("connect");
                    one.defragment().await.expect("defragment");
                }
                let alarms = all
                    .alarm(AlarmAction::Get, AlarmType::None, None)
                    .await
                    .expect("list alarms");
                for alarm in alarms.alarms() {
                    let mut options = AlarmOptions::new();
                    options.with_member(alarm.member_id());
                    all.alarm(AlarmAction::Deactivate, alarm.alarm(), Some(options))
                        .await
                        .expect("disarm");
                }
            })
        });
    }

    /// Replaces etcd by a new, empty cluster on the same endpoints (another cluster ID,
    /// revisions from 1): what an operator's rebuild, or a restore into a new cluster, does.
    pub fn replace_etcd(&mut self) {
        for member in &mut self.etcd {
            member.kill();
            let data = self.dir.path.join(&member.name);
            std::fs::remove_dir_all(&data).expect("remove a member's data");
        }
        self.etcd.clear();
        self.start_etcd();
        self.wait_etcd_healthy(Duration::from_secs(30));
    }

    /// Drops, or lets through again, everything the hub sends node `i` (etcd's answers and
    /// watch events, APIBAN's): the node's requests still reach etcd, and their answers are
    /// lost. What a link that dies mid-request does to a write. (A blackhole route in the
    /// hub: this kernel has no tc drop action, and iptables is not needed elsewhere.)
    pub fn set_answers_to(&self, i: usize, up: bool) {
        let op = if up { "del" } else { "add" };
        self.hub.exec(
            "ip",
            &["route", op, "blackhole", &format!("10.88.{i}.2/32")],
        );
    }

    /// Starts node `i`'s agent with its clock `offset` from the others' (libfaketime's
    /// syntax: `+8d`, `-3h`), the monotonic clock left alone.
    pub fn start_with_clock(&mut self, i: usize, extra: &[&str], offset: &str) {
        let mut args = self.node_args(i);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
        assert!(
            std::path::Path::new(lib).exists(),
            "{lib} is missing (Debian faketime; `cargo xtask setup`)"
        );
        self.nodes[i].scene.start_with_env(
            &args,
            &[
                ("APIBAN_KEY", crate::scene::KEY),
                ("LD_PRELOAD", lib),
                ("FAKETIME", offset),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ],
        );
    }

    /// The node whose status says it leads now, if one does.
    pub fn leader(&self) -> Option<usize> {
        self.nodes.iter().position(|n| {
            n.scene_running() && n.scene.status()["agent"]["cluster"]["leader"] == true
        })
    }

    /// Waits until one running node leads; which.
    pub fn wait_leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.leader() {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "no node leads after {timeout:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every running agent's log, for assertion messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .filter(|n| n.scene_running())
            .map(|n| format!("--- {}:\n{}", n.name, n.scene.agent().log_text()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Node {
    pub fn scene_running(&self) -> bool {
        self.scene.agent_running()
    }
}

/// A plain HTTP/1.0 GET: etcd's /health, without an HTTP client in the namespace thread.
fn http_get(url: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map_or((rest, "/"), |(h, p)| (h, p));
    let mut stream =
        std::net::TcpStream::connect_timeout(&host.parse().ok()?, Duration::from_millis(500))
            .ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body)
}
