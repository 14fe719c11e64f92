//! [`GuestMemory`]: the top-level object the VMM creates. It owns the frame
//! pool, the allocator, the primary guest-physical map and the notifier
//! list, and implements demand population (`resolve`), release (balloon /
//! free page reporting) and reset. Memory failure lives in `failure.rs`,
//! the checker in `check.rs`.
//!
//! # Lock order
//! 1. `ops` mutex: serialises everything that removes or changes mappings
//!    (release, reset, memory failure, soft offline, unpoison).
//! 2. page locks of the frames a change touches (release, reset, memory
//!    failure, soft offline take them holding `ops`; zero-page reclaim
//!    try-locks; `resolve` locks the new block with no other lock held;
//!    several at once in ascending frame order, see `locked_frames.rs`).
//! 3. notifier callbacks (`invalidate_range_start/end`) run here: with at
//!    most `ops` and a page lock held, never the space lock, so a secondary
//!    MMU may call `resolve` from its fault path while holding its own lock.
//! 4. the space lock (RwLock; `resolve` reads, installs and removals write).
//! 5. one per-vCPU list lock (the checker: all of them, in index order).
//! 6. the zone lock.
//!
//! The OOM lock is taken with no lock held, and reclaim callbacks run with
//! no guestmem lock held. Allocation never happens under `space`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::alloc::{AllocError, FrameAllocator};
use crate::frame::{FrameId, FrameState, CLEAN, HWPOISON, NO_GFN};
use crate::locked_frames::{mapped_heads, LockedFrames};
use crate::notifier::{GpaRange, InvalidateReason, NotifierList};
use crate::observe::{ObserverSlot, PrimaryChange, PrimaryObserver};
use crate::oom::{is_empty, Oom, OutOfMemory, ReclaimFn, ReclaimId};
use crate::page_lock::{KillSignal, Killed, PageLocks};
use crate::pcp::PcpConfig;
use crate::pool::{Backing, FramePool, PoolError};
use crate::space::{Mapping, Space, HUGE_ORDER};
use crate::{PAGE_SHIFT, PAGE_SIZE};

/// How to build a [`GuestMemory`].
#[derive(Clone, Debug)]
pub struct GuestMemoryConfig {
    /// Guest-physical ranges that are RAM (page aligned, disjoint).
    pub ram: Vec<GpaRange>,
    /// Number of vCPUs (one per-vCPU frame list each).
    pub vcpus: usize,
    /// What backs the frame pool.
    pub backing: Backing,
    /// Per-vCPU list watermarks.
    pub pcp: PcpConfig,
    /// Frames in the pool beyond the RAM size (spares for soft offline);
    /// the pool has `RAM pages + extra_frames` frames.
    pub extra_frames: u64,
    /// Overcommit: how many of the pool's frames the allocator may hand
    /// out (`None`: all). The others start `Reserved` (they hold no host
    /// memory) until [`GuestMemory::grow_pool`] releases them.
    pub pool_frames: Option<u64>,
}

/// Start of the 32-bit MMIO hole on x86.
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// End of the 32-bit MMIO hole on x86.
pub const MMIO_HOLE_END: u64 = 4 << 30;

impl GuestMemoryConfig {
    /// Explicit RAM ranges.
    pub fn new(ram: Vec<GpaRange>, vcpus: usize) -> Self {
        Self {
            ram,
            vcpus,
            backing: Backing::Memfd,
            pcp: PcpConfig::default(),
            extra_frames: 0,
            pool_frames: None,
        }
    }

    /// The x86 layout of the boot contract for `ram_bytes` of RAM:
    /// `[0, 640K)`, `[1M, min(end, 3G))` and, above the hole, `[4G, ...)`.
    pub fn x86(ram_bytes: u64, vcpus: usize) -> Self {
        let mut ram = vec![GpaRange::new(0, 640 << 10)];
        let end = ram_bytes.max(2 << 20);
        ram.push(GpaRange {
            start: 1 << 20,
            end: end.min(MMIO_HOLE_START),
        });
        if end > MMIO_HOLE_START {
            ram.push(GpaRange::new(MMIO_HOLE_END, end - MMIO_HOLE_START));
        }
        Self::new(ram, vcpus)
    }
}

