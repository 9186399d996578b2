//! The control socket: how `apiban status|check|list|ban|unban|allow` talk to the running
//! agent. One JSON request line per connection, one JSON answer, then the agent closes.
//!
//! Reads are answered from a snapshot taken under the owner's lock; changes are sent to the
//! owner's inbox like any source's update and answered after they are in the maps and saved.
//! The socket is mode 0600 in a 0700 directory, and peers must be root or the agent's user.

use std::{
    io,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
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
    engine::Enforcer,
    ledger::SourceId,
    status::{self, AgentInfo},
    sync::{self, Change, ChangeError, Owner, Update},
};

/// Requests are small; anything longer is not ours.
const MAX_REQUEST: u64 = 64 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// Re-read the configuration, as SIGHUP does.
    Reload,
}

/// How the control socket asks the agent's main loop for a reload, and hears how it went.
pub type ReloadReply = oneshot::Sender<Result<String, String>>;

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
    #[error("permission denied on {path}: the control socket is root-only (run as root)")]
    Permission { path: PathBuf },
    #[error("control socket {path}: {source}")]
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

/// Sends one request and returns the agent's answer.
pub async fn request(path: &Path, req: &Request) -> Result<serde_json::Value, ControlError> {
    let io_err = |source: io::Error| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path).await.map_err(|source| {
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
    })?;
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).await.map_err(io_err)?;
    stream.shutdown().await.map_err(io_err)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.map_err(io_err)?;
    match serde_json::from_slice::<Response>(&answer) {
        Ok(Response::Ok(v)) => Ok(v),
        Ok(Response::Refused(e)) => Err(ControlError::Refused(e)),
        Ok(Response::Error(e)) => Err(ControlError::Failed(e)),
        Err(e) => Err(ControlError::Protocol(e.to_string())),
    }
}

/// What the server needs: the owner to read, its inbox to send changes to, the agent facts.
pub struct ControlContext<E: Enforcer> {
    pub owner: Arc<Mutex<Owner<E>>>,
    pub updates: mpsc::Sender<Update>,
    pub info: Arc<Mutex<AgentInfo>>,
    pub reload: mpsc::Sender<ReloadReply>,
}

impl<E: Enforcer> Clone for ControlContext<E> {
    fn clone(&self) -> Self {
        Self {
            owner: self.owner.clone(),
            updates: self.updates.clone(),
            info: self.info.clone(),
            reload: self.reload.clone(),
        }
    }
}

/// Binds the socket: creates the directory (0700) if needed, replaces a stale socket left by
/// a crash, refuses to steal one a live agent listens on, and sets mode 0600.
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io_err = |source: io::Error| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(io_err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ControlError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io_err)?;
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    Ok(listener)
}

/// Serves until the task is aborted.
pub async fn serve<E: Enforcer + Send + 'static>(listener: UnixListener, ctx: ControlContext<E>) {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let allowed = stream
            .peer_cred()
            .is_ok_and(|c| c.uid() == 0 || c.uid() == me);
        if !allowed {
            tracing::warn!(
                "control socket: refused a peer that is neither root nor the agent's user"
            );
            continue;
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(IO_TIMEOUT, handle(stream, ctx)).await {
                tracing::debug!(error = %e, "control connection timed out");
            }
        });
    }
}

async fn handle<E: Enforcer + Send + 'static>(stream: UnixStream, ctx: ControlContext<E>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let read = BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await;
    let response = match read {
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(req, &ctx).await,
            Err(e) => Response::Error(format!("bad request: {e}")),
        },
        Err(e) => Response::Error(format!("cannot read the request: {e}")),
    };
    // A client that went away is not an error worth more than a debug line.
    let body = serde_json::to_vec(&response).unwrap_or_else(|e| {
        format!("{{\"error\":\"cannot encode the answer: {e}\"}}").into_bytes()
    });
    if let Err(e) = write.write_all(&body).await {
        tracing::debug!(error = %e, "control client went away");
    }
}

fn to_value<T: Serialize>(v: &T) -> Response {
    match serde_json::to_value(v) {
        Ok(v) => Response::Ok(v),
        Err(e) => Response::Error(format!("cannot encode the answer: {e}")),
    }
}

async fn answer<E: Enforcer + Send + 'static>(req: Request, ctx: &ControlContext<E>) -> Response {
    let now = sync::unix_now();
    let change = match req {
        Request::Status => {
            let info = sync::lock(&ctx.info).clone();
            let report = status::build(&sync::lock(&ctx.owner), &info, TOP_SOURCES, now);
            return to_value(&report);
        }
        Request::Check { addr } => return to_value(&status::check(&sync::lock(&ctx.owner), addr)),
        Request::List { source } => {
            let source = match source.map(|s| s.parse::<SourceId>()).transpose() {
                Ok(s) => s,
                Err(e) => return Response::Error(format!("--source: {e}")),
            };
            return to_value(&status::list(&sync::lock(&ctx.owner), source.as_ref()));
        }
        Request::AllowList => {
            let owner = sync::lock(&ctx.owner);
            let manual = owner.engine.manual_allow();
            let rows: Vec<serde_json::Value> = owner
                .engine
                .allowlist()
                .iter()
                .map(|n| {
                    serde_json::json!({
                        "net": n,
                        "origin": if manual.contains(n) { "manual" } else { "config" },
                    })
                })
                .collect();
            return Response::Ok(serde_json::Value::Array(rows));
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
        Request::Reload => {
            let (reply, rx) = oneshot::channel();
            if ctx.reload.send(reply).await.is_err() {
                return Response::Error("the agent is stopping".into());
            }
            return match rx.await {
                Ok(Ok(msg)) => Response::Ok(serde_json::Value::String(msg)),
                Ok(Err(e)) => Response::Error(e),
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

/// Sends a change to the owner and waits until it is applied and saved.
pub async fn send_change(
    updates: &mpsc::Sender<Update>,
    change: Change,
) -> Result<String, ChangeError> {
    let stopping = || ChangeError::Failed("the agent is stopping".to_owned());
    let (reply, rx) = oneshot::channel();
    updates
        .send(Update::Control { change, reply })
        .await
        .map_err(|_| stopping())?;
    rx.await.map_err(|_| stopping())?
}
