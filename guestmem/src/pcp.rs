//! Per-vCPU frame lists (Linux per-cpu pages).
//!
//! Each vCPU index has a list of order-0 frames. Two ways in:
//!
//! - **Owner fast path** ([`Pcp::with`] from the list's owner thread): no
//!   atomic read-modify-write at all. The owner publishes "I am inside list
//!   L" in its own per-thread record with a plain store, puts a *light*
//!   barrier (a compiler fence) after it, and checks the list's `req` flag
//!   with a plain load. If no remote request is pending it works on the list
//!   without the lock.
//! - **Locked path** (everyone else: remote drains, the checker, counters,
//!   non-owner alloc/free, and the owner when `req` is set): take the spin
//!   lock; when another thread owns the list, set `req`, issue the *heavy*
//!   barrier (`membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`: every running
//!   thread of the process executes a full barrier) and wait until the
//!   owner's record no longer names this list. Then the list is exclusively
//!   ours until `req` is cleared (release) and the lock dropped.
//!
//! The pair of barriers is Dekker's store/fence/load on both sides: the
//! owner stores `active = L` then loads `req`; the remote stores `req` then
//! loads `active`. membarrier places a full barrier in the owner's
//! instruction stream (or the owner is not running and will pass through a
//! context switch, itself a full barrier), so at least one side sees the
//! other's store: either the owner sees `req` and backs off to the lock, or
//! the remote sees `active == L` and waits for the owner's release store
//! that ends its section. Without membarrier (old kernel, seccomp) both
//! barriers are `fence(SeqCst)`. See DESIGN.md for the full argument.
//!
//! Ownership: a list is owned by the first thread that allocates or frees
//! through it; a thread that goes through the locked path
//! [`STEAL_AFTER`] times in a row without the owner using its fast path in
//! between takes ownership over (an owner thread that exited, work moved to
//! another thread). Ownership changes only under the lock *and* after the
//! handshake, and the owner re-checks ownership inside its section.
//!
//! Lock order: a per-vCPU lock is taken before the zone lock, and at most
//! one per-vCPU lock is held at a time except by [`lock_all`], which takes
//! them in index order.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use crate::frame::FrameId;
use crate::sync::{spin_hint, AtomicBool, AtomicUsize, Ordering};

/// Watermarks of the per-vCPU lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcpConfig {
    /// A list longer than this after a free gives `batch` frames back.
    pub high: u32,
    /// Frames moved between a list and the zone at once.
    pub batch: u32,
}

impl Default for PcpConfig {
    fn default() -> Self {
        // Linux's defaults scale with zone size; these suit a few GiB.
        Self {
            high: 192,
            batch: 32,
        }
    }
}

/// A non-owner that took the locked path this many times in a row, with no
/// owner fast-path operation in between, becomes the owner.
#[cfg(not(feature = "loom"))]
pub(crate) const STEAL_AFTER: u32 = 64;
/// Small under loom so a model can reach a steal.
#[cfg(feature = "loom")]
pub(crate) const STEAL_AFTER: u32 = 2;

/// A test-and-test-and-set spin lock (yields after a short spin).
pub(crate) struct SpinLock<T> {
    locked: AtomicBool,
    data: DataCell<T>,
}

/// `UnsafeCell`; under loom, loom's, so every access is checked for a
/// happens-before relation with the previous one (a race panics the model).
#[cfg(not(feature = "loom"))]
struct DataCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(feature = "loom"))]
impl<T> DataCell<T> {
    fn new(v: T) -> Self {
        Self(std::cell::UnsafeCell::new(v))
    }

    #[inline(always)]
    fn ptr(&self) -> *mut T {
        self.0.get()
    }
}

#[cfg(feature = "loom")]
struct DataCell<T>(loom::cell::UnsafeCell<T>);

#[cfg(feature = "loom")]
impl<T> DataCell<T> {
    fn new(v: T) -> Self {
        Self(loom::cell::UnsafeCell::new(v))
    }

    /// Records a write access (checked against the previous accesses).
    fn ptr(&self) -> *mut T {
        let g = self.0.get_mut();
        // SAFETY: only turned into a raw pointer here.
        unsafe { g.deref() as *mut T }
    }
}

// SAFETY: the lock (or the owner protocol of `Pcp`) serialises all access to
// `data`, so sharing the lock between threads is sound when `T` may be sent
// between them.
unsafe impl<T: Send> Sync for SpinLock<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for SpinLock<T> {}

