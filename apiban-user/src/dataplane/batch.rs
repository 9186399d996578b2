//! `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` through the raw syscall: aya 0.16 has no
//! batch API, and one syscall per entry dominates the cost of loading 100k bans. Kernels
//! before 6.x have no batch operations on LPM tries (ENOTSUPP, Debian 11's 5.10): there the
//! rest goes one element per syscall, slower but the same outcome.

use std::{io, mem, os::fd::AsRawFd as _, os::fd::BorrowedFd};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel's ENOTSUPP (not in libc): this map type has no batch operations here.
const ENOTSUPP: i32 = 524;

/// The `map_elem` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(ENOTSUPP)
}

/// One element per syscall, from `done` on: where the kernel has no batch for the map.
fn one_by_one<K, V>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: Option<&[V]>,
    from: usize,
) -> BatchOutcome {
    for i in from..keys.len() {
        let mut attr = ElemAttr {
            map_fd: map.as_raw_fd() as u32,
            key: (&raw const keys[i]) as u64,
            value: values.map_or(0, |v| (&raw const v[i]) as u64),
            ..Default::default()
        };
        let cmd = if values.is_some() {
            BPF_MAP_UPDATE_ELEM
        } else {
            BPF_MAP_DELETE_ELEM
        };
        // SAFETY: a `map_elem` attr pointing at one key (and value) of the sizes `checked`
        // made sure are the map's, alive for the call.
        if let Err(error) = unsafe { super::objects::bpf(cmd, &mut attr) } {
            return BatchOutcome {
                done: i,
                error: Some(error),
            };
        }
    }
    BatchOutcome {
        done: keys.len(),
        error: None,
    }
}

/// The `batch` member of `union bpf_attr` (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The outcome of a batch call: how many elements the kernel applied, and the error that
/// stopped it, if any (elements after `done` were not touched).
#[derive(Debug)]
pub struct BatchOutcome {
    pub done: usize,
    pub error: Option<io::Error>,
}

fn call(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: attr is a `batch` attr. The kernel reads `count` keys of the map's key size
    // (and values of its value size) from the arrays it points to; `checked` has made sure
    // those are the sizes of the slices' elements, and the callers keep the slices alive for
    // the call.
    unsafe { super::objects::bpf(cmd, attr).map(drop) }
}

/// Refuses a batch the kernel would read past: its element sizes must be the map's own.
fn checked<K, V>(map: BorrowedFd<'_>, keys: usize, values: Option<usize>) -> io::Result<()> {
    let (key_size, value_size) = super::objects::map_sizes(map)?;
    let bad = |what: &str, ours: usize, map: u32| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} of {ours} bytes for a map whose {what}s have {map}"),
        )
    };
    if mem::size_of::<K>() != key_size as usize {
        return Err(bad("key", mem::size_of::<K>(), key_size));
    }
    if let Some(values) = values {
        if mem::size_of::<V>() != value_size as usize {
            return Err(bad("value", mem::size_of::<V>(), value_size));
        }
        if values != keys {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{keys} keys and {values} values"),
            ));
        }
    }
    Ok(())
}

/// Inserts or replaces `keys[i] -> values[i]` for all i, in one syscall per `chunk`. Keys and
/// values must be plain data of exactly the map's key and value sizes, one value per key;
/// anything else is refused before the kernel reads a byte.
pub fn update<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> BatchOutcome {
    if let Err(error) = checked::<K, V>(map, keys.len(), Some(values.len())) {
        return BatchOutcome {
            done: 0,
            error: Some(error),
        };
    }
    let mut done = 0;
    for (ks, vs) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        let mut attr = BatchAttr {
            keys: ks.as_ptr() as u64,
            values: vs.as_ptr() as u64,
            count: ks.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = call(BPF_MAP_UPDATE_BATCH, &mut attr);
        // Refused before any element: `count` is still what was asked.
        if let Err(error) = &result
            && unsupported(error)
        {
            return one_by_one(map, keys, Some(values), done);
        }
        // On error the kernel reports in `count` how many elements it applied.
        done += attr.count as usize;
        if let Err(error) = result {
            return BatchOutcome {
                done,
                error: Some(error),
            };
        }
    }
    BatchOutcome { done, error: None }
}

/// Deletes all `keys`, which must be plain data of exactly the map's key size. A missing key
/// stops the batch with ENOENT, like the kernel does.
pub fn delete<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> BatchOutcome {
    if let Err(error) = checked::<K, K>(map, keys.len(), None) {
        return BatchOutcome {
            done: 0,
            error: Some(error),
        };
    }
    let mut done = 0;
    for ks in keys.chunks(CHUNK) {
        let mut attr = BatchAttr {
            keys: ks.as_ptr() as u64,
            count: ks.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = call(BPF_MAP_DELETE_BATCH, &mut attr);
        if let Err(error) = &result
            && unsupported(error)
        {
            return one_by_one::<K, K>(map, keys, None, done);
        }
        done += attr.count as usize;
        if let Err(error) = result {
            return BatchOutcome {
                done,
                error: Some(error),
            };
        }
    }
    BatchOutcome { done, error: None }
}

/// Elements per syscall: large enough to amortise the syscall, small enough that one call
/// never holds the CPU for long (the kernel reschedules between elements anyway).
const CHUNK: usize = 16_384;
