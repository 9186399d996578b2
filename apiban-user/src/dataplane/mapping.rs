//! Shared mappings of `BPF_F_MMAPABLE` arrays: the agent reads and writes the deny filter and
//! the host tables with plain atomic loads and stores, without a syscall per word.

use std::{
    io,
    ops::Range,
    os::fd::{AsRawFd as _, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64},
};

const PAGE: usize = 4096;

/// A shared mapping of the pages of an array map that hold some range of its value bytes,
/// unmapped on drop. Words are addressed by their index in the whole array, and are atomics:
/// the XDP program reads and writes the same memory concurrently.
pub(super) struct Mapping {
    ptr: NonNull<u8>,
    /// Bytes mapped, from `first_byte` of the array's values.
    len: usize,
    first_byte: usize,
}

// SAFETY: the mapping is plain shared memory, only ever accessed through atomics.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the pages holding `bytes` of the array's values. Mapping a page costs about half
    /// a microsecond, so one address's operation maps its page, not a table of megabytes.
    pub(super) fn new(
        map: BorrowedFd<'_>,
        bytes: Range<usize>,
        writable: bool,
    ) -> io::Result<Self> {
        let first_byte = bytes.start / PAGE * PAGE;
        let len = bytes.end.div_ceil(PAGE) * PAGE - first_byte;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let offset = libc::off_t::try_from(first_byte)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: a fresh shared mapping of the map's value area at a page offset; the kernel
        // checks the range against the map and that it is mmapable.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self {
            ptr,
            len,
            first_byte,
        })
    }

    fn at<T>(&self, index: usize) -> &T {
        let byte = index * size_of::<T>();
        assert!(
            byte >= self.first_byte && byte + size_of::<T>() <= self.first_byte + self.len,
            "word {index} is outside the mapped range"
        );
        // SAFETY: in bounds (checked above) of a page-aligned mapping that lives as long as
        // self; `T` is an atomic of its natural alignment, which `byte` is a multiple of.
        unsafe { &*self.ptr.as_ptr().add(byte - self.first_byte).cast::<T>() }
    }

    /// The u32 word `index` of the array's values.
    pub(super) fn u32_at(&self, index: usize) -> &AtomicU32 {
        self.at(index)
    }

    /// The u64 word `index` of the array's values.
    pub(super) fn u64_at(&self, index: usize) -> &AtomicU64 {
        self.at(index)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped; no reference outlives self.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
