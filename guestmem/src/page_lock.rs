//! Per-frame lock bit with hashed wait queues (Linux `lock_page`,
//! `wait_on_page_locked`, `page_wait_table`).
//!
//! - The lock is the `LOCKED` flag of the frame's descriptor; `WAITERS` says
//!   someone may be queued, so an uncontended unlock is one atomic op.
//! - Waiters sit in one of a fixed set of FIFO queues chosen by hashing the
//!   frame, queued at the tail.
//! - Unlock wakes every shared waiter (those only waiting for the frame to
//!   be unlocked) and the first exclusive waiter (one at a time).
//! - Bounded unfairness: a woken exclusive waiter races with new lockers; a
//!   waiter that lost [`UNFAIRNESS`] times gets the lock *handed off*: the
//!   unlocker (which has already cleared the bit, like Linux's
//!   `folio_unlock` + `wake_page_function`) sets the bit again on the
//!   waiter's behalf before waking it, so from that point until the waiter
//!   unlocks nobody else can take it. Handoffs are counted
//!   ([`PageLocks::handoffs`]).
//! - Killable lock ([`PageLocks::lock_killable`]): a waiter that was woken
//!   must try to take the bit, and if it gets it returns success even when a
//!   kill is pending; only a waiter that did not get the bit honours the
//!   kill. So an exclusive wake-up is never lost (the Linux v4.13 "page
//!   waitqueue race": a woken waiter that bailed out on a signal left the
//!   others sleeping on a free page).
//!
//! Why not `parking_lot_core`'s address-keyed park/unpark: it could express
//! all of this (its unpark callback runs under the bucket lock, which is how
//! parking_lot's own fair unlock hands off), but the std `Mutex` + `Condvar`
//! buckets used here run unchanged under loom, which models std's
//! primitives and not parking_lot_core's global hash table; the handoff and
//! killable-wake models in `tests/loom.rs` check this very code.

use std::collections::VecDeque;

use crate::frame::{FrameDesc, FrameId, LOCKED, WAITERS};
use crate::sync::{lock, Arc, AtomicBool, AtomicU64, Condvar, Mutex, Ordering};

/// Wake-ups an exclusive waiter may lose to lock stealers before the lock is
/// handed to it (Linux `sysctl_page_lock_unfairness` default).
#[cfg(not(feature = "loom"))]
pub const UNFAIRNESS: u32 = 5;
/// 1 under loom, so a model with one lock stealer reaches the handoff.
#[cfg(feature = "loom")]
pub const UNFAIRNESS: u32 = 1;

#[cfg(not(feature = "loom"))]
const BUCKETS: usize = 256;
#[cfg(feature = "loom")]
const BUCKETS: usize = 2;

const WAITING: u32 = 0;
const WOKEN: u32 = 1;
const HANDOFF: u32 = 2;

struct Waiter {
    frame: FrameId,
    exclusive: bool,
    /// Times this waiter was woken without getting the lock.
    lost: u32,
    /// `WAITING`, `WOKEN` or `HANDOFF`; the condvar signals changes (and
    /// kills).
    state: Mutex<u32>,
    cv: Condvar,
}

impl Waiter {
    fn wake(&self, how: u32) {
        *lock(&self.state) = how;
        self.cv.notify_one();
    }

    fn get(&self) -> u32 {
        *lock(&self.state)
    }
}

/// A pending kill for a killable waiter (the fatal-signal analogue).
pub struct KillSignal {
    killed: AtomicBool,
    waiter: Mutex<Option<Arc<Waiter>>>,
}

impl Default for KillSignal {
    fn default() -> Self {
        Self::new()
    }
}

impl KillSignal {
    /// A signal that is not raised.
    pub fn new() -> Self {
        Self {
            killed: AtomicBool::new(false),
            waiter: Mutex::new(None),
        }
    }

