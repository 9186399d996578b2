//! Real SIP tools as peers: SIPVicious (the scanner attackers run) and SIPp (a flood, or a
//! customer's PBX at a normal pace), each started in a namespace from an address of its own
//! and killed when its guard drops.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::Netns;

/// A SIPVicious command, from the virtualenv `cargo xtask test` installs it into.
pub fn sipvicious(tool: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-tools/sipvicious/bin")
        .join(format!("sipvicious_{tool}"));
    assert!(
        bin.exists(),
        "{} is missing: `cargo xtask test` installs SIPVicious from PyPI into \
         target/test-tools/sipvicious (or run: python3 -m venv target/test-tools/sipvicious \
         && target/test-tools/sipvicious/bin/pip install sipvicious==0.3.8)",
        bin.display()
    );
    bin
}

/// A SIPVicious command whose requests carry `user_agent` instead of its own
/// `friendly-scanner`, as an attacker who edits one line of it sends them: a copy of the
/// installed package under `dir` with that default changed, and a launcher for `tool`.
pub fn sipvicious_with_user_agent(dir: &Path, tool: &str, user_agent: &str) -> PathBuf {
    let venv = sipvicious(tool)
        .parent()
        .and_then(Path::parent)
        .expect("the virtualenv")
        .to_path_buf();
    let site = std::fs::read_dir(venv.join("lib"))
        .expect("the virtualenv's lib")
        .flatten()
        .map(|e| e.path().join("site-packages/sipvicious"))
        .find(|p| p.exists())
        .expect("the installed sipvicious package");
    let root = dir.join("sipvicious-patched");
    copy_tree(&site, &root.join("sipvicious"));
    let helper = root.join("sipvicious/libs/svhelper.py");
    let text = std::fs::read_to_string(&helper).expect("svhelper.py");
    let patched = text.replace(
        "useragent='friendly-scanner'",
        &format!("useragent='{user_agent}'"),
    );
    assert_ne!(
        text, patched,
        "svhelper.py no longer sets friendly-scanner as its default"
    );
    std::fs::write(&helper, patched).expect("patch svhelper.py");
    let launcher = root.join(format!("sipvicious_{tool}"));
    std::fs::write(
        &launcher,
        format!(
            "#!{}\nimport sys\nsys.path.insert(0, {:?})\nfrom sipvicious.{tool} import main\nsys.exit(main())\n",
            venv.join("bin/python3").display(),
            root.display().to_string()
        ),
    )
    .expect("write the launcher");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&launcher, std::fs::Permissions::from_mode(0o755))
        .expect("make the launcher executable");
    launcher
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create a directory");
    for entry in std::fs::read_dir(from).expect("read a directory").flatten() {
        let path = entry.path();
        if entry.file_name() == "__pycache__" {
            continue;
        }
        if path.is_dir() {
            copy_tree(&path, &to.join(entry.file_name()));
        } else {
            std::fs::copy(&path, to.join(entry.file_name())).expect("copy a file");
        }
    }
}

/// SIPp, from Debian's `sip-tester`.
pub fn sipp() -> PathBuf {
    let bin = PathBuf::from("/usr/bin/sipp");
    assert!(
        bin.exists(),
        "sipp is missing: `cargo xtask test` installs it (Debian: apt-get install sip-tester)"
    );
    bin
}

