//! [`FrameAllocator`]: frame descriptors + buddy zone + per-vCPU lists.
//!
//! This layer never blocks on anything but its own short locks and never
//! reclaims: an empty allocator answers [`AllocError::Empty`] and the caller
//! (see `oom.rs`) decides what to do.
//!
//! Poison protocol (why a poisoned frame is never handed out): every path
//! that puts a frame on a free list (per-vCPU free, trim, drain, zone free)
//! checks `HWPOISON` while holding that list exclusively (its lock, or its
//! owner's fast-path section, see `pcp.rs`) and retires the frame instead,
//! and every path that takes a frame off a per-vCPU list checks it too.
//! `memory_failure` sets `HWPOISON` first and then passes through every
//! list ([`FrameAllocator::barrier`]: lock plus owner handshake), so after
//! the barrier any free in flight is visible and any later one sees the
//! flag.

use crate::buddy::{Zone, MAX_ORDER};
use crate::frame::{FrameDesc, FrameId, FrameState, CLEAN, HWPOISON};
use crate::pcp::{init_barrier, lock_all, Pcp, PcpConfig};
use crate::sync::{lock, AtomicU64, Mutex, MutexGuard, Ordering};

/// Why an allocation or free was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    /// The vCPU index is not below the number of per-vCPU lists.
    #[error("vCPU {cpu} out of range: the allocator has {vcpus} per-vCPU lists")]
    BadCpu {
        /// The index passed.
        cpu: usize,
        /// Number of lists.
        vcpus: usize,
    },
    /// The order is above [`MAX_ORDER`].
    #[error("order {order} above the maximum {MAX_ORDER}")]
    BadOrder {
        /// The order passed.
        order: u32,
    },
    /// No free block of the order (no reclaim was attempted).
    #[error("no free block of order {order}")]
    Empty {
        /// The order requested.
        order: u32,
    },
    /// The frame is not an allocated block head of that order.
    #[error("frame {frame} is not an allocated block of order {order} (state {state:?}, order {actual})")]
    NotAllocated {
        /// The frame passed.
        frame: FrameId,
        /// The order passed.
        order: u32,
        /// Its state.
        state: FrameState,
        /// Its order.
        actual: u32,
    },
}

/// Snapshot of the allocator's counters (frames).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocCounts {
    /// Frames in the pool.
    pub total: u64,
    /// Frames on the buddy free lists.
    pub free: u64,
    /// Frames cached on per-vCPU lists.
    pub pcp_cached: u64,
    /// Frames handed out (including mapped ones).
    pub allocated: u64,
    /// Frames retired after a failure.
    pub retired: u64,
    /// Frames carrying `HWPOISON` (retired or still in use).
    pub poisoned: u64,
    /// Frames retired by soft offline.
    pub soft_offlined: u64,
    /// Reserved frames.
    pub reserved: u64,
}

/// Frame descriptors, buddy zone and per-vCPU lists.
pub struct FrameAllocator {
    pub(crate) descs: Box<[FrameDesc]>,
    pub(crate) zone: Mutex<Zone>,
    pub(crate) pcps: Box<[Pcp]>,
    cfg: PcpConfig,
    pub(crate) retired: AtomicU64,
    pub(crate) poisoned: AtomicU64,
    pub(crate) soft_offlined: AtomicU64,
    /// Frames `[0, reserved)` are `Reserved`; only changed under the zone
    /// lock ([`FrameAllocator::unreserve`]).
    reserved: AtomicU64,
}

