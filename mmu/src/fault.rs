//! The fault/invalidate protocol of KVM (`virt/kvm/kvm_main.c`), reusable by
//! any secondary MMU: [`ShadowEpt`](crate::ShadowEpt) uses it, and the VMM can
//! wrap its own subscribers' state (KVM mapping, device caches) in an
//! [`MmuLock`].
//!
//! | KVM                                   | here                                  |
//! |---------------------------------------|---------------------------------------|
//! | `mmu_seq = kvm->mmu_invalidate_seq; smp_rmb()` | [`MmuLock::fault_begin`]      |
//! | `write_lock(&kvm->mmu_lock)`          | [`MmuLock::lock`]                     |
//! | `kvm_mmu_invalidate_begin` + `_range_add` | [`MmuGuard::invalidate_begin`]    |
//! | `kvm_mmu_invalidate_end`              | [`MmuGuard::invalidate_end`]          |
//! | `mmu_invalidate_retry_gfn`            | [`MmuGuard::retry_needed`]            |
//!
//! A fault: `let s = lock.fault_begin();` resolve the frame from the primary
//! map (no lock held); `let g = lock.lock();` if `g.retry_needed(s, range)`
//! drop everything and start over, else install under `g`.
//!
//! Why it is enough (see also `DESIGN.md`): the sequence is bumped with
//! `Release` *after* the primary map changed and the snapshot is read with
//! `Acquire` *before* the primary map is read. If the resolve returned the old
//! frame, the snapshot was taken before the bump; the fault then takes the lock
//! either before `invalidate_begin` (the install is zapped by the invalidation
//! that follows), or between begin and end (the range is tracked as in
//! progress), or after end (the sequence moved). In every case no translation
//! to the old frame survives `invalidate_range_end`.

use core::ops::{Deref, DerefMut};

use guestmem::notifier::GpaRange;

use crate::sync::{AtomicU64, Mutex, MutexGuard, Ordering};

/// Snapshot of the invalidation sequence, taken by [`MmuLock::fault_begin`]
/// before the primary map is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultSeq(pub u64);

/// Invalidations in progress: their count and the union (min start, max end)
/// of their ranges, like `mmu_invalidate_in_progress` and
/// `mmu_invalidate_range_start/end`. Only touched under the [`MmuLock`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InvalidateTracker {
    in_progress: u32,
    range_start: u64,
    range_end: u64,
    unbalanced_ends: u64,
}

impl InvalidateTracker {
    /// Count one more invalidation and widen the tracked range to cover it.
    pub fn begin(&mut self, range: GpaRange) {
        self.in_progress += 1;
        if self.in_progress == 1 {
            self.range_start = range.start;
            self.range_end = range.end;
        } else {
            self.range_start = self.range_start.min(range.start);
            self.range_end = self.range_end.max(range.end);
        }
    }

    /// Drop one invalidation from the count (the caller bumps the sequence
    /// first). An `end` without a `begin` is a caller bug: it is counted in
    /// [`InvalidateTracker::unbalanced_ends`] and otherwise ignored.
    pub fn end(&mut self) {
        if self.in_progress == 0 {
            self.unbalanced_ends += 1;
            return;
        }
        self.in_progress -= 1;
        if self.in_progress == 0 {
            self.range_start = 0;
            self.range_end = 0;
        }
    }

    /// Number of invalidations between start and end.
    pub fn in_progress(&self) -> u32 {
        self.in_progress
    }

    /// The tracked range while any invalidation is in progress.
    pub fn range(&self) -> Option<GpaRange> {
        (self.in_progress > 0).then_some(GpaRange {
            start: self.range_start,
            end: self.range_end,
        })
    }

    /// True when an invalidation in progress may cover part of `range`.
    pub fn blocks(&self, range: GpaRange) -> bool {
        self.in_progress > 0 && self.range_start < range.end && range.start < self.range_end
    }

    /// `end` calls that had no matching `begin` (always 0 for a correct
    /// primary side).
    pub fn unbalanced_ends(&self) -> u64 {
        self.unbalanced_ends
    }
}

struct Locked<T> {
    tracker: InvalidateTracker,
    data: T,
}

/// The mmu lock of one secondary MMU together with its invalidation sequence
/// and tracker; `T` is the state the lock protects (the page table
/// bookkeeping for [`ShadowEpt`](crate::ShadowEpt)).
pub struct MmuLock<T> {
    /// `mmu_invalidate_seq`: written only under `inner`, read locklessly by
    /// [`MmuLock::fault_begin`].
    seq: AtomicU64,
    inner: Mutex<Locked<T>>,
}

