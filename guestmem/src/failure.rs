//! Memory failure (hard poison), soft offline and unpoison.
//!
//! `memory_failure` follows Linux `mm/memory-failure.c`:
//! serialised by the `ops` mutex; `HWPOISON` is test-and-set first, so a
//! second failure of the same frame is reported and not handled again; then
//! a barrier through every list lock (see `alloc.rs`) and a dispatch on the
//! frame's state:
//! - free in the buddy: taken off, the rest of its block split and kept;
//! - on a per-vCPU list: **all** per-vCPU lists are drained, which retires
//!   it (Linux v4.13 fix: poisoned pages left on per-cpu lists were reused);
//! - mapped into the guest: the page lock is taken (waiting if locked), the
//!   mapping is invalidated through the notifiers (one
//!   `invalidate_range_start/end` covering the whole mapping, aligned), a
//!   huge mapping is split so the other 511 pages stay mapped, the guest
//!   frame is marked poisoned (its next access is reported to the guest)
//!   and the frame is retired for good, its host memory punched (inside the
//!   bracket: no secondary MMU maps it, nobody else can reach it);
//! - allocated to another user: flagged; it is retired when freed.

use std::sync::atomic::Ordering;

use crate::buddy::MAX_ORDER;
use crate::frame::{
    block_head, FrameId, FrameState, CLEAN, HAS_HWPOISONED, HWPOISON, MAPPED_AT_FAILURE,
    SOFT_OFFLINED,
};
use crate::memory::GuestMemory;
use crate::notifier::{GpaRange, InvalidateReason};
use crate::observe::PrimaryChange;
use crate::space::HUGE_ORDER;
use crate::{PAGE_SHIFT, PAGE_SIZE};

/// Flags of [`GuestMemory::memory_failure`] (Linux `MF_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MfFlags {
    /// The failure was consumed by an access (synchronous machine check):
    /// the caller reports it to the guest right away.
    pub action_required: bool,
}

/// What [`GuestMemory::memory_failure`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MfOutcome {
    /// The frame was already poisoned: reported, not handled again.
    AlreadyPoisoned,
    /// It was free in the buddy lists: taken off, rest of block kept.
    Free,
    /// It was on a per-vCPU list: every list was drained, frame retired.
    PerCpuList,
    /// It was mapped at `gpa` (mapping of `order`): unmapped, guest frame
    /// poisoned, frame retired.
    Mapped {
        /// GPA of the poisoned guest frame.
        gpa: u64,
        /// Order of the mapping that was invalidated.
        order: u32,
    },
    /// It is allocated to a non-guest user: it is retired when freed.
    InUse,
    /// A reserved frame: flagged only.
    Reserved,
}

/// Errors of failure handling.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FailureError {
    /// The frame index is not in the pool.
    #[error("frame {frame} is not in the pool ({frames} frames)")]
    NoSuchFrame {
        /// Frame passed.
        frame: FrameId,
        /// Pool size.
        frames: u32,
    },
    /// The GPA is not mapped.
    #[error("guest-physical address {gpa:#x} is not populated")]
    NotMapped {
        /// GPA passed.
        gpa: u64,
    },
    /// Soft offline of a frame allocated to a non-guest user (not movable).
    #[error("frame {frame} is in use by a non-guest user and cannot be migrated")]
    Busy {
        /// Frame passed.
        frame: FrameId,
    },
    /// No free frame to migrate to (soft offline never reclaims).
    #[error("no free frame to migrate frame {frame} to")]
    NoTarget {
        /// Frame passed.
        frame: FrameId,
    },
    /// Unpoison of a frame that is not poisoned.
    #[error("frame {frame} is not poisoned")]
    NotPoisoned {
        /// Frame passed.
        frame: FrameId,
    },
    /// Unpoison refused: the frame was mapped into the guest when it failed.
    #[error("frame {frame} was mapped into the guest when it failed; unpoison refused")]
    WasMapped {
        /// Frame passed.
        frame: FrameId,
    },
    /// Unpoison refused: the frame is still held by its user.
    #[error("frame {frame} is still in use; unpoison after it is freed")]
    StillInUse {
        /// Frame passed.
        frame: FrameId,
    },
}

