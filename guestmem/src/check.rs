//! Statistics and the invariant checker.
//!
//! [`GuestMemory::check`] stops the world (takes `ops`, the space lock,
//! every per-vCPU list lock and the zone lock, in lock order) and verifies:
//! every frame is in exactly one state (covered exactly once by a free
//! block, a per-vCPU list entry, an allocated/mapped block, or is retired /
//! reserved); the buddy lists are consistent (aligned heads of the right
//! order, per-order counts, free total); no poisoned frame is reachable from
//! any free list; the primary map and the reverse map agree; the counters
//! match the descriptors; and, exactly, where the pool's host memory is: no
//! frame out of use (free, on a per-vCPU list, retired, reserved) holds any
//! (every path that takes a frame out of use punches it), so the pool holds
//! at most the frames in use (memfd backing; a hugetlb pool cannot punch
//! 4 KiB and is not checked for this).

use std::sync::atomic::Ordering;

use crate::buddy::MAX_ORDER;
use crate::frame::{FrameId, FrameState, HWPOISON};
use crate::memory::GuestMemory;
use crate::pool::Backing;
use crate::PAGE_SIZE;

/// Changes of the primary map held off (see
/// [`GuestMemory::hold_changes`]); the map only grows while this lives.
pub struct ChangesHeld<'a> {
    gm: &'a GuestMemory,
    _ops: std::sync::MutexGuard<'a, ()>,
}

impl ChangesHeld<'_> {
    /// [`GuestMemory::check_host_memory`] without letting changes in
    /// between (it would deadlock on `gm` itself here).
    pub fn check_host_memory(&self) -> Result<HostMemory, CheckError> {
        self.gm.check_host_memory_held()
    }
}

/// How the checker found a frame used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameUse {
    /// In a free block of the buddy allocator.
    Free,
    /// Cached on a per-vCPU list.
    PerCpuList,
    /// In an allocated or mapped block.
    InUse,
    /// Retired after a failure or a soft offline.
    Retired,
    /// Reserved at creation.
    Reserved,
}

/// Where the pool's host memory is, from one stop-the-world pass
/// ([`GuestMemory::check_host_memory`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostMemory {
    /// Bytes of host memory the pool's memfd holds.
    pub resident_bytes: u64,
    /// Frames in use (allocated, mapped ones included).
    pub in_use_frames: u64,
    /// Frames that hold host memory.
    pub holding_frames: u64,
    /// Per frame: true when it holds host memory.
    pub holds: Vec<bool>,
    /// Frames out of use that hold host memory (empty when all is well),
    /// with how they are used; not computed for a hugetlb pool.
    pub stray: Vec<(FrameId, FrameUse)>,
}

impl HostMemory {
    /// The exact host-memory rules: no stray frame, and the pool holds no
    /// more memory than its frames in use.
    pub fn verify(&self) -> Result<(), CheckError> {
        if let Some(&(frame, used)) = self.stray.first() {
            return Err(CheckError::HostMemory {
                frame,
                used,
                frames: self.stray.len() as u64,
            });
        }
        if !self.holds.is_empty() && self.resident_bytes > self.in_use_frames * PAGE_SIZE {
            return Err(CheckError::Resident {
                resident_kib: self.resident_bytes >> 10,
                in_use_kib: (self.in_use_frames * PAGE_SIZE) >> 10,
            });
        }
        Ok(())
    }
}