/// Creating a [`GuestMemory`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The frame pool could not be created.
    #[error("frame pool: {0}")]
    Pool(#[from] PoolError),
    /// The configuration is inconsistent.
    #[error("bad guest memory configuration: {0}")]
    Config(String),
}

/// The result of [`GuestMemory::resolve`]: the mapping covering a GPA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Guest-physical base of the mapping (aligned to its size).
    pub gpa: u64,
    /// Order of the mapping (0: 4 KiB, 9: 2 MiB).
    pub order: u32,
    /// Host address of the mapping's first byte in the direct map.
    pub host_addr: u64,
    /// Offset of the mapping's first byte in the memfd.
    pub file_offset: u64,
    /// Head frame of the backing block.
    pub frame: FrameId,
}

/// Why a GPA could not be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    /// The guest frame was poisoned: report a machine check to the guest.
    #[error("guest frame at {gpa:#x} is poisoned (hardware memory failure)")]
    Poisoned {
        /// The GPA asked for.
        gpa: u64,
    },
    /// The GPA is not RAM.
    #[error("{gpa:#x} is not guest RAM")]
    OutOfRange {
        /// The GPA asked for.
        gpa: u64,
    },
    /// No memory left even after reclaim.
    #[error(transparent)]
    OutOfMemory(#[from] OutOfMemory),
    /// The vCPU index is out of range.
    #[error(transparent)]
    Alloc(AllocError),
}

/// Why [`GuestMemory::alloc`] failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemAllocError {
    /// Bad argument.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// No memory left even after reclaim.
    #[error(transparent)]
    OutOfMemory(#[from] OutOfMemory),
}

/// Why a release was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReleaseError {
    /// Not page aligned or empty.
    #[error("release range {start:#x}..{end:#x} is empty or not 4 KiB aligned")]
    Unaligned {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// Past the end of guest RAM.
    #[error("release range {start:#x}..{end:#x} ends beyond guest RAM ({limit:#x})")]
    OutOfRange {
        /// Start.
        start: u64,
        /// End.
        end: u64,
        /// End of RAM.
        limit: u64,
    },
}

/// What a release did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReleaseReport {
    /// Frames unmapped and freed.
    pub freed_frames: u64,
    /// Pages of the range that were not populated.
    pub unpopulated: u64,
    /// Huge mappings split because the range covered them partly.
    pub split_huge: u64,
    /// The range passed to the notifiers.
    pub invalidated: Option<GpaRange>,
}

/// Guest RAM (see the module docs).
pub struct GuestMemory {
    pub(crate) pool: FramePool,
    pub(crate) alloc: FrameAllocator,
    pub(crate) locks: PageLocks,
    pub(crate) space: RwLock<Space>,
    pub(crate) ops: Mutex<()>,
    pub(crate) notifiers: NotifierList,
    pub(crate) oom: Oom,
    pub(crate) released: AtomicU64,
    pub(crate) zeroed: AtomicU64,
    /// Where primary changes are reported (shared with the space).
    pub(crate) observer: Arc<ObserverSlot>,
    /// Called when frames come back (see `overcommit.rs`).
    pub(crate) free_notify: crate::overcommit::FreeNotify,
}