    /// Raise the kill and wake the waiter if it sleeps.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        let w = lock(&self.waiter).clone();
        if let Some(w) = w {
            // Taking the waiter's state lock orders this against its check
            // of `killed` before sleeping: no lost kill.
            let _g = lock(&w.state);
            w.cv.notify_one();
        }
    }

    /// Raise the kill without waking anyone: the waiter notices it at its
    /// next wake-up (like a signal that arrives while the task is already
    /// being woken).
    pub fn set_pending(&self) {
        self.killed.store(true, Ordering::SeqCst);
    }

    /// True when raised.
    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }
}

/// The kill was honoured: the lock was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("killed while waiting for the lock of frame {frame}")]
pub struct Killed {
    /// The frame whose lock was waited on.
    pub frame: FrameId,
}

/// How [`PageLocks::lock_how`] got the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// The bit was free on the first try: no queueing.
    Uncontended,
    /// The caller took the bit itself after queueing (or on the re-check
    /// under the queue lock); `lost` wake-ups went to stealers first.
    Waited {
        /// Wake-ups lost before the bit was taken.
        lost: u32,
    },
    /// An unlocker handed the lock over (set the bit for the caller) after
    /// it lost `lost` (at least [`UNFAIRNESS`]) wake-ups.
    HandedOff {
        /// Wake-ups lost before the handoff.
        lost: u32,
    },
}

/// The hashed wait queues.
pub struct PageLocks {
    buckets: Box<[Mutex<VecDeque<Arc<Waiter>>>]>,
    /// Locks handed off to a waiter by an unlocker (statistics, tests).
    handoffs: AtomicU64,
}

impl Default for PageLocks {
    fn default() -> Self {
        Self::new()
    }
}

