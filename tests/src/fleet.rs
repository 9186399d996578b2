//! A fleet for the end-to-end tests: a three-member etcd cluster and one local APIBAN server
//! in a hub namespace, and nodes that each are a whole [`Scene`] (server and attacker
//! namespaces, the real agent with XDP on the server's interface) plus a veth link from the
//! node's server namespace to the hub. Nothing links to the host's network. Every part is a
//! guard: dropping the fleet (also on panic) kills the agents and etcd and deletes the
//! namespaces, pins and files.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    BpffsDir, Netns, Topology, fake_apiban::FakeApiban, in_netns, scene::Scene,
    sync_harness::TempDir, unique_name,
};

pub const MEMBERS: usize = 3;
/// Client port of etcd member `i` is `CLIENT_PORT + i`, peer port `PEER_PORT + i`.
const CLIENT_PORT: u16 = 23790;
const PEER_PORT: u16 = 23800;

/// One etcd member, in the hub namespace.
pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    child: Option<Child>,
    pub log: PathBuf,
}

impl EtcdMember {
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}

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
}

impl Fleet {
    /// The hub with its etcd cluster and APIBAN server, and `nodes` nodes (agents not started).
    pub fn new(nodes: usize) -> Self {
        let hub = Netns::new("apfh");
        let dir = TempDir::new("apiban-fleet-");
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
        };
        fleet.start_etcd();
        for i in 0..nodes {
            fleet.add_node(i);
        }
        fleet.wait_etcd_healthy(Duration::from_secs(30));
        fleet
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
            let log_file = std::fs::File::create(&log).expect("etcd log");
            let child = Command::new("ip")
                .args(["netns", "exec", &self.hub.name, "etcd"])
                .args(["--name", &name])
                .args(["--data-dir", &data.display().to_string()])
                .args([
                    "--listen-client-urls",
                    &format!("http://0.0.0.0:{client_port}"),
                ])
                .args([
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{client_port}"),
                ])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &cluster])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &token])
                // Elections within about a second, as on a LAN.
                .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start etcd (Debian etcd-server; `cargo xtask setup`): {e}")
                });
            self.etcd.push(EtcdMember {
                name,
                client_port,
                child: Some(child),
                log,
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

    /// Waits until etcd answers a write through every member.
    fn wait_etcd_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
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

    /// Runs `f` with an etcd client on the hub's members, in the hub namespace.
    pub fn etcd_client<T: Send + 'static>(
        &self,
        f: impl AsyncFnOnce(&mut etcd_client::Client) -> T + Send + 'static,
    ) -> T {
        let endpoints: Vec<String> = self
            .etcd
            .iter()
            .filter(|m| m.is_running())
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect();
        in_netns(&self.hub, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let mut client = etcd_client::Client::connect(&endpoints, None)
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
        vec![
            "--cluster".into(),
            node.endpoints(),
            "--cluster-prefix".into(),
            self.prefix.clone(),
            "--node-name".into(),
            node.name.clone(),
        ]
    }

    /// Starts node `i`'s agent with the fleet's flags and `extra`.
    pub fn start(&mut self, i: usize, extra: &[&str]) {
        let mut args = self.node_args(i);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.nodes[i].scene.start(&args);
    }

    /// The node whose log says it leads now, if one does.
    pub fn leader(&self) -> Option<usize> {
        self.nodes.iter().position(|n| {
            n.scene_running()
                && n.scene
                    .agent()
                    .log_text()
                    .rsplit("this node")
                    .next()
                    .is_some_and(|last| last.starts_with(" leads the fleet"))
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
