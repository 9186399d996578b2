//! Attach, adopt after restart (from the pins, and from the interface when the pins are
//! gone), refuse what is not ours, and detach, on a veth pair between two network
//! namespaces, with real datagrams as the ground truth.

use std::net::{IpAddr, SocketAddr};

use apiban::dataplane::{
    loader::{self, Adoption, AttachMode, AttachedMode, LoadOptions, LoaderError},
    netlink,
};
use apiban_common::{Verdict, program_names};
use ipnet::IpNet;
use tests::{BpffsDir, Netns, Topology, UdpReceiver, in_netns, probe, require_root};

const N: usize = 20;

/// The ID of the XDP program on `iface` in `ns`, as the kernel reports it.
fn attached_id(ns: &Netns, iface: &str) -> Option<u32> {
    let iface = iface.to_owned();
    in_netns(ns, move || {
        let index = loader::ifindex(&iface).expect("the interface exists");
        netlink::link(index)
            .expect("rtnetlink")
            .and_then(|l| l.xdp)
            .map(|p| p.id)
    })
}

fn options(dir: &BpffsDir) -> LoadOptions {
    LoadOptions {
        bpffs_dir: dir.path.clone(),
        ..Default::default()
    }
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

    let server_if = topo.server_if.clone();
    let opts = options(&dir);
    let (loaded, mode) = in_netns(&topo.server, move || {
        let mut loaded = loader::load(&opts).expect("load");
        assert_eq!(loaded.adoption, Adoption::Fresh, "fresh maps on first load");
        let mode = loaded.attach(&server_if, AttachMode::Auto).expect("attach");
        loaded.dataplane.deny(IpNet::from(banned)).expect("deny v4");
        loaded
            .dataplane
            .deny(IpNet::from(banned6))
            .expect("deny v6");
        (loaded, mode)
    });
    assert_eq!(mode, AttachedMode::Native, "veth supports native XDP");
    let first_id = loaded.program_id();
    assert_eq!(attached_id(&topo.server, &topo.server_if), Some(first_id));
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

    // The agent goes away: the attachment belongs to the interface and keeps enforcing.
    drop(loaded);
    assert_eq!(
        attached_id(&topo.server, &topo.server_if),
        Some(first_id),
        "still attached with no agent"
    );
    assert_eq!(
        probe(&topo, &mut rx, &[banned], clean, N),
        vec![0],
        "enforced with no agent"
    );

    // A new agent adopts the pinned maps and swaps its program in atomically.
    let server_if = topo.server_if.clone();
    let opts = options(&dir);
    let (mut loaded, mode) = in_netns(&topo.server, move || {
        let mut loaded = loader::load(&opts).expect("reload");
        let mode = loaded
            .attach(&server_if, AttachMode::Skb)
            .expect("re-attach");
        (loaded, mode)
    });
    assert_eq!(
        loaded.adoption,
        Adoption::Pins,
        "second load adopts the pins"
    );
    assert_eq!(mode, AttachedMode::Native, "the running mode is kept");
    assert_ne!(loaded.program_id(), first_id);
    assert_eq!(
        attached_id(&topo.server, &topo.server_if),
        Some(loaded.program_id()),
        "the new program runs"
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
    let pins = loader::attached_pins(&dir.path).expect("pins");
    assert_eq!(pins.len(), 1, "one attachment, not a second: {pins:?}");

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

    // Detach refuses while the agent holds the directory, then removes program and pins.
    let path = dir.path.clone();
    let refused = in_netns(&topo.server, move || loader::detach(&path, None, false));
    assert!(
        matches!(refused, Err(LoaderError::DirInUse { .. })),
        "{refused:?}"
    );
    drop(loaded);
    let path = dir.path.clone();
    let report =
        in_netns(&topo.server, move || loader::detach(&path, None, false)).expect("detach");
    assert_eq!(report.interfaces, vec![topo.server_if.clone()]);
    assert!(report.maps_removed);
    assert!(!dir.path.exists(), "bpffs directory removed");
    assert_eq!(attached_id(&topo.server, &topo.server_if), None);
    assert_eq!(
        probe(&topo, &mut rx, &[banned], clean, N),
        vec![N],
        "delivered after detach"
    );
}

#[test]
fn without_pins_the_maps_are_adopted_through_the_interface() {
    require_root();
    let topo = Topology::new();
    let dir = BpffsDir::new();
    let banned: IpAddr = "10.77.0.67".parse().expect("literal");
    let clean: IpAddr = "10.77.0.2".parse().expect("literal");
    topo.add_attacker_source(banned);
    let mut rx = UdpReceiver::bind(&topo.server, SocketAddr::new(topo.server_v4.into(), 5060));

    let server_if = topo.server_if.clone();
    let opts = options(&dir);
    let first_id = in_netns(&topo.server, move || {
        let mut loaded = loader::load(&opts).expect("load");
        loaded.attach(&server_if, AttachMode::Auto).expect("attach");
        loaded.dataplane.deny(IpNet::from(banned)).expect("deny");
        loaded.program_id()
    });
    assert_eq!(probe(&topo, &mut rx, &[banned], clean, N), vec![0]);

    // What a bpffs private to the last agent's mount namespace leaves: nothing pinned.
    std::fs::remove_dir_all(&dir.path).expect("remove the pins");
    assert_eq!(
        attached_id(&topo.server, &topo.server_if),
        Some(first_id),
        "the attachment does not depend on the pins"
    );
    assert_eq!(probe(&topo, &mut rx, &[banned], clean, N), vec![0]);

    let server_if = topo.server_if.clone();
    let mut opts = options(&dir);
    opts.adopt_from = vec![server_if.clone()];
    let loaded = in_netns(&topo.server, move || {
        let mut loaded = loader::load(&opts).expect("load without pins");
        loaded.attach(&server_if, AttachMode::Auto).expect("attach");
        loaded
    });
    assert_eq!(
        loaded.adoption,
        Adoption::Interface {
            iface: topo.server_if.clone(),
            prog_id: first_id
        }
    );
    assert!(
        loaded
            .dataplane
            .is_denied(IpNet::from(banned))
            .expect("contains"),
        "the ban came with the adopted maps"
    );
    assert!(
        loaded
            .dataplane
            .stats()
            .expect("stats")
            .get(Verdict::Dropped)
            .packets
            >= N as u64,
        "counters came too"
    );
    assert_eq!(
        attached_id(&topo.server, &topo.server_if),
        Some(loaded.program_id())
    );
    assert_eq!(probe(&topo, &mut rx, &[banned], clean, N), vec![0]);
}

#[test]
fn detach_one_interface_keeps_the_others_and_the_maps() {
    require_root();
    let topo = Topology::new();
    let dir = BpffsDir::new();
    // The namespace's loopback is the second interface: it has no native XDP, so it also
    // proves the auto mode's fallback to generic.
    let server_if = topo.server_if.clone();
    let opts = options(&dir);
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
    assert_eq!(loader::attached_pins(&dir.path).expect("pins").len(), 2);

    let path = dir.path.clone();
    let report = in_netns(&topo.server, move || {
        loader::detach(&path, Some("lo"), false)
    })
    .expect("detach one");
    assert_eq!(report.interfaces, vec!["lo".to_owned()]);
    assert!(!report.maps_removed);
    let left = loader::attached_pins(&dir.path).expect("pins");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0, topo.server_if);
    assert!(attached_id(&topo.server, &topo.server_if).is_some());
    assert_eq!(attached_id(&topo.server, "lo"), None);
}

