//! A ring buffer record from the dataplane, checked and copied out of the kernel's bytes.

use std::net::{IpAddr, Ipv6Addr};

use apiban_common::{SipSample, detect};

/// One record: a sample of a request (with its payload), a rate report, or a response the
/// server sent to the source (`addr`: where it went).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub kind: u8,
    /// IPv4 sources as IPv4, not mapped.
    pub addr: IpAddr,
    pub method: u8,
    /// IPPROTO_UDP or IPPROTO_TCP.
    pub proto: u8,
    pub dst_port: u16,
    pub requests: [u32; detect::METHODS],
    pub seen: u32,
    /// REGISTER and OPTIONS requests from the source so far, sampled or not.
    pub probes: u32,
    pub payload: Vec<u8>,
}

impl Sample {
    /// None for bytes that are not a whole record of a known kind.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < std::mem::size_of::<SipSample>() {
            return None;
        }
        // SAFETY: the length is checked above; SipSample is plain integers (any bits are a
        // value) and read unaligned.
        let raw: SipSample = unsafe { bytes.as_ptr().cast::<SipSample>().read_unaligned() };
        if ![
            detect::KIND_SAMPLE,
            detect::KIND_RATE,
            detect::KIND_RESPONSE,
        ]
        .contains(&raw.kind)
        {
            return None;
        }
        let v6 = Ipv6Addr::from(raw.src);
        let addr = match (raw.family, v6.to_ipv4_mapped()) {
            (4, Some(v4)) => IpAddr::V4(v4),
            (6, _) => IpAddr::V6(v6),
            _ => return None,
        };
        let captured = usize::from(raw.captured).min(detect::SNAPLEN);
        Some(Self {
            kind: raw.kind,
            addr,
            method: raw.method,
            proto: raw.proto,
            dst_port: raw.dst_port,
            requests: raw.requests,
            seen: raw.seen,
            probes: raw.probes,
            payload: raw.payload[..captured].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(raw: &SipSample) -> Vec<u8> {
        // SAFETY: SipSample is repr(C) plain data without padding.
        unsafe {
            std::slice::from_raw_parts(
                (raw as *const SipSample).cast::<u8>(),
                std::mem::size_of::<SipSample>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn records_decode_and_junk_does_not() {
        let mut raw = SipSample::zeroed();
        raw.kind = detect::KIND_SAMPLE;
        raw.family = 4;
        raw.src = Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0xc633, 0x6407]).octets();
        raw.captured = 3;
        raw.payload[..3].copy_from_slice(b"REG");
        let s = Sample::decode(&bytes(&raw)).unwrap();
        assert_eq!(s.addr, "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(s.payload, b"REG");
        raw.captured = 9999;
        assert_eq!(
            Sample::decode(&bytes(&raw)).unwrap().payload.len(),
            detect::SNAPLEN
        );
        raw.kind = 9;
        assert_eq!(Sample::decode(&bytes(&raw)), None);
        assert_eq!(Sample::decode(&[1, 2, 3]), None);
    }
}
