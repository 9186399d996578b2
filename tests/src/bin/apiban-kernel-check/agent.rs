//! The real agent on the guest's kernel, as an operator starts it: on a veth pair made with
//! iproute2's `ip`, its feature lines on stderr, `status --json`, a ban enforced on a frame
//! sent from the peer, still enforced with the agent stopped, the next agent adopting the
//! maps; and, where the kernel lacks detection, `--detect enforce` refused with the kernel
//! it needs named. Runs when the initramfs carries /apiban (the compat
//! check's guests).

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use apiban::dataplane::kernel::{Feature, KernelFeatures};
use tests::{PacketSocket, frame::Frame};

pub const AGENT: &str = "/apiban";
const IFACE: &str = "apb0";
const PEER: &str = "apb1";
const SOCKET: &str = "/run/apiban.sock";
const BANNED: &str = "203.0.113.9";
/// Software emulation is slow: a start that takes a second on the host takes several here.
const START_TIMEOUT: Duration = Duration::from_secs(120);

pub fn check(kernel: &KernelFeatures) -> Result<String, String> {
    load_module("/veth.ko")?;
    for args in [
        &["link", "set", "lo", "up"][..],
        &["link", "add", IFACE, "type", "veth", "peer", "name", PEER],
        &["link", "set", IFACE, "up"],
        &["link", "set", PEER, "up"],
    ] {
        run("/ip", args)?;
    }
    let refused = if kernel.has(Feature::Detection) {
        None
    } else {
        Some(refuses_detection()?)
    };
    let mut agent = Agent::start("/tmp/agent.log")?;
    let outcome = enforce(kernel, &mut agent);
    let log = agent.stop();
    let dropped = outcome.map_err(|e| format!("{e}; the agent's log:\n{log}"))?;
    // Stopped, the agent leaves the program attached and enforcing; the next one takes its
    // maps from the pins and swaps its program in.
    enforced_without_agent()?;
    let mut next = Agent::start("/tmp/agent-next.log")?;
    let ready = next.wait_ready();
    let next_log = next.stop();
    ready.map_err(|e| format!("the second agent: {e}:\n{next_log}"))?;
    if !next_log.contains("adopted=from the pins") {
        return Err(format!(
            "the second agent did not adopt the first one's maps:\n{next_log}"
        ));
    }
    for line in log.lines().filter(|l| l.contains("kernel feature")) {
        println!("apiban-kernel-check: agent: {line}");
    }
    for state in kernel.report() {
        let line = match state.enabled {
            true => "kernel feature on".to_owned(),
            false => "kernel feature off".to_owned(),
        };
        let said = log
            .lines()
            .any(|l| l.contains(&line) && l.contains(&format!("feature={} ", state.feature)));
        if !said {
            return Err(format!(
                "the agent did not log `{line}` for {}:\n{log}",
                state.feature
            ));
        }
    }
    Ok(format!(
        "the agent enforced a ban (frames dropped on {IFACE}: {dropped}), the program kept \
         enforcing it with the agent stopped, the next agent adopted its maps{}",
        refused.map_or(String::new(), |r| format!(
            "; --detect enforce refused: {r}"
        ))
    ))
}

