//! The state directory: what the agent must remember across restarts, crashes and upgrades.
//!
//! One JSON file, replaced atomically (write a temporary file, fsync it, rename it over the
//! old one, fsync the directory), so a kill -9 at any moment leaves either the previous state
//! or the new one, never a torn file. A file that cannot be read is moved aside, not deleted:
//! the operator may want to look at it, and the agent starts over with a full pull.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::ledger::{Ledger, Record, SourceId};

pub const STATE_FILE: &str = "state.json";
const TEMP_FILE: &str = "state.json.tmp";
const LOCK_FILE: &str = "lock";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use the state directory {dir}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state directory {dir} is in use by another apiban agent (pid {pid})")]
    Locked { dir: PathBuf, pid: String },
    #[error("cannot write the state file in {dir}")]
    Write {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A filesystem that takes no writes: the agent can still read its state and enforce it.
fn read_only(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EROFS)
}

/// A full pull in progress, saved after every batch so that it resumes where it stopped.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullPull {
    pub started_at: u64,
    pub next_id: String,
    /// Addresses received so far; a pull that ends with none does not reconcile (an empty
    /// list from the server is far likelier a fault than the end of all attacks).
    pub seen: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApibanCursor {
    /// Where the next incremental poll starts; None until a full pull has completed.
    pub next_id: Option<String>,
    pub full_pull: Option<FullPull>,
    pub last_full_pull: Option<u64>,
    /// Unix milliseconds of recent requests, as agents before the request journal saved
    /// them; read once after an upgrade so that it does not overspend the budget.
    #[serde(default, skip_serializing)]
    pub requests_ms: Vec<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListCursor {
    pub last_refresh: Option<u64>,
}

/// In a fleet: the etcd revision this ledger reflects, and under which prefix. Saved with
/// the ledger, so that a restart resumes the watch right after it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCursor {
    pub prefix: String,
    pub revision: i64,
    /// Operators' changes on this node that etcd has not settled yet: sent again after a
    /// restart (see `cluster::writer`). Saved in the same write as the change itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<PendingChange>,
    /// The node's fleet clock (Unix ms): the latest stamp it gave a change or saw on one.
    /// An operator's change is stamped after it, so it is ordered after every change the
    /// node had seen, whatever the clocks say.
    #[serde(default)]
    pub clock_ms: u64,
    /// The etcd cluster's ID the ledger came from: another ID (etcd replaced, or restored
    /// from a backup into a new cluster) means a full read, whatever the revisions say.
    #[serde(default)]
    pub cluster_id: u64,
}

/// One key an operator changed on this node, the revision the node had applied when it
/// first changed it, and the stamp of its latest change.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PendingChange {
    pub key: PendingKey,
    pub base_revision: i64,
    /// 0 in a state file from before stamps: any stamped change in etcd wins over it.
    #[serde(default)]
    pub stamp_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingKey {
    Record { net: IpNet, source: SourceId },
    Allow { net: IpNet },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedEntry {
    pub net: IpNet,
    pub source: SourceId,
    pub first_seen: u64,
    pub last_seen: u64,
    pub expires: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Box<crate::ledger::Evidence>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub saved_at: u64,
    #[serde(default)]
    pub apiban: ApibanCursor,
    #[serde(default)]
    pub lists: BTreeMap<String, ListCursor>,
    /// Allow entries added with `apiban allow add` (the configured ones live in the config).
    #[serde(default)]
    pub allow: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterCursor>,
    #[serde(default)]
    pub entries: Vec<SavedEntry>,
}

/// Why a state file's contents are not a state this version reads.
#[derive(Debug, thiserror::Error)]
pub enum UnreadableState {
    #[error("format version {0} is not {FORMAT_VERSION}")]
    Version(u32),
    #[error("not valid state JSON")]
    Json(#[source] serde_json::Error),
}

impl State {
    /// A state file's contents, or why they are not one this version reads. The file may
    /// have been edited, truncated by another tool or written by a future version.
    pub fn parse(bytes: &[u8]) -> Result<State, UnreadableState> {
        match serde_json::from_slice::<State>(bytes) {
            Ok(state) if state.version == FORMAT_VERSION => Ok(state),
            Ok(state) => Err(UnreadableState::Version(state.version)),
            Err(e) => Err(UnreadableState::Json(e)),
        }
    }

    pub fn ledger(&self) -> Ledger {
        let mut ledger = Ledger::new();
        for e in &self.entries {
            ledger.insert_record(
                e.net,
                e.source.clone(),
                Record {
                    first_seen: e.first_seen,
                    last_seen: e.last_seen,
                    expires: e.expires,
                    comment: e.comment.clone(),
                    evidence: e.evidence.clone(),
                },
            );
        }
        ledger
    }

    pub fn set_ledger(&mut self, ledger: &Ledger) {
        self.entries.clear();
        self.entries.reserve(ledger.len());
        for (net, records) in ledger.iter() {
            for (source, r) in records {
                self.entries.push(SavedEntry {
                    net: *net,
                    source: source.clone(),
                    first_seen: r.first_seen,
                    last_seen: r.last_seen,
                    expires: r.expires,
                    comment: r.comment.clone(),
                    evidence: r.evidence.clone(),
                });
            }
        }
    }
}

/// The state as saved, borrowed from the engine: serialised straight into the file, with no
/// copy of 100k entries in between.
#[derive(Serialize)]
pub struct StateView<'a> {
    pub version: u32,
    pub saved_at: u64,
    pub apiban: &'a ApibanCursor,
    pub lists: &'a BTreeMap<String, ListCursor>,
    pub allow: Vec<IpNet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<&'a ClusterCursor>,
    pub entries: EntriesView<'a>,
}

pub struct EntriesView<'a>(pub &'a Ledger);

