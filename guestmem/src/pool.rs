//! The frame pool: host memory for guest RAM.
//!
//! One memfd (optionally hugetlb-backed) of `frames * PAGE_SIZE` bytes,
//! mapped once, shared, into the VMM: the *direct map*. Frame `i` lives at
//! file offset `i * PAGE_SIZE` and host address `base + i * PAGE_SIZE`; the
//! VMM maps the same memfd at frame offsets into the guest's view.
//! Free frames are given back to the host by punching holes in the memfd
//! (`fallocate(PUNCH_HOLE)`), after which they read as zero.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::frame::FrameId;
use crate::{PAGE_SHIFT, PAGE_SIZE};

/// What backs the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backing {
    /// A plain memfd (shmem), 4 KiB host pages.
    #[default]
    Memfd,
    /// A hugetlb memfd with 2 MiB host pages (needs `vm.nr_hugepages`). Host
    /// memory is then only released in whole 2 MiB blocks.
    HugetlbMemfd,
}

/// Errors creating or operating the pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The size is zero or too large.
    #[error("pool size must be a non-zero number of frames below 2^31")]
    BadSize,
    /// Hugetlb pools come in 2 MiB units.
    #[error("hugetlb pool size must be a multiple of 2 MiB")]
    HugetlbAlignment,
    /// memfd_create failed.
    #[error("memfd_create failed: {0} (for hugetlb, check that hugetlbfs is available)")]
    MemfdCreate(std::io::Error),
    /// ftruncate failed.
    #[error("ftruncate of the memfd to the pool size failed: {0}")]
    Truncate(std::io::Error),
    /// mmap failed.
    #[error(
        "mmap of the pool failed: {0} (for hugetlb, reserve pages with `sysctl vm.nr_hugepages=N`)"
    )]
    Mmap(std::io::Error),
}

/// Host memory for guest RAM (see the module docs).
pub struct FramePool {
    fd: OwnedFd,
    base: *mut u8,
    frames: u32,
    backing: Backing,
}

// SAFETY: the pool only hands out addresses; the mapping itself is shared
// memory valid for the pool's lifetime and carries no thread affinity.
unsafe impl Send for FramePool {}
// SAFETY: as above; all methods take &self and do not mutate Rust-visible state.
unsafe impl Sync for FramePool {}

const HUGE_SIZE: u64 = 2 << 20;

impl FramePool {
    /// Create a pool of `frames` frames.
    pub fn new(frames: u64, backing: Backing) -> Result<Self, PoolError> {
        if frames == 0 || frames >= 1 << 31 {
            return Err(PoolError::BadSize);
        }
        let size = frames * PAGE_SIZE;
        let mut flags = libc::MFD_CLOEXEC;
        if backing == Backing::HugetlbMemfd {
            if !size.is_multiple_of(HUGE_SIZE) {
                return Err(PoolError::HugetlbAlignment);
            }
            flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
        }
        // SAFETY: the name is a valid NUL-terminated string; flags are valid.
        let raw = unsafe { libc::memfd_create(c"guestmem".as_ptr(), flags) };
        if raw < 0 {
            return Err(PoolError::MemfdCreate(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh file descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(PoolError::Truncate(std::io::Error::last_os_error()));
        }
        // The direct map is 2 MiB aligned so that a 2 MiB block of frames is
        // also a 2 MiB-aligned host range (what a secondary MMU needs for a
        // huge leaf). Reserve an extra 2 MiB, map the memfd at the aligned
        // address inside the reservation, and give the slop back.
        const ALIGN: usize = 2 << 20;
        let len = size as usize;
        // SAFETY: a fresh PROT_NONE reservation chosen by the kernel.
        let resv = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + ALIGN,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if resv == libc::MAP_FAILED {
            return Err(PoolError::Mmap(std::io::Error::last_os_error()));
        }
        let aligned = (resv as usize + ALIGN - 1) & !(ALIGN - 1);
        // SAFETY: `aligned..aligned + len` lies inside our own reservation, so
        // MAP_FIXED replaces only memory this function owns.
        let base = unsafe {
            libc::mmap(
                aligned as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE | libc::MAP_FIXED,
                fd.as_raw_fd(),
                0,
            )
        };
        let head = aligned - resv as usize;
        let tail = ALIGN - head;
        // SAFETY: unmapping the unused parts of our own reservation.
        unsafe {
            if head > 0 {
                libc::munmap(resv, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        if base == libc::MAP_FAILED {
            return Err(PoolError::Mmap(std::io::Error::last_os_error()));
        }
        Ok(Self {
            fd,
            base: base.cast(),
            frames: frames as u32,
            backing,
        })
    }

    /// Number of frames.
    pub fn frames(&self) -> u32 {
        self.frames
    }

    /// The backing kind.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The memfd (the VMM mmaps it at [`FramePool::file_offset`]s).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Host address of `frame` in the direct map.
    pub fn host_addr(&self, frame: FrameId) -> u64 {
        assert!(frame < self.frames, "frame {frame} out of pool");
        self.base as u64 + ((frame as u64) << PAGE_SHIFT)
    }

    /// Offset of `frame` in the memfd.
    pub fn file_offset(&self, frame: FrameId) -> u64 {
        assert!(frame < self.frames, "frame {frame} out of pool");
        (frame as u64) << PAGE_SHIFT
    }

    /// The bytes of `frames` frames starting at `frame`, for copying.
    ///
    /// # Safety
    /// The caller must own those frames (allocated to it and not freed) and
    /// nobody may write them while the slice lives.
    pub unsafe fn frame_bytes(&self, frame: FrameId, frames: u32) -> &[u8] {
        assert!(frame as u64 + frames as u64 <= self.frames as u64);
        // SAFETY: in bounds of the mapping (asserted); exclusivity is the
        // caller's contract.
        unsafe {
            std::slice::from_raw_parts(
                self.base.add((frame as usize) << PAGE_SHIFT),
                (frames as usize) << PAGE_SHIFT,
            )
        }
    }

    /// Mutable bytes of `frames` frames starting at `frame`.
    ///
    /// # Safety
    /// The caller must own those frames exclusively while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn frame_bytes_mut(&self, frame: FrameId, frames: u32) -> &mut [u8] {
        assert!(frame as u64 + frames as u64 <= self.frames as u64);
        // SAFETY: in bounds (asserted); exclusivity is the caller's contract.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.base.add((frame as usize) << PAGE_SHIFT),
                (frames as usize) << PAGE_SHIFT,
            )
        }
    }

    /// Give the host memory of `frames` frames at `frame` back to the host
    /// (punch a hole). Returns false when the backing cannot release that
    /// range (hugetlb ranges not 2 MiB aligned) or the syscall failed; the
    /// contents are then unchanged.
    pub fn punch(&self, frame: FrameId, frames: u32) -> bool {
        let off = self.file_offset(frame);
        let len = (frames as u64) << PAGE_SHIFT;
        if self.backing == Backing::HugetlbMemfd
            && (!off.is_multiple_of(HUGE_SIZE) || !len.is_multiple_of(HUGE_SIZE))
        {
            return false;
        }
        // SAFETY: plain syscall on our descriptor, range inside the file.
        let r = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        r == 0
    }

    /// Zero `frames` frames at `frame`.
    ///
    /// # Safety
    /// The caller must own those frames exclusively.
    pub unsafe fn zero(&self, frame: FrameId, frames: u32) {
        // SAFETY: forwarded contract.
        unsafe { self.frame_bytes_mut(frame, frames) }.fill(0);
    }

    /// Bytes of host memory the memfd currently holds (its allocated
    /// blocks): what punching gives back.
    pub fn resident_bytes(&self) -> u64 {
        // SAFETY: fstat into a zeroed stat struct we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and pointer to a stat struct.
        if unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) } != 0 {
            return 0;
        }
        st.st_blocks as u64 * 512
    }

