//! Page-lock tests. The randomized stress: blocking lockers, `try_lock`
//! stealers, shared waiters and killable lockers on two frames, checking
//! mutual exclusion (owner token and an unsynchronised counter), that the
//! bit is set while held, and that a lock handed off to a waiter is never
//! taken by anyone else before that waiter runs; it requires handoffs to
//! happen (they need a waiter to lose `UNFAIRNESS` wake-ups to stealers).
//! The seed is printed; `PAGE_LOCK_SEED=<n>` reuses it (the thread
//! interleaving still differs from run to run). `GUESTMEM_STRESS_OPS=<n>`
//! sets the operations of the stress tests (defaults: the CI runs).
//!
//! Every wait is bounded: the threads under test are detached and report
//! through channels read with a timeout, and the stress test fails when no
//! operation completes for [`STALL`]. A broken rule that strands a waiter
//! (a lost wake-up) thus fails the test with the lock's state instead of
//! hanging it; the stuck threads are left behind (the process still exits).
#![cfg(not(feature = "loom"))]

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use guestmem::frame::{LOCKED, WAITERS};
use guestmem::page_lock::UNFAIRNESS;
mod common;

use common::stress_ops;
use guestmem::*;

const FRAMES: u32 = 2;
const THREADS: usize = 4;
const MIB: u64 = 1 << 20;
/// Longest wait for one expected event (a thread's result, a waiter
/// queueing).
const LIMIT: Duration = Duration::from_secs(10);
/// The stress tests fail when no operation completes for this long.
const STALL: Duration = Duration::from_secs(10);