#[derive(Serialize)]
struct SavedEntryRef<'a> {
    net: &'a IpNet,
    source: &'a SourceId,
    first_seen: u64,
    last_seen: u64,
    expires: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    comment: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    evidence: &'a Option<Box<crate::ledger::Evidence>>,
}

impl Serialize for EntriesView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq as _;
        let mut seq = serializer.serialize_seq(None)?;
        for (net, records) in self.0.iter() {
            for (source, r) in records {
                seq.serialize_element(&SavedEntryRef {
                    net,
                    source,
                    first_seen: r.first_seen,
                    last_seen: r.last_seen,
                    expires: r.expires,
                    comment: &r.comment,
                    evidence: &r.evidence,
                })?;
            }
        }
        seq.end()
    }
}

/// What loading found.
#[derive(Debug)]
pub enum Loaded {
    /// No state yet: first start.
    Fresh,
    State(Box<State>),
    /// The file was unreadable; it was moved to `moved_to`.
    Corrupt {
        moved_to: PathBuf,
        reason: String,
    },
}

/// The state directory, held exclusively (flock) while the agent runs.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    _lock: File,
}

impl StateStore {
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let dir_err = |source| StateError::Dir {
            dir: dir.to_owned(),
            source,
        };
        fs::create_dir_all(dir).map_err(dir_err)?;
        // Bans are not secret, but the state names the operator's allowlist and comments.
        match fs::set_permissions(dir, fs::Permissions::from_mode(0o700)) {
            Ok(()) => {}
            Err(e) if read_only(&e) => {}
            Err(e) => return Err(dir_err(e)),
        }
        let lock_path = dir.join(LOCK_FILE);
        let writable = match OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
        {
            Ok(_) => true,
            Err(e) if read_only(&e) => false,
            Err(e) => return Err(dir_err(e)),
        };
        // The lock is held through a read-only descriptor: a descriptor open for writing
        // would keep the filesystem from being remounted read-only under the agent. Without
        // a lock file (a read-only directory), the directory itself is locked; the agent
        // enforces what the state file holds and every save fails (counted, retried) until
        // it is writable again.
        let lock = match File::open(&lock_path) {
            Ok(file) => file,
            Err(e) if !writable && e.kind() == io::ErrorKind::NotFound => {
                File::open(dir).map_err(dir_err)?
            }
            Err(e) => return Err(dir_err(e)),
        };
        // SAFETY: flock on a file descriptor we own.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            let pid = fs::read_to_string(dir.join(LOCK_FILE)).unwrap_or_default();
            return Err(StateError::Locked {
                dir: dir.to_owned(),
                pid: pid.trim().to_owned(),
            });
        }
        if writable {
            let _ = fs::write(&lock_path, std::process::id().to_string());
        } else {
            tracing::warn!(
                dir = %dir.display(),
                "the state directory is read-only: enforcing the state it holds; changes are \
                 not saved until it is writable again"
            );
        }
        Ok(Self {
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    pub fn load(&self) -> Loaded {
        // A temporary file is a save that was interrupted before its rename: the previous
        // state file is still whole and authoritative.
        let _ = fs::remove_file(self.dir.join(TEMP_FILE));
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Loaded::Fresh,
            Err(e) => return self.move_aside(format!("cannot read it: {e}")),
        };
        match State::parse(&bytes) {
            Ok(state) => Loaded::State(Box::new(state)),
            Err(why) => self.move_aside(crate::error_chain(&why)),
        }
    }

    fn move_aside(&self, reason: String) -> Loaded {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let moved_to = self.dir.join(format!("{STATE_FILE}.corrupt-{stamp}"));
        match fs::rename(self.path(), &moved_to) {
            Ok(()) => Loaded::Corrupt { moved_to, reason },
            Err(e) => Loaded::Corrupt {
                moved_to: self.path(),
                reason: format!("{reason}; moving it aside failed too: {e}"),
            },
        }
    }

    /// Replaces the state file atomically; returns how long it took. On any failure the
    /// previous file is untouched and the temporary one removed: a full disk must not keep
    /// a partial copy that takes the room a later save needs.
    pub fn save(&self, state: &impl Serialize) -> Result<Duration, StateError> {
        let started = Instant::now();
        let tmp = self.dir.join(TEMP_FILE);
        let written = self.write_and_rename(&tmp, state);
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp);
            return Err(StateError::Write {
                dir: self.dir.clone(),
                source,
            });
        }
        Ok(started.elapsed())
    }

    fn write_and_rename(&self, tmp: &Path, state: &impl Serialize) -> io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(tmp)?;
        let mut out = io::BufWriter::with_capacity(256 * 1024, file);
        serde_json::to_writer(&mut out, state)?;
        out.write_all(b"\n")?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        fs::rename(tmp, self.path())?;
        File::open(&self.dir).and_then(|d| d.sync_all())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("apiban-state-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn sample() -> State {
        let mut ledger = Ledger::new();
        ledger.observe(
            "1.2.3.4/32".parse().unwrap(),
            &SourceId::Apiban,
            10,
            Some(100),
            None,
        );
        ledger.observe(
            "2a01:4f8::/32".parse().unwrap(),
            &SourceId::Manual,
            11,
            None,
            Some("scanner \"x\"".into()),
        );
        let mut state = State {
            version: FORMAT_VERSION,
            saved_at: 12,
            apiban: ApibanCursor {
                next_id: Some("1636221410".into()),
                full_pull: Some(FullPull {
                    started_at: 5,
                    next_id: "77".into(),
                    seen: 250,
                }),
                last_full_pull: Some(1),
                requests_ms: vec![],
            },
            lists: BTreeMap::from([(
                "voipbl".into(),
                ListCursor {
                    last_refresh: Some(9),
                },
            )]),
            allow: vec!["192.0.2.0/24".parse().unwrap()],
            cluster: Some(ClusterCursor {
                prefix: "/apiban/v1/".into(),
                revision: 4711,
                pending: vec![PendingChange {
                    key: PendingKey::Record {
                        net: "192.0.2.9/32".parse().unwrap(),
                        source: SourceId::Manual,
                    },
                    base_revision: 4700,
                    stamp_ms: 1_780_000_000_000,
                }],
                clock_ms: 1_780_000_000_000,
                cluster_id: 0x5eed,
            }),
            entries: vec![],
        };
        state.set_ledger(&ledger);
        state
    }

    #[test]
    fn round_trip() {
        let dir = temp_dir("rt");
        let store = StateStore::open(&dir).unwrap();
        assert!(matches!(store.load(), Loaded::Fresh));
        let state = sample();
        store.save(&state).unwrap();
        let Loaded::State(back) = store.load() else {
            panic!("state did not load")
        };
        assert_eq!(*back, state);
        assert_eq!(back.ledger().len(), 2);
        let mode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn request_times_from_an_older_agent_are_read_but_no_longer_written() {
        let dir = temp_dir("legacy-requests");
        let store = StateStore::open(&dir).unwrap();
        let mut state = sample();
        store.save(&state).unwrap();
        let mut json: serde_json::Value =
            serde_json::from_slice(&fs::read(store.path()).unwrap()).unwrap();
        assert!(json["apiban"].get("requests_ms").is_none());
        json["apiban"]["requests_ms"] = serde_json::json!([1, 2, 3]);
        fs::write(store.path(), json.to_string()).unwrap();
        let Loaded::State(back) = store.load() else {
            panic!("state did not load")
        };
        state.apiban.requests_ms = vec![1, 2, 3];
        assert_eq!(*back, state);
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_state_is_moved_aside() {
        let dir = temp_dir("corrupt");
        let store = StateStore::open(&dir).unwrap();
        fs::write(store.path(), b"{\"version\":1,\"entries\":[{\"net\":").unwrap();
        let Loaded::Corrupt { moved_to, reason } = store.load() else {
            panic!("truncated state must not load")
        };
        assert!(reason.contains("JSON"), "{reason}");
        assert!(moved_to.exists() && !store.path().exists());
        assert!(matches!(store.load(), Loaded::Fresh));
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_crash_between_write_and_rename_keeps_the_previous_state() {
        let dir = temp_dir("crash");
        let store = StateStore::open(&dir).unwrap();
        let state = sample();
        store.save(&state).unwrap();
        // What a kill -9 after the write and before the rename leaves behind.
        fs::write(dir.join(TEMP_FILE), b"{\"version\":1,\"entries\":[").unwrap();
        let Loaded::State(back) = store.load() else {
            panic!("the previous state must load")
        };
        assert_eq!(*back, state);
        assert!(!dir.join(TEMP_FILE).exists());
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn one_agent_per_state_directory() {
        let dir = temp_dir("lock");
        let first = StateStore::open(&dir).unwrap();
        let second = StateStore::open(&dir).unwrap_err();
        assert!(matches!(second, StateError::Locked { .. }), "{second}");
        assert!(second.to_string().contains(&std::process::id().to_string()));
        drop(first);
        StateStore::open(&dir).unwrap();
        fs::remove_dir_all(dir).unwrap();
    }
}