impl PageLocks {
    /// Empty queues.
    pub fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| Mutex::new(VecDeque::new())).collect(),
            handoffs: AtomicU64::new(0),
        }
    }

    /// Locks handed off so far (an unlocker set the bit for a waiter that
    /// had lost [`UNFAIRNESS`] wake-ups). Counted before the waiter is
    /// woken, so a handed-off waiter that returned is always counted.
    pub fn handoffs(&self) -> u64 {
        self.handoffs.load(Ordering::Relaxed)
    }

    /// Waiters (shared and exclusive) queued on `frame` right now (takes
    /// the queue lock; for tests and diagnostics).
    pub fn queued(&self, frame: FrameId) -> usize {
        lock(self.bucket(frame))
            .iter()
            .filter(|w| w.frame == frame)
            .count()
    }

    fn bucket(&self, frame: FrameId) -> &Mutex<VecDeque<Arc<Waiter>>> {
        let h = (frame as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        &self.buckets[h as usize % BUCKETS]
    }

    /// Take the lock without waiting.
    #[inline]
    pub fn try_lock(&self, d: &FrameDesc) -> bool {
        let mut w = d.raw();
        while w & LOCKED == 0 {
            match d.cas(w, w | LOCKED) {
                Ok(_) => return true,
                Err(cur) => w = cur,
            }
        }
        false
    }

    /// Take the lock, sleeping while another holder has it.
    pub fn lock(&self, d: &FrameDesc, frame: FrameId) {
        self.lock_how(d, frame);
    }

    /// [`PageLocks::lock`], reporting how the lock was obtained (for tests
    /// and statistics).
    pub fn lock_how(&self, d: &FrameDesc, frame: FrameId) -> Acquired {
        if self.try_lock(d) {
            return Acquired::Uncontended;
        }
        match self.wait(d, frame, true, None) {
            Ok(how) => how,
            Err(_) => unreachable!("a lock without a kill signal is never killed"),
        }
    }

    /// Take the lock unless killed first. A waiter woken by an unlock takes
    /// the bit if it is free before looking at the kill (see module docs).
    pub fn lock_killable(
        &self,
        d: &FrameDesc,
        frame: FrameId,
        kill: &KillSignal,
    ) -> Result<(), Killed> {
        self.lock_killable_how(d, frame, kill).map(|_| ())
    }

    /// [`PageLocks::lock_killable`], reporting how the lock was obtained.
    pub fn lock_killable_how(
        &self,
        d: &FrameDesc,
        frame: FrameId,
        kill: &KillSignal,
    ) -> Result<Acquired, Killed> {
        if self.try_lock(d) {
            return Ok(Acquired::Uncontended);
        }
        if kill.is_killed() {
            return Err(Killed { frame });
        }
        let r = self.wait(d, frame, true, Some(kill));
        *lock(&kill.waiter) = None;
        r
    }

    /// Sleep until the frame is unlocked (shared waiter; does not lock).
    pub fn wait_unlocked(&self, d: &FrameDesc, frame: FrameId) {
        if d.raw() & LOCKED != 0 {
            let _ = self.wait(d, frame, false, None);
        }
    }

    /// Release the lock and wake waiters.
    pub fn unlock(&self, d: &FrameDesc, frame: FrameId) {
        let old = d.fetch_and_release(!LOCKED);
        debug_assert!(old & LOCKED != 0, "unlock of unlocked frame {frame}");
        if old & WAITERS != 0 {
            self.wake(d, frame);
        }
    }

    fn wake(&self, d: &FrameDesc, frame: FrameId) {
        let mut q = lock(self.bucket(frame));
        let mut woke_exclusive = false;
        let mut remaining = false;
        let mut i = 0;
        while i < q.len() {
            let w = &q[i];
            if w.frame != frame {
                i += 1;
                continue;
            }
            if w.exclusive {
                if woke_exclusive {
                    remaining = true;
                    i += 1;
                    continue;
                }
                woke_exclusive = true;
                let handoff = w.lost >= UNFAIRNESS && self.try_lock(d);
                if handoff {
                    // Before the wake: the waiter sees its handoff counted.
                    self.handoffs.fetch_add(1, Ordering::Relaxed);
                }
                let w = q.remove(i).expect("index in range");
                w.wake(if handoff { HANDOFF } else { WOKEN });
            } else {
                let w = q.remove(i).expect("index in range");
                w.wake(WOKEN);
            }
        }
        if !remaining {
            d.clear(WAITERS);
        }
    }

    fn wait(
        &self,
        d: &FrameDesc,
        frame: FrameId,
        exclusive: bool,
        kill: Option<&KillSignal>,
    ) -> Result<Acquired, Killed> {
        let mut lost = 0;
        loop {
            let me = {
                let mut q = lock(self.bucket(frame));
                d.set(WAITERS);
                // Re-check under the queue lock: an unlock after this point
                // sees WAITERS and wakes us through this queue.
                if exclusive {
                    if self.try_lock(d) {
                        return Ok(Acquired::Waited { lost });
                    }
                } else if d.raw() & LOCKED == 0 {
                    return Ok(Acquired::Waited { lost });
                }
                let me = Arc::new(Waiter {
                    frame,
                    exclusive,
                    lost,
                    state: Mutex::new(WAITING),
                    cv: Condvar::new(),
                });
                q.push_back(me.clone());
                if let Some(k) = kill {
                    *lock(&k.waiter) = Some(me.clone());
                }
                me
            };
            let killed = |k: Option<&KillSignal>| k.is_some_and(|k| k.is_killed());
            {
                let mut st = lock(&me.state);
                while *st == WAITING && !killed(kill) {
                    st = me.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            }
            if me.get() == WAITING {
                // Killed and maybe not woken: leave the queue if still in it.
                let mut q = lock(self.bucket(frame));
                if me.get() == WAITING {
                    q.retain(|w| !Arc::ptr_eq(w, &me));
                    if !q.iter().any(|w| w.frame == frame) {
                        d.clear(WAITERS);
                    }
                    return Err(Killed { frame });
                }
                // Woken concurrently: fall through to the woken path.
            }
            match me.get() {
                HANDOFF => return Ok(Acquired::HandedOff { lost }),
                _ if !exclusive => {
                    if d.raw() & LOCKED == 0 {
                        return Ok(Acquired::Waited { lost });
                    }
                }
                _ => {
                    // Take the bit before looking at a pending kill.
                    if self.try_lock(d) {
                        return Ok(Acquired::Waited { lost });
                    }
                    if kill.is_some_and(|k| k.is_killed()) {
                        return Err(Killed { frame });
                    }
                    lost += 1;
                }
            }
        }
    }
}