fn rng(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn seed() -> u64 {
    let s = std::env::var("PAGE_LOCK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("PAGE_LOCK_SEED={s}");
    s | 1
}

/// A detached thread whose result the test waits for with a bound.
struct Bounded<T> {
    name: String,
    rx: mpsc::Receiver<T>,
}

/// Run `f` on a new detached thread named `name`.
fn spawn<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Bounded<T> {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawn a test thread");
    Bounded {
        name: name.into(),
        rx,
    }
}

impl<T> Bounded<T> {
    /// The thread's result within [`LIMIT`].
    #[track_caller]
    fn result(self, state: impl Fn() -> String) -> T {
        self.result_within(LIMIT, state)
    }

    /// The thread's result within `limit`; panics with `state()` when the
    /// thread is stuck (it is left behind) or panicked.
    #[track_caller]
    fn result_within(self, limit: Duration, state: impl Fn() -> String) -> T {
        match self.rx.recv_timeout(limit) {
            Ok(v) => v,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "{} has no result after {limit:?}: stuck (a lost wake-up?); {}",
                self.name,
                state()
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("{} panicked (message above); {}", self.name, state())
            }
        }
    }
}

/// Wait until `cond` holds, at most [`LIMIT`].
#[track_caller]
fn wait_until(what: &str, cond: impl Fn() -> bool, state: impl Fn() -> String) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < LIMIT,
            "timed out after {LIMIT:?} waiting for {what}; {}",
            state()
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// The lock bit, waiters bit and queue length of `frame`.
fn lock_state(locks: &PageLocks, d: &FrameDesc, frame: FrameId) -> String {
    format!(
        "frame {frame}: LOCKED={} WAITERS={}, {} queued",
        u8::from(d.has(LOCKED)),
        u8::from(d.has(WAITERS)),
        locks.queued(frame)
    )
}

/// The invariant checker's view of one frame's lock. Each frame has its own
/// `PageLocks`, so that table's handoff counter is the frame's.
struct Slot {
    locks: PageLocks,
    /// Thread id + 1 of the holder, 0 when free.
    owner: AtomicUsize,
    /// Handoffs consumed by the waiter they were made for (holder only).
    consumed: AtomicU64,
    /// Acquisitions, incremented non-atomically by the holder: a second
    /// holder would lose increments.
    count: Counter,
    handed_off: AtomicU64,
}

struct Counter(UnsafeCell<u64>);
// SAFETY: only touched by the holder of the slot's page lock (which is
// what the test checks; a violation shows as lost increments).
unsafe impl Sync for Counter {}

impl Slot {
    fn new() -> Self {
        Self {
            locks: PageLocks::new(),
            owner: AtomicUsize::new(0),
            consumed: AtomicU64::new(0),
            count: Counter(UnsafeCell::new(0)),
            handed_off: AtomicU64::new(0),
        }
    }

    /// Checks on entry, a short critical section, checks on exit. A
    /// violation is returned, not panicked on (the lock must still be
    /// released, or the other threads would hang instead of reporting).
    fn critical(&self, d: &FrameDesc, me: usize, how: Acquired, hold: u64) -> Result<(), String> {
        let mut err = Vec::new();
        let prev = self.owner.swap(me, Ordering::SeqCst);
        if prev != 0 {
            err.push(format!("mutual exclusion: {me} got the lock {prev} holds"));
        }
        if !d.has(LOCKED) {
            err.push("bit clear while held".into());
        }
        // A handoff sets the bit for its waiter and is counted before the
        // wake: an acquisition while one is not consumed yet is a third
        // party taking the handed-off lock.
        let pending = self.locks.handoffs() - self.consumed.load(Ordering::SeqCst);
        match how {
            Acquired::HandedOff { lost } => {
                if lost < UNFAIRNESS {
                    err.push(format!("handoff after {lost} lost wake-ups"));
                }
                if pending != 1 {
                    err.push(format!("handoff with {pending} pending handoffs"));
                }
                self.consumed.fetch_add(1, Ordering::SeqCst);
                self.handed_off.fetch_add(1, Ordering::Relaxed);
            }
            _ if pending != 0 => {
                err.push(format!("{me} ({how:?}) took a lock handed off to a waiter"))
            }
            _ => {}
        }
        // SAFETY: we hold the page lock (a second holder shows up as lost
        // increments, reported at the end).
        unsafe {
            let c = self.count.0.get();
            let v = c.read_volatile();
            for _ in 0..hold {
                std::hint::spin_loop();
            }
            c.write_volatile(v + 1);
        }
        let now = self.owner.swap(0, Ordering::SeqCst);
        if now != me {
            err.push(format!("mutual exclusion: owner {now} at {me}'s unlock"));
        }
        if err.is_empty() {
            Ok(())
        } else {
            Err(err.join("; "))
        }
    }
}

/// What a stress thread is doing, for the stall report.
const DOING: [&str; 6] = [
    "between operations",
    "stealing with try_lock",
    "in wait_unlocked",
    "in lock_killable",
    "in lock",
    "in its critical section",
];

/// State shared by the stress threads and the watchdog (the test thread).
struct Stress {
    a: FrameAllocator,
    slots: Vec<Slot>,
    seed: u64,
    /// Operations completed (every kind, successful or not).
    ops: AtomicU64,
    acquisitions: AtomicU64,
    stop: AtomicBool,
    errors: Mutex<Vec<String>>,
    /// Per thread: `DOING` index << 8 | frame.
    doing: Vec<AtomicUsize>,
    /// Per thread: the kill signal of its `lock_killable` in progress, for
    /// other threads to raise while it waits.
    kills: Vec<Mutex<Option<Arc<KillSignal>>>>,
}

impl Stress {
    fn check(&self, r: Result<(), String>) {
        if let Err(e) = r {
            self.errors.lock().unwrap().push(e);
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    fn report(&self) -> String {
        let frames: Vec<String> = self
            .slots
            .iter()
            .enumerate()
            .map(|(f, s)| {
                format!(
                    "{} ({} handoffs)",
                    lock_state(&s.locks, self.a.desc(f as u32), f as u32),
                    s.locks.handoffs()
                )
            })
            .collect();
        let threads: Vec<String> = self
            .doing
            .iter()
            .enumerate()
            .map(|(t, d)| {
                let d = d.load(Ordering::Relaxed);
                format!("thread {}: {} (frame {})", t + 1, DOING[d >> 8], d & 0xff)
            })
            .collect();
        format!(
            "seed {}, {} operations, {} acquisitions; {}; {}",
            self.seed,
            self.ops.load(Ordering::Relaxed),
            self.acquisitions.load(Ordering::Relaxed),
            frames.join("; "),
            threads.join("; ")
        )
    }

    /// One stress thread (`t` in 0..THREADS).
    fn run(&self, t: usize) {
        let me = t + 1;
        let mut r = self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15 ^ me as u64) | 1;
        let doing =
            |what: usize, f: u32| self.doing[t].store(what << 8 | f as usize, Ordering::Relaxed);
        while !self.stop.load(Ordering::Relaxed) {
            let f = (rng(&mut r) % FRAMES as u64) as u32;
            let (slot, d) = (&self.slots[f as usize], self.a.desc(f));
            let hold = rng(&mut r) % 200;
            let critical = |how: Acquired| {
                doing(5, f);
                self.check(slot.critical(d, me, how, hold));
                slot.locks.unlock(d, f);
                self.acquisitions.fetch_add(1, Ordering::Relaxed);
            };
            // Threads 0 and 1 mostly block, 2 and 3 mostly steal, so woken
            // waiters keep losing races.
            let steal_bias = if t >= 2 { 6 } else { 1 };
            match rng(&mut r) % 10 {
                k if k < steal_bias => {
                    // A stealer: retries try_lock without sleeping.
                    doing(1, f);
                    for _ in 0..64 {
                        if slot.locks.try_lock(d) {
                            critical(Acquired::Uncontended);
                            break;
                        }
                        std::hint::spin_loop();
                    }
                    // Sometimes it signals a killable locker, maybe one that
                    // waits: with a wake-up (`kill`) or without (the kill
                    // is pending when an unlock wakes the waiter).
                    if rng(&mut r).is_multiple_of(4) {
                        let u = (rng(&mut r) % THREADS as u64) as usize;
                        let target = self.kills[u].lock().unwrap().clone();
                        if let Some(k) = target {
                            if rng(&mut r).is_multiple_of(2) {
                                k.kill();
                            } else {
                                k.set_pending();
                            }
                        }
                    }
                }
                7 => {
                    doing(2, f);
                    slot.locks.wait_unlocked(d, f);
                }
                8 => {
                    // Killable, maybe with a kill already pending or
                    // raised by a stealer while it waits: must either take
                    // the bit or leave nothing behind.
                    let kill = Arc::new(KillSignal::new());
                    if rng(&mut r).is_multiple_of(4) {
                        kill.set_pending();
                    }
                    *self.kills[t].lock().unwrap() = Some(kill.clone());
                    doing(3, f);
                    let got = slot.locks.lock_killable_how(d, f, &kill);
                    *self.kills[t].lock().unwrap() = None;
                    if let Ok(how) = got {
                        critical(how);
                    }
                }
                _ => {
                    doing(4, f);
                    let how = slot.locks.lock_how(d, f);
                    critical(how);
                }
            }
            doing(0, f);
            self.ops.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Watch `stress` until `done(elapsed)` says so; fails when no operation
/// completes for [`STALL`] (stopping the threads that still run).
#[track_caller]
fn watch(stress: &Stress, done: impl Fn(Duration) -> bool) {
    let start = Instant::now();
    let (mut last, mut since) = (0, Instant::now());
    while !stress.stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(5));
        let n = stress.ops.load(Ordering::Relaxed);
        if n != last {
            (last, since) = (n, Instant::now());
        } else if since.elapsed() > STALL {
            stress.stop.store(true, Ordering::Relaxed);
            panic!(
                "no page-lock operation completed for {STALL:?} (stranded waiters?): {}",
                stress.report()
            );
        }
        if done(start.elapsed()) {
            stress.stop.store(true, Ordering::Relaxed);
        }
    }
}

#[test]
fn page_lock_randomized_stress_with_handoffs() {
    let ops = stress_ops(500_000);
    let stress = Arc::new(Stress {
        a: FrameAllocator::new(16, 0, 1, PcpConfig::default()),
        slots: (0..FRAMES).map(|_| Slot::new()).collect(),
        seed: seed(),
        ops: AtomicU64::new(0),
        acquisitions: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        errors: Mutex::new(Vec::new()),
        doing: (0..THREADS).map(|_| AtomicUsize::new(0)).collect(),
        kills: (0..THREADS).map(|_| Mutex::new(None)).collect(),
    });
    let start = Instant::now();
    let threads: Vec<Bounded<()>> = (0..THREADS)
        .map(|t| {
            let s = stress.clone();
            spawn(&format!("stress thread {}", t + 1), move || s.run(t))
        })
        .collect();
    // At least `ops` operations; then stop once handoffs were seen on every
    // frame, or on one after 5 s (give up at 60 s: the assertion below
    // fails).
    watch(&stress, |t| {
        let handoffs: Vec<u64> = stress.slots.iter().map(|s| s.locks.handoffs()).collect();
        let enough = stress.ops.load(Ordering::Relaxed) >= ops;
        (enough && handoffs.iter().all(|&h| h > 0))
            || (enough && t > Duration::from_secs(5) && handoffs.iter().any(|&h| h > 0))
            || t > Duration::from_secs(60)
    });
    for t in threads {
        t.result(|| stress.report());
    }
    let seed = stress.seed;
    let errors = stress.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "seed {seed}: {errors:?}");
    let acq = stress.acquisitions.load(Ordering::Relaxed);
    let mut counted = 0;
    let mut handoffs = 0;
    for (f, slot) in stress.slots.iter().enumerate() {
        // SAFETY: every stress thread has returned.
        counted += unsafe { *slot.count.0.get() };
        let h = slot.locks.handoffs();
        assert_eq!(
            h,
            slot.handed_off.load(Ordering::Relaxed),
            "frame {f}: every handoff reaches its waiter"
        );
        assert_eq!(slot.consumed.load(Ordering::Relaxed), h);
        handoffs += h;
        assert!(
            slot.locks.try_lock(stress.a.desc(f as u32)),
            "frame {f} left locked"
        );
        assert_eq!(slot.locks.queued(f as u32), 0, "frame {f}: waiters left");
    }
    eprintln!(
        "{} operations, {acq} acquisitions, {handoffs} handoffs in {:?}",
        stress.ops.load(Ordering::Relaxed),
        start.elapsed()
    );
    assert_eq!(counted, acq, "lost increments: mutual exclusion broken");
    assert!(
        handoffs > 0,
        "no handoff in {:?} (seed {seed})",
        start.elapsed()
    );
}

/// The handoff counter is in `GuestMemory::stats`; stealers hammering a
/// frame that a blocking locker waits for make it count.
#[test]
fn guest_memory_counts_page_lock_handoffs() {
    let mut cfg = GuestMemoryConfig::new(vec![GpaRange::new(0, 4 * MIB)], 1);
    cfg.extra_frames = 0;
    let gm = Arc::new(GuestMemory::new(cfg).unwrap());
    let f = gm.resolve(0x3000, 0).unwrap().frame;
    assert_eq!(gm.stats().page_lock_handoffs, 0);
    let inside = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    // Counts overlaps instead of panicking with the lock held.
    let hold = {
        let (inside, overlaps) = (inside.clone(), overlaps.clone());
        move || {
            if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                overlaps.fetch_add(1, Ordering::SeqCst);
            }
            for _ in 0..50 {
                std::hint::spin_loop();
            }
            inside.fetch_sub(1, Ordering::SeqCst);
        }
    };
    let state = {
        let gm = gm.clone();
        move || {
            format!(
                "frame {f}: LOCKED={}, {} handoffs",
                u8::from(gm.allocator().desc(f).has(LOCKED)),
                gm.stats().page_lock_handoffs
            )
        }
    };
    let stealers: Vec<Bounded<()>> = (0..2)
        .map(|i| {
            let (gm, stop, hold) = (gm.clone(), stop.clone(), hold.clone());
            spawn(&format!("stealer {i}"), move || {
                while !stop.load(Ordering::Relaxed) {
                    if gm.try_lock_frame(f) {
                        hold();
                        gm.unlock_frame(f);
                    }
                }
            })
        })
        .collect();
    let locker = {
        let (gm, stop) = (gm.clone(), stop.clone());
        spawn("blocking locker", move || {
            while gm.stats().page_lock_handoffs == 0 && start.elapsed() < Duration::from_secs(60) {
                for _ in 0..100 {
                    gm.lock_frame(f);
                    hold();
                    gm.unlock_frame(f);
                }
            }
            stop.store(true, Ordering::Relaxed);
        })
    };
    locker.result_within(Duration::from_secs(60) + LIMIT, &state);
    for s in stealers {
        s.result(&state);
    }
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "mutual exclusion broken"
    );
    assert!(
        gm.stats().page_lock_handoffs > 0,
        "no handoff in {:?}",
        start.elapsed()
    );
    gm.check().unwrap();
}