    /// The frames that hold host memory, as runs `(first frame, frames)` in
    /// ascending order: the memfd's data extents (`SEEK_DATA`/`SEEK_HOLE`,
    /// what [`FramePool::resident_bytes`] counts). A frame partly covered
    /// by an extent counts as holding memory.
    pub fn data_runs(&self) -> std::io::Result<Vec<(FrameId, u32)>> {
        let size = (self.frames as i64) << PAGE_SHIFT;
        let seek = |off: i64, whence: libc::c_int| -> std::io::Result<Option<i64>> {
            // SAFETY: lseek on our own descriptor moves only the file
            // position, which nothing else uses (all I/O takes offsets).
            let r = unsafe { libc::lseek(self.fd.as_raw_fd(), off as libc::off_t, whence) };
            if r >= 0 {
                return Ok(Some(r as i64));
            }
            let e = std::io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after `off`.
            match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                _ => Err(e),
            }
        };
        let mut runs = Vec::new();
        let mut off = 0i64;
        while off < size {
            let Some(data) = seek(off, libc::SEEK_DATA)? else {
                break;
            };
            let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
            let first = (data >> PAGE_SHIFT) as FrameId;
            let end = ((hole + PAGE_SIZE as i64 - 1) >> PAGE_SHIFT) as FrameId;
            runs.push((first, end - first));
            off = hole;
        }
        Ok(runs)
    }
}

impl Drop for FramePool {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `new`; no references
        // into it outlive the pool (slices borrow `self`).
        unsafe {
            libc::munmap(self.base.cast(), (self.frames as usize) << PAGE_SHIFT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punch_returns_memory_and_zeroes() {
        let pool = FramePool::new(64, Backing::Memfd).unwrap();
        assert_eq!(pool.resident_bytes(), 0);
        // SAFETY: the test owns the whole pool.
        unsafe { pool.frame_bytes_mut(3, 4) }.fill(0xab);
        assert_eq!(pool.resident_bytes(), 4 * PAGE_SIZE);
        assert_eq!(pool.data_runs().unwrap(), vec![(3, 4)]);
        assert!(pool.punch(4, 2));
        assert_eq!(pool.resident_bytes(), 2 * PAGE_SIZE);
        assert_eq!(pool.data_runs().unwrap(), vec![(3, 1), (6, 1)]);
        // SAFETY: as above.
        let b = unsafe { pool.frame_bytes(3, 4) };
        assert!(b[..4096].iter().all(|&x| x == 0xab));
        assert!(b[4096..3 * 4096].iter().all(|&x| x == 0));
        assert_eq!(pool.file_offset(5), 5 * PAGE_SIZE);
        assert_eq!(pool.host_addr(5) - pool.host_addr(0), 5 * PAGE_SIZE);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            FramePool::new(0, Backing::Memfd),
            Err(PoolError::BadSize)
        ));
        assert!(matches!(
            FramePool::new(3, Backing::HugetlbMemfd),
            Err(PoolError::HugetlbAlignment)
        ));
    }
}
