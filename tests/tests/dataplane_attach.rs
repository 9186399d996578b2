//! Attach, adopt after restart and detach, on a veth pair between two network namespaces,
//! with real datagrams as the ground truth.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
};

use apiban::dataplane::loader::{self, AttachMode, AttachedMode, LoadOptions};
use apiban_common::Verdict;
use ipnet::IpNet;
use tests::{BpffsDir, Topology, UdpReceiver, in_netns, probe, require_root};

const N: usize = 20;

fn xdp_attached(topo: &Topology) -> bool {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.server.name,
            "ip",
            "-d",
            "link",
            "show",
            &topo.server_if,
        ])
        .output()
        .expect("ip link show");
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

#[test]
fn attach_adopt_after_restart_and_detach() {
    require_root();
    let topo = Topology::new();
    let dir = BpffsDir::new();
    let banned: IpAddr = "10.77.0.66".parse().expect("literal");
    let banned6: IpAddr = "fd77::66".parse().expect("literal");
    let clean: IpAddr = "10.77.0.2".parse().expect("literal");
    topo.add_attacker_source(banned);
    topo.add_attacker_source(banned6);
    let mut rx = UdpReceiver::bind(&topo.server, SocketAddr::new(topo.server_v4.into(), 5060));
    let mut rx6 = UdpReceiver::bind(&topo.server, SocketAddr::new(topo.server_v6.into(), 5060));
    let clean6: IpAddr = "fd77::2".parse().expect("literal");

    // Before any program: everything arrives.
    assert_eq!(probe(&topo, &mut rx, &[banned], clean, N), vec![N]);

    let options = LoadOptions {
        bpffs_dir: dir.path.clone(),
        ..Default::default()
    };
    let server_if = topo.server_if.clone();
    let opts = options.clone();
    let first = in_netns(&topo.server, move || {
        let mut loaded = loader::load(&opts).expect("load");
        assert!(!loaded.adopted, "fresh maps on first load");
        let mode = loaded.attach(&server_if, AttachMode::Auto).expect("attach");
        loaded.dataplane.deny(IpNet::from(banned)).expect("deny v4");
        loaded
            .dataplane
            .deny(IpNet::from(banned6))
            .expect("deny v6");
        (loaded, mode)
    });
    let (loaded, mode) = first;
    assert_eq!(mode, AttachedMode::Native, "veth supports native XDP");
    assert!(xdp_attached(&topo));
    assert_eq!(
        probe(&topo, &mut rx, &[banned], clean, N),
        vec![0],
        "banned v4 dropped"
    );
    assert_eq!(
        probe(&topo, &mut rx6, &[banned6], clean6, N),
        vec![0],
        "banned v6 dropped"
    );
    let dropped_first = loaded
        .dataplane
        .stats()
        .expect("stats")
        .get(Verdict::Dropped)
        .packets;
    assert!(
        dropped_first >= 2 * N as u64,
        "drops counted: {dropped_first}"
    );

    // The agent goes away: the pinned link and maps keep enforcing.
    drop(loaded);
    assert!(xdp_attached(&topo), "still attached with no agent");
    assert_eq!(
        probe(&topo, &mut rx, &[banned], clean, N),
        vec![0],
        "enforced with no agent"
    );

    // A new agent adopts the pinned maps and swaps its program into the pinned link.
    let server_if = topo.server_if.clone();
    let opts = options.clone();
    let (mut loaded, mode) = in_netns(&topo.server, move || {
        let mut loaded = loader::load(&opts).expect("reload");
        let mode = loaded
            .attach(&server_if, AttachMode::Skb)
            .expect("re-attach");
        (loaded, mode)
    });
    assert!(loaded.adopted, "second load adopts the pins");
    assert_eq!(
        mode,
        AttachedMode::Native,
        "the pinned attachment's mode is kept"
    );
    assert!(
        loaded
            .dataplane
            .is_denied(IpNet::from(banned))
            .expect("contains")
    );
    assert!(
        loaded
            .dataplane
            .is_denied(IpNet::from(banned6))
            .expect("contains")
    );
    let dropped_adopted = loaded
        .dataplane
        .stats()
        .expect("stats")
        .get(Verdict::Dropped)
        .packets;
    assert!(
        dropped_adopted >= dropped_first + N as u64,
        "counters survive the restart"
    );
    assert_eq!(
        probe(&topo, &mut rx, &[banned], clean, N),
        vec![0],
        "enforced after adoption"
    );
    let attachments = loader::pinned_attachments(&dir.path).expect("pins");
    assert_eq!(
        attachments.len(),
        1,
        "one link, not a second attachment: {attachments:?}"
    );

    // Unbanning on the adopted maps takes effect at once.
    loaded
        .dataplane
        .undeny(IpNet::from(banned6))
        .expect("undeny");
    assert_eq!(
        probe(&topo, &mut rx6, &[banned6], clean6, N),
        vec![N],
        "unbanned v6 delivered"
    );
    drop(loaded);

    // Detach removes program and pins: nothing left behind, traffic flows.
    let report = loader::detach(&dir.path, None).expect("detach");
    assert_eq!(report.interfaces, vec![topo.server_if.clone()]);
    assert!(report.maps_removed);
    assert!(!dir.path.exists(), "bpffs directory removed");
    assert!(!xdp_attached(&topo), "no program on the interface");
    assert_eq!(
        probe(&topo, &mut rx, &[banned], clean, N),
        vec![N],
        "delivered after detach"
    );
}

#[test]
fn detach_one_interface_keeps_the_others_and_the_maps() {
    require_root();
    let topo = Topology::new();
    let dir = BpffsDir::new();
    // The namespace's loopback is the second interface: it has no native XDP, so it also
    // proves the auto mode's fallback to generic.
    let server_if = topo.server_if.clone();
    let opts = LoadOptions {
        bpffs_dir: dir.path.clone(),
        ..Default::default()
    };
    let modes = in_netns(&topo.server, move || {
        let mut loaded = loader::load(&opts).expect("load");
        let a = loaded
            .attach(&server_if, AttachMode::Auto)
            .expect("attach veth");
        let b = loaded.attach("lo", AttachMode::Auto).expect("attach lo");
        (a, b)
    });
    assert_eq!(modes.0, AttachedMode::Native);
    assert_eq!(modes.1, AttachedMode::Skb);
    assert_eq!(
        loader::pinned_attachments(&dir.path).expect("pins").len(),
        2
    );

    let report = loader::detach(&dir.path, Some("lo")).expect("detach one");
    assert_eq!(report.interfaces, vec!["lo".to_owned()]);
    assert!(!report.maps_removed);
    let left = loader::pinned_attachments(&dir.path).expect("pins");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].iface, topo.server_if);
    assert!(xdp_attached(&topo), "the veth keeps its program");
}

#[test]
fn attaching_to_a_missing_interface_is_a_clear_error() {
    require_root();
    let dir = BpffsDir::new();
    let mut loaded = loader::load(&LoadOptions {
        bpffs_dir: dir.path.clone(),
        ..Default::default()
    })
    .expect("load");
    let err = loaded
        .attach("apbnosuch0", AttachMode::Auto)
        .expect_err("no such interface");
    assert_eq!(err.to_string(), "interface apbnosuch0 does not exist");
}
