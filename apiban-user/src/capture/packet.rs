//! A captured packet on the wire between agent and client, and what the client prints of
//! it: its addresses, ports, protocol and, for SIP, its first line.

use super::*;

/// One captured packet as the client gets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Nanoseconds since the Unix epoch when the program saw it.
    pub ts_unix_ns: u64,
    /// Its length on the wire; `data` may be shorter (snaplen).
    pub len: u32,
    pub ifindex: u32,
    pub verdict: Verdict,
    /// The sources of the entry it matched, e.g. `apiban,list:voipbl` (empty when the
    /// ledger no longer has it).
    pub sources: String,
    pub data: Vec<u8>,
}

pub(super) const PACKET_HEAD: usize = 8 + 4 + 4 + 1 + 2;

impl Packet {
    pub fn encode(&self) -> Vec<u8> {
        let sources = self.sources.as_bytes();
        let sources = &sources[..sources.len().min(usize::from(u16::MAX))];
        let mut out = Vec::with_capacity(PACKET_HEAD + sources.len() + self.data.len());
        out.extend_from_slice(&self.ts_unix_ns.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.ifindex.to_le_bytes());
        out.push(self.verdict as u8);
        out.extend_from_slice(&(sources.len() as u16).to_le_bytes());
        out.extend_from_slice(sources);
        out.extend_from_slice(&self.data);
        out
    }

    /// None for bytes that are not a packet message.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let head = bytes.get(..PACKET_HEAD)?;
        let u32_at =
            |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let verdict = Verdict::ALL.into_iter().find(|v| *v as u8 == head[16])?;
        let sources_len = usize::from(u16::from_le_bytes([head[17], head[18]]));
        let sources = bytes.get(PACKET_HEAD..PACKET_HEAD + sources_len)?;
        Some(Self {
            ts_unix_ns: u64::from_le_bytes(head[..8].try_into().ok()?),
            len: u32_at(8),
            ifindex: u32_at(12),
            verdict,
            sources: String::from_utf8_lossy(sources).into_owned(),
            data: bytes[PACKET_HEAD + sources_len..].to_vec(),
        })
    }
}

/// A tagged, length-prefixed message.
pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// A ring buffer record, checked and copied out of the kernel's bytes; None for anything
/// that is not a whole record.
pub fn decode_record(bytes: &[u8]) -> Option<(CaptureRecord, usize)> {
    if bytes.len() < std::mem::size_of::<CaptureRecord>() {
        return None;
    }
    // SAFETY: the length is checked above; CaptureRecord is plain integers (any bits are a
    // value) and read unaligned.
    let record: CaptureRecord = unsafe { bytes.as_ptr().cast::<CaptureRecord>().read_unaligned() };
    let captured = (record.captured as usize).min(capture::SNAPLEN);
    Some((record, captured))
}

/// The ethertype after up to two VLAN tags, and where the network header starts.
fn l3(data: &[u8]) -> Option<(u16, usize)> {
    let be16 = |at: usize| Some(u16::from_be_bytes([*data.get(at)?, *data.get(at + 1)?]));
    let mut ethertype = be16(12)?;
    let mut at = 14;
    for _ in 0..2 {
        if ethertype != 0x8100 && ethertype != 0x88a8 {
            break;
        }
        ethertype = be16(at + 2)?;
        at += 4;
    }
    Some((ethertype, at))
}

/// What a frame carries, as far as its bytes go.
#[derive(Debug, Default, PartialEq, Eq)]
struct Headers {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    proto: Option<u8>,
    ports: Option<(u16, u16)>,
    payload: Option<usize>,
}

fn headers(data: &[u8]) -> Headers {
    let mut h = Headers::default();
    let Some((ethertype, at)) = l3(data) else {
        return h;
    };
    let (proto, l4) = match ethertype {
        0x0800 => {
            let Some(ip) = data.get(at..at + 20) else {
                return h;
            };
            h.src = Some(IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15])));
            h.dst = Some(IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])));
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
                return h;
            }
            (ip[9], at + usize::from(ip[0] & 0x0f) * 4)
        }
        0x86dd => {
            let Some(ip) = data.get(at..at + 40) else {
                return h;
            };
            let addr = |from: usize| {
                let octets: [u8; 16] = ip[from..from + 16].try_into().unwrap_or([0; 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            h.src = Some(addr(8));
            h.dst = Some(addr(24));
            (ip[6], at + 40)
        }
        _ => return h,
    };
    h.proto = Some(proto);
    let be16 = |at: usize| Some(u16::from_be_bytes([*data.get(at)?, *data.get(at + 1)?]));
    if let (6 | 17, Some(sport), Some(dport)) = (proto, be16(l4), be16(l4 + 2)) {
        h.ports = Some((sport, dport));
        h.payload = match proto {
            17 => Some(l4 + 8),
            _ => data.get(l4 + 12).map(|off| l4 + usize::from(off >> 4) * 4),
        };
    }
    h
}

/// The source address of an Ethernet frame (up to two VLAN tags), as the program reads it.
pub fn frame_source(data: &[u8]) -> Option<IpAddr> {
    headers(data).src
}

/// One line per packet for a terminal, as tcpdump prints one: the time (UTC), interface,
/// verdict, addresses and ports, a SIP message's first line, and the entry's sources.
pub fn describe(p: &Packet, ifaces: &BTreeMap<u32, String>) -> String {
    let secs = p.ts_unix_ns / 1_000_000_000;
    let micros = p.ts_unix_ns % 1_000_000_000 / 1000;
    let time = format!(
        "{:02}:{:02}:{:02}.{micros:06}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    );
    let iface = ifaces
        .get(&p.ifindex)
        .cloned()
        .unwrap_or_else(|| format!("if{}", p.ifindex));
    let h = headers(&p.data);
    let endpoint = |addr: Option<IpAddr>, port: Option<u16>| match (addr, port) {
        (Some(IpAddr::V6(a)), Some(port)) => format!("[{a}]:{port}"),
        (Some(a), Some(port)) => format!("{a}:{port}"),
        (Some(a), None) => a.to_string(),
        (None, _) => "?".to_owned(),
    };
    let proto = match h.proto {
        Some(6) => "TCP".to_owned(),
        Some(17) => "UDP".to_owned(),
        Some(1) => "ICMP".to_owned(),
        Some(58) => "ICMPv6".to_owned(),
        Some(n) => format!("proto {n}"),
        None => "not IP".to_owned(),
    };
    let mut line = format!(
        "{time} {iface} {} {} > {} {proto} {} bytes",
        p.verdict.name(),
        endpoint(h.src, h.ports.map(|(s, _)| s)),
        endpoint(h.dst, h.ports.map(|(_, d)| d)),
        p.len
    );
    if let Some(first) = h
        .payload
        .and_then(|at| p.data.get(at..))
        .and_then(sip_first_line)
    {
        line.push_str(&format!(" \"{first}\""));
    }
    if !p.sources.is_empty() {
        line.push_str(&format!(" [{}]", p.sources));
    }
    line
}

/// A SIP request's or response's first line, if the payload starts with one.
fn sip_first_line(payload: &[u8]) -> Option<String> {
    let end = payload
        .iter()
        .position(|b| *b == b'\r' || *b == b'\n')
        .unwrap_or(payload.len())
        .min(120);
    let first = std::str::from_utf8(&payload[..end]).ok()?;
    let looks_sip = first.ends_with("SIP/2.0") || first.starts_with("SIP/2.0 ");
    (looks_sip && first.chars().all(|c| c.is_ascii_graphic() || c == ' ')).then(|| first.to_owned())
}
