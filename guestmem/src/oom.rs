//! Out of memory: the slow path of allocation (Linux
//! `__alloc_pages_may_oom`).
//!
//! When the zone and every per-vCPU list are empty:
//! 1. one thread at a time decides OOM: it *try*-locks the OOM lock
//!    (`mutex_trylock(&oom_lock)`); a thread that finds it taken does not
//!    queue behind it but counts that as progress (the holder is freeing
//!    memory or deciding), sleeps a tick, retries the allocation and goes
//!    round again;
//! 2. the holder makes a last-second allocation attempt that never
//!    reclaims (somebody may just have freed memory);
//! 3. the lock is dropped and the registered reclaim callbacks run with
//!    *no* guestmem lock held (they may inflate the balloon, drop zero
//!    pages, or allocate themselves: allocations made from inside a reclaim
//!    callback never reclaim again, like Linux's `PF_MEMALLOC`);
//! 4. retry. A round that freed nothing fails with the numbers unless
//!    another thread is reclaiming or has freed something since the round
//!    began: then it retries (bounded, [`MAX_WAIT_ROUNDS`]), as Linux
//!    retries while some thread makes progress.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, TryLockError};
use std::time::Duration;

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

/// Rounds spent waiting for other threads (the OOM lock was taken, or this
/// round freed nothing while another thread was reclaiming) before giving
/// up; each sleeps [`WAIT_TICK`].
pub const MAX_WAIT_ROUNDS: u32 = 1000;

/// The sleep of a waiting round (Linux: `schedule_timeout_uninterruptible(1)`).
const WAIT_TICK: Duration = Duration::from_millis(1);

/// The OOM lock and the reclaim callbacks.
#[derive(Default)]
pub struct Oom {
    lock: Mutex<()>,
    /// Token of the thread holding `lock` (0: nobody), so that code running
    /// in a thread can ask whether it holds the lock.
    holder: AtomicU64,
    callbacks: RwLock<Vec<(ReclaimId, Arc<ReclaimFn>)>>,
    next_id: AtomicU64,
    /// Threads running reclaim callbacks now.
    reclaiming: AtomicU64,
    /// Frames freed by reclaim callbacks so far (all threads).
    reclaimed: AtomicU64,
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
    /// Take the OOM lock unless another thread holds it (Linux
    /// `mutex_trylock(&oom_lock)`).
    fn try_lock(&self) -> Option<OomLockGuard<'_>> {
        let g = match self.lock.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        self.holder.store(thread_token(), Ordering::Release);
        Some(OomLockGuard {
            holder: &self.holder,
            _lock: g,
        })
    }

    /// True when some thread holds the OOM lock right now. Reads the
    /// holder token (set after locking, cleared before unlocking) rather
    /// than try-locking: a probe holding the lock for an instant would make
    /// an allocating thread's try-lock fail.
    pub fn is_locked(&self) -> bool {
        self.holder.load(Ordering::Acquire) != 0
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
            let (mut rounds, mut waits) = (0, 0);
            while rounds < MAX_ROUNDS && waits < MAX_WAIT_ROUNDS {
                let seen = self.reclaimed.load(Ordering::Acquire);
                match self.try_lock() {
                    // Last-second attempt under the lock: no reclaim here.
                    Some(_oom) => {
                        if let Some(f) = attempt() {
                            return Ok(f);
                        }
                    }
                    // Another thread decides OOM: that is progress; wait a
                    // tick and try again rather than queue or fail.
                    None => {
                        waits += 1;
                        std::thread::sleep(WAIT_TICK);
                        if let Some(f) = attempt() {
                            return Ok(f);
                        }
                        continue;
                    }
                }
                let freed = self.run_callbacks(&ReclaimRequest { order, cpu });
                if let Some(f) = attempt() {
                    return Ok(f);
                }
                if freed > 0 {
                    rounds += 1;
                } else if self.reclaiming.load(Ordering::Acquire) > 0
                    || self.reclaimed.load(Ordering::Acquire) != seen
                {
                    // Nothing freed here, but another thread is freeing (or
                    // freed meanwhile and its frames went elsewhere): retry.
                    waits += 1;
                    std::thread::sleep(WAIT_TICK);
                } else {
                    break;
                }
            }
        }
        self.failures.fetch_add(1, Ordering::Relaxed);
        Err(OutOfMemory::from_counts(order, &a.counts()))
    }
}

