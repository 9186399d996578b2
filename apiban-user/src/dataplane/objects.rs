//! BPF objects by path, through the few raw `bpf()` commands aya does not expose
//! for programs: open a pin (`BPF_OBJ_GET`), pin a descriptor (`BPF_OBJ_PIN`), and read a
//! program's ID or a map's key and value sizes (`BPF_OBJ_GET_INFO_BY_FD`). None of these needs CAP_SYS_ADMIN, unlike
//! opening a program by ID, so an agent with the systemd unit's capabilities can still tell
//! its own program from another on an interface.

use std::{
    ffi::CString,
    io, mem,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The `obj` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// The `info` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_prog_info`: the kernel fills in as much as `info_len` asks for.
#[repr(C)]
#[derive(Default)]
struct ProgInfoHead {
    prog_type: u32,
    id: u32,
}

/// The `bpf()` system call.
///
/// # Safety
/// `attr` must be a valid prefix of `union bpf_attr` for `cmd`, and every pointer in it
/// must stay valid, for the sizes the kernel will read or write through it, until the call
/// returns.
pub(super) unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for attr (see above); its size is passed with it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The `query` member of `union bpf_attr` (BPF_PROG_QUERY), up to the program IDs' count.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_TCX_EGRESS: u32 = 47;

/// The IDs of the programs on the interface's tcx egress hook. Needs CAP_NET_ADMIN only,
/// where aya's query opens each program by ID, which needs CAP_SYS_ADMIN (the systemd unit
/// does not grant it).
pub fn tcx_egress_program_ids(ifindex: u32) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_ifindex: ifindex,
        attach_type: BPF_TCX_EGRESS,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: a `query` attr whose ID buffer (of `prog_cnt` entries) outlives the call.
    unsafe { bpf(BPF_PROG_QUERY, &mut attr)? };
    let n = (attr.prog_cnt as usize).min(ids.len());
    Ok(ids[..n].to_vec())
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Opens the object pinned at `path`.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: an `obj` attr whose path outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr)? };
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins `fd` at `path`, which must not exist yet.
pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: an `obj` attr whose path outlives the call.
    unsafe { bpf(BPF_OBJ_PIN, &mut attr).map(drop) }
}

/// Pins `fd` at `path`, replacing what is pinned there in one step: pinned first at `tmp`
/// (on the same bpffs), then renamed over, so that a reader sees the old object or the new
/// one, never nothing.
pub fn repin(fd: BorrowedFd<'_>, path: &Path, tmp: &Path) -> io::Result<()> {
    match std::fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    pin(fd, tmp)?;
    std::fs::rename(tmp, path)
}

/// A name bpffs accepts for anything: it refuses names with a dot, which interface names
/// such as `eth0.100` have. Dots and percent signs are percent-encoded.
pub fn pin_name(name: &str) -> String {
    name.replace('%', "%25").replace('.', "%2E")
}

/// The name [`pin_name`] encoded.
pub fn unpin_name(pinned: &str) -> String {
    pinned.replace("%2E", ".").replace("%25", "%")
}

/// The head of `struct bpf_map_info`.
#[repr(C)]
#[derive(Default)]
struct MapInfoHead {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
}

/// The key and value sizes of the map behind `fd`, as the kernel will read them.
pub fn map_sizes(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    let mut head = MapInfoHead::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: mem::size_of::<MapInfoHead>() as u32,
        info: (&raw mut head) as u64,
    };
    // SAFETY: an `info` attr pointing at `head`, of the length given, alive for the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    Ok((head.key_size, head.value_size))
}

/// The kernel's ID of the program behind `fd`.
pub fn program_id(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut head = ProgInfoHead::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: mem::size_of::<ProgInfoHead>() as u32,
        info: (&raw mut head) as u64,
    };
    // SAFETY: an `info` attr pointing at `head`, of the length given, alive for the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    Ok(head.id)
}
