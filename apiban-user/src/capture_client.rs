//! `apiban capture`: asks the agent for a capture and writes what it streams, as a pcap file
//! (`-w FILE`, or `-w -` for a pipe into `tshark -r -`) or as one line per packet.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use apiban::{
    capture::{self, CaptureSpec, Packet, Started, Summary, TAG_PACKET, TAG_SUMMARY},
    control::{self, ControlError, Request},
};
use pcap_file::{
    DataLink, Endianness, TsResolution,
    pcap::{PcapHeader, PcapPacket, PcapWriter},
};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

/// How long the agent has to answer the request, and to end after `stop`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// No message is larger: a packet's header, its sources and a frame.
const MAX_MESSAGE: usize = 1 << 20;

/// Where the packets go. The pcap goes to an unbuffered file (stdout's descriptor for `-`):
/// each packet reaches a reader at the other end of a pipe as it comes.
enum Sink {
    Pcap(PcapWriter<std::fs::File>),
    Lines(std::io::Stdout),
}

impl Sink {
    fn open(write: Option<&Path>, snaplen: u32) -> anyhow::Result<Self> {
        use std::os::fd::AsFd as _;
        let out = match write {
            None => return Ok(Sink::Lines(std::io::stdout())),
            Some(p) if p == Path::new("-") => std::fs::File::from(
                std::io::stdout()
                    .as_fd()
                    .try_clone_to_owned()
                    .context("cannot use stdout")?,
            ),
            // The packets are SIP with its digests and numbers: readable by the one who
            // asked for them, whatever the umask.
            Some(p) => {
                use std::os::unix::fs::OpenOptionsExt as _;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(p)
                    .with_context(|| format!("cannot create {}", p.display()))?
            }
        };
        let header = PcapHeader {
            version_major: 2,
            version_minor: 4,
            ts_correction: 0,
            ts_accuracy: 0,
            snaplen,
            datalink: DataLink::ETHERNET,
            ts_resolution: TsResolution::NanoSecond,
            endianness: Endianness::native(),
        };
        let writer =
            PcapWriter::with_header(out, header).context("cannot write the pcap header")?;
        Ok(Sink::Pcap(writer))
    }

    fn write(&mut self, p: &Packet, started: &Started) -> std::io::Result<()> {
        match self {
            Sink::Pcap(w) => {
                let packet = PcapPacket::new(Duration::from_nanos(p.ts_unix_ns), p.len, &p.data);
                match w.write_packet(&packet) {
                    Ok(_) => Ok(()),
                    Err(pcap_file::PcapError::IoError(e)) => Err(e),
                    Err(e) => Err(std::io::Error::other(e)),
                }
            }
            Sink::Lines(out) => writeln!(out, "{}", capture::describe(p, &started.ifaces)),
        }
    }
}

