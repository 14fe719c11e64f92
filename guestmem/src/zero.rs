//! Zero-page reclaim: guest pages whose frames hold only zeros go back to
//! the host (like KSM merging zero pages, or Linux's reclaim dropping clean
//! pages it can rebuild). The guest loses nothing: its next access faults
//! in a fresh zeroed frame. This is the reclaim callback the VMM registers
//! for guestmem's OOM path.
//!
//! Protocol, per candidate mapping: a racy pre-check finds frames that look
//! zero; then, inside one `invalidate_range_start/end` bracket over the
//! whole mapping (`PAGE_SIZE << order`), no secondary MMU can reach the
//! frame and nobody can write it, so the check is repeated there and only a
//! frame that is still zero (and still mapped at the same place) is
//! unmapped, punched and freed, still inside that bracket. Huge mappings are taken only when all 512
//! frames are zero; they are never split for this.

use crate::frame::FrameId;
use crate::memory::GuestMemory;
use crate::notifier::InvalidateReason;
use crate::space::Mapping;
use crate::PAGE_SIZE;

/// What [`GuestMemory::reclaim_zero_pages`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroReclaim {
    /// Mappings that looked zero before the bracket.
    pub candidates: u64,
    /// Frames freed (all zero inside the bracket).
    pub freed_frames: u64,
    /// Candidates written meanwhile (kept).
    pub raced: u64,
}

impl GuestMemory {
    /// True when every byte of the `1 << order` frames at `frame` is zero.
    /// Reads through the direct map with volatile loads: the guest may be
    /// writing the frame concurrently (the answer is then only a hint).
    fn frames_zero(&self, frame: FrameId, order: u32) -> bool {
        let base = self.pool.host_addr(frame) as *const u64;
        let words = ((PAGE_SIZE << order) / 8) as usize;
        // The block lies in the pool's direct map (host_addr asserts the
        // head; mapped blocks never cross the pool's end), mapped while
        // `self` lives; the guest may write it meanwhile, hence volatile.
        (0..words).all(|i| {
            // SAFETY: in bounds of the live direct map (see above).
            unsafe { base.add(i).read_volatile() == 0 }
        })
    }

    /// Release up to `max_pages` guest pages whose frames hold only zeros
    /// (see the module docs). Never waits for another memory operation: if
    /// one is running (it may be the allocation that asked for reclaim)
    /// this returns at once with nothing done.
    pub fn reclaim_zero_pages(&self, max_pages: u64) -> ZeroReclaim {
        let mut rep = ZeroReclaim::default();
        let Ok(_ops) = self.ops.try_lock() else {
            return rep;
        };
        let candidates: Vec<Mapping> = {
            let s = self.read_space();
            let mut pages = 0u64;
            s.mappings()
                .filter(|m| self.frames_zero(m.frame, m.order))
                .take_while(|m| {
                    pages += 1 << m.order;
                    pages <= max_pages.max(1 << m.order)
                })
                .collect()
        };
        rep.candidates = candidates.len() as u64;
        for m in candidates {
            // Like Linux's reclaim (`folio_trylock`): a locked frame is
            // busy, skip it rather than wait.
            if !self.try_lock_frame(m.frame) {
                rep.raced += 1;
                continue;
            }
            let guard = self
                .notifiers
                .invalidate_range_start(m.range(), InvalidateReason::Release);
            let removed = {
                let mut s = self.write_space();
                // Still the same mapping, still zero: nobody can write it now.
                let same = s.lookup(m.gfn) == Some(m) && self.frames_zero(m.frame, m.order);
                if same {
                    s.remove(m.gfn);
                    self.unmap_desc(m);
                    rep.freed_frames += 1 << m.order;
                } else {
                    rep.raced += 1;
                }
                same
            };
            self.unlock_frame(m.frame);
            if removed {
                self.punch_and_free(vec![m]);
            }
            drop(guard);
        }
        self.released
            .fetch_add(rep.freed_frames, std::sync::atomic::Ordering::Relaxed);
        rep
    }
}