#[test]
fn another_program_on_the_interface_is_never_replaced() {
    require_root();
    let topo = Topology::new();
    let dir = BpffsDir::new();
    let other_dir = BpffsDir::new();
    // Someone else's XDP program: the object's bare XDP_DROP, attached the way `ip link`
    // does it.
    let server_if = topo.server_if.clone();
    let opts = options(&other_dir);
    let foreign = in_netns(&topo.server, move || {
        let mut loaded = loader::load(&opts).expect("load");
        let prog: &mut aya::programs::Xdp = loaded
            .ebpf_mut()
            .program_mut(program_names::BENCH_FLOOR)
            .expect("program")
            .try_into()
            .expect("xdp");
        prog.load().expect("load bench_floor");
        let fd = prog.fd().expect("fd");
        let index = loader::ifindex(&server_if).expect("veth");
        use std::os::fd::AsFd as _;
        netlink::set_xdp(index, Some(fd.as_fd()), None, netlink::XDP_FLAGS_DRV_MODE)
            .expect("attach the other program");
        let id = netlink::link(index).unwrap().unwrap().xdp.unwrap().id;
        drop(loaded);
        id
    });
    let server_if = topo.server_if.clone();
    let opts = options(&dir);
    let err = in_netns(&topo.server, move || {
        let mut loaded = loader::load(&opts).expect("load");
        loaded
            .attach(&server_if, AttachMode::Auto)
            .expect_err("another program runs there")
    });
    assert!(
        matches!(&err, LoaderError::Occupied { prog_id, name, .. }
            if *prog_id == foreign && name.as_deref() == Some("bench_floor")),
        "{err}"
    );
    assert!(err.to_string().contains("xdp off"), "{err}");
    assert_eq!(attached_id(&topo.server, &topo.server_if), Some(foreign));
    // `apiban detach` does not touch it either.
    let path = dir.path.clone();
    let iface = topo.server_if.clone();
    let report = in_netns(&topo.server, move || {
        loader::detach(&path, Some(&iface), false)
    })
    .expect("detach");
    assert!(report.interfaces.is_empty(), "{report:?}");
    assert_eq!(attached_id(&topo.server, &topo.server_if), Some(foreign));
}

#[test]
fn two_agents_never_share_maps_or_an_interface() {
    require_root();
    let topo = Topology::new();
    let dir = BpffsDir::new();
    let other_dir = BpffsDir::new();
    let server_if = topo.server_if.clone();
    let (opts, other) = (options(&dir), options(&other_dir));
    in_netns(&topo.server, move || {
        let mut first = loader::load(&opts).expect("load");
        first.attach(&server_if, AttachMode::Auto).expect("attach");
        // Same bpffs directory, another state directory: refused, naming the holder.
        let err = loader::load(&opts).err().expect("the directory is locked");
        let text = err.to_string();
        assert!(matches!(err, LoaderError::DirInUse { .. }), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        // Another bpffs directory, same interface, while the first agent runs: refused.
        let mut second = loader::load(&other).expect("another directory loads");
        let err = second
            .attach(&server_if, AttachMode::Auto)
            .expect_err("the interface is held");
        assert!(matches!(err, LoaderError::IfaceInUse { .. }), "{err}");
        // And once the first is gone, its program stays: not ours to replace either.
        drop(first);
        let err = second
            .attach(&server_if, AttachMode::Auto)
            .expect_err("other maps run there");
        assert!(matches!(err, LoaderError::OtherMaps { .. }), "{err}");
    });
}

#[test]
fn attaching_to_a_missing_interface_is_a_clear_error() {
    require_root();
    let dir = BpffsDir::new();
    let mut loaded = loader::load(&options(&dir)).expect("load");
    let err = loaded
        .attach("apbnosuch0", AttachMode::Auto)
        .expect_err("no such interface");
    assert_eq!(err.to_string(), "interface apbnosuch0 does not exist");
}