pub(crate) struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> SpinLock<T> {
    pub(crate) fn new(data: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            data: DataCell::new(data),
        }
    }

    #[inline]
    pub(crate) fn lock(&self) -> SpinGuard<'_, T> {
        if self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_slow();
        }
        SpinGuard { lock: self }
    }

    #[cold]
    fn lock_slow(&self) {
        let mut spins = 0u32;
        loop {
            while self.locked.load(Ordering::Relaxed) {
                spin_hint(spins);
                spins = spins.saturating_add(1);
            }
            if self
                .locked
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
            spin_hint(spins);
        }
    }
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the guard proves we hold the lock; for a `Pcp` the caller
        // also completed the owner handshake, so no one else accesses it.
        unsafe { &*self.lock.data.ptr() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the only
        // reference derived from the guard.
        unsafe { &mut *self.lock.data.ptr() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

/// The asymmetric barrier pair (see the module docs).
mod barrier {
    #[cfg(feature = "loom")]
    use crate::sync::{fence, Ordering};
    #[cfg(not(feature = "loom"))]
    use std::sync::atomic::{AtomicBool, Ordering};

    /// True once `MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED` succeeded:
    /// owners then use a compiler fence and remotes `membarrier`. It only
    /// ever goes from false to true, inside [`init`], which every
    /// `FrameAllocator::new` runs (through a `Once`) before any list exists,
    /// so every thread that can reach a list sees the final value.
    #[cfg(not(feature = "loom"))]
    static ASYMMETRIC: AtomicBool = AtomicBool::new(false);

    #[cfg(not(feature = "loom"))]
    const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    #[cfg(not(feature = "loom"))]
    const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

    #[cfg(not(feature = "loom"))]
    fn membarrier(cmd: libc::c_long) -> bool {
        // SAFETY: membarrier takes (cmd, flags, cpu_id) integers only.
        unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                cmd,
                0 as libc::c_long,
                0 as libc::c_long,
            ) == 0
        }
    }

    /// Register for expedited private membarrier (once per process).
    pub(crate) fn init() {
        #[cfg(not(feature = "loom"))]
        {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                if membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) {
                    ASYMMETRIC.store(true, Ordering::Relaxed);
                }
            });
        }
    }

    /// The owner's side: between its store to `active` and its load of
    /// `req`.
    #[inline(always)]
    pub(crate) fn light() {
        #[cfg(not(feature = "loom"))]
        {
            if ASYMMETRIC.load(Ordering::Relaxed) {
                // The heavy side supplies the hardware barrier; only keep
                // the compiler from reordering the store and the load.
                std::sync::atomic::compiler_fence(Ordering::SeqCst);
            } else {
                std::sync::atomic::fence(Ordering::SeqCst);
            }
        }
        // loom models membarrier as what it provides: a full fence in the
        // owner between its store and its load.
        #[cfg(feature = "loom")]
        fence(Ordering::SeqCst);
    }

    /// The remote's side: between its store to `req` and its loads of the
    /// owners' `active`.
    pub(crate) fn heavy() {
        #[cfg(not(feature = "loom"))]
        {
            if ASYMMETRIC.load(Ordering::Relaxed) {
                // Registered, so this cannot fail with EPERM; any other
                // failure would leave owners unfenced.
                assert!(
                    membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED),
                    "membarrier(PRIVATE_EXPEDITED) failed: {}",
                    std::io::Error::last_os_error()
                );
            } else {
                std::sync::atomic::fence(Ordering::SeqCst);
            }
        }
        #[cfg(feature = "loom")]
        fence(Ordering::SeqCst);
    }
}

pub(crate) use barrier::init as init_barrier;

/// A thread's owner record: which list (address of its `Pcp`) the thread is
/// inside on the fast path, or 0. Written only by its thread; read by
/// remotes that hold the list's lock.
#[repr(align(64))]
pub(crate) struct OwnerRec {
    active: AtomicUsize,
}

impl OwnerRec {
    fn new() -> Self {
        Self {
            active: AtomicUsize::new(0),
        }
    }
}

/// The calling thread's owner record (`*const OwnerRec`, 0 when the thread
/// is tearing down its thread-locals: such a thread owns nothing new).
#[cfg(not(feature = "loom"))]
mod me {
    use std::cell::Cell;
    use std::sync::Arc;

    use super::OwnerRec;

    struct Holder(Arc<OwnerRec>);

    impl Drop for Holder {
        fn drop(&mut self) {
            ME.with(|m| m.set(0));
        }
    }

    thread_local! {
        // Plain, const-initialised, no destructor: one TLS load.
        static ME: Cell<usize> = const { Cell::new(0) };
        static HOLDER: Holder = Holder(Arc::new(OwnerRec::new()));
    }

