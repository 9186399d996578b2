//! The control socket: how `apiban status|check|list|ban|unban|allow` talk to the running
//! agent. One JSON request line per connection, one JSON answer, then the agent closes.
//!
//! Reads are answered from the owner's latest snapshot and the maps' reader, without waiting
//! for the owner; changes are sent to the owner's inbox like any source's update and answered
//! after they are in the maps, saved and published.
//!
//! Who may do what is checked twice: by the file's mode (0600 in a 0700 directory, or 0660
//! and 0750 with the `--control-group`), and by the peer's credentials (SO_PEERCRED and
//! SO_PEERGROUPS): root and the agent's own user may do everything, the group's members may
//! only read (status, check, list, allow list), anyone else is told no.

use std::{
    io,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::{
    config,
    ledger::SourceId,
    status,
    sync::{self, Change, ChangeError, Update, send_change},
};

/// Requests are small; anything longer is not ours.
pub const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client has to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may take in all, answer included.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; past this the oldest is dropped (see `conn_slots`).
const MAX_CONNECTIONS: usize = 256;
/// Reads answered at once. A `list` of 100k entries is tens of milliseconds of encoding on the
/// runtime the sources and signals share; the rest wait their turn without taking it.
const CONCURRENT_READS: usize = 1;
/// Status lists this many banned sources by hits.
pub const TOP_SOURCES: usize = 10;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Check {
        addr: IpAddr,
    },
    List {
        source: Option<String>,
    },
    Ban {
        net: IpNet,
        ttl_secs: Option<u64>,
        comment: Option<String>,
        #[serde(default)]
        force: bool,
    },
    Unban {
        net: IpNet,
    },
    AllowAdd {
        net: IpNet,
    },
    AllowRemove {
        net: IpNet,
    },
    AllowList,
    /// Every node of this node's fleet, from their heartbeats in etcd.
    Fleet,
    /// Re-read the configuration, as SIGHUP does.
    Reload,
    /// Stream what the program drops (or allows, or observes) until stopped; see `capture`.
    Capture(crate::capture::CaptureSpec),
}

/// One request line from a client, or why it is not one.
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str::<Request>(line).map_err(|e| format!("bad request: {e}"))
}

impl Request {
    /// What a member of the read-only group may ask.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Request::Status
                | Request::Check { .. }
                | Request::List { .. }
                | Request::AllowList
                | Request::Fleet
        )
    }
}

/// Who may use the control socket beyond root and the agent's own user.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Members of this group may run the read-only commands.
    pub read_gid: Option<u32>,
}

/// What a peer may do.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Peer {
    Admin,
    Reader,
    Denied(String),
}

/// The group of this name (or number) on this host.
pub fn resolve_group(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c_name =
        std::ffi::CString::new(name).map_err(|_| format!("`{name}` is not a group name"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: group is plain data; getgrnam_r fills it, pointing into buf.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the sizes given; buf outlives the call.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(format!(
            "no group `{name}` on this host; create it (`groupadd {name}`) or give a GID"
        ));
    }
    Ok(group.gr_gid)
}

/// The peer's supplementary groups, as the kernel recorded them at connect time.
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    use std::os::fd::AsRawFd as _;
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
    // SAFETY: groups is a writable buffer of len bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Vec::new();
    }
    groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
    groups
}

fn classify(stream: &UnixStream, access: Access, agent_uid: u32) -> Peer {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => return Peer::Denied(format!("cannot tell who is asking: {e}")),
    };
    if cred.uid() == 0 || cred.uid() == agent_uid {
        return Peer::Admin;
    }
    if let Some(gid) = access.read_gid
        && (cred.gid() == gid || peer_groups(stream).contains(&gid))
    {
        return Peer::Reader;
    }
    Peer::Denied(format!(
        "permission denied: uid {} is neither root nor {}",
        cred.uid(),
        match access.read_gid {
            Some(gid) => format!("in the agent's --control-group (gid {gid})"),
            None => "the agent's user (no --control-group is configured)".to_owned(),
        }
    ))
}

/// How the control socket asks the agent's main loop for a reload, and hears how it went.
pub type ReloadReply = oneshot::Sender<Result<(), ReloadError>>;

