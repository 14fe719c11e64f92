//! Page locks of the frames an operation changes (Linux: the folios a
//! truncate or migration locks before unmapping them).
//!
//! Every operation that changes a mapped frame's mapping or state takes the
//! page lock of the block's head frame first: release, reset, zero-page
//! reclaim (try-lock: reclaim skips locked frames, like Linux's
//! `folio_trylock` in `shrink_folio_list`), memory failure and soft offline
//! (`failure.rs`), population (`resolve` locks the new block while it
//! installs it). Lock order (docs/memory.md, "Lock order"): the ops lock,
//! then page locks (several in ascending frame order), then notifier
//! callbacks, then the space lock. Page locks are dropped before the
//! frames are freed, so a free frame is never locked by its old user.

use crate::frame::FrameId;
use crate::memory::GuestMemory;
use crate::notifier::GpaRange;
use crate::space::Space;
use crate::PAGE_SHIFT;

/// Page locks held on a set of head frames (unlocked on drop).
pub(crate) struct LockedFrames<'a> {
    gm: &'a GuestMemory,
    /// Sorted, no duplicates.
    frames: Vec<FrameId>,
}

impl<'a> LockedFrames<'a> {
    /// Lock `frames` in ascending order (sleeps while others hold them).
    pub(crate) fn lock(gm: &'a GuestMemory, mut frames: Vec<FrameId>) -> Self {
        frames.sort_unstable();
        frames.dedup();
        for &f in &frames {
            gm.lock_frame(f);
        }
        Self { gm, frames }
    }

    /// True when every frame of `heads` is locked here.
    pub(crate) fn covers(&self, heads: &[FrameId]) -> bool {
        heads.iter().all(|f| self.frames.binary_search(f).is_ok())
    }

    /// Unlock everything now.
    pub(crate) fn unlock(self) {}
}

impl Drop for LockedFrames<'_> {
    fn drop(&mut self) {
        for &f in &self.frames {
            self.gm.unlock_frame(f);
        }
    }
}

/// Head frames of the mappings overlapping `range` in `s`.
pub(crate) fn mapped_heads(s: &Space, range: GpaRange) -> Vec<FrameId> {
    let mut heads = Vec::new();
    let (mut gfn, end) = (range.start >> PAGE_SHIFT, range.end >> PAGE_SHIFT);
    while gfn < end {
        match s.lookup(gfn) {
            Some(m) => {
                heads.push(m.frame);
                gfn = m.gfn + (1 << m.order);
            }
            None => gfn += 1,
        }
    }
    heads
}
