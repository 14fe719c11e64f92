//! Frame descriptors: one compact [`FrameDesc`] per 4 KiB frame, the
//! `struct page` analogue.
//!
//! A descriptor holds three atomic words (16 bytes):
//! - `state`: the exclusive *state* (bits 0..4) and the block *order*
//!   (bits 4..8, valid on heads). It is written with a plain store, only
//!   under the lock that owns the list or map the frame moves between
//!   (per-vCPU list lock or owner section, zone lock, space lock), so the
//!   allocation fast path
//!   needs no read-modify-write on the descriptor.
//! - `flags`: `HWPOISON`, `LOCKED`, `WAITERS`, `CLEAN`, `HAS_HWPOISONED`,
//!   `MAPPED_AT_FAILURE`, `SOFT_OFFLINED`, changed with atomic
//!   read-modify-write so concurrent setters never lose updates.
//! - `gfn`: the reverse map, the guest frame number this frame backs while it
//!   is mapped ([`NO_GFN`] otherwise).

use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Index of a frame in the pool (frame `i` is at file offset `i * PAGE_SIZE`).
pub type FrameId = u32;

/// `gfn` value of a frame that backs no guest frame.
pub const NO_GFN: u64 = u64::MAX;

/// Exclusive state of a frame (exactly one at any time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum FrameState {
    /// Not the head of a block: part of the block whose head is the nearest
    /// aligned non-tail frame below (free or allocated, like that head).
    Tail = 0,
    /// Head of a free block on a buddy free list.
    Buddy = 1,
    /// On a per-vCPU list (order 0).
    Pcp = 2,
    /// Handed out by [`crate::FrameAllocator::alloc`], not in the guest map.
    Allocated = 3,
    /// Head of a block mapped into the guest-physical map.
    Mapped = 4,
    /// Retired after a hardware or soft failure; never handed out again.
    Retired = 5,
    /// Never handed out (set aside at creation).
    Reserved = 6,
}

impl FrameState {
    fn from_bits(b: u32) -> Self {
        match b & STATE_MASK {
            1 => Self::Buddy,
            2 => Self::Pcp,
            3 => Self::Allocated,
            4 => Self::Mapped,
            5 => Self::Retired,
            6 => Self::Reserved,
            _ => Self::Tail,
        }
    }
}

const STATE_MASK: u32 = 0xf;
const ORDER_SHIFT: u32 = 4;
const ORDER_MASK: u32 = 0xf << ORDER_SHIFT;

/// The frame has a hardware (or soft-offline) failure; never hand it out.
pub const HWPOISON: u32 = 1 << 8;
/// The page lock bit.
pub const LOCKED: u32 = 1 << 9;
/// Somebody may be waiting on the page lock (wake on unlock).
pub const WAITERS: u32 = 1 << 10;
/// The frame's contents are known to be zero (fresh or punched).
pub const CLEAN: u32 = 1 << 11;
/// On a block head: some frame of the block is poisoned (split on free).
pub const HAS_HWPOISONED: u32 = 1 << 12;
/// The frame was mapped into the guest when it failed: unpoison is refused.
pub const MAPPED_AT_FAILURE: u32 = 1 << 13;
/// The frame was retired by soft offline (its data was migrated).
pub const SOFT_OFFLINED: u32 = 1 << 14;

/// One frame's descriptor (16 bytes).
pub struct FrameDesc {
    state: AtomicU32,
    word: AtomicU32,
    gfn: AtomicU64,
}

impl FrameDesc {
    /// A descriptor in state `state`, order 0, with `flags`.
    pub(crate) fn new(state: FrameState, flags: u32) -> Self {
        Self {
            state: AtomicU32::new(state as u32),
            word: AtomicU32::new(flags),
            gfn: AtomicU64::new(NO_GFN),
        }
    }

    /// The raw flags word.
    #[inline]
    pub fn raw(&self) -> u32 {
        self.word.load(Ordering::Acquire)
    }

    /// Current state.
    #[inline]
    pub fn state(&self) -> FrameState {
        FrameState::from_bits(self.state.load(Ordering::Acquire))
    }

    /// Block order (meaningful on heads).
    #[inline]
    pub fn order(&self) -> u32 {
        (self.state.load(Ordering::Acquire) & ORDER_MASK) >> ORDER_SHIFT
    }

    /// State and order read together.
    #[inline]
    pub fn state_order(&self) -> (FrameState, u32) {
        let s = self.state.load(Ordering::Acquire);
        (FrameState::from_bits(s), (s & ORDER_MASK) >> ORDER_SHIFT)
    }

    /// True when `flag` is set.
    #[inline]
    pub fn has(&self, flag: u32) -> bool {
        self.raw() & flag != 0
    }

    /// Set state and order, keeping the flags. The caller holds the lock that
    /// owns the frame's current and new state.
    #[inline]
    pub(crate) fn set_state(&self, state: FrameState, order: u32) {
        self.state
            .store(state as u32 | (order << ORDER_SHIFT), Ordering::Release);
    }

    /// Set `flag` (read-modify-write).
    #[inline]
    pub(crate) fn set(&self, flag: u32) {
        self.word.fetch_or(flag, Ordering::AcqRel);
    }

    /// Clear `flag` (read-modify-write).
    #[inline]
    pub(crate) fn clear(&self, flag: u32) {
        self.word.fetch_and(!flag, Ordering::AcqRel);
    }

    /// Atomically set `flag`; returns true when it was already set.
    #[inline]
    pub(crate) fn test_and_set(&self, flag: u32) -> bool {
        self.word.fetch_or(flag, Ordering::SeqCst) & flag != 0
    }

    /// Atomically clear `flag`; returns true when it was set.
    #[inline]
    pub(crate) fn test_and_clear(&self, flag: u32) -> bool {
        self.word.fetch_and(!flag, Ordering::SeqCst) & flag != 0
    }

    /// Compare-exchange on the raw word (page lock).
    #[inline]
    pub(crate) fn cas(&self, old: u32, new: u32) -> Result<u32, u32> {
        self.word
            .compare_exchange_weak(old, new, Ordering::Acquire, Ordering::Relaxed)
    }

    /// Fetch-and with release ordering (page unlock).
    #[inline]
    pub(crate) fn fetch_and_release(&self, mask: u32) -> u32 {
        self.word.fetch_and(mask, Ordering::Release)
    }

    /// Reverse map: the guest frame number this frame backs.
    #[inline]
    pub fn gfn(&self) -> Option<u64> {
        match self.gfn.load(Ordering::Acquire) {
            NO_GFN => None,
            g => Some(g),
        }
    }

    #[inline]
    pub(crate) fn set_gfn(&self, gfn: u64) {
        self.gfn.store(gfn, Ordering::Release);
    }
}

/// Find the head of the block containing `frame` given a state lookup;
/// returns `(head, order)` or `None` when the descriptors are inconsistent.
pub(crate) fn block_head(
    descs: &[FrameDesc],
    frame: FrameId,
    max_order: u32,
) -> Option<(FrameId, u32)> {
    let (st, order) = descs[frame as usize].state_order();
    if st != FrameState::Tail {
        return Some((frame, order));
    }
    for o in 1..=max_order {
        let h = frame & !((1u32 << o) - 1);
        let (hs, ho) = descs[h as usize].state_order();
        if hs != FrameState::Tail {
            return (ho >= o).then_some((h, ho));
        }
    }
    None
}
