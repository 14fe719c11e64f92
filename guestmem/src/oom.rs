//! Out of memory: the slow path of allocation.
//!
//! When the zone and every per-vCPU list are empty:
//! 1. one thread at a time takes the OOM lock (the others block on it);
//! 2. holding it, a last-second allocation attempt that never reclaims
//!    (somebody may just have freed memory, e.g. the previous OOM holder);
//! 3. the lock is dropped and the registered reclaim callbacks run with
//!    *no* guestmem lock held (they may inflate the balloon, drop zero
//!    pages, or allocate themselves: allocations made from inside a reclaim
//!    callback never reclaim again, like Linux's `PF_MEMALLOC`);
//! 4. retry; after a round that freed nothing, fail with the numbers.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, TryLockError};

use crate::alloc::{AllocCounts, AllocError, FrameAllocator};
use crate::frame::FrameId;

/// What a reclaim callback is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReclaimRequest {
    /// Order of the allocation that failed.
    pub order: u32,
    /// The vCPU (list) it ran on.
    pub cpu: usize,
}

/// A reclaim callback: frees what it can and returns the number of frames
/// it gave back (0 when it could not help).
pub type ReclaimFn = dyn Fn(&ReclaimRequest) -> u64 + Send + Sync;

/// Handle to unregister a reclaim callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReclaimId(u64);

/// Allocation failed after reclaim; carries the numbers.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
#[error(
    "out of memory: no free block of order {order} ({free} frames free in the buddy lists, \
     {pcp_cached} cached on per-vCPU lists, {poisoned} poisoned, {total} total); \
     give the VM more memory or inflate the balloon"
)]
pub struct OutOfMemory {
    /// Requested order.
    pub order: u32,
    /// Frames free in the buddy lists.
    pub free: u64,
    /// Frames cached on per-vCPU lists.
    pub pcp_cached: u64,
    /// Frames poisoned.
    pub poisoned: u64,
    /// Frames in the pool.
    pub total: u64,
}

impl OutOfMemory {
    pub(crate) fn from_counts(order: u32, c: &AllocCounts) -> Self {
        Self {
            order,
            free: c.free,
            pcp_cached: c.pcp_cached,
            poisoned: c.poisoned,
            total: c.total,
        }
    }
}

thread_local! {
    static IN_RECLAIM: Cell<bool> = const { Cell::new(false) };
    /// This thread's token for [`Oom::holder`] (0: not assigned yet).
    static THREAD_TOKEN: Cell<u64> = const { Cell::new(0) };
}

/// A number no other live thread uses (never 0).
fn thread_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    THREAD_TOKEN.with(|t| {
        if t.get() == 0 {
            t.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        t.get()
    })
}

/// Marks this thread as reclaiming until dropped (also on panic).
struct ReclaimFlag;

impl ReclaimFlag {
    fn set() -> Self {
        IN_RECLAIM.with(|c| c.set(true));
        Self
    }
}

impl Drop for ReclaimFlag {
    fn drop(&mut self) {
        IN_RECLAIM.with(|c| c.set(false));
    }
}

/// True while this thread runs a reclaim callback.
pub fn in_reclaim() -> bool {
    IN_RECLAIM.with(|c| c.get())
}

/// Rounds of reclaim before giving up even if callbacks keep freeing.
const MAX_ROUNDS: u32 = 8;

/// The OOM lock and the reclaim callbacks.
#[derive(Default)]
pub struct Oom {
    lock: Mutex<()>,
    /// Token of the thread holding `lock` (0: nobody), so that code running
    /// in a thread can ask whether it holds the lock.
    holder: AtomicU64,
    callbacks: RwLock<Vec<(ReclaimId, Arc<ReclaimFn>)>>,
    next_id: AtomicU64,
    /// Times the OOM path was entered.
    pub(crate) events: AtomicU64,
    /// Reclaim callback invocations.
    pub(crate) reclaim_runs: AtomicU64,
    /// Allocations that failed with [`OutOfMemory`].
    pub(crate) failures: AtomicU64,
}

/// The OOM lock, held (clears [`Oom::holder`] when dropped).
struct OomLockGuard<'a> {
    holder: &'a AtomicU64,
    _lock: MutexGuard<'a, ()>,
}

impl Drop for OomLockGuard<'_> {
    fn drop(&mut self) {
        self.holder.store(0, Ordering::Release);
    }
}

impl Oom {
    fn lock(&self) -> OomLockGuard<'_> {
        let g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.holder.store(thread_token(), Ordering::Release);
        OomLockGuard {
            holder: &self.holder,
            _lock: g,
        }
    }

    /// True when some thread holds the OOM lock right now (a `try_lock`
    /// that fails because the lock is taken).
    pub fn is_locked(&self) -> bool {
        matches!(self.lock.try_lock(), Err(TryLockError::WouldBlock))
    }

    /// True when the calling thread holds the OOM lock.
    pub fn held_by_current_thread(&self) -> bool {
        self.holder.load(Ordering::Acquire) == thread_token()
    }

    /// Register a reclaim callback.
    pub fn register(&self, f: Arc<ReclaimFn>) -> ReclaimId {
        let id = ReclaimId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.callbacks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, f));
        id
    }

    /// Unregister; false when unknown.
    pub fn unregister(&self, id: ReclaimId) -> bool {
        let mut v = self.callbacks.write().unwrap_or_else(|e| e.into_inner());
        let n = v.len();
        v.retain(|(i, _)| *i != id);
        v.len() != n
    }

    /// The slow path: `fast` already failed with [`AllocError::Empty`].
    pub(crate) fn alloc_slow(
        &self,
        a: &FrameAllocator,
        cpu: usize,
        order: u32,
    ) -> Result<FrameId, OutOfMemory> {
        let attempt = || match a.alloc(cpu, order) {
            Ok(f) => Some(f),
            Err(_) => {
                // Frames cached on other vCPUs' lists are free too.
                (a.drain_all() > 0)
                    .then(|| a.alloc(cpu, order).ok())
                    .flatten()
            }
        };
        if let Some(f) = attempt() {
            return Ok(f);
        }
        self.events.fetch_add(1, Ordering::Relaxed);
        if !in_reclaim() {
            for _ in 0..MAX_ROUNDS {
                {
                    let _oom = self.lock();
                    // Last-second attempt under the lock: no reclaim here.
                    if let Some(f) = attempt() {
                        return Ok(f);
                    }
                }
                let cbs: Vec<Arc<ReclaimFn>> = self
                    .callbacks
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .map(|(_, f)| f.clone())
                    .collect();
                let req = ReclaimRequest { order, cpu };
                let _flag = ReclaimFlag::set();
                let freed: u64 = cbs
                    .iter()
                    .map(|f| {
                        self.reclaim_runs.fetch_add(1, Ordering::Relaxed);
                        f(&req)
                    })
                    .sum();
                drop(_flag);
                if let Some(f) = attempt() {
                    return Ok(f);
                }
                if freed == 0 {
                    break;
                }
            }
        }
        self.failures.fetch_add(1, Ordering::Relaxed);
        Err(OutOfMemory::from_counts(order, &a.counts()))
    }
}

/// Map a fast-path error that is not `Empty` to a panic-free result.
pub(crate) fn is_empty(e: &AllocError) -> bool {
    matches!(e, AllocError::Empty { .. })
}