/// What [`GuestMemory::soft_offline`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoftOfflineOutcome {
    /// Already poisoned or offlined: nothing done.
    AlreadyOffline,
    /// It was free: taken off.
    Free,
    /// It was mapped: migrated to `new_frame`.
    Migrated {
        /// The replacement frame.
        new_frame: FrameId,
        /// GPA of the migrated guest frame.
        gpa: u64,
    },
}

impl GuestMemory {
    fn check_frame(&self, frame: FrameId) -> Result<(), FailureError> {
        let frames = self.alloc.frames();
        if frame >= frames {
            return Err(FailureError::NoSuchFrame { frame, frames });
        }
        Ok(())
    }

    /// Every list lock and the space lock once: after this, a state read
    /// of a poisoned frame is stable (see `alloc.rs`). A frame found on a
    /// per-vCPU list is drained in the same pass; returns whether it was.
    fn poison_barrier(&self, frame: FrameId) -> bool {
        let drained = self.alloc.barrier_drain_if_pcp(frame);
        drop(self.write_space());
        drained
    }

    /// Start the invalidation for changing the mapped `frame` alone: the
    /// range covers its whole mapping of `order` (split if huge), only its
    /// own page changes. Returns the frame's GFN and the guard.
    fn begin_page_change(
        &self,
        frame: FrameId,
        order: u32,
        reason: InvalidateReason,
    ) -> (u64, crate::notifier::InvalidateGuard) {
        let gfn = self
            .alloc
            .desc(frame)
            .gfn()
            .expect("mapped frame has a reverse map");
        let range = GpaRange::for_order(gfn << PAGE_SHIFT, order);
        let changed = GpaRange::new(gfn << PAGE_SHIFT, crate::PAGE_SIZE);
        (
            gfn,
            self.notifiers
                .invalidate_range_start_split(range, changed, reason),
        )
    }

    /// Split the 2 MiB mapping headed by `head` (if it is one) into 4 KiB
    /// mappings, so the guest frame `gfn` can be changed alone. The caller
    /// holds an invalidation covering the whole huge mapping.
    fn split_if_huge(&self, s: &mut crate::space::Space, gfn: u64, head: FrameId, order: u32) {
        if order == HUGE_ORDER {
            s.split(gfn);
            self.alloc.split_allocated(head, order, FrameState::Mapped);
        }
    }

    /// Retire `frame`, which backed guest frame `gfn` until the caller
    /// unmapped it (the caller is inside the invalidation covering `gfn`
    /// and holds the frame, state `Allocated`): its host memory goes back
    /// to the host, then it leaves use for good.
    fn retire_unmapped(&self, frame: FrameId, gfn: u64) {
        let range = GpaRange::new(gfn << PAGE_SHIFT, PAGE_SIZE);
        self.observer.report(PrimaryChange::Punch, range, frame);
        if self.pool.punch(frame, 1) {
            self.alloc.desc(frame).set(CLEAN);
        }
        self.observer.report(PrimaryChange::Retire, range, frame);
        self.alloc.retire_allocated(frame);
    }

