//! The comparison's flood on a veth pair (see the benchmark's header): the generator in the
//! attacker's namespace, the receiver's NAPI thread alone on its CPU, and what each filter
//! costs it per packet.

#[path = "packet_socket.rs"]
mod packet_socket;

use super::*;

struct FloodResult {
    /// Frames the generator produced; more than the server sees when its receive path is
    /// saturated and the veth's ring overflows.
    generated: u64,
    /// Packets the server disposed of: dropped by the filter or delivered to the stack.
    disposed: u64,
    /// CPU time of the server's NAPI thread.
    receive_s: f64,
    elapsed_s: f64,
    clean_generated: u64,
    /// Clean datagrams that reached the UDP socket (queued or refused for a full buffer).
    clean_delivered: u64,
    generator: Generator,
}

impl FloodResult {
    fn ns_per_packet(&self) -> f64 {
        self.receive_s * 1e9 / self.disposed.max(1) as f64
    }

    fn pps(&self) -> f64 {
        self.disposed as f64 / self.elapsed_s
    }

    /// Packets per second one CPU of receive path can dispose of.
    fn capacity(&self) -> f64 {
        self.disposed as f64 / self.receive_s.max(1e-9)
    }

    fn clean_share(&self) -> f64 {
        self.clean_delivered as f64 / self.clean_generated.max(1) as f64
    }
}

/// Named counters of one protocol line pair in the server's /proc/net/snmp ("Ip:", "Udp:").
fn snmp(ns: &Netns, proto: &'static str, fields: &'static [&'static str]) -> Vec<u64> {
    in_netns(ns, move || {
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("snmp");
        let mut lines = snmp.lines().filter(|l| l.starts_with(proto));
        let names: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
        let values: Vec<&str> = lines.next().expect("values").split_whitespace().collect();
        fields
            .iter()
            .map(|f| {
                let i = names.iter().position(|n| n == f).expect("a known counter");
                values[i].parse().expect("a number")
            })
            .collect()
    })
}

/// IP packets that reached the server's stack (InReceives counts before netfilter).
fn ip_in_receives(ns: &Netns) -> u64 {
    snmp(ns, "Ip:", &["InReceives"])[0]
}

/// UDP datagrams that got past every filter to a socket, read or not.
fn udp_delivered(ns: &Netns) -> u64 {
    snmp(ns, "Udp:", &["InDatagrams", "RcvbufErrors"])
        .iter()
        .sum()
}

/// Turns GRO on (ETHTOOL_SGRO): a veth then receives through NAPI like a NIC driver, and
/// accepts frames redirected by XDP, which it refuses without NAPI.
fn enable_gro(ns: &Netns, iface: &str) {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_SGRO: u32 = 0x2c;
    let iface = iface.to_owned();
    in_netns(ns, move || {
        let mut value = EthtoolValue {
            cmd: ETHTOOL_SGRO,
            data: 1,
        };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: &mut value,
            _pad: [0; 16],
        };
        req.name[..iface.len()].copy_from_slice(iface.as_bytes());
        // SAFETY: plain socket and ioctl calls on structures that outlive them.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let rc = libc::ioctl(fd, SIOCETHTOOL, &mut req);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(rc, 0, "enable GRO on {iface}: {err}");
        }
    });
}

/// The kernel threads that run `iface`'s NAPI once it is threaded ("napi/<iface>-<id>",
/// cut to the 15 characters of a task name).
fn napi_threads(iface: &str) -> Vec<i32> {
    let prefix: String = format!("napi/{iface}").chars().take(15).collect();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim_end().starts_with(&prefix))
        })
        .collect()
}