/// A tool running in a namespace; killed (its whole process group) on drop.
pub struct Tool {
    child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Tool {
    /// Starts `program args` in `ns`, its output in `log`.
    pub fn start(ns: &Netns, program: &Path, args: &[&str], log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).expect("a log file");
        let err = out.try_clone().expect("a log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Self {
            child,
            log,
            name: program
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// Waits for it to exit on its own, up to `timeout`; its exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "{} still runs after {timeout:?}:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `sig` to its process group, as a terminal's Ctrl-C does.
    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling the process group this guard started.
        unsafe { libc::kill(-(self.child.id() as i32), sig) };
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        // SAFETY: signalling the process group this guard started.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A SIPp scenario that sends one `method` request per call and expects nothing back, with
/// `user_agent`; the target user is `user` (with `[call_number]` for one per call). With
/// `again_after_ms`, the call sends it a second time after that pause (a re-registration).
pub fn sipp_scenario(
    method: &str,
    user: &str,
    user_agent: &str,
    again_after_ms: Option<u32>,
) -> String {
    let request = sipp_request(method, user, user_agent);
    let again = again_after_ms.map_or(String::new(), |ms| {
        format!("  <pause milliseconds=\"{ms}\"/>\n{request}")
    });
    format!(
        r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="{method} without answers">
{request}{again}</scenario>
"#
    )
}

fn sipp_request(method: &str, user: &str, user_agent: &str) -> String {
    format!(
        r#"  <send>
    <![CDATA[

      {method} sip:{user}@[remote_ip] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:pbx@[local_ip]>;tag=[call_number]
      To: <sip:{user}@[remote_ip]>
      Call-ID: [call_id]
      CSeq: 1 {method}
      Contact: <sip:pbx@[local_ip]:[local_port]>
      Max-Forwards: 70
      User-Agent: {user_agent}
      Expires: 120
      Content-Length: 0

    ]]>
  </send>
"#
    )
}

/// A SIP server for scanners to talk to: it answers OPTIONS with 200, requests for
/// extensions 100-105 with a 401 digest challenge and others with 404 (so that svwar and
/// svcrack carry on as against a real PBX), and counts requests per source.
pub struct SipResponder {
    pub addr: SocketAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SipResponder {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let counts: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, bound) = std::sync::mpsc::channel();
        let thread = crate::spawn_in_netns(ns, {
            let (counts, stop) = (counts.clone(), stop.clone());
            move || {
                let socket = UdpSocket::bind(addr).expect("bind the SIP responder");
                socket
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("a read timeout");
                let _ = ready.send(());
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    *counts
                        .lock()
                        .expect("not poisoned")
                        .entry(from.ip())
                        .or_default() += 1;
                    if let Some(answer) = answer(&buf[..n]) {
                        let _ = socket.send_to(answer.as_bytes(), from);
                    }
                }
            }
        });
        bound
            .recv_timeout(Duration::from_secs(5))
            .expect("the SIP responder is up");
        Self {
            addr,
            counts,
            stop,
            thread: Some(thread),
        }
    }

    /// Requests that reached it from `from`.
    pub fn count(&self, from: IpAddr) -> usize {
        self.counts
            .lock()
            .expect("not poisoned")
            .get(&from)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for SipResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The response to a request, its dialog headers copied back.
fn answer(request: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(request).ok()?;
    let method = text.split(' ').next()?;
    if method.starts_with("SIP/") || method == "ACK" {
        return None;
    }
    let copied: String = text
        .lines()
        .filter(|l| {
            let name = l.split(':').next().unwrap_or_default().to_ascii_lowercase();
            matches!(
                name.as_str(),
                "via" | "from" | "call-id" | "cseq" | "v" | "f" | "i"
            )
        })
        .map(|l| format!("{l}\r\n"))
        .collect();
    let to = text
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("to:") || l.starts_with("t:"))
        .map(|l| format!("{};tag=apiban-test\r\n", l.trim_end()))
        .unwrap_or_default();
    // Extensions 100-105 exist (a challenge); others do not, so that svwar carries on.
    let exists = (100..=105).any(|ext| to.contains(&format!("sip:{ext}@")));
    let (status, extra) = if method == "OPTIONS" {
        ("200 OK", String::new())
    } else if !exists {
        ("404 Not Found", String::new())
    } else {
        (
            "401 Unauthorized",
            "WWW-Authenticate: Digest realm=\"apiban-test\", nonce=\"4f6e63655f617069\", algorithm=MD5\r\n".to_owned(),
        )
    };
    Some(format!(
        "SIP/2.0 {status}\r\n{copied}{to}{extra}Server: apiban-test-pbx\r\nContent-Length: 0\r\n\r\n"
    ))
}