    #[inline(always)]
    pub(super) fn ptr() -> usize {
        let p = ME.with(Cell::get);
        if p != 0 {
            p
        } else {
            ptr_slow()
        }
    }

    #[cold]
    fn ptr_slow() -> usize {
        HOLDER
            .try_with(|h| {
                let p = Arc::as_ptr(&h.0) as usize;
                ME.with(|m| m.set(p));
                p
            })
            .unwrap_or(0)
    }

    pub(super) fn arc() -> Option<Arc<OwnerRec>> {
        HOLDER.try_with(|h| h.0.clone()).ok()
    }
}

#[cfg(feature = "loom")]
mod me {
    use std::sync::Arc;

    use super::OwnerRec;

    loom::thread_local! {
        static HOLDER: Arc<OwnerRec> = Arc::new(OwnerRec::new());
    }

    pub(super) fn ptr() -> usize {
        HOLDER.with(|h| Arc::as_ptr(h) as usize)
    }

    pub(super) fn arc() -> Option<Arc<OwnerRec>> {
        Some(HOLDER.with(Arc::clone))
    }
}

/// The contents of one vCPU's list.
pub(crate) struct PcpList {
    /// Cached frames; the hot end is the back.
    pub(crate) frames: Vec<FrameId>,
    /// Order-0 frames allocated through this list, net of frees to it.
    pub(crate) allocated: i64,
    /// Fast-path operations of the owner (wrapping).
    fast_ops: u32,
    /// `fast_ops` when a non-owner last took the locked path.
    fast_ops_seen: u32,
    /// Consecutive locked-path alloc/free by non-owners with no owner
    /// fast-path operation in between.
    remote_streak: u32,
}

/// One vCPU's list, on its own cache lines.
#[repr(align(128))]
pub(crate) struct Pcp {
    /// Address of the owner's `OwnerRec` (0: none). Written under the lock
    /// after the handshake; the fast path only compares it.
    owner: AtomicUsize,
    /// A locked-path user wants the list: the owner must not enter.
    req: AtomicBool,
    list: SpinLock<PcpList>,
    /// Keeps the record `owner` points to alive (so its address stays
    /// unique). Accessed only with `list` locked; never by the fast path,
    /// so it is not part of the data the owner borrows.
    keep: DataCell<Option<Arc<OwnerRec>>>,
}

// SAFETY: `list` is a `SpinLock` (Sync); `keep` is only accessed with that
// lock held; the owner protocol (module docs) gives the fast path exclusive
// access to the list data.
unsafe impl Sync for Pcp {}

/// Exclusive access to a list through its lock (and the owner handshake).
pub(crate) struct PcpGuard<'a> {
    pcp: &'a Pcp,
    /// `req` was set (another thread owns the list): clear it on drop.
    requested: bool,
    guard: SpinGuard<'a, PcpList>,
}

impl Deref for PcpGuard<'_> {
    type Target = PcpList;
    #[inline]
    fn deref(&self) -> &PcpList {
        &self.guard
    }
}

impl DerefMut for PcpGuard<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut PcpList {
        &mut self.guard
    }
}

impl Drop for PcpGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.requested {
            // Publishes our list changes (and an ownership change) to an
            // owner whose next `req` load reads this store.
            self.pcp.req.store(false, Ordering::Release);
        }
        // then `guard` unlocks
    }
}

/// Clears the owner's `active` even if the section unwinds.
struct Section<'a>(&'a OwnerRec);

impl Drop for Section<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        // Release: the remote that sees 0 sees all our list changes.
        self.0.active.store(0, Ordering::Release);
    }
}

impl Pcp {
    pub(crate) fn new(cfg: PcpConfig) -> Self {
        Self {
            owner: AtomicUsize::new(0),
            req: AtomicBool::new(false),
            keep: DataCell::new(None),
            list: SpinLock::new(PcpList {
                frames: Vec::with_capacity(cfg.high as usize + cfg.batch as usize + 1),
                allocated: 0,
                fast_ops: 0,
                fast_ops_seen: 0,
                remote_streak: 0,
            }),
        }
    }

    fn addr(&self) -> usize {
        self as *const Self as usize
    }