impl GuestMemory {
    /// Create guest memory per `cfg`.
    pub fn new(cfg: GuestMemoryConfig) -> Result<Self, CreateError> {
        if cfg.vcpus == 0 {
            return Err(CreateError::Config("at least one vCPU is needed".into()));
        }
        if cfg.pcp.batch == 0 || cfg.pcp.high < cfg.pcp.batch {
            return Err(CreateError::Config(format!(
                "per-vCPU watermarks need 0 < batch <= high (got batch {}, high {})",
                cfg.pcp.batch, cfg.pcp.high
            )));
        }
        let mut ram = cfg.ram.clone();
        ram.sort_by_key(|r| r.start);
        for (i, r) in ram.iter().enumerate() {
            if r.is_empty() || r.start % PAGE_SIZE != 0 || r.end % PAGE_SIZE != 0 {
                return Err(CreateError::Config(format!(
                    "RAM range {:#x}..{:#x} is empty or not 4 KiB aligned",
                    r.start, r.end
                )));
            }
            if i > 0 && ram[i - 1].end > r.start {
                return Err(CreateError::Config(format!(
                    "RAM ranges {:#x}..{:#x} and {:#x}..{:#x} overlap",
                    ram[i - 1].start,
                    ram[i - 1].end,
                    r.start,
                    r.end
                )));
            }
        }
        let pages: u64 = ram.iter().map(|r| r.len() >> PAGE_SHIFT).sum::<u64>() + cfg.extra_frames;
        let mut frames = pages;
        if cfg.backing == Backing::HugetlbMemfd {
            frames = frames.next_multiple_of(1 << HUGE_ORDER);
        }
        let pool = FramePool::new(frames, cfg.backing)?;
        let reserved = match cfg.pool_frames {
            Some(0) => {
                return Err(CreateError::Config(
                    "the frame pool needs at least one usable frame".into(),
                ))
            }
            Some(n) => frames.saturating_sub(n) as u32,
            None => 0,
        };
        let observer = Arc::new(ObserverSlot::default());
        Ok(Self {
            alloc: FrameAllocator::new(pool.frames(), reserved, cfg.vcpus, cfg.pcp),
            pool,
            locks: PageLocks::new(),
            space: RwLock::new(Space::new(&ram, observer.clone())),
            ops: Mutex::new(()),
            notifiers: NotifierList::new(),
            oom: Oom::default(),
            released: AtomicU64::new(0),
            zeroed: AtomicU64::new(0),
            observer,
            free_notify: Default::default(),
        })
    }

    /// Install the observer of primary changes (tests, debugging; see
    /// [`crate::observe`]). Returns false when one is installed already.
    pub fn set_primary_observer(&self, observer: Arc<dyn PrimaryObserver>) -> bool {
        self.observer.set(observer)
    }

    /// The frame pool (host addresses, file offsets, memfd).
    pub fn pool(&self) -> &FramePool {
        &self.pool
    }

    /// The allocator (descriptors, counters).
    pub fn allocator(&self) -> &FrameAllocator {
        &self.alloc
    }

    /// The MMU notifier list of this guest address space.
    pub fn notifiers(&self) -> &NotifierList {
        &self.notifiers
    }

    /// Register an OOM reclaim callback.
    pub fn register_reclaim(&self, f: Arc<ReclaimFn>) -> ReclaimId {
        self.oom.register(f)
    }

    /// Unregister an OOM reclaim callback.
    pub fn unregister_reclaim(&self, id: ReclaimId) -> bool {
        self.oom.unregister(id)
    }

    /// True when some thread holds the OOM lock right now. Reclaim
    /// callbacks run without it, so inside one this is false unless another
    /// thread is in its last-second attempt.
    pub fn oom_lock_held(&self) -> bool {
        self.oom.is_locked()
    }

    /// True when the calling thread holds the OOM lock (never inside a
    /// reclaim callback).
    pub fn oom_lock_held_by_current_thread(&self) -> bool {
        self.oom.held_by_current_thread()
    }

    pub(crate) fn read_space(&self) -> RwLockReadGuard<'_, Space> {
        self.space.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write_space(&self) -> RwLockWriteGuard<'_, Space> {
        self.space.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn lock_ops(&self) -> MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocate a block (OOM handling and reclaim when empty). Its
    /// contents are undefined; the caller may write them.
    #[inline]
    pub fn alloc(&self, cpu: usize, order: u32) -> Result<FrameId, MemAllocError> {
        let f = match self.alloc.alloc(cpu, order) {
            Ok(f) => f,
            Err(e) if is_empty(&e) => self.oom.alloc_slow(&self.alloc, cpu, order)?,
            Err(e) => return Err(e.into()),
        };
        // The caller may dirty the block: it is no longer known zero.
        for i in f..f + (1 << order) {
            let d = self.alloc.desc(i);
            if d.has(CLEAN) {
                d.clear(CLEAN);
            }
        }
        Ok(f)
    }