/// Why a reload changed nothing, or only part of what it was asked to: the answer to
/// `reload` here, and what SIGHUP logs.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("reload refused, still running with the previous configuration")]
    Config(#[source] config::ConfigError),
    #[error("reload refused, still running with the previous configuration")]
    Apiban(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot apply the reloaded settings")]
    Apply(#[source] crate::sync::ChangeError),
}

/// `{"ok": <answer>}`, `{"refused": "..."}` (not done as asked: a usage error for the
/// client) or `{"error": "..."}` (could not be done).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(serde_json::Value),
    Refused(String),
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "no agent is listening on {path}; start it with `apiban run` (or `systemctl start \
         apiban`), or point --control-socket at the one you run"
    )]
    NotRunning {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "permission denied on {path}: the control socket is for root, and for the read-only \
         commands of the agent's --control-group (run as root, or join that group)"
    )]
    Permission { path: PathBuf },
    #[error("control socket {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent sent an answer this client does not understand: {0}")]
    Protocol(String),
    /// The agent will not do it as asked (exit code 2, like any usage error).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
    #[error(
        "another agent is already listening on {0}; stop it, or give this one its own \
         --control-socket"
    )]
    InUse(PathBuf),
}

/// Connects to the agent, or says why not in words an operator can act on.
pub async fn connect(path: &Path) -> Result<UnixStream, ControlError> {
    UnixStream::connect(path).await.map_err(|source| {
        if source.kind() == io::ErrorKind::PermissionDenied {
            ControlError::Permission {
                path: path.to_path_buf(),
            }
        } else {
            ControlError::NotRunning {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// The agent's answer to a request, from its JSON.
pub fn parse_response(answer: &[u8]) -> Result<serde_json::Value, ControlError> {
    match serde_json::from_slice::<Response>(answer) {
        Ok(Response::Ok(v)) => Ok(v),
        Ok(Response::Refused(e)) => Err(ControlError::Refused(e)),
        Ok(Response::Error(e)) => Err(ControlError::Failed(e)),
        Err(e) => Err(ControlError::Protocol(e.to_string())),
    }
}

/// Sends one request and returns the agent's answer.
pub async fn request(path: &Path, req: &Request) -> Result<serde_json::Value, ControlError> {
    let io_err = |source: io::Error| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = connect(path).await?;
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).await.map_err(io_err)?;
    stream.shutdown().await.map_err(io_err)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.map_err(io_err)?;
    parse_response(&answer)
}

/// What the server needs: the owner's snapshots to read, its inbox to send changes to, the
/// agent's facts and the maps' reader. Nothing here can wait for the owner.
#[derive(Clone)]
pub struct ControlContext {
    pub readers: status::Readers,
    pub updates: mpsc::Sender<Update>,
    pub reload: mpsc::Sender<ReloadReply>,
    /// Why there is none: a dry run has no program, an old kernel cannot copy packets.
    pub capture: Result<Arc<crate::capture::CaptureService>, String>,
}

/// Binds the socket: creates the directory if needed, replaces a stale socket left by a
/// crash, refuses to steal one a live agent listens on, and sets the modes: 0600 in a 0700
/// directory, or 0660 and 0750 for the read-only group. A directory that is not the agent's
/// own is left as it is.
pub async fn bind(path: &Path, access: Access) -> Result<UnixListener, ControlError> {
    use std::os::unix::fs::MetadataExt as _;
    let io_err = |source: io::Error| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (dir_mode, sock_mode) = match access.read_gid {
        None => (0o700, 0o600),
        Some(_) => (0o750, 0o660),
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        let created = !dir.exists();
        if created {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        let meta = std::fs::metadata(dir).map_err(io_err)?;
        if created || (meta.uid() == me && is_apiban_dir(dir)) {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))
                .map_err(io_err)?;
            if let Some(gid) = access.read_gid {
                chown_group(dir, gid).map_err(io_err)?;
            }
        } else if let Some(gid) = access.read_gid {
            let mode = meta.mode();
            let group_can_enter = (meta.gid() == gid && mode & 0o010 != 0) || mode & 0o001 != 0;
            if !group_can_enter {
                tracing::warn!(
                    dir = %dir.display(),
                    "the --control-group cannot enter the control socket's directory; \
                     give it g+x (chgrp it) or move the socket"
                );
            }
        }
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ControlError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io_err)?;
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(sock_mode)).map_err(io_err)?;
    if let Some(gid) = access.read_gid {
        chown_group(path, gid).map_err(io_err)?;
    }
    Ok(listener)
}

/// A directory apiban keeps for itself (`/run/apiban`, or one named after the agent).
fn is_apiban_dir(dir: &Path) -> bool {
    dir.file_name()
        .is_some_and(|n| n.to_string_lossy().contains("apiban"))
}

fn chown_group(path: &Path, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, None, Some(gid))
}

/// Serves until the task is aborted.
pub async fn serve(listener: UnixListener, ctx: ControlContext, access: Access) {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let slots = crate::conn_slots::ConnSlots::new(MAX_CONNECTIONS);
    let reads = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_READS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer = classify(&stream, access, me);
        let (ctx, reads) = (ctx.clone(), reads.clone());
        slots.spawn(handle(stream, ctx, peer, reads));
    }
}