    /// Run `f` with exclusive access to the list: the owner's fast path when
    /// the caller owns the list and no remote request is pending, else the
    /// locked path (which may make the caller the owner). For alloc/free.
    #[inline]
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut PcpList) -> R) -> R {
        let me = me::ptr();
        if me != 0 && self.owner.load(Ordering::Relaxed) == me {
            // SAFETY: `me` is the calling thread's live record.
            let rec = unsafe { &*(me as *const OwnerRec) };
            rec.active.store(self.addr(), Ordering::Relaxed);
            let section = Section(rec);
            barrier::light();
            // Acquire: if this reads a remote's clearing store, we see its
            // list changes and any ownership change it made.
            if !self.req.load(Ordering::Acquire) && self.owner.load(Ordering::Relaxed) == me {
                // SAFETY: we own the list and no locked-path user is inside
                // or can enter until `section` ends (module docs, DESIGN.md).
                let list = unsafe { &mut *self.list.data.ptr() };
                list.fast_ops = list.fast_ops.wrapping_add(1);
                let r = f(list);
                // loom: check the end of the section against remotes too.
                #[cfg(feature = "loom")]
                self.list.data.ptr();
                return r;
            }
            drop(section);
        }
        self.with_locked(me, f)
    }

    #[cold]
    #[inline(never)]
    fn with_locked<R>(&self, me: usize, f: impl FnOnce(&mut PcpList) -> R) -> R {
        let mut g = self.lock(me);
        let r = f(&mut g);
        if me != 0 {
            let l = &mut *g;
            // Only written with the lock held, which we hold.
            match self.owner.load(Ordering::Relaxed) {
                0 => self.set_owner(l),
                o if o != me => {
                    if l.fast_ops != l.fast_ops_seen {
                        l.fast_ops_seen = l.fast_ops;
                        l.remote_streak = 0;
                    }
                    l.remote_streak = l.remote_streak.saturating_add(1);
                    if l.remote_streak >= STEAL_AFTER {
                        // The handshake is complete (`g.requested`): the old
                        // owner is outside and re-checks `owner` before it
                        // touches the list again.
                        self.set_owner(l);
                    }
                }
                _ => {}
            }
        }
        r
    }

    /// Make the caller the owner. The list lock is held and the handshake
    /// with the previous owner (if any) is complete.
    fn set_owner(&self, l: &mut PcpList) {
        if let Some(a) = me::arc() {
            self.owner
                .store(Arc::as_ptr(&a) as usize, Ordering::Relaxed);
            // SAFETY: `keep` is only accessed with the list lock held.
            let old = unsafe { (*self.keep.ptr()).replace(a) };
            // The old record may be the last reference to an exited thread's.
            drop(old);
            l.remote_streak = 0;
            l.fast_ops_seen = l.fast_ops;
        }
    }

    /// Exclusive access through the lock (remote drains, counters).
    pub(crate) fn lock_remote(&self) -> PcpGuard<'_> {
        self.lock(me::ptr())
    }

    fn lock(&self, me: usize) -> PcpGuard<'_> {
        let g = self.lock_no_wait(me);
        if g.requested {
            barrier::heavy();
            self.wait_owner(&g);
        }
        g
    }

    /// Take the lock and, when another thread owns the list, raise `req`;
    /// the caller must then run `barrier::heavy` and `wait_owner`.
    fn lock_no_wait(&self, me: usize) -> PcpGuard<'_> {
        let guard = self.list.lock();
        // `owner` is only written with the lock held, so this is current.
        let owner = self.owner.load(Ordering::Relaxed);
        let requested = owner != 0 && owner != me;
        if requested {
            self.req.store(true, Ordering::Relaxed);
        }
        PcpGuard {
            pcp: self,
            requested,
            guard,
        }
    }

    fn wait_owner(&self, _g: &PcpGuard<'_>) {
        // The lock (proved by `_g`) keeps `owner` fixed and `keep` holds the
        // record alive.
        let o = self.owner.load(Ordering::Relaxed);
        if o != 0 {
            // SAFETY: as above.
            let o = unsafe { &*(o as *const OwnerRec) };
            let mut spins = 0u32;
            // Acquire: pairs with the owner's release store ending its
            // section, so its list changes are visible to us.
            while o.active.load(Ordering::Acquire) == self.addr() {
                spin_hint(spins);
                spins = spins.saturating_add(1);
            }
        }
    }
}

/// Exclusive access to every list at once, taken in index order with one
/// heavy barrier for all (drain_all, barrier, counters, the checker).
pub(crate) fn lock_all(pcps: &[Pcp]) -> Vec<PcpGuard<'_>> {
    let me = me::ptr();
    let guards: Vec<_> = pcps.iter().map(|p| p.lock_no_wait(me)).collect();
    if guards.iter().any(|g| g.requested) {
        barrier::heavy();
        for g in &guards {
            if g.requested {
                g.pcp.wait_owner(g);
            }
        }
    }
    guards
}
