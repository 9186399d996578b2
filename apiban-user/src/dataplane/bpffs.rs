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
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path} is not on a BPF filesystem and mounting one there failed ({source}); \
         mount it with `mount -t bpf bpf {path}` or pick another --bpffs-dir"
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
    tracing::info!(path = %mount_point.display(), "mounted bpffs");
    Ok(())
}