    /// Allocate for population: like [`GuestMemory::alloc`] but leaves the
    /// clean marks for [`GuestMemory::prepare`].
    fn alloc_for_guest(&self, cpu: usize, order: u32) -> Result<FrameId, MemAllocError> {
        match self.alloc.alloc(cpu, order) {
            Ok(f) => Ok(f),
            Err(e) if is_empty(&e) => Ok(self.oom.alloc_slow(&self.alloc, cpu, order)?),
            Err(e) => Err(e.into()),
        }
    }

    /// Free a block from [`GuestMemory::alloc`] (order 0 to `cpu`'s list).
    /// Its host memory goes back to the host first (punched, unless the
    /// block is known clean): a frame out of use never holds host memory.
    pub fn free(&self, cpu: usize, frame: FrameId, order: u32) -> Result<(), AllocError> {
        // Only a block the caller holds is punched; `alloc.free` checks
        // the same again (and refuses double frees).
        if self.alloc.frames() > frame
            && self.alloc.desc(frame).state_order() == (FrameState::Allocated, order)
        {
            self.give_back(frame, order);
        }
        self.alloc.free(cpu, frame, order)?;
        self.notify_freed();
        Ok(())
    }

    /// Punch the host memory of a block the caller holds (allocated, in
    /// nobody's map) unless all of it is known clean; it is clean after.
    fn give_back(&self, frame: FrameId, order: u32) {
        let frames = frame..frame + (1 << order);
        if frames.clone().any(|f| !self.alloc.desc(f).has(CLEAN))
            && self.pool.punch(frame, 1 << order)
        {
            for f in frames {
                self.alloc.desc(f).set(CLEAN);
            }
        }
    }

    /// Drain one vCPU's list.
    pub fn drain_cpu(&self, cpu: usize) -> Result<usize, AllocError> {
        self.alloc.drain_cpu(cpu)
    }

    /// Drain every vCPU's list.
    pub fn drain_all(&self) -> usize {
        self.alloc.drain_all()
    }

    /// Lock a frame (sleeps while another holder has it).
    pub fn lock_frame(&self, frame: FrameId) {
        self.locks.lock(self.alloc.desc(frame), frame)
    }

    /// Lock a frame unless `kill` is raised first.
    pub fn lock_frame_killable(&self, frame: FrameId, kill: &KillSignal) -> Result<(), Killed> {
        self.locks
            .lock_killable(self.alloc.desc(frame), frame, kill)
    }

    /// Try to lock a frame without sleeping.
    pub fn try_lock_frame(&self, frame: FrameId) -> bool {
        self.locks.try_lock(self.alloc.desc(frame))
    }

    /// Unlock a frame locked by this caller.
    pub fn unlock_frame(&self, frame: FrameId) {
        self.locks.unlock(self.alloc.desc(frame), frame)
    }

    /// Sleep until a frame is unlocked.
    pub fn wait_frame_unlocked(&self, frame: FrameId) {
        self.locks.wait_unlocked(self.alloc.desc(frame), frame)
    }

    pub(crate) fn resolved(&self, m: Mapping) -> Resolved {
        Resolved {
            gpa: m.gfn << PAGE_SHIFT,
            order: m.order,
            host_addr: self.pool.host_addr(m.frame),
            file_offset: self.pool.file_offset(m.frame),
            frame: m.frame,
        }
    }

    /// The frame backing `gpa`, if mapped.
    pub fn frame_of_gpa(&self, gpa: u64) -> Option<FrameId> {
        let gfn = gpa >> PAGE_SHIFT;
        self.read_space()
            .lookup(gfn)
            .map(|m| m.frame + (gfn - m.gfn) as u32)
    }