/// `--detect enforce` on a kernel without detection: the agent exits, naming the kernel.
fn refuses_detection() -> Result<String, String> {
    let out = Command::new(AGENT)
        .args(["run", "--iface", IFACE, "--detect", "enforce"])
        .args([
            "--state-dir",
            "/tmp/refused",
            "--control-socket",
            "/run/refused.sock",
        ])
        .args(["--bpffs-dir", "/sys/fs/bpf/refused"])
        .output()
        .map_err(|e| format!("cannot start {AGENT}: {e}"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !err.contains("needs Linux 5.18 or newer") {
        return Err(format!(
            "--detect enforce on a kernel without detection: {}, stderr:\n{err}",
            out.status
        ));
    }
    let why = err
        .lines()
        .rev()
        .find(|l| l.contains("needs Linux"))
        .unwrap_or_default()
        .trim();
    Ok(why.to_owned())
}

/// Bans an address, sends frames from it, and reads the drops off `status`; checks that the
/// status reports the probe's features.
fn enforce(kernel: &KernelFeatures, agent: &mut Agent) -> Result<u64, String> {
    agent.wait_ready()?;
    cli(&["ban", BANNED])?;
    let status = json(&cli(&["status", "--json"])?)?;
    let reported: Vec<apiban::dataplane::kernel::FeatureState> =
        serde_json::from_value(status["agent"]["features"].clone())
            .map_err(|e| format!("status has no features: {e}"))?;
    if reported != kernel.report() {
        return Err(format!(
            "status reports features {reported:?}, the probe {:?}",
            kernel.report()
        ));
    }
    let frame = Frame::udp(
        BANNED.parse().expect("literal"),
        "192.0.2.1".parse().expect("literal"),
        5060,
    )
    .build();
    let peer = PacketSocket::open_here(PEER, (libc::ETH_P_ALL as u16).to_be());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        peer.send(&frame);
        let status = json(&cli(&["status", "--json"])?)?;
        let dropped = status["traffic"][IFACE]["dropped"]["packets"]
            .as_u64()
            .unwrap_or(0);
        if dropped > 0 {
            return Ok(dropped);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no frame from {BANNED} was dropped on {IFACE} within 30 s: {}",
                status["traffic"]
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// With no agent running, frames from the banned address still never reach the interface's
/// packet sockets (XDP runs first), while a clean source's do.
fn enforced_without_agent() -> Result<(), String> {
    let clean = "198.51.100.20";
    let frame = |src: &str| {
        Frame::udp(
            src.parse().expect("literal"),
            "192.0.2.1".parse().expect("literal"),
            5060,
        )
        .build()
    };
    let all = (libc::ETH_P_ALL as u16).to_be();
    let (peer, here) = (
        PacketSocket::open_here(PEER, all),
        PacketSocket::open_here(IFACE, all),
    );
    let mut seen = std::collections::HashMap::new();
    for _ in 0..5 {
        peer.send(&frame(BANNED));
        peer.send(&frame(clean));
        std::thread::sleep(Duration::from_millis(100));
        here.drain_into(&mut seen);
    }
    let count = |a: &str| seen.get(&a.parse().expect("literal")).copied().unwrap_or(0);
    if count(BANNED) != 0 || count(clean) == 0 {
        return Err(format!(
            "with the agent stopped, {IFACE} saw {} frames from {BANNED} (banned) and {} from \
             {clean} (clean)",
            count(BANNED),
            count(clean)
        ));
    }
    Ok(())
}

struct Agent {
    child: Child,
    log_path: &'static str,
}

impl Agent {
    fn start(log_path: &'static str) -> Result<Self, String> {
        let log = std::fs::File::create(log_path).map_err(|e| e.to_string())?;
        let child = Command::new(AGENT)
            .args(["run", "--iface", IFACE, "--state-dir", "/tmp/state"])
            .args(["--control-socket", SOCKET])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {AGENT}: {e}"))?;
        Ok(Self { child, log_path })
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        while !Path::new(SOCKET).exists() {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("the agent exited at start: {st}"));
            }
            if Instant::now() > deadline {
                return Err(format!("no control socket within {START_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// SIGTERM, then its log.
    fn stop(mut self) -> String {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(self.log_path).unwrap_or_default()
    }
}

fn cli(args: &[&str]) -> Result<String, String> {
    let out = Command::new(AGENT)
        .args(args)
        .env("APIBAN_CONTROL_SOCKET", SOCKET)
        .output()
        .map_err(|e| format!("cannot run apiban {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "apiban {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn json(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON ({e}): {text}"))
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// finit_module(2) of a module file; one already loaded (or built in) is fine.
fn load_module(path: &str) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    use std::os::fd::AsRawFd as _;
    // SAFETY: a valid fd and an empty NUL-terminated parameter string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), 0) };
    let err = std::io::Error::last_os_error();
    if rc != 0 && err.raw_os_error() != Some(libc::EEXIST) {
        return Err(format!("cannot load {path}: {err}"));
    }
    Ok(())
}