/// CPU time of a task, from its schedstat (nanoseconds).
fn task_cpu_ns(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn pin_to_cpu(pid: i32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid, and CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "pin {pid} to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The receive side: GRO on and NAPI threaded, its thread alone on the last CPU.
fn prepare_receiver(topo: &Topology) -> Vec<i32> {
    enable_gro(&topo.server, &topo.server_if);
    topo.server.exec(
        "sh",
        &[
            "-c",
            &format!("echo 1 > /sys/class/net/{}/threaded", topo.server_if),
        ],
    );
    let threads = napi_threads(&topo.server_if);
    assert!(
        !threads.is_empty(),
        "no NAPI thread for {} after enabling threaded NAPI",
        topo.server_if
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for t in &threads {
        pin_to_cpu(*t, cpus - 1);
    }
    threads
}

/// 4,096 source addresses: 9 of 10 banned, sampled evenly over the list (so a linear rule
/// chain is walked half way on average), 1 of 10 the clean address.
fn sources(banned: &[Ipv4Addr], clean: Ipv4Addr) -> Vec<[u8; 4]> {
    (0..TRAFFICGEN_SOURCE_SLOTS as usize)
        .map(|i| {
            if i % 10 == 9 {
                clean.octets()
            } else {
                banned[(i * 7_919) % banned.len()].octets()
            }
        })
        .collect()
}

/// Runs the traffic generator in the attacker namespace on CPU 0 until `packets` frames or
/// `max_time`; returns the frames generated and the time taken.
fn generate(
    topo: &Topology,
    template: Vec<u8>,
    sources: Vec<[u8; 4]>,
    packets: u64,
    max_time: Duration,
) -> (u64, Duration, Generator) {
    let iface = topo.attacker_if.clone();
    spawn_in_netns(&topo.attacker, move || {
        pin_to_cpu(0, 0);
        let ifindex = loader::ifindex(&iface).expect("the attacker's veth");
        let dir = BpffsDir::new();
        let mut loaded = loader::load(&LoadOptions {
            bpffs_dir: dir.path.clone(),
            ..Default::default()
        })
        .expect("load the eBPF object");
        let ebpf = loaded.ebpf_mut();
        let mut params: Array<_, TrafficgenParams> =
            Array::try_from(ebpf.map_mut(map_names::TRAFFICGEN).expect("map")).expect("array");
        params
            .set(
                0,
                &TrafficgenParams {
                    ifindex,
                    _reserved: 0,
                },
                0,
            )
            .expect("set the generator's interface");
        let mut slots: Array<_, [u8; 4]> =
            Array::try_from(ebpf.map_mut(map_names::TRAFFICGEN_SOURCES).expect("map"))
                .expect("array");
        for (i, src) in sources.iter().enumerate() {
            slots.set(i as u32, src, 0).expect("set a source");
        }
        let prog: &mut Xdp = ebpf
            .program_mut(program_names::BENCH_TRAFFICGEN)
            .expect("generator program")
            .try_into()
            .expect("xdp");
        prog.load().expect("load the generator");
        let start = Instant::now();
        let mut generated = 0u64;
        while generated < packets && start.elapsed() < max_time {
            let chunk = (packets - generated).min(100_000);
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(&template);
            opts.repeat = chunk as u32;
            opts.attrs = TestRunAttrs::new().xdp_live_frames(64);
            match prog.test_run(opts) {
                Ok(_) => generated += chunk,
                Err(e) if generated == 0 && refused(&e) => {
                    let (sent, took) = through_packet_socket(prog, &template, packets, max_time);
                    return (sent, took, Generator::PacketSocket);
                }
                Err(e) => panic!("live-frames test run: {e:?}"),
            }
        }
        (generated, start.elapsed(), Generator::LiveFrames)
    })
    .join()
    .expect("generator thread")
}

/// The generator program on a second veth pair of the attacker's, fed by an AF_PACKET
/// socket (see `packet_socket`); run in the attacker's namespace.
fn through_packet_socket(
    prog: &mut Xdp,
    template: &[u8],
    packets: u64,
    max_time: Duration,
) -> (u64, Duration) {
    const FEED: &str = "apbgen0";
    const GENERATOR: &str = "apbgen1";
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let _ = Command::new("ip").args(["link", "del", FEED]).output();
    ip(&[
        "link", "add", FEED, "type", "veth", "peer", "name", GENERATOR,
    ]);
    ip(&["link", "set", FEED, "up"]);
    ip(&["link", "set", GENERATOR, "up"]);
    let generator = loader::ifindex(GENERATOR).expect("the generator's veth");
    let link = prog
        .attach(
            aya::programs::NetworkInterface::Index(generator),
            aya::programs::xdp::XdpMode::Driver,
        )
        .expect("attach the generator to its veth");
    let feed = loader::ifindex(FEED).expect("the feeding veth");
    let sent = packet_socket::flood(feed, template, packets, max_time);
    prog.detach(link).expect("detach the generator");
    ip(&["link", "del", FEED]);
    sent
}

/// Whether the kernel refused live frames outright (EPERM, EOPNOTSUPP, EINVAL from a kernel
/// without them), rather than failing one run.
fn refused(e: &aya::programs::ProgramError) -> bool {
    let text = format!("{e:?}");
    ["PermissionDenied", "Unsupported", "code: 95", "code: 22"]
        .iter()
        .any(|k| text.contains(k))
}

/// Where the flood's frames came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Generator {
    /// XDP live frames: they reach the server's veth as xdp_frames, as off a NIC.
    LiveFrames,
    /// An AF_PACKET socket feeding the generator program on another veth
    /// (`packet_socket`): they reach the server as xdp_frames too, at a lower rate.
    PacketSocket,
}

impl Generator {
    fn key(self) -> &'static str {
        match self {
            Generator::LiveFrames => "xdp_live_frames",
            Generator::PacketSocket => "af_packet",
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn flood(
    topo: &Topology,
    filter: Filter,
    napi: &[i32],
    template: &[u8],
    sources: Vec<[u8; 4]>,
    packets: u64,
    max_time: Duration,
    sink: std::net::SocketAddr,
    bpffs: Option<&BpffsDir>,
) -> FloodResult {
    // A bound socket, so clean datagrams are delivered rather than answered with ICMP;
    // nobody needs to read it, since delivery is counted where UDP queues them.
    let socket = {
        let (tx, rx) = std::sync::mpsc::channel();
        in_netns(&topo.server, move || {
            tx.send(std::net::UdpSocket::bind(sink).expect("bind the sink"))
                .expect("hand the socket back");
        });
        rx.recv().expect("the sink socket")
    };
    let clean_slots = sources
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 == 9)
        .count() as u64;
    let slots = sources.len() as u64;
    let xdp_before = bpffs.map(xdp_dropped).unwrap_or(0);
    let ip_before = ip_in_receives(&topo.server);
    let udp_before = udp_delivered(&topo.server);
    let cpu_before: u64 = napi.iter().map(|t| task_cpu_ns(*t)).sum();
    let (generated, elapsed, generator) =
        generate(topo, template.to_vec(), sources, packets, max_time);
    std::thread::sleep(Duration::from_millis(100));
    let receive_ns = napi.iter().map(|t| task_cpu_ns(*t)).sum::<u64>() - cpu_before;
    let ip = ip_in_receives(&topo.server) - ip_before;
    let xdp = bpffs.map(xdp_dropped).unwrap_or(0) - xdp_before;
    let delivered = udp_delivered(&topo.server) - udp_before;
    drop(socket);
    // Behind a filter only clean datagrams reach the socket. With none, every frame does, and
    // clean ones fare like the rest.
    let clean_delivered = if filter == Filter::Nothing {
        delivered * clean_slots / slots
    } else {
        delivered
    };
    FloodResult {
        generated,
        disposed: ip + xdp,
        receive_s: receive_ns as f64 / 1e9,
        elapsed_s: elapsed.as_secs_f64(),
        clean_generated: generated * clean_slots / slots,
        clean_delivered,
        generator,
    }
}

pub(super) fn veth_flood(mode: Mode, only: Option<&[String]>) -> serde_json::Value {
    let (sizes, packets, max_time): (&[usize], u64, Duration) = match mode {
        Mode::Full => (
            &[1_000, 10_000, 100_000],
            10_000_000,
            Duration::from_secs(20),
        ),
        Mode::Quick => (&[10_000], 2_000_000, Duration::from_secs(5)),
        // 10k: the size the comparison's ratios are taken at; 1k first, so that the smoke
        // run attaches our program a second time on the same veth, as the full run does.
        Mode::Smoke => (&[1_000, 10_000], 20_000, Duration::from_secs(2)),
    };
    let topo = Topology::new();
    let napi = prepare_receiver(&topo);
    let mut template = Frame::udp(
        IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)),
        IpAddr::V4(topo.server_v4),
        5060,
    );
    template.dst_mac = topo.server_mac();
    let template = template.build();
    let clean: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    let sink = std::net::SocketAddr::new(topo.server_v4.into(), 5060);
    println!();
    println!(
        "dropping a flood on a veth pair: up to {packets} frames per run (at most {}s), \
         9 of 10 from banned sources; the server's NAPI thread alone on CPU {}",
        max_time.as_secs(),
        std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
    );
    println!(
        "{:<30} {:>8} {:>10} {:>14} {:>12} {:>12} {:>9}",
        "receiver filter",
        "entries",
        "ns/packet",
        "pkts/s per CPU",
        "disposed/s",
        "generated/s",
        "clean in"
    );
    let mut json = serde_json::Map::new();
    let mut results = std::collections::BTreeMap::new();
    if only.is_none_or(|o| o.iter().any(|k| k == "nothing")) {
        let base = flood(
            &topo,
            Filter::Nothing,
            &napi,
            &template,
            sources(&addresses(1_000), clean),
            packets,
            max_time,
            sink,
            None,
        );
        print_row(Filter::Nothing, 0, &base);
        note_generator(&mut json, &base);
        json.insert("nothing_ns_per_packet".into(), round(base.ns_per_packet()));
        json.insert("nothing_pps_per_cpu".into(), round(base.capacity()));
    }
    for &n in sizes {
        let addrs = addresses(n);
        for filter in [Filter::Xdp, Filter::Iptables, Filter::Ipset, Filter::NftSet] {
            if only.is_some_and(|o| !o.iter().any(|k| k == filter.key())) {
                continue;
            }
            setup_filter(&topo.server, filter, &addrs);
            let attached = (filter == Filter::Xdp).then(|| attach_xdp(&topo, &addrs));
            let bpffs = attached.as_ref().map(|a| &a.dir);
            let r = flood(
                &topo,
                filter,
                &napi,
                &template,
                sources(&addrs, clean),
                packets,
                max_time,
                sink,
                bpffs,
            );
            drop(attached);
            teardown_filter(&topo.server, filter);
            print_row(filter, n, &r);
            note_generator(&mut json, &r);
            let size = format!("{}k", n / 1_000);
            json.insert(
                format!("{}_ns_per_packet_{size}", filter.key()),
                round(r.ns_per_packet()),
            );
            json.insert(
                format!("{}_pps_per_cpu_{size}", filter.key()),
                round(r.capacity()),
            );
            json.insert(format!("{}_pps_{size}", filter.key()), round(r.pps()));
            json.insert(
                format!("{}_clean_delivered_{size}", filter.key()),
                round(r.clean_share()),
            );
            results.insert((filter.key(), n), r);
        }
    }
    if let (Some(x), Some(ipt), Some(nft)) = (
        results.get(&("xdp", 10_000)),
        results.get(&("iptables", 10_000)),
        results.get(&("nft_set", 10_000)),
    ) {
        let cpu = |other: &FloodResult| round(other.ns_per_packet() / x.ns_per_packet());
        // Wall-clock throughput: what the server actually disposed of per second while the
        // generator pushed as hard as it could. The generator caps the fastest filters.
        let pps = |other: &FloodResult| round(x.pps() / other.pps());
        json.insert("xdp_vs_iptables".into(), cpu(ipt));
        json.insert("xdp_vs_nft_set".into(), cpu(nft));
        json.insert("pps_xdp_vs_iptables".into(), pps(ipt));
        json.insert("pps_xdp_vs_nft_set".into(), pps(nft));
        println!();
        println!(
            "at 10k entries apiban needs {}x less receive CPU per packet than iptables (target >= 5x) \
             and {}x less than an nftables set (target >= 1.5x)",
            cpu(ipt),
            cpu(nft)
        );
        println!(
            "and the server disposed of {}x the packets per second of iptables and {}x those of \
             the nftables set",
            pps(ipt),
            pps(nft)
        );
    }
    serde_json::Value::Object(json)
}

fn round(x: f64) -> serde_json::Value {
    serde_json::json!((x * 100.0).round() / 100.0)
}

/// Records which generator made the rows, and says so once when it was not live frames.
fn note_generator(json: &mut serde_json::Map<String, serde_json::Value>, r: &FloodResult) {
    let key = serde_json::json!(r.generator.key());
    if json.get("generator") != Some(&key) {
        if r.generator == Generator::PacketSocket {
            println!(
                "  (the kernel refused XDP live frames: an AF_PACKET socket feeds the generator \
                 program on a second veth, slower than live frames, so the receiver polls \
                 smaller batches; see tests/benches/compare/packet_socket.rs)"
            );
        }
        json.insert("generator".into(), key);
    }
}

fn print_row(filter: Filter, n: usize, r: &FloodResult) {
    println!(
        "{:<30} {:>8} {:>10.0} {:>14.0} {:>12.0} {:>12.0} {:>8.0}%",
        filter.name(),
        n,
        r.ns_per_packet(),
        r.capacity(),
        r.pps(),
        r.generated as f64 / r.elapsed_s,
        100.0 * r.clean_share()
    );
}

fn xdp_dropped(dir: &BpffsDir) -> u64 {
    let loaded = loader::load(&LoadOptions {
        bpffs_dir: dir.path.clone(),
        ..Default::default()
    })
    .expect("adopt the pinned maps");
    loaded
        .dataplane
        .stats()
        .expect("stats")
        .get(Verdict::Dropped)
        .packets
}

/// Our program on the server's veth with its maps pinned in a directory of its own. Detached
/// in the server's namespace on drop: `BpffsDir`'s own drop detaches from the namespace it
/// runs in, where the veth is not, and the next size's program would find ours still there
/// (and refuse to replace a program on other maps).
struct XdpOnServer {
    dir: BpffsDir,
    netns: std::path::PathBuf,
    iface: String,
}

impl Drop for XdpOnServer {
    fn drop(&mut self) {
        let (path, iface) = (self.dir.path.clone(), self.iface.clone());
        // Best effort: a failure here must not mask the bench's own panic.
        let _ = spawn_in_netns_at(self.netns.clone(), move || {
            loader::detach(&path, Some(&iface), true)
        })
        .join();
    }
}

fn attach_xdp(topo: &Topology, addrs: &[Ipv4Addr]) -> XdpOnServer {
    let attached = XdpOnServer {
        dir: BpffsDir::new(),
        netns: topo.server.path(),
        iface: topo.server_if.clone(),
    };
    let path = attached.dir.path.clone();
    let iface = topo.server_if.clone();
    let nets: Vec<IpNet> = addrs
        .iter()
        .map(|a| IpNet::V4(Ipv4Net::new(*a, 32).expect("/32")))
        .collect();
    in_netns(&topo.server, move || {
        let mut loaded = loader::load(&LoadOptions {
            bpffs_dir: path,
            ..Default::default()
        })
        .expect("load the XDP program");
        loaded
            .attach(&iface, loader::AttachMode::Native)
            .expect("attach native XDP to the veth");
        loaded
            .dataplane
            .deny_batch(&nets, false)
            .expect("load the bans");
        // Dropping the object leaves the pinned link and maps enforcing.
    });
    attached
}
