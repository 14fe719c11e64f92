//! Per-vCPU frame lists (Linux per-cpu pages).
//!
//! Each vCPU owns a list of order-0 frames behind its own small spin lock.
//! The owner takes that lock uncontended (one compare-and-swap and one
//! release store), so an alloc+free pair stays in the tens of nanoseconds;
//! a remote drain takes the same lock, so lists can be drained while their
//! owners keep running (Linux >= 5.19 does the same with `pcp->lock`).
//! Lock order: a per-vCPU lock is taken before the zone lock, and at most
//! one per-vCPU lock is held at a time except by the checker, which takes
//! them in index order.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};

use crate::frame::FrameId;
use crate::sync::{spin_hint, AtomicBool, Ordering};

/// Watermarks of the per-vCPU lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcpConfig {
    /// A list longer than this after a free gives `batch` frames back.
    pub high: u32,
    /// Frames moved between a list and the zone at once.
    pub batch: u32,
}

impl Default for PcpConfig {
    fn default() -> Self {
        // Linux's defaults scale with zone size; these suit a few GiB.
        Self {
            high: 192,
            batch: 32,
        }
    }
}

/// A test-and-test-and-set spin lock (yields after a short spin).
pub(crate) struct SpinLock<T> {
    locked: AtomicBool,
    data: UnsafeCell<T>,
}

// SAFETY: the lock serialises all access to `data`, so sharing the lock
// between threads is sound when `T` may be sent between them.
unsafe impl<T: Send> Sync for SpinLock<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for SpinLock<T> {}

pub(crate) struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> SpinLock<T> {
    pub(crate) fn new(data: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            data: UnsafeCell::new(data),
        }
    }

    #[inline]
    pub(crate) fn lock(&self) -> SpinGuard<'_, T> {
        if self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_slow();
        }
        SpinGuard { lock: self }
    }

    #[cold]
    fn lock_slow(&self) {
        let mut spins = 0u32;
        loop {
            while self.locked.load(Ordering::Relaxed) {
                spin_hint(spins);
                spins = spins.saturating_add(1);
            }
            if self
                .locked
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
            spin_hint(spins);
        }
    }
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the guard proves we hold the lock, so no one else accesses
        // the data.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the only
        // reference derived from the guard.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

/// The contents of one vCPU's list.
pub(crate) struct PcpList {
    /// Cached frames; the hot end is the back.
    pub(crate) frames: Vec<FrameId>,
    /// Order-0 frames allocated through this list, net of frees to it.
    pub(crate) allocated: i64,
}

/// One vCPU's list, on its own cache lines.
#[repr(align(128))]
pub(crate) struct Pcp {
    pub(crate) list: SpinLock<PcpList>,
}

impl Pcp {
    pub(crate) fn new(cfg: PcpConfig) -> Self {
        Self {
            list: SpinLock::new(PcpList {
                frames: Vec::with_capacity(cfg.high as usize + cfg.batch as usize + 1),
                allocated: 0,
            }),
        }
    }
}