/// v4.13 page waitqueue race: a woken killable waiter that bails out on
/// its signal without taking the free lock leaves the next waiter asleep
/// forever. The rule: a woken killable locker takes the bit first and
/// honours the kill only if it did not get it.
#[test]
fn killable_lock_takes_the_bit_before_honouring_the_kill() {
    const F: FrameId = 3;
    let locks = Arc::new(PageLocks::new());
    let a = Arc::new(FrameAllocator::new(16, 0, 1, PcpConfig::default()));
    let state = {
        let (locks, a) = (locks.clone(), a.clone());
        move || lock_state(&locks, a.desc(F), F)
    };
    assert!(locks.try_lock(a.desc(F)));
    let kill = Arc::new(KillSignal::new());
    let b = {
        let (locks, a, kill) = (locks.clone(), a.clone(), kill.clone());
        spawn("B (killable)", move || {
            let r = locks.lock_killable(a.desc(F), F, &kill);
            if r.is_ok() {
                locks.unlock(a.desc(F), F);
            }
            r
        })
    };
    wait_until("B to queue", || locks.queued(F) == 1, &state);
    let c = {
        let (locks, a) = (locks.clone(), a.clone());
        spawn("C (queued behind B)", move || {
            locks.lock(a.desc(F), F);
            locks.unlock(a.desc(F), F);
        })
    };
    wait_until("C to queue behind B", || locks.queued(F) == 2, &state);
    kill.set_pending(); // the kill is pending when B is woken
    locks.unlock(a.desc(F), F); // wakes B (exclusive, first in the queue)
    assert_eq!(
        b.result(&state),
        Ok(()),
        "the woken killable waiter must take the free bit before honouring its kill; {}",
        state()
    );
    c.result(&state);
    // A kill delivered while the lock stays held is honoured.
    assert!(locks.try_lock(a.desc(F)));
    let kill = Arc::new(KillSignal::new());
    let b = {
        let (locks, a, kill) = (locks.clone(), a.clone(), kill.clone());
        spawn("B (killed)", move || {
            locks.lock_killable(a.desc(F), F, &kill)
        })
    };
    wait_until("B to queue", || locks.queued(F) == 1, &state);
    kill.kill();
    assert_eq!(b.result(&state), Err(Killed { frame: F }));
    assert_eq!(locks.queued(F), 0, "the killed waiter left the queue");
    locks.unlock(a.desc(F), F);
    assert!(
        locks.try_lock(a.desc(F)),
        "no WAITERS/LOCKED bit left behind"
    );
    locks.unlock(a.desc(F), F);
}