    /// Handle a hardware memory failure of `frame` (see the module docs).
    pub fn memory_failure(
        &self,
        frame: FrameId,
        _flags: MfFlags,
    ) -> Result<MfOutcome, FailureError> {
        self.check_frame(frame)?;
        let _ops = self.lock_ops();
        let d = self.alloc.desc(frame);
        if d.test_and_set(HWPOISON) {
            return Ok(MfOutcome::AlreadyPoisoned);
        }
        self.alloc.poisoned.fetch_add(1, Ordering::Relaxed);
        let mut drained = self.poison_barrier(frame);
        loop {
            {
                let mut zone = self.alloc.lock_zone();
                if zone.take_off(&self.alloc.descs, frame) {
                    d.set_state(FrameState::Retired, 0);
                    self.alloc.retired.fetch_add(1, Ordering::Relaxed);
                    return Ok(MfOutcome::Free);
                }
                // A block in use: flag its head under the zone lock, so the
                // free of the block (which checks it under the same lock)
                // retires the poisoned frame.
                if let Some((h, o)) = block_head(&self.alloc.descs, frame, MAX_ORDER) {
                    let hd = self.alloc.desc(h);
                    if o > 0 && matches!(hd.state(), FrameState::Allocated | FrameState::Mapped) {
                        hd.set(HAS_HWPOISONED);
                    }
                }
            }
            let Some((head, order)) = block_head(&self.alloc.descs, frame, MAX_ORDER) else {
                std::thread::yield_now();
                continue;
            };
            match self.alloc.desc(head).state() {
                FrameState::Pcp => {
                    self.alloc.drain_all();
                    drained = true;
                }
                FrameState::Retired if drained => return Ok(MfOutcome::PerCpuList),
                FrameState::Retired => return Ok(MfOutcome::Free),
                FrameState::Reserved => return Ok(MfOutcome::Reserved),
                FrameState::Buddy | FrameState::Tail => std::thread::yield_now(),
                FrameState::Allocated | FrameState::Mapped => {
                    return Ok(self.failure_in_use(frame, head, order));
                }
            }
        }
    }

    fn failure_in_use(&self, frame: FrameId, head: FrameId, order: u32) -> MfOutcome {
        self.lock_frame(head);
        let out = self.failure_locked(frame, head, order);
        self.unlock_frame(head);
        out
    }

    fn failure_locked(&self, frame: FrameId, head: FrameId, order: u32) -> MfOutcome {
        let hd = self.alloc.desc(head);
        if hd.state() != FrameState::Mapped {
            return MfOutcome::InUse;
        }
        self.alloc.desc(frame).set(MAPPED_AT_FAILURE);
        let (gfn, guard) = self.begin_page_change(frame, order, InvalidateReason::Poison);
        {
            let mut s = self.write_space();
            self.split_if_huge(&mut s, gfn, head, order);
            let m = s.remove(gfn).expect("mapping of a mapped frame");
            debug_assert_eq!(m.frame, frame);
            s.poisoned.insert(gfn);
            self.unmap_desc(m);
        }
        self.retire_unmapped(frame, gfn);
        drop(guard);
        MfOutcome::Mapped {
            gpa: gfn << PAGE_SHIFT,
            order,
        }
    }

    /// [`GuestMemory::memory_failure`] of the frame backing `gpa`.
    pub fn memory_failure_gpa(&self, gpa: u64, flags: MfFlags) -> Result<MfOutcome, FailureError> {
        let frame = self
            .frame_of_gpa(gpa)
            .ok_or(FailureError::NotMapped { gpa })?;
        self.memory_failure(frame, flags)
    }

    /// Take `frame` out of use without losing data: a free frame is taken
    /// off the free lists; a mapped one is migrated to a new frame (copy and
    /// remap inside one notifier bracket) and retired. The guest never
    /// notices. Never reclaims.
    pub fn soft_offline(&self, frame: FrameId) -> Result<SoftOfflineOutcome, FailureError> {
        self.check_frame(frame)?;
        let _ops = self.lock_ops();
        let d = self.alloc.desc(frame);
        if d.has(HWPOISON) {
            return Ok(SoftOfflineOutcome::AlreadyOffline);
        }
        loop {
            {
                let mut zone = self.alloc.lock_zone();
                if zone.take_off(&self.alloc.descs, frame) {
                    d.set(HWPOISON | SOFT_OFFLINED);
                    d.set_state(FrameState::Retired, 0);
                    drop(zone);
                    self.alloc.retired.fetch_add(1, Ordering::Relaxed);
                    self.alloc.poisoned.fetch_add(1, Ordering::Relaxed);
                    self.alloc.soft_offlined.fetch_add(1, Ordering::Relaxed);
                    return Ok(SoftOfflineOutcome::Free);
                }
            }
            let Some((head, order)) = block_head(&self.alloc.descs, frame, MAX_ORDER) else {
                std::thread::yield_now();
                continue;
            };
            match self.alloc.desc(head).state() {
                FrameState::Pcp => {
                    self.alloc.drain_all();
                }
                FrameState::Mapped => return self.migrate(frame, head, order),
                FrameState::Buddy | FrameState::Tail => std::thread::yield_now(),
                _ => return Err(FailureError::Busy { frame }),
            }
        }
    }