impl FrameAllocator {
    /// An allocator of `frames` frames, all free and clean except the first
    /// `reserved` (state `Reserved`), with `vcpus` per-vCPU lists.
    pub fn new(frames: u32, reserved: u32, vcpus: usize, cfg: PcpConfig) -> Self {
        assert!(vcpus > 0 && cfg.batch > 0 && cfg.high >= cfg.batch);
        init_barrier();
        let descs: Box<[FrameDesc]> = (0..frames)
            .map(|i| {
                let st = if i < reserved {
                    FrameState::Reserved
                } else {
                    FrameState::Tail
                };
                FrameDesc::new(st, CLEAN)
            })
            .collect();
        let mut zone = Zone::new(frames);
        let mut f = reserved.min(frames);
        while f < frames {
            let mut o = MAX_ORDER;
            while f & ((1 << o) - 1) != 0 || f as u64 + (1u64 << o) > frames as u64 {
                o -= 1;
            }
            zone.free_block(&descs, f, o);
            f += 1 << o;
        }
        Self {
            descs,
            zone: Mutex::new(zone),
            pcps: (0..vcpus).map(|_| Pcp::new(cfg)).collect(),
            cfg,
            retired: AtomicU64::new(0),
            poisoned: AtomicU64::new(0),
            soft_offlined: AtomicU64::new(0),
            reserved: AtomicU64::new(reserved.min(frames) as u64),
        }
    }