/// Counters (frames unless named otherwise).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames in the pool.
    pub total: u64,
    /// Frames free in the buddy lists.
    pub free: u64,
    /// Frames cached on per-vCPU lists.
    pub pcp_cached: u64,
    /// Frames handed out (mapped ones included).
    pub allocated: u64,
    /// Frames mapped into the guest.
    pub mapped: u64,
    /// Frames carrying the poison flag (hard failures and soft offlines).
    pub poisoned: u64,
    /// Frames retired (never handed out again).
    pub retired: u64,
    /// Frames retired by soft offline.
    pub soft_offlined: u64,
    /// Reserved frames.
    pub reserved: u64,
    /// Guest frames marked poisoned.
    pub poisoned_gfns: u64,
    /// Frames released to the host by `release_range` (cumulative).
    pub released: u64,
    /// Frames zeroed on population because they were not known clean.
    pub zeroed: u64,
    /// Times the OOM path ran.
    pub oom_events: u64,
    /// Allocations that failed with out-of-memory.
    pub oom_failures: u64,
    /// Reclaim callback invocations.
    pub reclaim_runs: u64,
    /// Page locks handed off to a waiter that lost
    /// [`UNFAIRNESS`](crate::page_lock::UNFAIRNESS) wake-ups (cumulative).
    pub page_lock_handoffs: u64,
    /// Bytes of host memory the pool's memfd holds.
    pub resident_bytes: u64,
}

/// An invariant violation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    /// A frame's descriptor contradicts the lists or maps.
    #[error("frame {frame}: {problem}")]
    Frame {
        /// The frame.
        frame: u32,
        /// What is wrong.
        problem: String,
    },
    /// The buddy free lists are inconsistent.
    #[error("buddy lists: {0}")]
    Buddy(String),
    /// The primary map is inconsistent.
    #[error("guest map: {0}")]
    Map(String),
    /// A frame out of use holds host memory (it was not punched).
    #[error(
        "frame {frame} is out of use ({used:?}) but holds host memory \
         ({frames} such frames); a frame leaving use must be punched"
    )]
    HostMemory {
        /// The first such frame.
        frame: FrameId,
        /// How it is used.
        used: FrameUse,
        /// How many frames out of use hold host memory.
        frames: u64,
    },
    /// The pool holds more host memory than its frames in use.
    #[error(
        "the pool holds {resident_kib} KiB of host memory but only {in_use_kib} KiB \
         are allocated"
    )]
    Resident {
        /// Host memory of the pool.
        resident_kib: u64,
        /// Frames in use, in KiB.
        in_use_kib: u64,
    },
    /// The pool's extents could not be read.
    #[error("cannot read the pool's data extents: {0}")]
    Extents(String),
    /// A counter disagrees with the descriptors.
    #[error("counter {name}: counted {counted}, recorded {recorded}")]
    Counter {
        /// Which counter.
        name: &'static str,
        /// From the descriptors.
        counted: u64,
        /// The counter's value.
        recorded: u64,
    },
}

fn frame_err(frame: u32, problem: impl Into<String>) -> CheckError {
    CheckError::Frame {
        frame,
        problem: problem.into(),
    }
}

impl GuestMemory {
    /// Counters.
    pub fn stats(&self) -> Stats {
        let c = self.alloc.counts();
        let (mapped, poisoned_gfns) = {
            let s = self.read_space();
            (s.mapped, s.poisoned.len() as u64)
        };
        Stats {
            total: c.total,
            free: c.free,
            pcp_cached: c.pcp_cached,
            allocated: c.allocated,
            mapped,
            poisoned: c.poisoned,
            retired: c.retired,
            soft_offlined: c.soft_offlined,
            reserved: c.reserved,
            poisoned_gfns,
            released: self.released.load(Ordering::Relaxed),
            zeroed: self.zeroed.load(Ordering::Relaxed),
            oom_events: self.oom.events.load(Ordering::Relaxed),
            oom_failures: self.oom.failures.load(Ordering::Relaxed),
            reclaim_runs: self.oom.reclaim_runs.load(Ordering::Relaxed),
            page_lock_handoffs: self.locks.handoffs(),
            resident_bytes: self.pool.resident_bytes(),
        }
    }

    /// Verify every invariant (see the module docs).
    pub fn check(&self) -> Result<(), CheckError> {
        self.check_host_memory()?.verify()
    }