#[test]
fn page_lock_wakes_all_shared_and_one_exclusive_fifo() {
    const F: FrameId = 5;
    let a = Arc::new(FrameAllocator::new(16, 0, 1, PcpConfig::default()));
    let locks = Arc::new(PageLocks::new());
    let state = {
        let (locks, a) = (locks.clone(), a.clone());
        move || lock_state(&locks, a.desc(F), F)
    };
    locks.lock(a.desc(F), F);
    let order = Arc::new(Mutex::new(Vec::new()));
    let waited = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for i in 0..3 {
        let (l, a, order) = (locks.clone(), a.clone(), order.clone());
        threads.push(spawn(&format!("exclusive waiter {i}"), move || {
            l.lock(a.desc(F), F);
            order.lock().unwrap().push(i);
            thread::sleep(Duration::from_millis(5));
            l.unlock(a.desc(F), F);
        }));
        wait_until(
            "the exclusive waiter to queue",
            || locks.queued(F) == i + 1,
            &state,
        );
    }
    for i in 0..3 {
        let (l, a, waited) = (locks.clone(), a.clone(), waited.clone());
        threads.push(spawn(&format!("shared waiter {i}"), move || {
            l.wait_unlocked(a.desc(F), F);
            waited.fetch_add(1, Ordering::SeqCst);
        }));
    }
    wait_until("every waiter to queue", || locks.queued(F) == 6, &state);
    assert_eq!(waited.load(Ordering::SeqCst), 0);
    locks.unlock(a.desc(F), F);
    for t in threads {
        t.result(&state);
    }
    assert_eq!(
        *order.lock().unwrap(),
        vec![0, 1, 2],
        "exclusive waiters served FIFO"
    );
    assert_eq!(waited.load(Ordering::SeqCst), 3);
}

