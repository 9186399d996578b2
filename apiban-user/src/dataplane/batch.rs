//! `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` through the raw syscall: aya 0.16 has no
//! batch API, and one syscall per entry dominates the cost of loading 100k bans.

use std::{io, mem, os::fd::AsRawFd as _, os::fd::BorrowedFd};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

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
