//! `apiban capture`: what the XDP program dropped, allowed or observed, as a pcap.
//!
//! XDP drops never reach tcpdump. While a capture runs, the program copies the packets of
//! the verdicts it asks for into a ring buffer, at most `--rate` a second over all CPUs (see
//! `apiban_common::capture`); the agent reads them, keeps those of the `--source` asked for,
//! and streams them over the control socket to the client, which writes the pcap. One
//! capture at a time; when none runs the program's capture switch is off and costs nothing.
//!
//! The stream, after the usual JSON answer line: messages of a tag byte, a little-endian u32
//! length and that many bytes. [`TAG_PACKET`]: [`Packet::encode`]. [`TAG_SUMMARY`]: the
//! [`Summary`] as JSON, last. The client ends a capture early by sending `stop\n`, or by
//! closing the socket.
//!
//! Over 600 lines with its tests; the code is 470.

mod packet;

pub use packet::{Packet, decode_record, describe, frame, frame_source};
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::Duration,
};

use apiban_common::{CaptureConfig, CaptureRecord, Verdict, capture};
use aya::maps::{MapData, RingBuf};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWrite, AsyncWriteExt as _, unix::AsyncFd},
    sync::{Mutex, mpsc, oneshot},
};

use crate::{
    dataplane::capture::{CaptureControls, CaptureTap},
    ledger::SourceId,
    snapshot::Snapshot,
    sync::{ChangeError, Update},
};

pub const TAG_PACKET: u8 = 1;
pub const TAG_SUMMARY: u8 = 2;
/// How long a capture waits for a client that stopped reading before it ends.
pub const CLIENT_STALLED: Duration = Duration::from_secs(10);

/// How a capture whose client stopped reading ended.
const STALLED: &str = "client stopped reading";

/// The packet rate a capture is capped at unless it asks otherwise.
pub const DEFAULT_PER_SEC: u32 = 1000;

/// The verdicts a capture can ask for: what the program decided about a listed source.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum CaptureVerdict {
    /// Dropped: from a banned source.
    Dropped,
    /// Passed because the allowlist covers a banned source.
    Allowed,
    /// Passed and counted: only sources in observe mode list it.
    Observed,
}

impl CaptureVerdict {
    pub fn verdict(self) -> Verdict {
        match self {
            CaptureVerdict::Dropped => Verdict::Dropped,
            CaptureVerdict::Allowed => Verdict::Allowed,
            CaptureVerdict::Observed => Verdict::Observed,
        }
    }
}

/// What a client asks to capture.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureSpec {
    pub verdicts: Vec<CaptureVerdict>,
    /// Only packets whose matching entry this source lists (`apiban`, `list:NAME`, ...).
    pub source: Option<String>,
    /// Stop after this many packets.
    pub count: Option<u64>,
    /// Bytes of each frame; 0 or more than the program copies means all it copies.
    pub snaplen: u32,
    /// Packets a second at most.
    pub per_sec: u32,
}

/// Why a capture cannot run as asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("--verdict: give at least one of dropped, allowed, observed")]
    NoVerdict,
    #[error("--rate {0}: give 1 to {max} packets a second", max = capture::MAX_PER_SEC)]
    Rate(u32),
    #[error("--count 0 would capture nothing; leave it out to capture until Ctrl-C")]
    Count,
    #[error("--source: {0}")]
    Source(String),
}

/// A spec the program can run: its settings in the program, and the source to keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub config: CaptureConfig,
    pub source: Option<SourceId>,
    pub count: Option<u64>,
}

impl CaptureSpec {
    pub fn plan(&self) -> Result<Plan, SpecError> {
        if self.verdicts.is_empty() {
            return Err(SpecError::NoVerdict);
        }
        if self.per_sec == 0 || self.per_sec > capture::MAX_PER_SEC {
            return Err(SpecError::Rate(self.per_sec));
        }
        if self.count == Some(0) {
            return Err(SpecError::Count);
        }
        let source = self
            .source
            .as_deref()
            .map(str::parse::<SourceId>)
            .transpose()
            .map_err(SpecError::Source)?;
        Ok(Plan {
            config: CaptureConfig {
                verdicts: self
                    .verdicts
                    .iter()
                    .fold(0, |mask, v| mask | 1 << (v.verdict() as u32)),
                snaplen: effective_snaplen(self.snaplen),
                per_sec: self.per_sec,
                _pad: 0,
            },
            source,
            count: self.count,
        })
    }
}