impl Oom {
    /// Run every reclaim callback (no lock held, marked as reclaiming);
    /// the frames they freed.
    fn run_callbacks(&self, req: &ReclaimRequest) -> u64 {
        let cbs: Vec<Arc<ReclaimFn>> = self
            .callbacks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(_, f)| f.clone())
            .collect();
        self.reclaiming.fetch_add(1, Ordering::AcqRel);
        // Counts this thread out again also when a callback panics.
        let _reclaiming = Reclaiming(&self.reclaiming);
        let _flag = ReclaimFlag::set();
        let freed: u64 = cbs
            .iter()
            .map(|f| {
                self.reclaim_runs.fetch_add(1, Ordering::Relaxed);
                f(req)
            })
            .sum();
        self.reclaimed.fetch_add(freed, Ordering::AcqRel);
        freed
    }
}

/// One thread counted in [`Oom::reclaiming`] until dropped.
struct Reclaiming<'a>(&'a AtomicU64);

impl Drop for Reclaiming<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Map a fast-path error that is not `Empty` to a panic-free result.
pub(crate) fn is_empty(e: &AllocError) -> bool {
    matches!(e, AllocError::Empty { .. })
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;
    use crate::pcp::PcpConfig;
    use std::sync::mpsc;
    use std::thread;

    /// Longest wait for another thread: a broken rule fails, never hangs.
    const LIMIT: Duration = Duration::from_secs(5);

    /// An allocator of `frames` frames, all allocated (returned).
    fn full(frames: u32) -> (Arc<FrameAllocator>, Vec<FrameId>) {
        let a = Arc::new(FrameAllocator::new(frames, 0, 2, PcpConfig::default()));
        let held = (0..frames).map(|_| a.alloc(0, 0).unwrap()).collect();
        assert!(a.alloc(0, 0).is_err());
        (a, held)
    }

    /// While one thread holds the OOM lock, another allocating thread does
    /// not queue behind it (Linux's `mutex_trylock(&oom_lock)`): it keeps
    /// retrying and gets a frame freed meanwhile, lock still held.
    #[test]
    fn oom_lock_is_try_locked() {
        let oom = Arc::new(Oom::default());
        let (a, mut held) = full(4);
        let guard = oom.try_lock().expect("free at first");
        let (tx, rx) = mpsc::channel();
        let t = {
            let (oom, a) = (oom.clone(), a.clone());
            thread::spawn(move || tx.send(oom.alloc_slow(&a, 1, 0)).unwrap())
        };
        // Free a frame only once the thread is past its first attempt and
        // at the OOM lock.
        let deadline = std::time::Instant::now() + LIMIT;
        while oom.events.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "never reached OOM");
            thread::sleep(Duration::from_millis(1));
        }
        thread::sleep(Duration::from_millis(20));
        a.free(0, held.pop().unwrap(), 0).unwrap();
        let got = rx.recv_timeout(LIMIT);
        drop(guard);
        t.join().unwrap();
        let got = got.expect("the allocation waited for the OOM lock instead of retrying");
        assert!(got.is_ok(), "{got:?}");
    }

    /// A round whose callbacks free nothing while another thread's
    /// callback is still freeing retries instead of failing.
    #[test]
    fn round_that_freed_nothing_retries_while_another_thread_frees() {
        let oom = Arc::new(Oom::default());
        let (a, held) = full(4);
        let held = Arc::new(Mutex::new(held));
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let first = std::sync::atomic::AtomicBool::new(true);
        let empty_rounds = Arc::new(AtomicU64::new(0));
        {
            let (a, held, empty_rounds) = (a.clone(), held.clone(), empty_rounds.clone());
            oom.register(Arc::new(move |_req: &ReclaimRequest| {
                if first.swap(false, Ordering::SeqCst) {
                    // The slow reclaimer: frees two frames once told to.
                    let _ = release_rx.lock().unwrap().recv_timeout(LIMIT);
                    for f in held.lock().unwrap().drain(..2) {
                        a.free(0, f, 0).unwrap();
                    }
                    2
                } else {
                    empty_rounds.fetch_add(1, Ordering::SeqCst);
                    0
                }
            }));
        }
        let spawn = |cpu: usize| {
            let (oom, a) = (oom.clone(), a.clone());
            thread::spawn(move || oom.alloc_slow(&a, cpu, 0))
        };
        let slow = spawn(0);
        // The slow reclaimer is in its callback once the flag is taken.
        let deadline = std::time::Instant::now() + LIMIT;
        while oom.reclaiming.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "no reclaim started");
            thread::sleep(Duration::from_millis(1));
        }
        let other = spawn(1);
        while empty_rounds.load(Ordering::SeqCst) == 0 && !other.is_finished() {
            assert!(std::time::Instant::now() < deadline, "no empty round");
            thread::sleep(Duration::from_millis(1));
        }
        // The other thread has had a round that freed nothing.
        let _ = release_tx.send(());
        let other = other.join().unwrap();
        let slow = slow.join().unwrap();
        assert!(
            other.is_ok(),
            "a round that freed nothing failed while another thread was freeing: {other:?}"
        );
        assert!(slow.is_ok(), "{slow:?}");
    }
}
