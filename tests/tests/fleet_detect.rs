//! Detection in a fleet: a peer the server proved at one node (Kamailio's 200 to its
//! authenticated REGISTERs) is spared by every node's detection, through etcd; what etcd
//! holds under the proofs' prefix passes the same checks as any input.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tests::{
    attackers::{Tool, sipp},
    crowd::{PHONE, phone_users},
    fleet::Fleet,
    kamailio::Registrar,
    require_root, send_udp,
};

const PORT: u16 = 5072;
const OFFICE: &str = "45.89.0.1";
const FORGED: &str = "45.89.0.9";

fn detect_of(f: &Fleet, i: usize) -> serde_json::Value {
    f.nodes[i].scene.status()["agent"]["detect"].clone()
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "{what} after {timeout:?}:\n{}",
            why()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_peer_proven_at_one_node_is_spared_by_the_others_detection() {
    require_root();
    let mut f = Fleet::new(2);
    let detect = [
        "--detect",
        "enforce",
        "--detect-ports",
        "5072",
        "--detect-tls-ports",
        "5071",
    ];
    for i in 0..2 {
        f.start(i, &detect);
    }
    f.wait_leader(Duration::from_secs(20));
    // Node 0: the office registers ten phones at its Kamailio, through challenges.
    let node0 = &f.nodes[0].scene;
    let office = node0.source(OFFICE);
    let server0 = IpAddr::V4(node0.topo.server_v4);
    let registrar = Registrar::start(
        &node0.topo.server,
        &node0.dir.path,
        server0,
        PORT,
        5071,
        &node0.topo.attacker,
        office,
    );
    let dir = &node0.dir.path;
    let phone = dir.join("phone.xml");
    std::fs::write(&phone, PHONE).expect("write the scenario");
    let users_file = dir.join("users.csv");
    std::fs::write(&users_file, phone_users(10)).expect("write the users");
    let mut phones = Tool::start(
        &node0.topo.attacker,
        &sipp(),
        &[
            "-sf",
            &phone.display().to_string(),
            "-inf",
            &users_file.display().to_string(),
            "-i",
            OFFICE,
            "-p",
            "5091",
            "-r",
            "10",
            "-m",
            "10",
            "-nostdin",
            &format!("{server0}:{PORT}"),
        ],
        dir.join("sipp-office.log"),
    );
    assert_eq!(
        phones.wait(Duration::from_secs(30)),
        Some(0),
        "the phones register:\n{}",
        phones.output()
    );
    drop(registrar);
    // Proven at node 0, in etcd, and at node 1.
    wait_for(
        "node 0 has not proven the office",
        Duration::from_secs(5),
        || detect_of(&f, 0)["proven"] == 1,
        || f.logs(),
    );
    let prefix = f.prefix.clone();
    let in_etcd = f.etcd_client(async move |c| {
        let got = c
            .get(format!("{prefix}proven/{OFFICE}"), None)
            .await
            .expect("read the proof");
        got.kvs()
            .first()
            .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease()))
    });
    let (value, lease) = in_etcd.expect("the proof is in etcd");
    println!("etcd holds {value} on lease {lease:x}");
    assert!(value.contains("authenticated REGISTER"), "{value}");
    assert!(value.contains(&f.nodes[0].name), "{value}");
    assert_ne!(lease, 0, "a proof lives on a lease");
    wait_for(
        "node 1 has not learned the office's proof",
        Duration::from_secs(5),
        || detect_of(&f, 1)["proven"] == 1,
        || f.logs(),
    );

    // Node 1: forged scanner packets from the office's address, and from one nobody
    // vouches for. The office's are reported, not enforced; the other's are banned, on both
    // nodes.
    let node1 = &f.nodes[1].scene;
    let forged_office = node1.source(OFFICE);
    let forged = node1.source(FORGED);
    let target = SocketAddr::new(IpAddr::V4(node1.topo.server_v4), PORT);
    send_udp(&node1.topo.attacker, forged_office, target, 10);
    send_udp(&node1.topo.attacker, forged, target, 10);
    for node in &f.nodes {
        node.scene
            .wait_verdict(forged, "banned", Duration::from_secs(10));
    }
    let detect = detect_of(&f, 1);
    let spared = detect["recent"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["addr"] == OFFICE)
        .unwrap_or_else(|| panic!("node 1 did not report the office: {detect}"));
    println!("node 1: {spared}");
    assert!(
        spared["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("proven peer") && o.contains(&f.nodes[0].name)),
        "{spared}"
    );
    for (i, node) in f.nodes.iter().enumerate() {
        let check = node.scene.check(OFFICE);
        assert_ne!(check["verdict"], "banned", "node {i}: {check}");
    }

    // What etcd holds under the proofs is input like any other: a value with a terminal
    // escape, one dated ahead, a key that names no address: none is taken.
    let prefix = f.prefix.clone();
    f.etcd_client(async move |c| {
        for (key, value) in [
            (
                "45.89.0.5",
                r#"{"at":1,"how":"ok\u001b]0;pwned\u0007","node":"x"}"#.to_owned(),
            ),
            (
                "45.89.0.6",
                format!(r#"{{"at":{},"how":"200","node":"x"}}"#, u64::MAX / 2),
            ),
            (
                "not-an-address",
                r#"{"at":1,"how":"200","node":"x"}"#.to_owned(),
            ),
        ] {
            c.put(format!("{prefix}proven/{key}"), value, None)
                .await
                .expect("put a proof");
        }
    });
    wait_for(
        "the bad proofs were not reported",
        Duration::from_secs(5),
        || {
            f.nodes[1]
                .scene
                .agent()
                .log_text()
                .matches("a proven peer in etcd is not taken")
                .count()
                >= 3
        },
        || f.logs(),
    );
    for i in 0..2 {
        assert_eq!(detect_of(&f, i)["proven"], 1, "node {i}");
    }
}