/// What the program copies of a frame for `asked` (0: as much as it can, like tcpdump -s 0).
pub fn effective_snaplen(asked: u32) -> u32 {
    match asked {
        0 => capture::SNAPLEN as u32,
        n => n.min(capture::SNAPLEN as u32),
    }
}

/// The agent's first answer: the capture runs, with these settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub snaplen: u32,
    pub per_sec: u32,
    pub verdicts: Vec<CaptureVerdict>,
    pub source: Option<String>,
    /// The interfaces the program is attached to, by ifindex.
    pub ifaces: BTreeMap<u32, String>,
}

/// The last message: what the capture saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Packets sent to the client.
    pub captured: u64,
    /// Copied by the program, but their entry is not the asked source's.
    pub other_sources: u64,
    /// Matched past the rate cap, not copied.
    pub over_cap: u64,
    /// Not copied: the ring buffer was full (the agent or the client fell behind).
    pub lost: u64,
    /// Why it ended: `count`, `stopped`, `client gone`, or an error.
    pub ended: String,
}

/// The sources of the ledger's entry for `addr`: its longest match, as the program's, and any
/// IPv6 block derived over it.
pub fn sources_of(snapshot: &Snapshot, addr: IpAddr) -> Vec<SourceId> {
    let mut sources: Vec<SourceId> = snapshot
        .engine
        .ledger
        .longest_match(addr)
        .map(|(_, records)| records.iter().map(|(s, _)| s.clone()).collect())
        .unwrap_or_default();
    for derived in snapshot
        .engine
        .derived
        .iter()
        .filter(|d| d.net.contains(&addr))
    {
        if !sources.contains(&derived.source) {
            sources.push(derived.source.clone());
        }
    }
    sources
}

/// The capture maps, and the ring buffer registered with the runtime. One capture at a time
/// holds them.
pub struct CaptureService {
    inner: Mutex<Inner>,
    ifaces: BTreeMap<u32, String>,
}

struct Inner {
    tap: CaptureControls,
    ring: AsyncFd<RingBuf<MapData>>,
}

impl CaptureService {
    /// Must be called within the runtime, which watches the ring buffer's descriptor.
    pub fn new(tap: CaptureTap, ifaces: &[String]) -> std::io::Result<Self> {
        let CaptureTap { controls, ring } = tap;
        let ifaces = ifaces
            .iter()
            .filter_map(|name| ifindex(name).map(|i| (i, name.clone())))
            .collect();
        // SAFETY: the ring buffer owns its descriptor and keeps it open until it is dropped,
        // which only the AsyncFd does.
        let ring = unsafe { AsyncFd::register(ring) }?;
        Ok(Self {
            inner: Mutex::new(Inner {
                tap: controls,
                ring,
            }),
            ifaces,
        })
    }
}

fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Nanoseconds to add to CLOCK_MONOTONIC (the program's clock) to get the Unix time.
fn monotonic_to_unix_ns() -> i128 {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid timespec to write.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    let mono = read(libc::CLOCK_MONOTONIC);
    read(libc::CLOCK_REALTIME) - mono
}

/// Asks the ledger's owner, the only writer of `CONFIG`, to switch the program's capture.
async fn switch(updates: &mpsc::Sender<Update>, on: bool) -> Result<(), String> {
    let (reply, rx) = oneshot::channel();
    updates
        .send(Update::Capture { on, reply })
        .await
        .map_err(|_| "the agent is stopping".to_owned())?;
    match rx.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(ChangeError::Refused(e) | ChangeError::Failed(e))) => Err(e),
        Err(_) => Err("the agent is stopping".to_owned()),
    }
}

/// Switches the capture off if a session ends without doing it (the agent stopping, the
/// session's task aborted): the program outlives the agent, and must not go on copying.
struct SwitchOff {
    updates: Option<mpsc::Sender<Update>>,
}