    /// Number of reserved frames (`[0, reserved)`).
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }

    /// Hand the last `count` reserved frames (the top of `[0, reserved)`)
    /// to the buddy lists, coalescing with free neighbours; a reserved
    /// frame that was poisoned meanwhile is retired instead. Returns the
    /// frames that became free. `count` is capped at the reserved frames.
    pub fn unreserve(&self, count: u64) -> u64 {
        let mut zone = self.lock_zone();
        let old = self.reserved.load(Ordering::Relaxed);
        let new = old - count.min(old);
        let (mut freed, mut retired) = (0u64, 0u64);
        for f in new as FrameId..old as FrameId {
            let d = &self.descs[f as usize];
            if d.has(HWPOISON) {
                d.set_state(FrameState::Retired, 0);
                retired += 1;
            } else {
                zone.free_block(&self.descs, f, 0);
                freed += 1;
            }
        }
        self.reserved.store(new, Ordering::Relaxed);
        drop(zone);
        self.retired.fetch_add(retired, Ordering::Relaxed);
        freed
    }

    /// Number of frames.
    pub fn frames(&self) -> u32 {
        self.descs.len() as u32
    }

    /// Number of per-vCPU lists.
    pub fn vcpus(&self) -> usize {
        self.pcps.len()
    }

    /// The descriptor of `frame`.
    pub fn desc(&self, frame: FrameId) -> &FrameDesc {
        &self.descs[frame as usize]
    }

    pub(crate) fn lock_zone(&self) -> MutexGuard<'_, Zone> {
        lock(&self.zone)
    }

    fn pcp(&self, cpu: usize) -> Result<&Pcp, AllocError> {
        self.pcps.get(cpu).ok_or(AllocError::BadCpu {
            cpu,
            vcpus: self.pcps.len(),
        })
    }

    fn retire(&self, f: FrameId) {
        self.descs[f as usize].set_state(FrameState::Retired, 0);
        self.retired.fetch_add(1, Ordering::Relaxed);
    }

    /// Allocate a block of `2^order` frames. Order 0 comes from `cpu`'s
    /// list (refilled from the zone in batches); larger orders from the zone.
    /// The block's head is left in state `Allocated` with its order.
    #[inline]
    pub fn alloc(&self, cpu: usize, order: u32) -> Result<FrameId, AllocError> {
        if order == 0 {
            return self.pcp(cpu)?.with(|list| loop {
                let f = match list.frames.pop() {
                    Some(f) => f,
                    None => {
                        self.refill(&mut list.frames);
                        match list.frames.pop() {
                            Some(f) => f,
                            None => return Err(AllocError::Empty { order }),
                        }
                    }
                };
                let d = &self.descs[f as usize];
                if d.has(HWPOISON) {
                    self.retire(f);
                    continue;
                }
                d.set_state(FrameState::Allocated, 0);
                list.allocated += 1;
                return Ok(f);
            });
        }
        if order > MAX_ORDER {
            return Err(AllocError::BadOrder { order });
        }
        let mut zone = self.lock_zone();
        let f = zone
            .rmqueue(&self.descs, order)
            .ok_or(AllocError::Empty { order })?;
        self.descs[f as usize].set_state(FrameState::Allocated, order);
        zone.allocated += 1 << order;
        Ok(f)
    }

    /// Allocate only from the zone (never from a per-vCPU list).
    pub(crate) fn alloc_from_zone(&self, order: u32) -> Option<FrameId> {
        let mut zone = self.lock_zone();
        let f = zone.rmqueue(&self.descs, order)?;
        self.descs[f as usize].set_state(FrameState::Allocated, order);
        zone.allocated += 1 << order;
        Some(f)
    }

    #[cold]
    fn refill(&self, frames: &mut Vec<FrameId>) {
        let mut zone = self.lock_zone();
        for _ in 0..self.cfg.batch {
            let Some(f) = zone.rmqueue(&self.descs, 0) else {
                break;
            };
            self.descs[f as usize].set_state(FrameState::Pcp, 0);
            frames.push(f);
        }
        // Hand out in ascending order (the hot end is the back).
        frames.reverse();
    }

    /// Free a block allocated with [`FrameAllocator::alloc`] (or split from
    /// one). Order 0 goes to `cpu`'s list; a poisoned frame is retired.
    #[inline]
    pub fn free(&self, cpu: usize, frame: FrameId, order: u32) -> Result<(), AllocError> {
        let d = self
            .descs
            .get(frame as usize)
            .ok_or(AllocError::NotAllocated {
                frame,
                order,
                state: FrameState::Reserved,
                actual: 0,
            })?;
        let (state, actual) = d.state_order();
        if state != FrameState::Allocated || actual != order {
            return Err(AllocError::NotAllocated {
                frame,
                order,
                state,
                actual,
            });
        }
        if order == 0 {
            self.pcp(cpu)?.with(|list| {
                list.allocated -= 1;
                if d.has(HWPOISON) {
                    self.retire(frame);
                    return;
                }
                d.set_state(FrameState::Pcp, 0);
                list.frames.push(frame);
                if list.frames.len() > self.cfg.high as usize {
                    self.trim(&mut list.frames);
                }
            });
            return Ok(());
        }
        let mut zone = self.lock_zone();
        zone.allocated -= 1 << order;
        let r = zone.free_block_checked(&self.descs, frame, order);
        drop(zone);
        self.retired.fetch_add(r as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Free a block straight to the zone (callers that are not a vCPU).
    /// A poisoned frame in it is retired.
    pub fn free_to_zone(&self, frame: FrameId, order: u32) {
        let mut zone = self.lock_zone();
        zone.allocated -= 1 << order;
        let r = zone.free_block_checked(&self.descs, frame, order);
        drop(zone);
        self.retired.fetch_add(r as u64, Ordering::Relaxed);
    }

    /// Retire an allocated order-0 frame that its owner gives up (failure
    /// handling): it leaves the allocated count and is never reused.
    pub(crate) fn retire_allocated(&self, frame: FrameId) {
        let mut zone = self.lock_zone();
        zone.allocated -= 1;
        self.retire(frame);
    }

    #[cold]
    fn trim(&self, frames: &mut Vec<FrameId>) {
        let n = (self.cfg.batch as usize).min(frames.len());
        let mut zone = self.lock_zone();
        let mut retired = 0;
        for f in frames.drain(..n) {
            retired += zone.free_block_checked(&self.descs, f, 0);
        }
        drop(zone);
        self.retired.fetch_add(retired as u64, Ordering::Relaxed);
    }

    /// Give every frame on `cpu`'s list back to the zone. Returns how many
    /// frames left the list.
    pub fn drain_cpu(&self, cpu: usize) -> Result<usize, AllocError> {
        let mut list = self.pcp(cpu)?.lock_remote();
        let n = list.frames.len();
        if n > 0 {
            self.trim_all(&mut list.frames);
        }
        Ok(n)
    }

    fn trim_all(&self, frames: &mut Vec<FrameId>) {
        let mut zone = self.lock_zone();
        let mut retired = 0;
        for f in frames.drain(..) {
            retired += zone.free_block_checked(&self.descs, f, 0);
        }
        drop(zone);
        self.retired.fetch_add(retired as u64, Ordering::Relaxed);
    }

    /// Drain every per-vCPU list (remotely; owners may keep running).
    pub fn drain_all(&self) -> usize {
        let mut n = 0;
        for mut list in lock_all(&self.pcps) {
            n += list.frames.len();
            if !list.frames.is_empty() {
                self.trim_all(&mut list.frames);
            }
        }
        n
    }

    /// Pass through every list once, excluding its owner's fast path too
    /// (see the module docs and `pcp.rs`), then the zone lock; and when
    /// `frame` then sits on a per-vCPU list, drain every list inside the
    /// same pass: one heavy
    /// barrier instead of two for a poisoned frame on a remote list. With
    /// every list held no owner is inside its fast path, so the frame's
    /// `Pcp` state is stable while it is read. Returns whether it drained.
    pub(crate) fn barrier_drain_if_pcp(&self, frame: FrameId) -> bool {
        let mut lists = lock_all(&self.pcps);
        let on_list = self.desc(frame).state() == FrameState::Pcp;
        if on_list {
            for list in &mut lists {
                if !list.frames.is_empty() {
                    self.trim_all(&mut list.frames);
                }
            }
        }
        drop(lists);
        drop(self.lock_zone());
        on_list
    }

    /// The allocator half of `memory_failure` for loom models (which cannot
    /// build a `GuestMemory`): poison `frame`, pass the barrier, and drain
    /// the lists when the frame sits on one. Returns the state after.
    #[cfg(feature = "loom")]
    #[doc(hidden)]
    pub fn model_memory_failure(&self, frame: FrameId) -> FrameState {
        let d = &self.descs[frame as usize];
        assert!(!d.test_and_set(HWPOISON));
        self.barrier_drain_if_pcp(frame);
        d.state()
    }

    /// True when `frame` is on some per-vCPU list (takes each list, remotely).
    pub fn on_pcp_list(&self, frame: FrameId) -> bool {
        self.pcps
            .iter()
            .any(|p| p.lock_remote().frames.contains(&frame))
    }

    /// Split an allocated block into `2^order` order-0 blocks in `state`
    /// (the owner of the block calls this; no lock needed).
    pub(crate) fn split_allocated(&self, head: FrameId, order: u32, state: FrameState) {
        for i in head..head + (1 << order) {
            self.descs[i as usize].set_state(state, 0);
        }
        self.descs[head as usize].clear(crate::frame::HAS_HWPOISONED);
    }

    /// Counters. Takes the locks one at a time, so under concurrent
    /// allocation the snapshot is approximate; it is exact when quiescent.
    pub fn counts(&self) -> AllocCounts {
        let mut pcp_cached = 0u64;
        let mut allocated = 0i64;
        for l in lock_all(&self.pcps) {
            pcp_cached += l.frames.len() as u64;
            allocated += l.allocated;
        }
        let zone = self.lock_zone();
        allocated += zone.allocated;
        AllocCounts {
            total: self.descs.len() as u64,
            free: zone.nr_free,
            pcp_cached,
            allocated: allocated.max(0) as u64,
            retired: self.retired.load(Ordering::Relaxed),
            poisoned: self.poisoned.load(Ordering::Relaxed),
            soft_offlined: self.soft_offlined.load(Ordering::Relaxed),
            reserved: self.reserved.load(Ordering::Relaxed),
        }
    }

    /// Number of free blocks of `order` on the buddy lists.
    pub fn free_blocks(&self, order: u32) -> u32 {
        self.lock_zone().count(order)
    }
}