/// Four blocking lockers on two frames: mutual exclusion. Its operations
/// (lock + unlock pairs, all threads) come from `GUESTMEM_STRESS_OPS`.
#[test]
fn page_lock_stress_mutual_exclusion() {
    let ops = stress_ops(20_000);
    let per_thread = ops.div_ceil(4);
    let a = Arc::new(FrameAllocator::new(4, 0, 1, PcpConfig::default()));
    let locks = Arc::new(PageLocks::new());
    let inside = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let state = {
        let (locks, a, total) = (locks.clone(), a.clone(), total.clone());
        move || {
            format!(
                "{} pairs done; {}; {}",
                total.load(Ordering::Relaxed),
                lock_state(&locks, a.desc(0), 0),
                lock_state(&locks, a.desc(1), 1)
            )
        }
    };
    let start = Instant::now();
    let threads: Vec<Bounded<Result<(), String>>> = (0..4)
        .map(|t| {
            let (a, locks, inside, total) =
                (a.clone(), locks.clone(), inside.clone(), total.clone());
            spawn(&format!("locker {t}"), move || {
                let mut violation = None;
                for i in 0..per_thread {
                    let f = (i % 2) as u32;
                    locks.lock(a.desc(f), f);
                    let before = inside.fetch_add(1 << (f * 16), Ordering::SeqCst);
                    total.fetch_add(1, Ordering::Relaxed);
                    inside.fetch_sub(1 << (f * 16), Ordering::SeqCst);
                    locks.unlock(a.desc(f), f);
                    if (before >> (f * 16)) & 0xffff != 0 {
                        violation.get_or_insert(format!("locker {t}: frame {f} held twice"));
                    }
                }
                violation.map_or(Ok(()), Err)
            })
        })
        .collect();
    // Progress watchdog: fail when the count stops moving for STALL.
    let (mut last, mut since) = (0, Instant::now());
    while total.load(Ordering::Relaxed) < per_thread * 4 {
        thread::sleep(Duration::from_millis(5));
        let n = total.load(Ordering::Relaxed);
        if n != last {
            (last, since) = (n, Instant::now());
        }
        assert!(
            since.elapsed() < STALL,
            "no lock/unlock pair completed for {STALL:?}: {}",
            state()
        );
    }
    for t in threads {
        t.result(&state).unwrap();
    }
    assert_eq!(total.load(Ordering::Relaxed), per_thread * 4);
    eprintln!(
        "{} lock/unlock pairs in {:?}",
        per_thread * 4,
        start.elapsed()
    );
}