impl Drop for SwitchOff {
    fn drop(&mut self) {
        if let Some(updates) = self.updates.take() {
            let (reply, _) = oneshot::channel();
            let _ = updates.try_send(Update::Capture { on: false, reply });
        }
    }
}

/// What a session needs from the agent.
pub struct SessionContext<'a> {
    pub service: &'a CaptureService,
    pub snapshots: &'a tokio::sync::watch::Receiver<Arc<Snapshot>>,
    pub updates: &'a mpsc::Sender<Update>,
    /// The control protocol's line for a successful answer carrying this value: the
    /// session's first line, before the frames (the protocol is the control socket's).
    pub ok_line: fn(serde_json::Value) -> Vec<u8>,
}

/// Why a session did not start.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Spec(#[from] SpecError),
    #[error("a capture is already running (one at a time); stop it first")]
    Busy,
    #[error("cannot start the capture: {0}")]
    Failed(String),
}

/// Runs one capture: switches it on, streams what the program copies to `out` (the answer
/// line first, see the module's doc), and switches it off however it ends.
pub async fn session<R, W>(
    ctx: SessionContext<'_>,
    spec: &CaptureSpec,
    mut client: R,
    out: &mut W,
) -> Result<Summary, SessionError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let plan = spec.plan()?;
    let Ok(mut inner) = ctx.service.inner.try_lock() else {
        return Err(SessionError::Busy);
    };
    let Inner { tap, ring } = &mut *inner;
    let mut stale = 0;
    while ring.get_mut().next().is_some() {
        stale += 1;
    }
    if stale > 0 {
        tracing::debug!(stale, "capture: dropped records left by an earlier capture");
    }
    let fail = |e: crate::dataplane::DataplaneError| SessionError::Failed(crate::error_chain(&e));
    let before = tap.budget().map_err(fail)?;
    tap.set(plan.config).map_err(fail)?;
    let mut guard = SwitchOff {
        updates: Some(ctx.updates.clone()),
    };
    if let Err(e) = switch(ctx.updates, true).await {
        guard.updates = None;
        let _ = tap.set(CaptureConfig::default());
        return Err(SessionError::Failed(e));
    }
    tracing::info!(verdicts = ?spec.verdicts, source = ?spec.source, count = ?spec.count, "capture started");
    let started = Started {
        snaplen: plan.config.snaplen,
        per_sec: plan.config.per_sec,
        verdicts: spec.verdicts.clone(),
        source: spec.source.clone(),
        ifaces: ctx.service.ifaces.clone(),
    };
    let mut summary = Summary::default();
    let head = (ctx.ok_line)(serde_json::to_value(&started).unwrap_or_default());
    summary.ended = match out.write_all(&head).await {
        Err(_) => "client gone".into(),
        Ok(()) => stream(&plan, &ctx, ring, &mut client, out, &mut summary).await,
    };
    guard.updates = None;
    if let Err(e) = switch(ctx.updates, false).await {
        tracing::warn!(error = %e, "capture: cannot switch the program's capture off");
    }
    let _ = tap.set(CaptureConfig::default());
    if let Ok(after) = tap.budget() {
        summary.over_cap = after.over_cap.saturating_sub(before.over_cap);
        summary.lost = after.lost.saturating_sub(before.lost);
    }
    tracing::info!(
        captured = summary.captured,
        over_cap = summary.over_cap,
        lost = summary.lost,
        ended = %summary.ended,
        "capture ended"
    );
    let body = serde_json::to_vec(&summary).unwrap_or_default();
    // The summary too must not wait on a client that stopped reading: the session (and
    // with it the next capture) would be held for as long as the client sleeps.
    if summary.ended == STALLED {
        return Ok(summary);
    }
    let _ = tokio::time::timeout(CLIENT_STALLED, async {
        out.write_all(&frame(TAG_SUMMARY, &body)).await?;
        out.flush().await
    })
    .await;
    Ok(summary)
}