    fn migrate(
        &self,
        frame: FrameId,
        head: FrameId,
        order: u32,
    ) -> Result<SoftOfflineOutcome, FailureError> {
        let new = match self.alloc.alloc_from_zone(0) {
            Some(f) => f,
            None => {
                self.alloc.drain_all();
                self.alloc
                    .alloc_from_zone(0)
                    .ok_or(FailureError::NoTarget { frame })?
            }
        };
        self.lock_frame(head);
        let (gfn, guard) = self.begin_page_change(frame, order, InvalidateReason::Migrate);
        let d = self.alloc.desc(frame);
        {
            let mut s = self.write_space();
            self.split_if_huge(&mut s, gfn, head, order);
            // Both frames are ours: `new` was just allocated, `frame` is mapped,
            // every translation to it is invalidated and the space write lock
            // SAFETY: keeps `resolve` from handing either out during the copy.
            unsafe {
                self.pool
                    .frame_bytes_mut(new, 1)
                    .copy_from_slice(self.pool.frame_bytes(frame, 1));
            }
            self.alloc.desc(new).clear(CLEAN);
            self.alloc.desc(new).set_gfn(gfn);
            self.alloc.desc(new).set_state(FrameState::Mapped, 0);
            s.replace(gfn, new);
            d.set_gfn(crate::frame::NO_GFN);
            d.set(HWPOISON | SOFT_OFFLINED);
            d.set_state(FrameState::Allocated, 0);
        }
        // The data is in `new` now.
        self.retire_unmapped(frame, gfn);
        drop(guard);
        self.unlock_frame(head);
        self.alloc.poisoned.fetch_add(1, Ordering::Relaxed);
        self.alloc.soft_offlined.fetch_add(1, Ordering::Relaxed);
        Ok(SoftOfflineOutcome::Migrated {
            new_frame: new,
            gpa: gfn << PAGE_SHIFT,
        })
    }

    /// [`GuestMemory::soft_offline`] of the frame backing `gpa`.
    pub fn soft_offline_gpa(&self, gpa: u64) -> Result<SoftOfflineOutcome, FailureError> {
        let frame = self
            .frame_of_gpa(gpa)
            .ok_or(FailureError::NotMapped { gpa })?;
        self.soft_offline(frame)
    }

    /// Return a retired frame to use (tests, admin). Refused for frames that
    /// were mapped into the guest when they failed and for frames still held.
    pub fn unpoison(&self, frame: FrameId) -> Result<(), FailureError> {
        self.check_frame(frame)?;
        let _ops = self.lock_ops();
        let d = self.alloc.desc(frame);
        if !d.has(HWPOISON) {
            return Err(FailureError::NotPoisoned { frame });
        }
        if d.has(MAPPED_AT_FAILURE) {
            return Err(FailureError::WasMapped { frame });
        }
        if d.state() != FrameState::Retired {
            return Err(FailureError::StillInUse { frame });
        }
        let soft = d.has(SOFT_OFFLINED);
        {
            let mut zone = self.alloc.lock_zone();
            d.test_and_clear(HWPOISON | SOFT_OFFLINED);
            zone.free_block(&self.alloc.descs, frame, 0);
        }
        self.alloc.retired.fetch_sub(1, Ordering::Relaxed);
        self.alloc.poisoned.fetch_sub(1, Ordering::Relaxed);
        if soft {
            self.alloc.soft_offlined.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }
}