pub async fn run(socket: &Path, spec: CaptureSpec, write: Option<PathBuf>) -> anyhow::Result<()> {
    // Checked here too, so a typo is a usage error before anything is asked of the agent.
    spec.plan()
        .map_err(|e| ControlError::Refused(e.to_string()))?;
    let asked_snaplen = spec.snaplen;
    let stream = control::connect(socket).await?;
    let (read, mut send) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = serde_json::to_vec(&Request::Capture(spec.clone()))?;
    line.push(b'\n');
    send.write_all(&line)
        .await
        .context("cannot send the capture request")?;
    let mut answer = String::new();
    tokio::time::timeout(ANSWER_TIMEOUT, read.read_line(&mut answer))
        .await
        .context("the agent did not answer the capture request")?
        .context("cannot read the agent's answer")?;
    let started: Started = serde_json::from_value(control::parse_response(answer.as_bytes())?)
        .context("the agent's answer to the capture request is not one this client knows")?;
    if asked_snaplen > started.snaplen {
        eprintln!(
            "apiban: snaplen {asked_snaplen} capped at {}: the XDP program copies at most that much",
            started.snaplen
        );
    }
    let mut sink = Sink::open(write.as_deref(), started.snaplen)?;
    eprintln!(
        "apiban: {}",
        describe_start(&started, spec.count, write.as_deref())
    );
    let mut stopping = false;
    let summary = loop {
        tokio::select! {
            message = read_message(&mut read) => {
                match message? {
                    (TAG_PACKET, body) => {
                        let packet = Packet::decode(&body)
                            .context("the agent sent a packet this client cannot read")?;
                        if let Err(e) = sink.write(&packet, &started) {
                            // A reader that went away (tshark done, `head`): stop cleanly.
                            if e.kind() != std::io::ErrorKind::BrokenPipe {
                                eprintln!("apiban: cannot write the capture: {e}");
                            }
                            stop(&mut send, &mut stopping).await;
                        }
                    }
                    (TAG_SUMMARY, body) => {
                        break serde_json::from_slice::<Summary>(&body)
                            .context("the agent's capture summary is not one this client knows")?;
                    }
                    (tag, _) => anyhow::bail!("the agent sent a message of unknown kind {tag}"),
                }
            }
            _ = tokio::signal::ctrl_c(), if !stopping => stop(&mut send, &mut stopping).await,
            () = tokio::time::sleep(ANSWER_TIMEOUT), if stopping => {
                anyhow::bail!("the agent did not end the capture within {}s of `stop`", ANSWER_TIMEOUT.as_secs())
            }
        }
    };
    eprintln!("apiban: {}", describe_summary(&summary));
    Ok(())
}

async fn stop(send: &mut tokio::net::unix::OwnedWriteHalf, stopping: &mut bool) {
    if !*stopping {
        *stopping = true;
        let _ = send.write_all(b"stop\n").await;
    }
}

async fn read_message(
    read: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> anyhow::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    read.read_exact(&mut head)
        .await
        .context("the agent ended the capture without a summary (did it stop?)")?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    anyhow::ensure!(
        len <= MAX_MESSAGE,
        "the agent sent a message of {len} bytes; this client expects at most {MAX_MESSAGE}"
    );
    let mut body = vec![0; len];
    read.read_exact(&mut body)
        .await
        .context("the capture stream broke off")?;
    Ok((head[0], body))
}

fn describe_start(started: &Started, count: Option<u64>, write: Option<&Path>) -> String {
    let verdicts: Vec<&str> = started
        .verdicts
        .iter()
        .map(|v| v.verdict().name())
        .collect();
    let ifaces: Vec<&str> = started.ifaces.values().map(String::as_str).collect();
    format!(
        "capturing {} packets{}{} on {}, {} bytes of each, at most {} a second, {}; Ctrl-C stops",
        verdicts.join(" and "),
        started
            .source
            .as_deref()
            .map(|s| format!(" of source {s}"))
            .unwrap_or_default(),
        count
            .map(|c| format!(" (the first {c})"))
            .unwrap_or_default(),
        if ifaces.is_empty() {
            "every interface".to_owned()
        } else {
            ifaces.join(", ")
        },
        started.snaplen,
        started.per_sec,
        match write {
            None => "one line each".to_owned(),
            Some(p) if p == Path::new("-") => "as pcap on stdout".to_owned(),
            Some(p) => format!("into {}", p.display()),
        }
    )
}

fn describe_summary(s: &Summary) -> String {
    let mut text = format!(
        "{} packet{} captured",
        s.captured,
        if s.captured == 1 { "" } else { "s" }
    );
    if s.other_sources > 0 {
        text.push_str(&format!("; {} of other sources left out", s.other_sources));
    }
    if s.over_cap > 0 {
        text.push_str(&format!("; {} over the rate cap not copied", s.over_cap));
    }
    if s.lost > 0 {
        text.push_str(&format!("; {} lost (the ring buffer was full)", s.lost));
    }
    text.push_str(match s.ended.as_str() {
        "count" => " (count reached)",
        "stopped" | "client gone" => "",
        _ => " (ended early)",
    });
    if !matches!(s.ended.as_str(), "count" | "stopped" | "client gone") {
        text.push_str(&format!(": {}", s.ended));
    }
    text
}