/// Serves one connection: one request, one answer within [`IO_TIMEOUT`]; a capture streams
/// until it ends instead.
async fn handle(
    stream: UnixStream,
    ctx: ControlContext,
    peer: Peer,
    reads: Arc<tokio::sync::Semaphore>,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    let mut line = String::new();
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let request = match read {
        Err(_) => Err(Response::Error(format!(
            "no request within {}s",
            REQUEST_TIMEOUT.as_secs()
        ))),
        Ok(Err(e)) => Err(Response::Error(format!("cannot read the request: {e}"))),
        Ok(Ok(n)) if n as u64 >= MAX_REQUEST && !line.ends_with('\n') => Err(Response::Error(
            format!("request larger than {} KiB", MAX_REQUEST / 1024),
        )),
        Ok(Ok(_)) => match (parse_request(&line), &peer) {
            (Err(e), _) => Err(Response::Error(e)),
            (Ok(_), Peer::Denied(why)) => {
                tracing::warn!(%why, "control socket: refused a peer");
                Err(Response::Error(why.clone()))
            }
            (Ok(req), Peer::Reader) if !req.is_read_only() => Err(Response::Error(
                "permission denied: members of the --control-group may only read (status, \
                 check, list, allow list); changes and captures need root"
                    .into(),
            )),
            (Ok(req), _) => Ok(req),
        },
    };
    let request = match request {
        Ok(Request::Capture(spec)) => return capture(&spec, &ctx, reader, &mut write).await,
        other => other,
    };
    let answered = async {
        let response = match request {
            Err(response) => response,
            Ok(req) if req.is_read_only() => match reads.acquire().await {
                Ok(_permit) => answer(req, &ctx).await,
                Err(_) => Response::Error("the agent is stopping".into()),
            },
            Ok(req) => answer(req, &ctx).await,
        };
        send(&mut write, &response).await;
    };
    if tokio::time::timeout(IO_TIMEOUT, answered).await.is_err() {
        tracing::debug!("control connection timed out");
    }
}

/// Writes one answer; a client that went away is not an error worth more than a debug line.
async fn send(write: &mut (impl tokio::io::AsyncWrite + Unpin), response: &Response) {
    let body = serde_json::to_vec(response).unwrap_or_else(|e| {
        format!("{{\"error\":\"cannot encode the answer: {e}\"}}").into_bytes()
    });
    if let Err(e) = write.write_all(&body).await {
        tracing::debug!(error = %crate::error_chain(&e), "control client went away");
    }
}

/// `apiban capture`: the session streams until it ends; a capture that cannot start gets
/// one answer, like any request.
async fn capture(
    spec: &crate::capture::CaptureSpec,
    ctx: &ControlContext,
    reader: impl tokio::io::AsyncBufRead + Unpin,
    write: &mut (impl tokio::io::AsyncWrite + Unpin),
) {
    use crate::capture::{SessionContext, SessionError};
    let service = match &ctx.capture {
        Ok(service) => service,
        Err(why) => return send(write, &Response::Refused(why.clone())).await,
    };
    let session = SessionContext {
        service,
        snapshots: &ctx.readers.snapshots,
        updates: &ctx.updates,
        ok_line,
    };
    let response = match crate::capture::session(session, spec, reader, write).await {
        Ok(_) => return,
        Err(e @ (SessionError::Spec(_) | SessionError::Busy)) => Response::Refused(e.to_string()),
        Err(e @ SessionError::Failed(_)) => Response::Error(e.to_string()),
    };
    send(write, &response).await;
}