impl<T> MmuLock<T> {
    /// A lock protecting `data`, with no invalidation in progress.
    pub fn new(data: T) -> Self {
        Self {
            seq: AtomicU64::new(0),
            inner: Mutex::new(Locked {
                tracker: InvalidateTracker::default(),
                data,
            }),
        }
    }

    /// Snapshot the sequence before resolving the primary map (the
    /// `Acquire` is KVM's `smp_rmb()`: the primary read cannot move above it).
    pub fn fault_begin(&self) -> FaultSeq {
        FaultSeq(self.seq.load(Ordering::Acquire))
    }

    /// Take the mmu lock.
    pub fn lock(&self) -> MmuGuard<'_, T> {
        MmuGuard {
            seq: &self.seq,
            guard: self.inner.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Current sequence (for statistics and tests).
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }
}

/// The mmu lock held; dereferences to the protected state.
pub struct MmuGuard<'a, T> {
    seq: &'a AtomicU64,
    guard: MutexGuard<'a, Locked<T>>,
}

impl<T> MmuGuard<'_, T> {
    /// True when a fault that took `snap` before resolving `range` must not
    /// install: an invalidation overlapping `range` is in progress, or one
    /// ended since the snapshot (`mmu_invalidate_retry_gfn`).
    pub fn retry_needed(&self, snap: FaultSeq, range: GpaRange) -> bool {
        if self.guard.tracker.blocks(range) {
            return true;
        }
        // The sequence only changes under the lock we hold.
        self.seq.load(Ordering::Relaxed) != snap.0
    }

    /// `invalidate_range_start`: count the invalidation and widen the range.
    /// The caller zaps the range while still holding the lock.
    pub fn invalidate_begin(&mut self, range: GpaRange) {
        self.guard.tracker.begin(range);
    }

    /// `invalidate_range_end`: bump the sequence, then drop the count.
    pub fn invalidate_end(&mut self) {
        let next = self.seq.load(Ordering::Relaxed).wrapping_add(1);
        self.seq.store(next, Ordering::Release);
        self.guard.tracker.end();
    }

    /// The invalidations in progress.
    pub fn tracker(&self) -> &InvalidateTracker {
        &self.guard.tracker
    }
}

impl<T> Deref for MmuGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard.data
    }
}

impl<T> DerefMut for MmuGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard.data
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;

    fn r(s: u64, e: u64) -> GpaRange {
        GpaRange { start: s, end: e }
    }

    #[test]
    fn tracker_widens_and_resets() {
        let mut t = InvalidateTracker::default();
        assert_eq!(t.range(), None);
        t.begin(r(0x2000, 0x3000));
        t.begin(r(0x10000, 0x11000));
        assert_eq!(t.in_progress(), 2);
        assert_eq!(t.range(), Some(r(0x2000, 0x11000)));
        // Widened: a range between the two is blocked too (conservative).
        assert!(t.blocks(r(0x5000, 0x6000)));
        assert!(!t.blocks(r(0x11000, 0x12000)));
        t.end();
        assert_eq!(t.range(), Some(r(0x2000, 0x11000)));
        t.end();
        assert_eq!(t.range(), None);
        assert!(!t.blocks(r(0, u64::MAX)));
        t.end();
        assert_eq!(t.unbalanced_ends(), 1);
        assert_eq!(t.in_progress(), 0);
    }

    #[test]
    fn retry_on_overlap_in_progress_or_seq_moved() {
        let l = MmuLock::new(());
        let s = l.fault_begin();
        {
            let g = l.lock();
            assert!(!g.retry_needed(s, r(0, 0x1000)));
        }
        let mut g = l.lock();
        g.invalidate_begin(r(0x1000, 0x2000));
        assert!(g.retry_needed(s, r(0x1000, 0x2000)));
        assert!(!g.retry_needed(s, r(0x2000, 0x3000)));
        g.invalidate_end();
        // Ended: no longer in progress but the sequence moved.
        assert!(g.retry_needed(s, r(0x2000, 0x3000)));
        drop(g);
        let s2 = l.fault_begin();
        assert_eq!(s2.0, s.0 + 1);
        assert!(!l.lock().retry_needed(s2, r(0x1000, 0x2000)));
    }
}
