//! XDP attachments through rtnetlink (`IFLA_XDP`), the way `ip link set dev X xdp` and
//! xdp-loader make them.
//!
//! Why netlink rather than a bpf_link: a bpf_link lives as long as a file descriptor or a pin
//! on a bpffs holds it, and a bpffs can be private to a mount namespace (`ip netns exec`,
//! `unshare -m`, a container), so it may vanish with the agent and take the program off the
//! interface. A netlink attachment belongs to the interface: the program stays attached,
//! with its maps, until someone detaches it or the interface goes away, however the agent
//! was started and however it ends.
//!
//! Every call opens its own socket in the calling thread's network namespace.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage, LinkXdp, XdpAttached},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::loader::AttachedMode;

/// `XDP_FLAGS_*` from linux/if_link.h.
pub const XDP_FLAGS_UPDATE_IF_NOEXIST: u32 = 1 << 0;
pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
pub const XDP_FLAGS_REPLACE: u32 = 1 << 4;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot talk rtnetlink")]
    Socket(#[source] io::Error),
    #[error("{0}")]
    Kernel(io::Error),
    #[error("unexpected rtnetlink answer: {0}")]
    Protocol(String),
}

impl NetlinkError {
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetlinkError::Socket(e) | NetlinkError::Kernel(e) => e.raw_os_error(),
            NetlinkError::Protocol(_) => None,
        }
    }
}

/// The XDP program an interface runs, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpProgram {
    pub id: u32,
    pub mode: AttachedMode,
}

/// An interface as rtnetlink describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// Its frames start with an Ethernet header (ARPHRD_ETHER, or loopback, which gets
    /// one too), which is what the XDP program parses; None: what it is instead.
    pub not_ethernet: Option<String>,
    /// The XDP program attached in native or generic mode, if any. Offloaded (hardware)
    /// programs are not ours and are reported as none.
    pub xdp: Option<XdpProgram>,
}

fn socket() -> Result<Socket, NetlinkError> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
    socket.bind_auto().map_err(NetlinkError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(NetlinkError::Socket)?;
    Ok(socket)
}

/// Sends one request and collects the link messages of the answer until the kernel's ACK,
/// error or end of dump.
fn request(flags: u16, message: RouteNetlinkMessage) -> Result<Vec<LinkMessage>, NetlinkError> {
    let socket = socket()?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = 1;
    let mut request = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
    request.finalize();
    let mut out = vec![0u8; request.buffer_len()];
    request.serialize(&mut out);
    socket.send(&out, 0).map_err(NetlinkError::Socket)?;

    let mut links = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = socket
            .recv(&mut &mut buf[..], 0)
            .map_err(NetlinkError::Socket)?;
        if n == 0 {
            return Err(NetlinkError::Protocol("the socket closed".into()));
        }
        let mut offset = 0;
        while offset < n {
            let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..n])
                .map_err(|e| NetlinkError::Protocol(e.to_string()))?;
            let len = message.header.length as usize;
            if len == 0 {
                return Err(NetlinkError::Protocol("a message of length 0".into()));
            }
            offset += len.next_multiple_of(4);
            match message.payload {
                NetlinkPayload::Error(e) if e.code.is_none() => return Ok(links),
                NetlinkPayload::Error(e) => return Err(NetlinkError::Kernel(e.to_io())),
                NetlinkPayload::Done(_) => return Ok(links),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    links.push(link);
                    // A request for one link is answered by that link alone.
                    if flags & NLM_F_DUMP == 0 {
                        return Ok(links);
                    }
                }
                _ => {}
            }
        }
    }
}

fn describe(message: &LinkMessage) -> Link {
    let mut name = String::new();
    let mut xdp = None;
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::Xdp(nlas) => xdp = xdp_program(nlas),
            _ => {}
        }
    }
    Link {
        index: message.header.index,
        name,
        up: message.header.flags.contains(LinkFlags::Up),
        xdp,
        not_ethernet: match message.header.link_layer_type {
            LinkLayerType::Ether | LinkLayerType::Loopback => None,
            // tun, WireGuard, and other layer-3 devices.
            LinkLayerType::None => {
                Some("a layer-3 device without link headers (tun, WireGuard)".into())
            }
            LinkLayerType::Ppp => Some("a PPP link".into()),
            other => Some(format!("link type {other}")),
        },
    }
}

fn xdp_program(nlas: &[LinkXdp]) -> Option<XdpProgram> {
    let mut mode = None;
    let (mut id, mut drv, mut skb) = (None, None, None);
    for nla in nlas {
        match nla {
            LinkXdp::Attached(XdpAttached::Driver) => mode = Some(AttachedMode::Native),
            LinkXdp::Attached(XdpAttached::SocketBuffer) => mode = Some(AttachedMode::Skb),
            LinkXdp::ProgId(i) => id = Some(*i),
            LinkXdp::DrvProgId(i) => drv = Some(*i),
            LinkXdp::SkbProgId(i) => skb = Some(*i),
            _ => {}
        }
    }
    match mode {
        Some(mode) => id.map(|id| XdpProgram { id, mode }),
        // XDP_ATTACHED_MULTI (a native and an offloaded program): the native one is ours.
        None => drv
            .map(|id| XdpProgram {
                id,
                mode: AttachedMode::Native,
            })
            .or(skb.map(|id| XdpProgram {
                id,
                mode: AttachedMode::Skb,
            })),
    }
}

/// The interface with this index, or None if there is none (in this network namespace).
pub fn link(index: u32) -> Result<Option<Link>, NetlinkError> {
    let mut message = LinkMessage::default();
    message.header.index = index;
    match request(0, RouteNetlinkMessage::GetLink(message)) {
        Ok(links) => Ok(links.first().map(describe)),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every interface of this network namespace.
pub fn links() -> Result<Vec<Link>, NetlinkError> {
    let links = request(
        NLM_F_DUMP,
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
    )?;
    Ok(links.iter().map(describe).collect())
}

/// Attaches `prog` to the interface (None detaches). With `expected`, the kernel swaps
/// programs only if that is the one attached now, atomically: no packet meets the
/// interface without a program. `flags` are `XDP_FLAGS_*`.
pub fn set_xdp(
    index: u32,
    prog: Option<BorrowedFd<'_>>,
    expected: Option<BorrowedFd<'_>>,
    mut flags: u32,
) -> Result<(), NetlinkError> {
    let mut nlas = vec![LinkXdp::Fd(prog.map_or(-1, |fd| fd.as_raw_fd()))];
    if let Some(old) = expected {
        flags |= XDP_FLAGS_REPLACE;
        nlas.push(LinkXdp::ExpectedFd(old.as_raw_fd() as u32));
    }
    nlas.push(LinkXdp::Flags(flags));
    let mut message = LinkMessage::default();
    message.header.index = index;
    message.attributes.push(LinkAttribute::Xdp(nlas));
    request(NLM_F_ACK, RouteNetlinkMessage::SetLink(message)).map(drop)
}

/// The mode flag of an attachment mode.
pub fn mode_flag(mode: AttachedMode) -> u32 {
    match mode {
        AttachedMode::Native => XDP_FLAGS_DRV_MODE,
        AttachedMode::Skb => XDP_FLAGS_SKB_MODE,
    }
}
