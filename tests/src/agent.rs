//! The real `apiban` binary as a child process: built once per test binary, killed and its
//! pins removed on drop, so a failing test leaves no agent, socket or XDP program behind.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use crate::{Netns, in_netns};

static BIN: OnceLock<PathBuf> = OnceLock::new();

/// Use this `apiban` binary instead of building one (the demo runs the release build).
pub fn use_apiban_bin(path: PathBuf) {
    let _ = BIN.set(path);
}

/// The `apiban` binary of this workspace, built (debug) on first use.
pub fn apiban_bin() -> &'static Path {
    BIN.get_or_init(|| build_apiban(false))
}

/// Builds the `apiban` binary (debug or release) and returns its path. Cargo sets CARGO for
/// the tests and benches it runs, so this builds with the same toolchain and target directory.
pub fn build_apiban(release: bool) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut args = vec!["build", "--quiet", "-p", "apiban-user", "--bin", "apiban"];
    if release {
        args.push("--release");
    }
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args(&args)
        .status()
        .expect("run cargo build for the apiban binary");
    assert!(status.success(), "building the apiban binary failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let bin = target
        .join(if release { "release" } else { "debug" })
        .join("apiban");
    assert!(bin.exists(), "{} was not built", bin.display());
    bin
}

/// Runs an `apiban` client command and returns its output.
pub fn apiban(args: &[&str]) -> Output {
    apiban_env(args, &[])
}

/// [`apiban`] with environment variables set (and no APIBAN_* inherited from the caller).
pub fn apiban_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(apiban_bin());
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("APIBAN_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied()).output().expect("run apiban")
}

/// Runs an `apiban` command inside network namespace `ns` only (as the agent runs in the
/// tests), e.g. `apiban detach`, which works on that namespace's interfaces.
pub fn apiban_in(ns: &Netns, args: &[&str]) -> Output {
    let mut cmd = Command::new(apiban_bin());
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("APIBAN_") {
            cmd.env_remove(k);
        }
    }
    let ns_file = std::fs::File::open(ns.path()).expect("open the netns");
    enter_netns_before_exec(&mut cmd, Some(&ns_file));
    cmd.output().expect("run apiban")
}

/// Makes `cmd`'s child enter `netns` (network namespace only) and start with no signals
/// blocked, right before it execs. The file must stay open until the child is spawned.
fn enter_netns_before_exec(cmd: &mut Command, netns: Option<&std::fs::File>) {
    use std::os::unix::process::CommandExt as _;
    let ns_fd = netns.map(std::os::fd::AsRawFd::as_raw_fd);
    // SAFETY: setns and sigprocmask are async-signal-safe; the caller keeps the fd open
    // until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            // The caller may block signals (the demo does, to clean up on Ctrl-C); the
            // agent must get SIGTERM and SIGHUP like under systemd.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if let Some(fd) = ns_fd
                && libc::setns(fd, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Like [`apiban`], but panics with stderr unless the command succeeds; returns stdout.
pub fn apiban_ok(args: &[&str]) -> String {
    let out = apiban(args);
    assert!(
        out.status.success(),
        "apiban {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running `apiban run`; SIGKILLed on drop unless stopped first.
pub struct AgentProcess {
    child: Option<Child>,
    pub control_socket: PathBuf,
    pub log: PathBuf,
}

impl AgentProcess {
    /// Starts `apiban run <args>` inside `netns` (or the host namespace), logging to a file,
    /// and waits until its control socket answers.
    pub fn start(
        netns: Option<&Netns>,
        control_socket: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_wrapped(&[], netns, control_socket, args, env)
    }

    /// Like [`AgentProcess::start`], with the agent run by `wrapper` (e.g. setpriv with the
    /// systemd unit's capabilities).
    pub fn start_wrapped(
        wrapper: &[&str],
        netns: Option<&Netns>,
        control_socket: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", crate::unique_name("apiban-agent-")));
        let log_file = std::fs::File::create(&log).expect("agent log file");
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(apiban_bin());
                c
            }
            None => Command::new(apiban_bin()),
        };
        // Enter only the network namespace, unless the wrapper does it (`ip netns exec`).
        let ns_file = netns.map(|ns| std::fs::File::open(ns.path()).expect("open the netns"));
        enter_netns_before_exec(&mut cmd, ns_file.as_ref());
        cmd.arg("run")
            .args(["--control-socket", &control_socket.display().to_string()])
            .args(args)
            .env_remove("APIBAN_KEY")
            .env_remove("APIBAN_CONFIG")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start apiban run");
        drop(ns_file);
        let mut agent = Self {
            child: Some(child),
            control_socket: control_socket.to_path_buf(),
            log,
        };
        agent.wait_ready(Duration::from_secs(30));
        agent
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let sock = self.control_socket.display().to_string();
            if apiban(&["status", "--json", "--control-socket", &sock])
                .status
                .success()
            {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("apiban run exited with {status}:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "apiban run not ready after {timeout:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGTERM, then waits for a clean exit; returns the exit status code.
    pub fn stop(self) -> Option<i32> {
        self.stop_with_log().0
    }

    /// SIGTERM, then waits for a clean exit; returns the exit status code and the log.
    pub fn stop_with_log(mut self) -> (Option<i32>, String) {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait for apiban") {
                return (status.code(), self.log_text());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("apiban did not stop on SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `apiban <args> --control-socket <this agent's>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let sock = self.control_socket.display().to_string();
        let mut full = args.to_vec();
        full.extend_from_slice(&["--control-socket", &sock]);
        apiban(&full)
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "apiban {} failed: {}\nagent log:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn status_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.cli_ok(&["status", "--json"])).expect("status is JSON")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.control_socket);
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// GET over plain HTTP/1.1 from inside `netns` (or the host); returns (status code, body).
pub fn http_get(netns: Option<&Netns>, addr: SocketAddr, path: &str) -> (u16, String) {
    let r = http_request(netns, addr, "GET", path, &[]);
    (r.code, r.body)
}

/// What [`http_request`] got back.
#[derive(Debug)]
pub struct HttpResponse {
    pub code: u16,
    /// The status line and headers, as sent.
    pub head: String,
    pub body: String,
}

impl HttpResponse {
    /// A header's value (names compared without case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One HTTP/1.1 request with `headers`, over a connection the server closes.
pub fn http_request(
    netns: Option<&Netns>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    let send = move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(request.as_bytes()).expect("send request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read response");
        let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status code");
        HttpResponse {
            code,
            head: head.to_owned(),
            body: body.to_owned(),
        }
    };
    match netns {
        Some(ns) => in_netns(ns, send),
        None => send(),
    }
}

/// Whether the dataplane drops `addr` now, through the control socket: cheap enough to poll.
/// (The ledger's record of a ban, which `check`'s records come from, is published once the
/// owner has also saved the state, a moment later: see `Scene::check_recorded`.)
pub fn banned(socket: &Path, addr: impl std::fmt::Display) -> bool {
    control_request(socket, &format!(r#"{{"op":"check","addr":"{addr}"}}"#))
        .contains(r#""verdict":"banned""#)
}

/// One request on a control socket, as `apiban` sends it (a JSON line, then end of input);
/// the raw answer.
pub fn control_request(socket: &Path, request: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("control socket");
    stream
        .write_all(format!("{request}\n").as_bytes())
        .expect("send the request");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("end the request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    answer
}
