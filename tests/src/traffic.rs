//! Test traffic between the namespaces: SIP-looking UDP datagrams, a receiver that counts them
//! per source, steady background streams, and packet sockets for whole (VLAN-tagged) frames.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use crate::{Netns, Topology, in_netns, spawn_in_netns};

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

/// A SIP OPTIONS request as scanners send them.
pub fn sip_options(src: IpAddr, dst: SocketAddr, seq: usize) -> String {
    format!(
        "OPTIONS sip:{ip} SIP/2.0\r\nVia: SIP/2.0/UDP {src}:5060;branch=z9hG4bK-{seq}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:100@{src}>;tag=apiban{seq}\r\nTo: <sip:100@{ip}>\r\n\
         Call-ID: {seq}@{src}\r\nCSeq: 1 OPTIONS\r\nUser-Agent: friendly-scanner\r\n\
         Content-Length: 0\r\n\r\n",
        ip = dst.ip()
    )
}

/// Sends `n` datagrams from `src` (an attacker address) to `dst`, from the attacker namespace.
pub fn send_udp(ns: &Netns, src: IpAddr, dst: SocketAddr, n: usize) {
    in_netns(ns, move || {
        let socket =
            UdpSocket::bind(SocketAddr::new(src, 0)).unwrap_or_else(|e| panic!("bind {src}: {e}"));
        for i in 0..n {
            socket
                .send_to(sip_options(src, dst, i).as_bytes(), dst)
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
        // Read as we go: a whole round unread could overflow the receive buffer.
        rx.drain();
    }
    send_udp(&topo.attacker, clean, dst, n);
    rx.wait_for(clean, clean_before + n, Duration::from_secs(10));
    banned
        .iter()
        .zip(before)
        .map(|(b, before)| rx.count(*b) - before)
        .collect()
}

/// A banned and a clean source that each send a datagram every millisecond to a receiver
/// of their own, on threads, until stopped: what a restart must not let through. The
/// receiver reads on its own thread, so nothing queues up unread.
pub struct SteadyTraffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sending: Option<std::thread::JoinHandle<usize>>,
    receiving: Option<std::thread::JoinHandle<UdpReceiver>>,
    banned: IpAddr,
    clean: IpAddr,
}

/// What [`SteadyTraffic::finish`] counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Datagrams each source sent.
    pub sent: usize,
    pub banned: usize,
    pub clean: usize,
}

impl SteadyTraffic {
    pub fn start(topo: &Topology, banned: IpAddr, clean: IpAddr, port: u16) -> Self {
        use std::sync::{Arc, atomic::AtomicBool};
        let dst = SocketAddr::new(topo.server_v4.into(), port);
        let mut rx = UdpReceiver::bind(&topo.server, dst);
        let stop = Arc::new(AtomicBool::new(false));
        let sending = {
            let stop = stop.clone();
            spawn_in_netns(&topo.attacker, move || {
                let b = UdpSocket::bind(SocketAddr::new(banned, 0)).expect("bind banned");
                let c = UdpSocket::bind(SocketAddr::new(clean, 0)).expect("bind clean");
                let mut sent = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let payload = sip_options(banned, dst, sent);
                    // A link that is down answers with errors (no route, no neighbour):
                    // keep sending, as an attacker would, and count the attempts.
                    let _ = b.send_to(payload.as_bytes(), dst);
                    let _ = c.send_to(payload.as_bytes(), dst);
                    sent += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                sent
            })
        };
        let receiving = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    rx.drain();
                }
                // What is still in flight on the veth.
                std::thread::sleep(Duration::from_millis(100));
                rx.drain();
                rx
            })
        };
        Self {
            stop,
            sending: Some(sending),
            receiving: Some(receiving),
            banned,
            clean,
        }
    }

    /// Stops both threads and counts what arrived.
    pub fn finish(mut self) -> Delivered {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self
            .sending
            .take()
            .map(|t| t.join().expect("sender"))
            .unwrap_or(0);
        let rx = self
            .receiving
            .take()
            .map(|t| t.join().expect("receiver"))
            .expect("a receiver");
        Delivered {
            sent,
            banned: rx.count(self.banned),
            clean: rx.count(self.clean),
        }
    }
}

impl Drop for SteadyTraffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// An AF_PACKET socket on one interface of a namespace: sends whole frames (VLAN-tagged
/// ones too, which this kernel has no VLAN device for) and sees every frame that arrives.
/// XDP runs before packet sockets, so a frame XDP dropped never shows up here.
pub struct PacketSocket {
    fd: std::os::fd::OwnedFd,
}

impl PacketSocket {
    pub fn open(ns: &Netns, ifname: &str) -> Self {
        Self::open_with(ns, ifname, (libc::ETH_P_ALL as u16).to_be())
    }

    fn open_with(ns: &Netns, ifname: &str, proto: u16) -> Self {
        let ifname = ifname.to_owned();
        in_netns(ns, move || Self::open_here(&ifname, proto))
    }

    /// On `ifname` of this process's own namespace (a guest's, in the compat check).
    pub fn open_here(ifname: &str, proto: u16) -> Self {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            raw >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: raw is a fresh, valid fd.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let ifindex = apiban::dataplane::loader::ifindex(ifname)
            .unwrap_or_else(|| panic!("no interface {ifname}"));
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as i32;
        use std::os::fd::AsRawFd as _;
        // SAFETY: addr is a valid sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 20_000,
        };
        // SAFETY: timeout is a valid timeval of the size given.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Self { fd }
    }

    pub fn send(&self, frame: &[u8]) {
        use std::os::fd::AsRawFd as _;
        // SAFETY: frame is a valid buffer of the length given.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n as usize,
            frame.len(),
            "send frame: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Reads what has arrived; counts frames by their IP source address (behind any number
    /// of VLAN tags) into `counts`.
    pub fn drain_into(&self, counts: &mut HashMap<IpAddr, usize>) {
        use std::os::fd::AsRawFd as _;
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: buf is a valid, writable buffer of the length given.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                return;
            }
            if let Some(src) = frame_source(&buf[..n as usize]) {
                *counts.entry(src).or_default() += 1;
            }
        }
    }
}

/// The IP source address of an Ethernet frame, behind VLAN tags.
pub fn frame_source(frame: &[u8]) -> Option<IpAddr> {
    let mut off = 12;
    loop {
        let ethertype = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
        match ethertype {
            0x8100 | 0x88A8 => off += 4,
            0x0800 => {
                let b: [u8; 4] = frame.get(off + 2 + 12..off + 2 + 16)?.try_into().ok()?;
                return Some(IpAddr::from(b));
            }
            0x86DD => {
                let b: [u8; 16] = frame.get(off + 2 + 8..off + 2 + 24)?.try_into().ok()?;
                return Some(IpAddr::from(b));
            }
            _ => return None,
        }
    }
}
