//! The buddy allocator proper: free lists per order, splitting and
//! coalescing, and taking a single (poisoned) frame off the free lists
//! (Linux `take_page_off_buddy`). Everything here runs under the zone lock.
//!
//! Free lists are intrusive doubly linked lists threaded through `next` and
//! `prev` arrays indexed by frame, so any block can be unlinked in O(1).
//! Only a free block's head carries [`FrameState::Buddy`] and the order; its
//! other frames are [`FrameState::Tail`].

use crate::frame::{block_head, FrameDesc, FrameId, FrameState, HAS_HWPOISONED, HWPOISON};

/// Largest block order: 2^10 frames = 4 MiB.
pub const MAX_ORDER: u32 = 10;
const NIL: u32 = u32::MAX;

/// The zone: free lists and the counters they own.
pub(crate) struct Zone {
    heads: [u32; MAX_ORDER as usize + 1],
    counts: [u32; MAX_ORDER as usize + 1],
    next: Vec<u32>,
    prev: Vec<u32>,
    /// Frames on the free lists.
    pub(crate) nr_free: u64,
    /// Frames handed out directly by the zone (order > 0), net of frees.
    pub(crate) allocated: i64,
}

impl Zone {
    pub(crate) fn new(frames: u32) -> Self {
        Self {
            heads: [NIL; MAX_ORDER as usize + 1],
            counts: [0; MAX_ORDER as usize + 1],
            next: vec![NIL; frames as usize],
            prev: vec![NIL; frames as usize],
            nr_free: 0,
            allocated: 0,
        }
    }

    fn link(&mut self, f: FrameId, order: u32) {
        let o = order as usize;
        let h = self.heads[o];
        self.next[f as usize] = h;
        self.prev[f as usize] = NIL;
        if h != NIL {
            self.prev[h as usize] = f;
        }
        self.heads[o] = f;
        self.counts[o] += 1;
    }

    fn unlink(&mut self, f: FrameId, order: u32) {
        let o = order as usize;
        let (n, p) = (self.next[f as usize], self.prev[f as usize]);
        if p != NIL {
            self.next[p as usize] = n;
        } else {
            self.heads[o] = n;
        }
        if n != NIL {
            self.prev[n as usize] = p;
        }
        self.next[f as usize] = NIL;
        self.prev[f as usize] = NIL;
        self.counts[o] -= 1;
    }

    /// Number of free blocks of `order`.
    pub(crate) fn count(&self, order: u32) -> u32 {
        self.counts[order as usize]
    }

    /// Blocks on the free list of `order`, head first.
    pub(crate) fn blocks(&self, order: u32) -> impl Iterator<Item = FrameId> + '_ {
        let mut cur = self.heads[order as usize];
        std::iter::from_fn(move || {
            (cur != NIL).then(|| {
                let f = cur;
                cur = self.next[f as usize];
                f
            })
        })
    }

    /// Take a block of `order` off the free lists, splitting a larger one if
    /// needed. The returned head's state is left for the caller to set.
    pub(crate) fn rmqueue(&mut self, descs: &[FrameDesc], order: u32) -> Option<FrameId> {
        let mut o = (order..=MAX_ORDER).find(|&o| self.heads[o as usize] != NIL)?;
        let f = self.heads[o as usize];
        self.unlink(f, o);
        while o > order {
            o -= 1;
            let half = f + (1 << o);
            descs[half as usize].set_state(FrameState::Buddy, o);
            self.link(half, o);
        }
        self.nr_free -= 1 << order;
        Some(f)
    }

    /// Put the block `f` of `order` on the free lists, merging with free
    /// buddies. The caller has checked it carries no poisoned frame.
    pub(crate) fn free_block(&mut self, descs: &[FrameDesc], f: FrameId, order: u32) {
        self.nr_free += 1 << order;
        let mut cur = f;
        let mut o = order;
        while o < MAX_ORDER {
            let b = cur ^ (1 << o);
            if b as usize >= descs.len()
                || descs[b as usize].state_order() != (FrameState::Buddy, o)
            {
                break;
            }
            self.unlink(b, o);
            if b < cur {
                descs[cur as usize].set_state(FrameState::Tail, 0);
                cur = b;
            } else {
                descs[b as usize].set_state(FrameState::Tail, 0);
            }
            o += 1;
        }
        descs[cur as usize].set_state(FrameState::Buddy, o);
        self.link(cur, o);
    }

    /// Free a block that may contain poisoned frames: an order-0 frame with
    /// `HWPOISON`, or a block whose head carries `HAS_HWPOISONED` (set by
    /// memory failure under the zone lock), has its poisoned frames retired
    /// (state `Retired`) and the rest freed. Returns frames retired.
    pub(crate) fn free_block_checked(
        &mut self,
        descs: &[FrameDesc],
        f: FrameId,
        order: u32,
    ) -> u32 {
        let d = &descs[f as usize];
        if order == 0 {
            if d.has(HWPOISON) {
                d.set_state(FrameState::Retired, 0);
                return 1;
            }
            self.free_block(descs, f, 0);
            return 0;
        }
        if !d.has(HAS_HWPOISONED) {
            self.free_block(descs, f, order);
            return 0;
        }
        d.clear(HAS_HWPOISONED);
        let mut retired = 0;
        for i in f..f + (1u32 << order) {
            if descs[i as usize].has(HWPOISON) {
                descs[i as usize].set_state(FrameState::Retired, 0);
                retired += 1;
            } else {
                descs[i as usize].set_state(FrameState::Allocated, 0);
                self.free_block(descs, i, 0);
            }
        }
        retired
    }

    /// If `frame` lies in a free block, take exactly that frame off the free
    /// lists, give the rest of the block back split into buddies, and return
    /// true. The frame's state is left for the caller (it retires it).
    pub(crate) fn take_off(&mut self, descs: &[FrameDesc], frame: FrameId) -> bool {
        let Some((head, order)) = block_head(descs, frame, MAX_ORDER) else {
            return false;
        };
        if descs[head as usize].state() != FrameState::Buddy {
            return false;
        }
        self.unlink(head, order);
        let (mut h, mut o) = (head, order);
        while o > 0 {
            o -= 1;
            let upper = h + (1 << o);
            let (keep, give) = if frame >= upper {
                (upper, h)
            } else {
                (h, upper)
            };
            descs[give as usize].set_state(FrameState::Buddy, o);
            self.link(give, o);
            h = keep;
        }
        self.nr_free -= 1;
        descs[frame as usize].set_state(FrameState::Allocated, 0);
        true
    }
}