    /// The mapping covering `gpa`, if any (never allocates).
    pub fn lookup(&self, gpa: u64) -> Option<Resolved> {
        let m = self.read_space().lookup(gpa >> PAGE_SHIFT)?;
        Some(self.resolved(m))
    }

    /// True when the guest frame `gfn` is marked poisoned.
    pub fn is_poisoned_gfn(&self, gfn: u64) -> bool {
        self.read_space().poisoned.contains(&gfn)
    }

    /// One past the last byte of guest RAM.
    pub fn ram_end(&self) -> u64 {
        self.read_space().end_gfn() << PAGE_SHIFT
    }

    /// Make the frames of a new block zero (frames not known clean are
    /// cleared) and mark them dirty (the guest will write them).
    fn prepare(&self, frame: FrameId, order: u32) {
        for f in frame..frame + (1 << order) {
            let d = self.alloc.desc(f);
            if d.has(CLEAN) {
                d.clear(CLEAN);
            } else {
                // SAFETY: the caller allocated the block and nobody else can
                // reach it before it is installed.
                unsafe { self.pool.zero(f, 1) };
                self.zeroed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Demand population: the mapping covering `gpa`, creating it if needed
    /// (2 MiB when the whole aligned 2 MiB is unpopulated RAM without
    /// poisoned frames and an order-9 block is free, else 4 KiB).
    pub fn resolve(&self, gpa: u64, cpu: usize) -> Result<Resolved, ResolveError> {
        let gfn = gpa >> PAGE_SHIFT;
        let mut huge = {
            let s = self.read_space();
            if let Some(m) = s.lookup(gfn) {
                return Ok(self.resolved(m));
            }
            if s.poisoned.contains(&gfn) {
                return Err(ResolveError::Poisoned { gpa });
            }
            if !s.is_ram(gfn) {
                return Err(ResolveError::OutOfRange { gpa });
            }
            s.huge_eligible(gfn)
        };
        if cpu >= self.alloc.vcpus() {
            return Err(ResolveError::Alloc(AllocError::BadCpu {
                cpu,
                vcpus: self.alloc.vcpus(),
            }));
        }
        loop {
            let (frame, order) = match huge
                .then(|| self.alloc.alloc_from_zone(HUGE_ORDER))
                .flatten()
            {
                Some(f) => (f, HUGE_ORDER),
                None => match self.alloc_for_guest(cpu, 0) {
                    Ok(f) => (f, 0),
                    Err(MemAllocError::OutOfMemory(e)) => return Err(e.into()),
                    Err(MemAllocError::Alloc(e)) => return Err(ResolveError::Alloc(e)),
                },
            };
            self.prepare(frame, order);
            // Population changes the block's state: under its page lock.
            self.lock_frame(frame);
            let mut s = self.write_space();
            let outcome = if let Some(m) = s.lookup(gfn) {
                Err(Ok(m))
            } else if s.poisoned.contains(&gfn) {
                Err(Err(ResolveError::Poisoned { gpa }))
            } else if order == HUGE_ORDER && !s.huge_eligible(gfn) {
                huge = false;
                Err(Err(ResolveError::OutOfRange { gpa }))
            } else if (frame..frame + (1 << order)).any(|f| self.alloc.desc(f).has(HWPOISON)) {
                // Poisoned while we held it: memory_failure saw it allocated
                // and left it to us; the free below retires it.
                Err(Err(ResolveError::OutOfRange { gpa }))
            } else {
                let base = if order == HUGE_ORDER {
                    gfn & !((1 << HUGE_ORDER) - 1)
                } else {
                    gfn
                };
                let m = Mapping {
                    gfn: base,
                    frame,
                    order,
                };
                for i in 0..1u32 << order {
                    self.alloc.desc(frame + i).set_gfn(base + i as u64);
                }
                self.alloc.desc(frame).set_state(FrameState::Mapped, order);
                s.install(m);
                Ok(m)
            };
            drop(s);
            self.unlock_frame(frame);
            match outcome {
                Ok(m) => return Ok(self.resolved(m)),
                Err(done) => {
                    // `prepare` may have zeroed (so populated) frames.
                    self.give_back(frame, order);
                    self.alloc
                        .free(cpu, frame, order)
                        .expect("freeing a block we just allocated");
                    match done {
                        Ok(m) => return Ok(self.resolved(m)),
                        Err(ResolveError::OutOfRange { .. }) => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// Unmap `m` from the descriptors' point of view: the block goes back to
    /// `Allocated` (caller holds the space write lock and removed it).
    pub(crate) fn unmap_desc(&self, m: Mapping) {
        for i in 0..1u32 << m.order {
            self.alloc.desc(m.frame + i).set_gfn(NO_GFN);
        }
        self.alloc
            .desc(m.frame)
            .set_state(FrameState::Allocated, m.order);
    }

    /// Punch the host memory of the blocks of removed mappings (merging
    /// contiguous runs), mark them clean and free them to the zone. The
    /// caller is inside an invalidation covering every mapping's range
    /// (reported to the observer as such).
    pub(crate) fn punch_and_free(&self, mut maps: Vec<Mapping>) {
        maps.sort_unstable_by_key(|m| m.frame);
        let mut i = 0;
        while i < maps.len() {
            let start = maps[i].frame;
            let mut end = start + (1 << maps[i].order);
            let mut j = i + 1;
            while j < maps.len() && maps[j].frame == end {
                end += 1 << maps[j].order;
                j += 1;
            }
            for m in &maps[i..j] {
                self.observer
                    .report(PrimaryChange::Punch, m.range(), m.frame);
            }
            if self.pool.punch(start, end - start) {
                for f in start..end {
                    self.alloc.desc(f).set(CLEAN);
                }
            }
            i = j;
        }
        for m in maps {
            self.observer
                .report(PrimaryChange::Free, m.range(), m.frame);
            self.alloc.free_to_zone(m.frame, m.order);
        }
    }

    fn check_range(&self, r: GpaRange) -> Result<(), ReleaseError> {
        if r.is_empty() || !r.start.is_multiple_of(PAGE_SIZE) || !r.end.is_multiple_of(PAGE_SIZE) {
            return Err(ReleaseError::Unaligned {
                start: r.start,
                end: r.end,
            });
        }
        let limit = self.ram_end();
        if r.end > limit {
            return Err(ReleaseError::OutOfRange {
                start: r.start,
                end: r.end,
                limit,
            });
        }
        Ok(())
    }

    /// Give the guest RAM in `range` back to the host (balloon inflate, free
    /// page reporting): unmap it inside one notifier bracket covering whole
    /// huge mappings, free the frames and punch their host memory. A huge
    /// mapping partly covered is split; its other pages stay mapped to the
    /// same frames.
    pub fn release_range(&self, range: GpaRange) -> Result<ReleaseReport, ReleaseError> {
        self.check_range(range)?;
        let _ops = self.lock_ops();
        let (first, last) = (range.start >> PAGE_SHIFT, (range.end >> PAGE_SHIFT) - 1);
        // A huge mapping at either end of `range` must be invalidated whole.
        // A concurrent `resolve` may install one after any look outside the
        // space lock, so the range is re-checked under the write lock that
        // makes the changes, inside the bracket; if it grew, the bracket is
        // closed (nothing changed) and opened again over the wider range.
        // The same for the page locks of the blocks that change.
        let mut cover = release_cover(&self.read_space(), range);
        let mut heads = mapped_heads(&self.read_space(), range);
        let (guard, mut s, locked) = loop {
            let locked = LockedFrames::lock(self, heads);
            // Pages of `cover` outside `range` keep their frames (split).
            let guard = self.notifiers.invalidate_range_start_split(
                cover,
                range,
                InvalidateReason::Release,
            );
            let s = self.write_space();
            let now = release_cover(&s, range);
            heads = mapped_heads(&s, range);
            if cover.start <= now.start && now.end <= cover.end && locked.covers(&heads) {
                break (guard, s, locked);
            }
            drop(s);
            drop(guard);
            drop(locked);
            cover = GpaRange {
                start: cover.start.min(now.start),
                end: cover.end.max(now.end),
            };
        };
        let mut report = ReleaseReport {
            invalidated: Some(cover),
            ..Default::default()
        };
        let mut removed = Vec::new();
        {
            let mut gfn = first;
            while gfn <= last {
                let slot_end = (gfn | ((1 << HUGE_ORDER) - 1)).min(last);
                if s.is_huge(gfn) {
                    let whole =
                        gfn % (1 << HUGE_ORDER) == 0 && slot_end - gfn == (1 << HUGE_ORDER) - 1;
                    if !whole {
                        let m = s.split(gfn).expect("huge slot");
                        self.alloc
                            .split_allocated(m.frame, m.order, FrameState::Mapped);
                        report.split_huge += 1;
                    }
                }
                for g in gfn..=slot_end {
                    match s.lookup(g) {
                        Some(m) => {
                            s.remove(g);
                            self.unmap_desc(m);
                            removed.push(m);
                            report.freed_frames += 1 << m.order;
                            if m.order == HUGE_ORDER {
                                break;
                            }
                        }
                        None => report.unpopulated += 1,
                    }
                }
                gfn = slot_end + 1;
            }
            drop(s);
        }
        // Unmapped: unlock before the frames can be handed out again.
        locked.unlock();
        // Inside the bracket: until its end no secondary MMU can map the
        // range again, and nobody gets the frames before they are punched.
        self.punch_and_free(removed);
        drop(guard);
        self.released
            .fetch_add(report.freed_frames, Ordering::Relaxed);
        if report.freed_frames > 0 {
            // Never under a guestmem lock but `ops` (the callback only
            // signals; it must not call back into guestmem's changes).
            self.notify_freed();
        }
        Ok(report)
    }

    /// Guest reset: unmap everything (one notifier bracket), free and punch
    /// all frames, forget guest-frame poison marks (poisoned frames stay
    /// retired), like QEMU remapping poisoned pages on reset.
    pub fn reset(&self) {
        let _ops = self.lock_ops();
        let all = GpaRange {
            start: 0,
            end: self.ram_end(),
        };
        // Page locks of every mapped block first (re-checked under the
        // write lock: `resolve` may have mapped more meanwhile).
        let mut heads: Vec<FrameId> = self.read_space().mappings().map(|m| m.frame).collect();
        let (guard, mut s, locked) = loop {
            let locked = LockedFrames::lock(self, heads);
            let guard = self
                .notifiers
                .invalidate_range_start(all, InvalidateReason::Unmap);
            let s = self.write_space();
            heads = s.mappings().map(|m| m.frame).collect();
            if locked.covers(&heads) {
                break (guard, s, locked);
            }
            drop(s);
            drop(guard);
            drop(locked);
        };
        s.poisoned.clear();
        let removed = s.clear();
        for m in &removed {
            self.unmap_desc(*m);
        }
        drop(s);
        locked.unlock();
        self.punch_and_free(removed);
        drop(guard);
        self.alloc.drain_all();
        self.notify_freed();
    }
}

/// The range a release of `range` must invalidate: `range`, widened to whole
/// huge mappings at either end (by the map `s` as it is now).
fn release_cover(s: &Space, range: GpaRange) -> GpaRange {
    let huge = 1u64 << (HUGE_ORDER + PAGE_SHIFT);
    let (first, last) = (range.start >> PAGE_SHIFT, (range.end >> PAGE_SHIFT) - 1);
    let start = if s.is_huge(first) {
        range.start & !(huge - 1)
    } else {
        range.start
    };
    let end = if s.is_huge(last) {
        (range.end + huge - 1) & !(huge - 1)
    } else {
        range.end
    };
    GpaRange { start, end }
}
