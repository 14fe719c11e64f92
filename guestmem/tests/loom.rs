//! loom models: per-vCPU drain vs concurrent alloc/free, and the page-lock
//! wake/handoff/kill protocol.
//! `cargo test -p guestmem --features loom --release --test loom`
#![cfg(feature = "loom")]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize as StdAtomicUsize, Ordering as StdOrdering};

use guestmem::frame::LOCKED;
use guestmem::page_lock::UNFAIRNESS;
use guestmem::{Acquired, FrameAllocator, KillSignal, PageLocks, PcpConfig};
use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

/// Run loom model `name` with a preemption bound (LOOM_MAX_PREEMPTIONS,
/// default 2), print how many interleavings it explored and fail if it was
/// only one: a model whose accesses loom cannot see proves nothing.
fn model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    let runs = std::sync::Arc::new(StdAtomicUsize::new(0));
    let counter = runs.clone();
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(
        std::env::var("LOOM_MAX_PREEMPTIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2),
    );
    let start = std::time::Instant::now();
    b.check(move || {
        counter.fetch_add(1, StdOrdering::Relaxed);
        f()
    });
    let n = runs.load(StdOrdering::Relaxed);
    eprintln!(
        "loom model {name}: {n} interleavings in {:.2?}",
        start.elapsed()
    );
    assert!(
        n > 1,
        "loom model {name} explored a single interleaving: loom sees none of its races"
    );
}

/// Everything allocatable exactly once: nothing lost, nothing duplicated.
fn assert_all_frames_once(a: &FrameAllocator, held: usize) {
    a.drain_all();
    let c = a.counts();
    assert_eq!(c.free as usize + held, c.total as usize, "{c:?}");
    let mut seen = BTreeSet::new();
    while let Ok(f) = a.alloc(0, 0) {
        assert!(seen.insert(f), "frame {f} handed out twice");
    }
    assert_eq!(seen.len() + held, c.total as usize);
}

#[test]
fn drain_all_vs_owner_alloc_free() {
    model("drain_all_vs_owner_alloc_free", || {
        let a = Arc::new(FrameAllocator::new(
            4,
            0,
            2,
            PcpConfig { high: 2, batch: 1 },
        ));
        let a1 = a.clone();
        let owner = thread::spawn(move || {
            let f = a1.alloc(0, 0).unwrap();
            a1.free(0, f, 0).unwrap();
            a1.alloc(0, 0).unwrap()
        });
        let a2 = a.clone();
        let remote = thread::spawn(move || a2.drain_all());
        let kept = owner.join().unwrap();
        remote.join().unwrap();
        assert_eq!(a.desc(kept).state(), guestmem::FrameState::Allocated);
        assert_all_frames_once(&a, 1);
    });
}

#[test]
fn drain_cpu_vs_two_owners() {
    model("drain_cpu_vs_two_owners", || {
        let a = Arc::new(FrameAllocator::new(
            4,
            0,
            2,
            PcpConfig { high: 1, batch: 1 },
        ));
        let hs: Vec<_> = (0..2)
            .map(|cpu| {
                let a = a.clone();
                thread::spawn(move || {
                    let f = a.alloc(cpu, 0).unwrap();
                    a.free(cpu, f, 0).unwrap();
                })
            })
            .collect();
        a.drain_cpu(1).unwrap();
        for h in hs {
            h.join().unwrap();
        }
        assert_all_frames_once(&a, 0);
    });
}

