//! Randomized page-lock stress with an invariant checker: blocking lockers,
//! `try_lock` stealers, shared waiters and killable lockers on two frames.
//! Checks mutual exclusion (owner token and an unsynchronised counter),
//! that the bit is set while held, and that a lock handed off to a waiter
//! is never taken by anyone else before that waiter runs; requires handoffs
//! to happen (they need a waiter to lose `UNFAIRNESS` wake-ups to stealers).
//! The seed is printed; `PAGE_LOCK_SEED=<n>` reuses it (the thread
//! interleaving still differs from run to run).
#![cfg(not(feature = "loom"))]

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use guestmem::frame::LOCKED;
use guestmem::page_lock::UNFAIRNESS;
use guestmem::*;

const FRAMES: u32 = 2;
const THREADS: usize = 4;
const MIB: u64 = 1 << 20;

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

#[test]
fn page_lock_randomized_stress_with_handoffs() {
    let seed = seed();
    let a = FrameAllocator::new(16, 0, 1, PcpConfig::default());
    let slots: Vec<Slot> = (0..FRAMES).map(|_| Slot::new()).collect();
    let acquisitions = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let errors = Mutex::new(Vec::new());
    let start = Instant::now();
    thread::scope(|s| {
        for t in 0..THREADS {
            let (a, slots, acquisitions, stop) = (&a, &slots, &acquisitions, &stop);
            let errors = &errors;
            let check = move |r: Result<(), String>| {
                if let Err(e) = r {
                    errors.lock().unwrap().push(e);
                    stop.store(true, Ordering::Relaxed);
                }
            };
            s.spawn(move || {
                let me = t + 1;
                let mut r = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15 ^ me as u64) | 1;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let f = (rng(&mut r) % FRAMES as u64) as u32;
                    let (slot, d) = (&slots[f as usize], a.desc(f));
                    let hold = rng(&mut r) % 200;
                    // Threads 0 and 1 mostly block, 2 and 3 mostly steal,
                    // so woken waiters keep losing races.
                    let steal_bias = if t >= 2 { 6 } else { 1 };
                    match rng(&mut r) % 10 {
                        k if k < steal_bias => {
                            // A stealer: retries try_lock without sleeping.
                            for _ in 0..64 {
                                if slot.locks.try_lock(d) {
                                    check(slot.critical(d, me, Acquired::Uncontended, hold));
                                    slot.locks.unlock(d, f);
                                    acquisitions.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                                std::hint::spin_loop();
                            }
                        }
                        7 => slot.locks.wait_unlocked(d, f),
                        8 => {
                            // Killable, with a kill already pending: must
                            // either take the bit or leave nothing behind.
                            let kill = KillSignal::new();
                            if rng(&mut r).is_multiple_of(2) {
                                kill.set_pending();
                            }
                            if let Ok(how) = slot.locks.lock_killable_how(d, f, &kill) {
                                check(slot.critical(d, me, how, hold));
                                slot.locks.unlock(d, f);
                                acquisitions.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => {
                            let how = slot.locks.lock_how(d, f);
                            check(slot.critical(d, me, how, hold));
                            slot.locks.unlock(d, f);
                            acquisitions.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if i.is_multiple_of(1024) && t == 0 {
                        let handoffs: u64 = slots.iter().map(|s| s.locks.handoffs()).sum();
                        let t = start.elapsed();
                        // At least 1 s of mixing; stop once handoffs were
                        // seen on every frame, or on one after 5 s (give up
                        // at 60 s: the assertion below fails).
                        let every = slots.iter().all(|s| s.locks.handoffs() > 0);
                        if (t > Duration::from_secs(1) && every)
                            || (t > Duration::from_secs(5) && handoffs > 0)
                            || t > Duration::from_secs(60)
                        {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap();
    assert!(errors.is_empty(), "seed {seed}: {errors:?}");
    let acq = acquisitions.load(Ordering::Relaxed);
    let mut counted = 0;
    let mut handoffs = 0;
    for (f, slot) in slots.iter().enumerate() {
        // SAFETY: every thread has joined.
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
            slot.locks.try_lock(a.desc(f as u32)),
            "frame {f} left locked"
        );
        assert_eq!(slot.locks.queued(f as u32), 0, "frame {f}: waiters left");
    }
    eprintln!(
        "{acq} acquisitions, {handoffs} handoffs in {:?}",
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
    let gm = GuestMemory::new(cfg).unwrap();
    let f = gm.resolve(0x3000, 0).unwrap().frame;
    assert_eq!(gm.stats().page_lock_handoffs, 0);
    let inside = AtomicUsize::new(0);
    let overlaps = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    thread::scope(|s| {
        let (gm, inside, overlaps, stop) = (&gm, &inside, &overlaps, &stop);
        // Counts overlaps instead of panicking with the lock held.
        let hold = || {
            if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                overlaps.fetch_add(1, Ordering::SeqCst);
            }
            for _ in 0..50 {
                std::hint::spin_loop();
            }
            inside.fetch_sub(1, Ordering::SeqCst);
        };
        for _ in 0..2 {
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if gm.try_lock_frame(f) {
                        hold();
                        gm.unlock_frame(f);
                    }
                }
            });
        }
        s.spawn(move || {
            while gm.stats().page_lock_handoffs == 0 && start.elapsed() < Duration::from_secs(60) {
                for _ in 0..100 {
                    gm.lock_frame(f);
                    hold();
                    gm.unlock_frame(f);
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
    });
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