/// Streams packets until the count is reached, the client stops or goes; returns why it
/// ended.
async fn stream<R, W>(
    plan: &Plan,
    ctx: &SessionContext<'_>,
    ring: &mut AsyncFd<RingBuf<MapData>>,
    client: &mut R,
    out: &mut W,
    summary: &mut Summary,
) -> String
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut line = String::new();
    loop {
        tokio::select! {
            read = client.read_line(&mut line) => {
                return match read {
                    Ok(0) | Err(_) => "client gone".into(),
                    Ok(_) if line.trim() == "stop" => "stopped".into(),
                    Ok(_) => format!("unexpected client message {:?}", line.trim()),
                };
            }
            guard = ring.readable_mut() => {
                let Ok(mut guard) = guard else {
                    return "cannot wait on the capture ring buffer".into();
                };
                // Cleared before draining: a record committed meanwhile wakes us again.
                guard.clear_ready();
                let offset = monotonic_to_unix_ns();
                let snapshot = ctx.snapshots.borrow().clone();
                let mut batch = Vec::new();
                while let Some(item) = guard.get_inner_mut().next() {
                    let Some((record, captured)) = decode_record(&item) else { continue };
                    let Some(verdict) = Verdict::ALL.into_iter().find(|v| *v as u32 == record.verdict) else {
                        continue;
                    };
                    let data = &record.data[..captured];
                    let sources = frame_source(data)
                        .map(|addr| sources_of(&snapshot, addr))
                        .unwrap_or_default();
                    if plan.source.as_ref().is_some_and(|s| !sources.contains(s)) {
                        summary.other_sources += 1;
                        continue;
                    }
                    if plan.count.is_some_and(|c| summary.captured >= c) {
                        continue;
                    }
                    let packet = Packet {
                        ts_unix_ns: (i128::from(record.ts_ns) + offset).max(0) as u64,
                        len: record.len,
                        ifindex: record.ifindex,
                        verdict,
                        sources: sources.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                        data: data.to_vec(),
                    };
                    batch.extend_from_slice(&frame(TAG_PACKET, &packet.encode()));
                    summary.captured += 1;
                }
                if !batch.is_empty() {
                    // A client that stops reading (Ctrl-Z) blocks the session, not the
                    // agent: the ring buffer fills and the program counts what it loses;
                    // and after CLIENT_STALLED the session ends, so that the next capture
                    // is not refused as busy for as long as the client sleeps.
                    let sent = async {
                        out.write_all(&batch).await?;
                        out.flush().await
                    };
                    match tokio::time::timeout(CLIENT_STALLED, sent).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return "client gone".into(),
                        Err(_) => {
                            tracing::info!(after = ?CLIENT_STALLED, "capture: the client stopped reading; ending the capture");
                            return STALLED.into();
                        }
                    }
                }
                if plan.count.is_some_and(|c| summary.captured >= c) {
                    return "count".into();
                }
            }
            // Nothing to read for a while: look again, in case a wakeup was missed.
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CaptureSpec {
        CaptureSpec {
            verdicts: vec![CaptureVerdict::Dropped, CaptureVerdict::Observed],
            source: Some("list:voipbl".into()),
            count: Some(10),
            snaplen: 0,
            per_sec: DEFAULT_PER_SEC,
        }
    }

    #[test]
    fn a_spec_becomes_the_programs_settings() {
        let plan = spec().plan().expect("valid");
        assert_eq!(
            plan.config.verdicts,
            1 << Verdict::Dropped as u32 | 1 << Verdict::Observed as u32
        );
        assert_eq!(plan.config.snaplen, capture::SNAPLEN as u32);
        assert_eq!(plan.source, Some(SourceId::List("voipbl".into())));
        assert_eq!(effective_snaplen(96), 96);
        assert_eq!(effective_snaplen(65535), capture::SNAPLEN as u32);
    }

    #[test]
    fn bad_specs_say_what_to_give() {
        let mut s = spec();
        s.verdicts.clear();
        assert_eq!(s.plan(), Err(SpecError::NoVerdict));
        let mut s = spec();
        s.per_sec = 0;
        assert_eq!(s.plan(), Err(SpecError::Rate(0)));
        s.per_sec = capture::MAX_PER_SEC + 1;
        assert!(s.plan().is_err());
        let mut s = spec();
        s.count = Some(0);
        assert_eq!(s.plan(), Err(SpecError::Count));
        let mut s = spec();
        s.source = Some("nosuch".into());
        assert!(matches!(s.plan(), Err(SpecError::Source(_))));
    }

    #[test]
    fn packets_survive_the_wire() {
        let p = Packet {
            ts_unix_ns: 1_765_000_000_123_456_789,
            len: 1500,
            ifindex: 7,
            verdict: Verdict::Observed,
            sources: "apiban,list:voipbl".into(),
            data: vec![1, 2, 3],
        };
        assert_eq!(Packet::decode(&p.encode()), Some(p.clone()));
        assert_eq!(Packet::decode(&p.encode()[..packet::PACKET_HEAD - 1]), None);
        let framed = frame(TAG_PACKET, &p.encode());
        assert_eq!(framed[0], TAG_PACKET);
        assert_eq!(
            u32::from_le_bytes(framed[1..5].try_into().expect("4 bytes")) as usize,
            framed.len() - 5
        );
    }

    #[test]
    fn frame_sources_behind_vlan_tags() {
        let mut v4 = vec![0u8; 12];
        v4.extend_from_slice(&[0x81, 0x00, 0, 1, 0x08, 0x00]);
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[12..16].copy_from_slice(&[45, 95, 0, 1]);
        v4.extend_from_slice(&ip);
        assert_eq!(
            frame_source(&v4),
            Some("45.95.0.1".parse().expect("literal"))
        );
        assert_eq!(frame_source(&v4[..30]), None);
        let mut v6 = vec![0u8; 12];
        v6.extend_from_slice(&[0x86, 0xdd]);
        let mut ip = [0u8; 40];
        ip[8..24].copy_from_slice(
            &"2001:db8::66"
                .parse::<Ipv6Addr>()
                .expect("literal")
                .octets(),
        );
        v6.extend_from_slice(&ip);
        assert_eq!(
            frame_source(&v6),
            Some("2001:db8::66".parse().expect("literal"))
        );
        assert_eq!(frame_source(&[0u8; 10]), None);
    }

    #[test]
    fn a_packet_reads_like_a_tcpdump_line() {
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        let payload = b"OPTIONS sip:100@192.0.2.1 SIP/2.0\r\nVia: x\r\n\r\n";
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[45, 95, 0, 1]);
        ip[16..20].copy_from_slice(&[192, 0, 2, 1]);
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&[0x13, 0xc4, 0x13, 0xc4, 0, 0, 0, 0]);
        frame.extend_from_slice(payload);
        let p = Packet {
            ts_unix_ns: 86_400 * 1_000_000_000 + 3_723_000_456_000,
            len: frame.len() as u32,
            ifindex: 3,
            verdict: Verdict::Dropped,
            sources: "apiban".into(),
            data: frame,
        };
        let ifaces = BTreeMap::from([(3, "eth0".to_owned())]);
        assert_eq!(
            describe(&p, &ifaces),
            format!(
                "01:02:03.000456 eth0 dropped 45.95.0.1:5060 > 192.0.2.1:5060 UDP {} bytes \
                 \"OPTIONS sip:100@192.0.2.1 SIP/2.0\" [apiban]",
                p.len
            )
        );
        let cut = Packet {
            data: p.data[..20].to_vec(),
            sources: String::new(),
            ..p
        };
        assert_eq!(
            describe(&cut, &BTreeMap::new()),
            format!("01:02:03.000456 if3 dropped ? > ? not IP {} bytes", cut.len)
        );
    }

    #[test]
    fn records_shorter_than_a_record_are_refused() {
        assert!(decode_record(&[0u8; 16]).is_none());
        let mut record = CaptureRecord::zeroed();
        record.captured = 99_999;
        // SAFETY: CaptureRecord is repr(C) plain data without padding.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw const record).cast::<u8>(),
                std::mem::size_of::<CaptureRecord>(),
            )
        };
        assert_eq!(decode_record(bytes).map(|(_, n)| n), Some(capture::SNAPLEN));
    }
}