/// An `Ok` answer carrying `value`, as one line of the protocol.
fn ok_line(value: serde_json::Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(&Response::Ok(value)).unwrap_or_default();
    line.push(b'\n');
    line
}

fn to_value<T: Serialize>(v: &T) -> Response {
    match serde_json::to_value(v) {
        Ok(v) => Response::Ok(v),
        Err(e) => Response::Error(format!("cannot encode the answer: {e}")),
    }
}

fn read_answer(read: Result<Response, tokio::task::JoinError>) -> Response {
    read.unwrap_or_else(|e| Response::Error(format!("reading the agent's state failed: {e}")))
}

async fn answer(req: Request, ctx: &ControlContext) -> Response {
    let now = sync::unix_now();
    let change = match req {
        Request::Fleet => {
            let Some(view) = &ctx.readers.cluster else {
                return Response::Refused(
                    "this node is not in a fleet: it runs without --cluster".into(),
                );
            };
            return match crate::cluster::heartbeat::read_fleet(&view.settings).await {
                Ok(fleet) => to_value(&fleet),
                Err(e) => Response::Error(format!(
                    "cannot read the fleet from etcd: {}",
                    crate::error_chain(&e)
                )),
            };
        }
        Request::Status => {
            let built = ctx
                .readers
                .read(move |snapshot, info, dataplane| {
                    status::report(snapshot, info, dataplane, now, TOP_SOURCES)
                })
                .await;
            return read_answer(built.map(|report| to_value(&report)));
        }
        Request::Check { addr } => {
            let read = ctx.readers.read(move |snapshot, _, dataplane| {
                to_value(&status::check(snapshot, dataplane, addr))
            });
            return read_answer(read.await);
        }
        Request::List { source } => {
            let source = match source.map(|s| s.parse::<SourceId>()).transpose() {
                Ok(s) => s,
                Err(e) => return Response::Error(format!("--source: {e}")),
            };
            let read = ctx
                .readers
                .read(move |snapshot, _, _| to_value(&status::list(snapshot, source.as_ref())));
            return read_answer(read.await);
        }
        Request::AllowList => {
            let read = ctx.readers.read(|snapshot, _, _| {
                let rows: Vec<serde_json::Value> = snapshot
                    .engine
                    .allowlist
                    .iter()
                    .map(|n| {
                        let origin = if snapshot.engine.manual_allow.contains(n) {
                            "manual"
                        } else {
                            "config"
                        };
                        serde_json::json!({ "net": n, "origin": origin })
                    })
                    .collect();
                Response::Ok(serde_json::Value::Array(rows))
            });
            return read_answer(read.await);
        }
        Request::Ban {
            net,
            ttl_secs,
            comment,
            force,
        } => Change::Ban {
            net,
            ttl: ttl_secs.map(Duration::from_secs),
            comment,
            force,
        },
        Request::Unban { net } => Change::Unban { net },
        Request::AllowAdd { net } => Change::AllowAdd { net },
        Request::AllowRemove { net } => Change::AllowRemove { net },
        Request::Capture(_) => {
            return Response::Error("a capture is served on its own connection".into());
        }
        Request::Reload => {
            let (reply, rx) = oneshot::channel();
            if ctx.reload.send(reply).await.is_err() {
                return Response::Error("the agent is stopping".into());
            }
            return match rx.await {
                Ok(Ok(())) => Response::Ok(serde_json::Value::String(
                    "configuration reloaded".to_owned(),
                )),
                Ok(Err(e)) => Response::Error(crate::error_chain(&e)),
                Err(_) => Response::Error("the agent is stopping".into()),
            };
        }
    };
    match send_change(&ctx.updates, change).await {
        Ok(msg) => Response::Ok(serde_json::Value::String(msg)),
        Err(ChangeError::Refused(e)) => Response::Refused(e),
        Err(ChangeError::Failed(e)) => Response::Error(e),
    }
}
