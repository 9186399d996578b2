//! The BPF filesystem that holds the pinned maps and links.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("{path}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path} is not on a BPF filesystem and mounting one there failed (mount it with \
         `mount -t bpf bpf {path}` or pick another --bpffs-dir)"
    )]
    Mount { path: PathBuf, source: io::Error },
    #[error("{0} is not under a BPF filesystem mount point (bpffs is mounted at /sys/fs/bpf)")]
    NotBpffs(PathBuf),
}

fn statfs_magic(path: &Path) -> io::Result<i64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs is plain data; the kernel fills it in.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and buf is a valid out pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs.
    Ok(buf.f_type as i64)
}

pub fn is_bpffs(path: &Path) -> bool {
    statfs_magic(path).is_ok_and(|m| m == BPF_FS_MAGIC)
}

/// Makes sure `dir` exists on a bpffs. If its ancestor `/sys/fs/bpf` (the conventional mount
/// point, which this kind of host does not mount by default) is not bpffs, mounts it.
pub fn ensure_dir(dir: &Path) -> Result<(), BpffsError> {
    let mount_point = Path::new("/sys/fs/bpf");
    if dir.starts_with(mount_point) && !is_bpffs(mount_point) {
        mount_bpffs(mount_point)?;
    }
    std::fs::create_dir_all(dir).map_err(|source| BpffsError::Io {
        path: dir.to_owned(),
        source,
    })?;
    if !is_bpffs(dir) {
        return Err(BpffsError::NotBpffs(dir.to_owned()));
    }
    Ok(())
}

fn mount_bpffs(mount_point: &Path) -> Result<(), BpffsError> {
    let err = |source| BpffsError::Mount {
        path: mount_point.to_owned(),
        source,
    };
    std::fs::create_dir_all(mount_point).map_err(err)?;
    let target = CString::new(mount_point.as_os_str().as_bytes())
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: all pointers are valid NUL-terminated strings; data may be NULL.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    tracing::info!(
        path = %mount_point.display(),
        "mounted bpffs; in a mount namespace of its own (ip netns exec, unshare -m) the pins \
         go with it, the XDP attachment does not: the next start finds the maps through the \
         interface"
    );
    Ok(())
}

/// An exclusive lock on a bpffs directory: one agent writes the maps pinned in it, and
/// `apiban detach` does not pull them from under a running agent. A flock on the directory
/// itself, since bpffs holds no regular files; it goes when the process does, kill -9
/// included.
#[derive(Debug)]
pub struct DirLock {
    _dir: std::fs::File,
}

/// Who holds a [`DirLock`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The holder's PID as this PID namespace sees it, when /proc/locks names it.
    pub pid: Option<u32>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "pid {pid}"),
            None => f.write_str("a process in another PID namespace"),
        }
    }
}

impl DirLock {
    /// Takes the lock, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Result<Self, Holder>, BpffsError> {
        use std::os::fd::AsRawFd as _;
        let io = |source| BpffsError::Io {
            path: dir.to_owned(),
            source,
        };
        let file = std::fs::File::open(dir).map_err(io)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Ok(Self { _dir: file }));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io(err));
        }
        Ok(Err(Holder {
            pid: lock_holder(&file),
        }))
    }

    /// Who holds the lock on `dir`, if anyone; takes and drops it to find out.
    pub fn holder(dir: &Path) -> Result<Option<Holder>, BpffsError> {
        Ok(Self::acquire(dir)?.err())
    }
}

/// The PID /proc/locks gives for a flock on the file's inode.
fn lock_holder(file: &std::fs::File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    // /proc/locks writes the device as major:minor in hex and the inode in decimal.
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let id = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 00:2a:1 0 EOF"
        (fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&id.as_str()))
            .then(|| fields.get(4)?.parse().ok())
            .flatten()
    })
}