#[test]
fn page_lock_mutual_exclusion_and_wakeup() {
    model("page_lock_mutual_exclusion_and_wakeup", || {
        let a = Arc::new(FrameAllocator::new(
            2,
            0,
            1,
            PcpConfig { high: 1, batch: 1 },
        ));
        let locks = Arc::new(PageLocks::new());
        let inside = Arc::new(AtomicUsize::new(0));
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let (a, locks, inside) = (a.clone(), locks.clone(), inside.clone());
                thread::spawn(move || {
                    locks.lock(a.desc(1), 1);
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                    inside.fetch_sub(1, Ordering::SeqCst);
                    locks.unlock(a.desc(1), 1);
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert!(locks.try_lock(a.desc(1)));
    });
}

/// A killable waiter races an unlock and a kill; whatever happens, the
/// plain waiter must get the lock (no lost wake-up) and the bit is free
/// at the end.
#[test]
fn killable_waiter_never_strands_others() {
    model("killable_waiter_never_strands_others", || {
        let a = Arc::new(FrameAllocator::new(
            2,
            0,
            1,
            PcpConfig { high: 1, batch: 1 },
        ));
        let locks = Arc::new(PageLocks::new());
        let kill = Arc::new(KillSignal::new());
        assert!(locks.try_lock(a.desc(0)));
        let (a1, l1, k1) = (a.clone(), locks.clone(), kill.clone());
        let killable = thread::spawn(move || {
            if l1.lock_killable(a1.desc(0), 0, &k1).is_ok() {
                l1.unlock(a1.desc(0), 0);
            }
        });
        let (a2, l2) = (a.clone(), locks.clone());
        let plain = thread::spawn(move || {
            l2.lock(a2.desc(0), 0);
            l2.unlock(a2.desc(0), 0);
        });
        kill.kill();
        locks.unlock(a.desc(0), 0);
        killable.join().unwrap();
        plain.join().unwrap();
        assert!(locks.try_lock(a.desc(0)));
    });
}

/// The owner (which claimed the list before the race) runs every
/// operation on its fast path while a remote drains its list: nothing lost
/// or duplicated, and the owner's frame stays allocated.
#[test]
fn owner_fast_path_vs_remote_drain() {
    model("owner_fast_path_vs_remote_drain", || {
        let a = Arc::new(FrameAllocator::new(
            4,
            0,
            2,
            PcpConfig { high: 2, batch: 2 },
        ));
        // Claim list 0 for this thread (first use goes through the lock).
        let f = a.alloc(0, 0).unwrap();
        a.free(0, f, 0).unwrap();
        let a2 = a.clone();
        let remote = thread::spawn(move || a2.drain_cpu(0).unwrap());
        let f = a.alloc(0, 0).unwrap();
        a.free(0, f, 0).unwrap();
        let kept = a.alloc(0, 0).unwrap();
        remote.join().unwrap();
        assert_eq!(a.desc(kept).state(), guestmem::FrameState::Allocated);
        assert_all_frames_once(&a, 1);
    });
}

/// A second thread keeps using the owner's list through the lock until it
/// takes ownership over, while the old owner keeps allocating: the two
/// never use the list at once (loom's cell checks it) and no frame is
/// handed out twice.
#[test]
fn ownership_steal_vs_owner() {
    model("ownership_steal_vs_owner", || {
        let a = Arc::new(FrameAllocator::new(
            4,
            0,
            1,
            PcpConfig { high: 2, batch: 1 },
        ));
        let f = a.alloc(0, 0).unwrap();
        a.free(0, f, 0).unwrap();
        let a2 = a.clone();
        let other = thread::spawn(move || {
            // STEAL_AFTER is 2 under loom: the second call steals, the
            // third runs on the new owner's fast path.
            let mut last = 0;
            for _ in 0..3 {
                let g = a2.alloc(0, 0).unwrap();
                a2.free(0, g, 0).unwrap();
                last = g;
            }
            let kept = a2.alloc(0, 0).unwrap();
            (last, kept)
        });
        let mine = a.alloc(0, 0).unwrap();
        let (_, theirs) = other.join().unwrap();
        assert_ne!(mine, theirs, "frame handed out twice");
        assert_eq!(a.desc(mine).state(), guestmem::FrameState::Allocated);
        assert_eq!(a.desc(theirs).state(), guestmem::FrameState::Allocated);
        assert_all_frames_once(&a, 2);
    });
}

/// memory_failure's allocator half races the owner freeing the frame on
/// its fast path and allocating again: the poisoned frame is retired and
/// never handed out again (unless the owner already holds it again, in
/// which case its free retires it).
#[test]
fn poison_vs_owner_fast_free() {
    model("poison_vs_owner_fast_free", || {
        let a = Arc::new(FrameAllocator::new(
            4,
            0,
            1,
            PcpConfig { high: 2, batch: 2 },
        ));
        let f = a.alloc(0, 0).unwrap(); // claims list 0
        let a2 = a.clone();
        let poisoner = thread::spawn(move || a2.model_memory_failure(f));
        a.free(0, f, 0).unwrap();
        let g = a.alloc(0, 0).unwrap();
        let seen = poisoner.join().unwrap();
        assert_ne!(
            seen,
            guestmem::FrameState::Pcp,
            "poisoned frame left on a list"
        );
        // When g == f it was handed out before the flag was set: its free
        // retires it.
        a.free(0, g, 0).unwrap();
        assert_eq!(a.desc(f).state(), guestmem::FrameState::Retired);
        a.drain_all();
        let mut seen = BTreeSet::new();
        while let Ok(x) = a.alloc(0, 0) {
            assert_ne!(x, f, "poisoned frame handed out");
            assert!(seen.insert(x), "frame {x} handed out twice");
        }
        assert_eq!(seen.len(), 3);
    });
}

/// Shared state of the handoff model: who holds frame 0's lock (0 = nobody,
/// checked on every acquisition), how many handoffs were consumed by the
/// waiter they were made for, and the acquisition log.
#[derive(Default)]
struct Holder {
    owner: AtomicUsize,
    consumed: AtomicU64,
    log: std::sync::Mutex<Vec<(usize, Acquired)>>,
}

impl Holder {
    /// Called right after `who` got frame 0's lock.
    fn enter(&self, a: &FrameAllocator, locks: &PageLocks, who: usize, how: Acquired) {
        assert_eq!(
            self.owner.swap(who, Ordering::SeqCst),
            0,
            "mutual exclusion: {who} got the lock while someone held it"
        );
        assert!(a.desc(0).has(LOCKED), "lock bit clear while held");
        // A handoff sets the bit for the waiter before waking it and is
        // counted before the wake. Any acquisition while a handoff is not
        // yet consumed by its waiter is a third party taking a handed-off
        // lock.
        let pending = locks.handoffs() - self.consumed.load(Ordering::SeqCst);
        match how {
            Acquired::HandedOff { lost } => {
                assert!(lost >= UNFAIRNESS, "handoff after {lost} lost wake-ups");
                assert_eq!(pending, 1, "handoff not counted before the wake");
                self.consumed.fetch_add(1, Ordering::SeqCst);
            }
            _ => assert_eq!(
                pending, 0,
                "{who} ({how:?}) took a lock handed off to a waiter"
            ),
        }
        self.log.lock().unwrap().push((who, how));
    }

    fn leave(&self, who: usize) {
        assert_eq!(self.owner.swap(0, Ordering::SeqCst), who);
    }
}

/// Page-lock handoff (UNFAIRNESS is 1 under loom). The main thread holds
/// frame 0's lock while W1 then W2 queue (in that order, FIFO), then
/// unlocks and tries twice to steal the lock back. A woken waiter that
/// loses to the stealer is queued again and must get the lock handed off:
/// - mutual exclusion holds, and the bit is set whenever someone holds it;
/// - between the unlocker setting the bit for the waiter and the waiter
///   running, nobody else (stealer or other waiter) gets the lock;
/// - the first waiter is woken first: W2 can get the lock before W1 only
///   after the stealer got it (the first unlock wakes W1 alone);
/// - every handoff is consumed by its waiter, and the lock ends free.
///
/// Across the executions the handoff, W2 overtaking a requeued W1 and a
/// steal attempt while a handoff was pending must all have been reached.
#[test]
fn page_lock_handoff_fifo_and_no_third_party() {
    static HANDOFF_RUNS: StdAtomicUsize = StdAtomicUsize::new(0);
    static OVERTAKEN_RUNS: StdAtomicUsize = StdAtomicUsize::new(0);
    static WINDOW_PROBES: StdAtomicUsize = StdAtomicUsize::new(0);
    model("page_lock_handoff_fifo_and_no_third_party", || {
        let a = Arc::new(FrameAllocator::new(
            2,
            0,
            1,
            PcpConfig { high: 1, batch: 1 },
        ));
        let locks = Arc::new(PageLocks::new());
        let h = Arc::new(Holder::default());
        assert!(locks.try_lock(a.desc(0)));
        let waiter = |who: usize| {
            let (a, locks, h) = (a.clone(), locks.clone(), h.clone());
            thread::spawn(move || {
                let how = locks.lock_how(a.desc(0), 0);
                h.enter(&a, &locks, who, how);
                h.leave(who);
                locks.unlock(a.desc(0), 0);
            })
        };
        let w1 = waiter(1);
        while locks.queued(0) < 1 {
            thread::yield_now();
        }
        let w2 = waiter(2);
        while locks.queued(0) < 2 {
            thread::yield_now();
        }
        locks.unlock(a.desc(0), 0);
        // The third party: steal whenever the bit is free.
        for _ in 0..2 {
            let pending = locks.handoffs() > h.consumed.load(Ordering::SeqCst);
            if locks.try_lock(a.desc(0)) {
                h.enter(&a, &locks, 3, Acquired::Uncontended);
                h.leave(3);
                locks.unlock(a.desc(0), 0);
            } else if pending {
                WINDOW_PROBES.fetch_add(1, StdOrdering::Relaxed);
            }
        }
        w1.join().unwrap();
        w2.join().unwrap();
        let log = h.log.lock().unwrap().clone();
        let pos = |who| log.iter().position(|&(w, _)| w == who).unwrap();
        assert_eq!(log.iter().filter(|&&(w, _)| w != 3).count(), 2, "{log:?}");
        let (p1, p2) = (pos(1), pos(2));
        if p2 < p1 {
            // FIFO: the first unlock wakes W1, the head of the queue, so W2
            // can only be woken (and overtake W1) by a later unlock, i.e.
            // after the stealer got the lock.
            assert_eq!(log[0].0, 3, "W2 woken before W1: {log:?}");
            if matches!(
                log[p1].1,
                Acquired::HandedOff { .. } | Acquired::Waited { lost: 1.. }
            ) {
                // W1 lost its wake-up and was queued again behind W2.
                OVERTAKEN_RUNS.fetch_add(1, StdOrdering::Relaxed);
            }
        }
        let handoffs = locks.handoffs();
        assert_eq!(handoffs, h.consumed.load(Ordering::SeqCst));
        if handoffs > 0 {
            HANDOFF_RUNS.fetch_add(1, StdOrdering::Relaxed);
        }
        assert!(locks.try_lock(a.desc(0)), "lock left held: {log:?}");
    });
    let (handoffs, overtaken, probes) = (
        HANDOFF_RUNS.load(StdOrdering::Relaxed),
        OVERTAKEN_RUNS.load(StdOrdering::Relaxed),
        WINDOW_PROBES.load(StdOrdering::Relaxed),
    );
    eprintln!("handoff runs {handoffs}, W1 requeued behind W2 {overtaken}, window probes {probes}");
    assert!(handoffs > 0, "no execution reached the handoff");
    assert!(overtaken > 0, "no execution requeued a woken waiter");
    assert!(probes > 0, "no steal attempt while a handoff was pending");
}