    /// Verify every invariant but the host-memory rules and report where
    /// the pool's host memory is, from the same stop-the-world pass (so
    /// the frames' uses and their memory are one consistent picture);
    /// [`HostMemory::verify`] applies the rules.
    pub fn check_host_memory(&self) -> Result<HostMemory, CheckError> {
        let _ops = self.lock_ops();
        self.check_host_memory_held()
    }

    /// Hold off every change of the primary map but population (release,
    /// reset, memory failure, soft offline, unpoison, zero-page reclaim)
    /// until the result is dropped: mappings are only added meanwhile. For
    /// checkers that compare the primary with its subscribers and must not
    /// see a change half done (the VMM's `GET /memory/check`).
    pub fn hold_changes(&self) -> ChangesHeld<'_> {
        ChangesHeld {
            gm: self,
            _ops: self.lock_ops(),
        }
    }

    /// [`GuestMemory::check_host_memory`] with `ops` held by the caller.
    fn check_host_memory_held(&self) -> Result<HostMemory, CheckError> {
        let space = self.read_space();
        let a = &self.alloc;
        let pcps = crate::pcp::lock_all(&a.pcps);
        let zone = a.lock_zone();
        let n = a.frames() as usize;
        let mut seen: Vec<Option<FrameUse>> = vec![None; n];
        let cover = |f: u32, used: FrameUse, seen: &mut Vec<Option<FrameUse>>| {
            let s = seen
                .get_mut(f as usize)
                .ok_or_else(|| frame_err(f, "beyond the pool"))?;
            if s.is_some() {
                return Err(frame_err(f, "in more than one state"));
            }
            *s = Some(used);
            Ok(())
        };
        // Buddy lists.
        let mut free = 0u64;
        for o in 0..=MAX_ORDER {
            let mut count = 0;
            for h in zone.blocks(o) {
                count += 1;
                if h & ((1 << o) - 1) != 0 {
                    return Err(CheckError::Buddy(format!(
                        "block {h} of order {o} not aligned"
                    )));
                }
                if a.desc(h).state_order() != (FrameState::Buddy, o) {
                    return Err(frame_err(
                        h,
                        format!(
                            "on the order-{o} free list but {:?}",
                            a.desc(h).state_order()
                        ),
                    ));
                }
                for f in h..h + (1 << o) {
                    cover(f, FrameUse::Free, &mut seen)?;
                    if f != h && a.desc(f).state() != FrameState::Tail {
                        return Err(frame_err(
                            f,
                            format!("inside free block {h} but {:?}", a.desc(f).state()),
                        ));
                    }
                    if a.desc(f).has(HWPOISON) {
                        return Err(frame_err(f, "poisoned frame on a buddy free list"));
                    }
                }
                free += 1 << o;
            }
            if count != zone.count(o) {
                return Err(CheckError::Buddy(format!(
                    "order {o}: {count} blocks listed, count says {}",
                    zone.count(o)
                )));
            }
        }
        if free != zone.nr_free {
            return Err(CheckError::Counter {
                name: "free",
                counted: free,
                recorded: zone.nr_free,
            });
        }
        // Per-vCPU lists.
        let mut allocated_rec = zone.allocated;
        for (cpu, l) in pcps.iter().enumerate() {
            allocated_rec += l.allocated;
            for &f in &l.frames {
                cover(f, FrameUse::PerCpuList, &mut seen)?;
                if a.desc(f).state_order() != (FrameState::Pcp, 0) {
                    return Err(frame_err(
                        f,
                        format!("on vCPU {cpu}'s list but {:?}", a.desc(f).state_order()),
                    ));
                }
                if a.desc(f).has(HWPOISON) {
                    return Err(frame_err(f, format!("poisoned frame on vCPU {cpu}'s list")));
                }
            }
        }
        // Everything else.
        let (mut allocated, mut mapped, mut retired) = (0u64, 0u64, 0u64);
        let mut f = 0u32;
        while (f as usize) < n {
            if seen[f as usize].is_some() {
                f += 1;
                continue;
            }
            let (st, o) = a.desc(f).state_order();
            match st {
                FrameState::Allocated | FrameState::Mapped => {
                    for t in f..f + (1 << o) {
                        cover(t, FrameUse::InUse, &mut seen)?;
                        if t != f && a.desc(t).state() != FrameState::Tail {
                            return Err(frame_err(
                                t,
                                format!(
                                    "inside block {f} of order {o} but {:?}",
                                    a.desc(t).state()
                                ),
                            ));
                        }
                    }
                    allocated += 1 << o;
                    if st == FrameState::Mapped {
                        mapped += 1 << o;
                        let base = a
                            .desc(f)
                            .gfn()
                            .ok_or_else(|| frame_err(f, "mapped without reverse map"))?;
                        match space.lookup(base) {
                            Some(m) if m.frame == f && m.order == o && m.gfn == base => {}
                            other => {
                                return Err(frame_err(
                                    f,
                                    format!("reverse map says gfn {base:#x}, map has {other:?}"),
                                ))
                            }
                        }
                        for t in f..f + (1 << o) {
                            if a.desc(t).gfn() != Some(base + (t - f) as u64) {
                                return Err(frame_err(t, "reverse map disagrees with its block"));
                            }
                            if a.desc(t).has(HWPOISON) {
                                return Err(frame_err(t, "poisoned frame still mapped"));
                            }
                        }
                    }
                    f += 1 << o;
                }
                FrameState::Retired => {
                    cover(f, FrameUse::Retired, &mut seen)?;
                    if !a.desc(f).has(HWPOISON) {
                        return Err(frame_err(f, "retired without the poison flag"));
                    }
                    retired += 1;
                    f += 1;
                }
                FrameState::Reserved => {
                    cover(f, FrameUse::Reserved, &mut seen)?;
                    f += 1;
                }
                s => {
                    return Err(frame_err(
                        f,
                        format!("{s:?} but on no list and in no block"),
                    ))
                }
            }
        }
        for m in space.mappings() {
            if a.desc(m.frame).state_order() != (FrameState::Mapped, m.order) {
                return Err(CheckError::Map(format!(
                    "gfn {:#x} maps frame {} which is {:?}",
                    m.gfn,
                    m.frame,
                    a.desc(m.frame).state_order()
                )));
            }
            if space.poisoned.contains(&m.gfn) {
                return Err(CheckError::Map(format!(
                    "poisoned gfn {:#x} is mapped",
                    m.gfn
                )));
            }
        }
        let checks = [
            ("allocated", allocated, allocated_rec.max(0) as u64),
            ("mapped", mapped, space.mapped),
            ("retired", retired, a.retired.load(Ordering::Relaxed)),
        ];
        for (name, counted, recorded) in checks {
            if counted != recorded {
                return Err(CheckError::Counter {
                    name,
                    counted,
                    recorded,
                });
            }
        }
        // Host memory, with every list and the map still held: a frame out
        // of use cannot gain memory meanwhile (nobody may write it) and no
        // frame changes between in use and out of use.
        let mut host = HostMemory {
            in_use_frames: allocated,
            ..HostMemory::default()
        };
        if self.pool.backing() == Backing::Memfd {
            let runs = self
                .pool
                .data_runs()
                .map_err(|e| CheckError::Extents(e.to_string()))?;
            host.holds = vec![false; n];
            for (first, len) in runs {
                for f in first..first + len {
                    host.holds[f as usize] = true;
                    host.holding_frames += 1;
                    match seen[f as usize] {
                        Some(FrameUse::InUse) => {}
                        Some(used) => host.stray.push((f, used)),
                        None => unreachable!("every frame was classified above"),
                    }
                }
            }
        }
        host.resident_bytes = self.pool.resident_bytes();
        drop(zone);
        drop(pcps);
        Ok(host)
    }
}
