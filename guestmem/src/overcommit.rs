//! Overcommit: a frame pool smaller than guest RAM.
//!
//! The memfd is sized for all of guest RAM (plus spares) as before, but
//! only `pool_frames` of its frames are usable: the others stay in state
//! `Reserved` (never touched, so they hold no host memory) until
//! [`GuestMemory::grow_pool`] hands them to the buddy lists. Shrinking is
//! not supported (it would need to migrate or evict frames in use).
//!
//! Whoever waits for frames (the VMM's pager parks faults that met
//! [`crate::OutOfMemory`]) registers one callback with
//! [`GuestMemory::set_free_notify`]; it runs after frames came back:
//! `release_range` that freed frames (balloon inflate, free page
//! reporting), `reset`, `free`, and a pool grow. It runs with at most the
//! `ops` mutex held and must only signal (e.g. write an eventfd), never call
//! back into guestmem.

use std::sync::{Arc, RwLock};

use crate::memory::GuestMemory;
use crate::PAGE_SIZE;

/// The callback run when frames come back.
pub type FreeNotifyFn = dyn Fn() + Send + Sync;

/// Slot for the one [`FreeNotifyFn`].
#[derive(Default)]
pub(crate) struct FreeNotify(RwLock<Option<Arc<FreeNotifyFn>>>);

/// Why a pool resize was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolResizeError {
    /// Smaller than today.
    #[error(
        "cannot shrink the frame pool from {current_mib} MiB to {asked_mib} MiB: frames in use \
         cannot be taken back (only growing is supported; inflate the balloon to return memory)"
    )]
    Shrink {
        /// Pool size now.
        current_mib: u64,
        /// Asked for.
        asked_mib: u64,
    },
    /// Larger than guest RAM (plus spares).
    #[error(
        "cannot grow the frame pool to {asked_mib} MiB: the most it can hold is {max_mib} MiB \
         (guest RAM plus spare frames)"
    )]
    TooLarge {
        /// Asked for.
        asked_mib: u64,
        /// Largest possible size.
        max_mib: u64,
    },
}

impl GuestMemory {
    /// Frames the allocator may hand out (the pool size), retired ones
    /// included.
    pub fn pool_frames(&self) -> u64 {
        u64::from(self.alloc.frames()) - self.alloc.reserved()
    }

    /// Largest pool size in frames (all frames of the memfd).
    pub fn max_pool_frames(&self) -> u64 {
        u64::from(self.alloc.frames())
    }

    /// Grow the pool to `frames` usable frames (a size equal to today's is
    /// a no-op). Returns the frames added; wakes whoever waits for frames.
    pub fn grow_pool(&self, frames: u64) -> Result<u64, PoolResizeError> {
        let mib = |f: u64| (f * PAGE_SIZE) >> 20;
        let _ops = self.lock_ops();
        let current = self.pool_frames();
        if frames < current {
            return Err(PoolResizeError::Shrink {
                current_mib: mib(current),
                asked_mib: mib(frames),
            });
        }
        if frames > self.max_pool_frames() {
            return Err(PoolResizeError::TooLarge {
                asked_mib: mib(frames),
                max_mib: mib(self.max_pool_frames()),
            });
        }
        let added = self.alloc.unreserve(frames - current);
        drop(_ops);
        if added > 0 {
            self.notify_freed();
        }
        Ok(added)
    }

    /// Install the callback run when frames come back (replaces any
    /// previous one); `None` removes it.
    pub fn set_free_notify(&self, f: Option<Arc<FreeNotifyFn>>) {
        *self
            .free_notify
            .0
            .write()
            .unwrap_or_else(|e| e.into_inner()) = f;
    }

    pub(crate) fn notify_freed(&self) {
        let f = self
            .free_notify
            .0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(f) = f {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GuestMemoryConfig, ResolveError};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// 8 MiB of RAM over a 2 MiB pool: population stops at the pool size
    /// with `OutOfMemory`, a grow lets it continue and signals the
    /// callback, shrinking and growing past RAM are refused, and the
    /// checker agrees all along.
    #[test]
    fn small_pool_runs_dry_then_grows() {
        let mut cfg = GuestMemoryConfig::new(vec![crate::GpaRange::new(0, 8 << 20)], 1);
        cfg.pool_frames = Some(512);
        let gm = GuestMemory::new(cfg).unwrap();
        assert_eq!(gm.pool_frames(), 512);
        assert_eq!(gm.stats().reserved, 2048 - 512);
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        gm.set_free_notify(Some(Arc::new(move || {
            c.fetch_add(1, Ordering::Relaxed);
        })));
        let mut gpa = 0;
        let err = loop {
            match gm.resolve(gpa, 0) {
                Ok(r) => {
                    // Dirty every frame so zero reclaim (not registered
                    // here anyway) could not help.
                    // SAFETY: `host_addr` is the direct map of the frame
                    // just mapped at `gpa`, valid while `gm` lives.
                    unsafe { *(r.host_addr as *mut u8) = 1 };
                    gpa += PAGE_SIZE;
                }
                Err(e) => break e,
            }
        };
        assert!(matches!(err, ResolveError::OutOfMemory(_)), "{err}");
        assert_eq!(gpa, 2 << 20, "populated {gpa:#x} before running dry");
        gm.check().unwrap();
        assert!(matches!(
            gm.grow_pool(100),
            Err(PoolResizeError::Shrink { .. })
        ));
        assert!(matches!(
            gm.grow_pool(4096),
            Err(PoolResizeError::TooLarge { .. })
        ));
        assert_eq!(gm.grow_pool(2048).unwrap(), 2048 - 512);
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert_eq!(gm.stats().reserved, 0);
        gm.check().unwrap();
        while gpa < 8 << 20 {
            gm.resolve(gpa, 0).unwrap();
            gpa += PAGE_SIZE;
        }
        gm.check().unwrap();
        gm.release_range(crate::GpaRange::new(0, 1 << 20)).unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }

    /// A reserved frame poisoned before the grow is retired, not freed.
    #[test]
    fn grow_retires_a_reserved_frame_that_was_poisoned() {
        let mut cfg = GuestMemoryConfig::new(vec![crate::GpaRange::new(0, 4 << 20)], 1);
        cfg.pool_frames = Some(512);
        let gm = GuestMemory::new(cfg).unwrap();
        // Frames [0, 512) are the reserved ones.
        assert_eq!(
            gm.memory_failure(100, crate::MfFlags::default()).unwrap(),
            crate::MfOutcome::Reserved
        );
        assert_eq!(gm.grow_pool(1024).unwrap(), 511);
        let st = gm.stats();
        assert_eq!((st.reserved, st.retired), (0, 1), "{st:?}");
        gm.check().unwrap();
        // 1023 usable frames for 1024 pages: the last one runs dry, and
        // no page ever gets the poisoned frame.
        for gpa in (0..(4 << 20) - PAGE_SIZE).step_by(PAGE_SIZE as usize) {
            let r = gm.resolve(gpa, 0).unwrap();
            let frames = r.frame..r.frame + (1 << r.order);
            assert!(!frames.contains(&100), "{r:?}");
        }
        assert!(matches!(
            gm.resolve((4 << 20) - PAGE_SIZE, 0),
            Err(ResolveError::OutOfMemory(_))
        ));
        gm.check().unwrap();
    }
}
