//! Memory failure, soft offline, unpoison, page lock, OOM.
#![cfg(not(feature = "loom"))]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use guestmem::*;

const MIB: u64 = 1 << 20;

#[derive(Default)]
struct Recorder {
    starts: Mutex<Vec<Invalidation>>,
    open: AtomicU64,
}

impl MmuNotifier for Recorder {
    fn invalidate_range_start(&self, inv: &Invalidation) {
        self.open.fetch_add(1, Ordering::SeqCst);
        self.starts.lock().unwrap().push(*inv);
    }
    fn invalidate_range_end(&self, _inv: &Invalidation) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn mem(mib: u64, vcpus: usize, extra: u64) -> (GuestMemory, Arc<Recorder>) {
    let mut cfg = GuestMemoryConfig::new(vec![GpaRange::new(0, mib * MIB)], vcpus);
    cfg.extra_frames = extra;
    let gm = GuestMemory::new(cfg).unwrap();
    let rec = Arc::new(Recorder::default());
    gm.notifiers().register(rec.clone());
    (gm, rec)
}

/// Wait (bounded) for a condition another thread makes true.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn failure_of_free_frame_splits_block_and_keeps_rest() {
    let (gm, rec) = mem(8, 1, 0);
    let before = gm.stats().free;
    assert_eq!(
        gm.memory_failure(777, MfFlags::default()),
        Ok(MfOutcome::Free)
    );
    assert_eq!(
        gm.memory_failure(777, MfFlags::default()),
        Ok(MfOutcome::AlreadyPoisoned)
    );
    let s = gm.stats();
    assert_eq!((s.free, s.retired, s.poisoned), (before - 1, 1, 1));
    assert!(
        rec.starts.lock().unwrap().is_empty(),
        "no mapping, no invalidation"
    );
    gm.check().unwrap();
    // Everything else can still be allocated; 777 never comes back.
    let mut got = Vec::new();
    while let Ok(f) = gm.allocator().alloc(0, 0) {
        got.push(f);
    }
    assert_eq!(got.len() as u64, before - 1);
    assert!(!got.contains(&777));
}

/// Regression test for Linux v4.13 "poisoned pages left on per-cpu lists
/// get reused": the frame sits on vCPU 1's list when it fails; afterwards it
/// must be on no list at all and no vCPU may ever get it.
#[test]
fn poisoned_frame_on_other_vcpus_list_is_drained_not_reused() {
    let (gm, _) = mem(8, 2, 0);
    let f = gm.alloc(1, 0).unwrap();
    gm.free(1, f, 0).unwrap();
    let other = gm.alloc(0, 0).unwrap(); // vCPU 0's list is populated too
    assert!(gm.allocator().on_pcp_list(f));
    assert_eq!(gm.allocator().desc(f).state(), FrameState::Pcp);
    let h = {
        let gm = &gm;
        thread::scope(|s| {
            s.spawn(move || gm.memory_failure(f, MfFlags::default()))
                .join()
                .unwrap()
        })
    };
    assert_eq!(h, Ok(MfOutcome::PerCpuList));
    assert!(
        !gm.allocator().on_pcp_list(f),
        "poisoned frame left on a per-vCPU list"
    );
    assert_eq!(gm.stats().pcp_cached, 0, "all lists drained");
    gm.check().unwrap();
    for cpu in [1, 0, 1] {
        for _ in 0..64 {
            let g = gm.alloc(cpu, 0).unwrap();
            assert_ne!(g, f);
        }
    }
    gm.free(0, other, 0).unwrap();
    gm.check().unwrap();
}

#[test]
fn failure_of_mapped_huge_frame_splits_and_poisons_gfn() {
    let (gm, rec) = mem(8, 1, 0);
    let r = gm.resolve(4 * MIB, 0).unwrap();
    assert_eq!(r.order, 9);
    let bad = r.frame + 17;
    let out = gm
        .memory_failure(
            bad,
            MfFlags {
                action_required: true,
            },
        )
        .unwrap();
    assert_eq!(
        out,
        MfOutcome::Mapped {
            gpa: 4 * MIB + 17 * 4096,
            order: 9
        }
    );
    assert_eq!(
        *rec.starts.lock().unwrap(),
        vec![Invalidation {
            range: GpaRange::new(4 * MIB, 2 * MIB),
            reason: InvalidateReason::Poison
        }],
        "one invalidation covering the whole aligned 2 MiB mapping"
    );
    assert_eq!(rec.open.load(Ordering::SeqCst), 0);
    assert!(gm.is_poisoned_gfn(((4 * MIB) >> 12) + 17));
    assert_eq!(
        gm.resolve(4 * MIB + 17 * 4096 + 5, 0),
        Err(ResolveError::Poisoned {
            gpa: 4 * MIB + 17 * 4096 + 5
        })
    );
    assert_eq!(gm.lookup(4 * MIB + 18 * 4096).unwrap().frame, r.frame + 18);
    let s = gm.stats();
    assert_eq!((s.mapped, s.retired, s.poisoned_gfns), (511, 1, 1));
    assert_eq!(
        gm.unpoison(bad),
        Err(FailureError::WasMapped { frame: bad })
    );
    gm.check().unwrap();
    // Releasing the rest frees 511 frames; the retired one stays retired.
    gm.release_range(GpaRange::new(4 * MIB, 2 * MIB)).unwrap();
    assert_eq!(gm.allocator().desc(bad).state(), FrameState::Retired);
    gm.check().unwrap();
}

#[test]
fn failure_of_allocated_frame_retires_it_on_free() {
    let (gm, _) = mem(8, 1, 0);
    let f = gm.alloc(0, 2).unwrap();
    assert_eq!(
        gm.memory_failure(f + 1, MfFlags::default()),
        Ok(MfOutcome::InUse)
    );
    gm.free(0, f, 2).unwrap();
    assert_eq!(gm.allocator().desc(f + 1).state(), FrameState::Retired);
    assert_eq!(gm.stats().retired, 1);
    gm.check().unwrap();
    assert_eq!(gm.unpoison(f + 1), Ok(()));
    assert_eq!(gm.stats().retired, 0);
    assert_eq!(
        gm.unpoison(f + 1),
        Err(FailureError::NotPoisoned { frame: f + 1 })
    );
    gm.check().unwrap();
}

#[test]
fn failure_waits_for_the_page_lock() {
    let (gm, _) = mem(8, 1, 0);
    let r = gm.resolve(0x3000, 0).unwrap();
    let f = r.frame;
    gm.lock_frame(f);
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        let h = s.spawn(|| {
            let out = gm.memory_failure(f, MfFlags::default());
            done.store(true, Ordering::SeqCst);
            out
        });
        thread::sleep(Duration::from_millis(100));
        assert!(
            !done.load(Ordering::SeqCst),
            "memory_failure did not wait for the page lock"
        );
        assert!(
            gm.lookup(0x3000).is_some(),
            "unmapped while the page was locked"
        );
        gm.unlock_frame(f);
        assert!(matches!(h.join().unwrap(), Ok(MfOutcome::Mapped { .. })));
    });
    gm.check().unwrap();
}

#[test]
fn soft_offline_migrates_without_data_loss() {
    let (gm, rec) = mem(8, 1, 16);
    let r = gm.resolve(2 * MIB, 0).unwrap();
    assert_eq!(r.order, 9);
    let old = r.frame + 3;
    // SAFETY: the test plays the guest writing its RAM.
    unsafe { gm.pool().frame_bytes_mut(old, 1) }.fill(0xc3);
    let out = gm.soft_offline(old).unwrap();
    let SoftOfflineOutcome::Migrated { new_frame, gpa } = out else {
        panic!("{out:?}")
    };
    assert_eq!(gpa, 2 * MIB + 3 * 4096);
    assert_ne!(new_frame, old);
    let m = gm.lookup(gpa).unwrap();
    assert_eq!((m.frame, m.order), (new_frame, 0));
    // SAFETY: reading the guest's frame.
    assert!(unsafe { gm.pool().frame_bytes(new_frame, 1) }
        .iter()
        .all(|&b| b == 0xc3));
    assert_eq!(
        *rec.starts.lock().unwrap(),
        vec![Invalidation {
            range: GpaRange::new(2 * MIB, 2 * MIB),
            reason: InvalidateReason::Migrate
        }]
    );
    assert!(!gm.is_poisoned_gfn(gpa >> 12), "the guest never notices");
    let s = gm.stats();
    assert_eq!((s.soft_offlined, s.retired, s.mapped), (1, 1, 512));
    gm.check().unwrap();
    assert_eq!(gm.soft_offline(old), Ok(SoftOfflineOutcome::AlreadyOffline));
    // Free frames are just taken off; unpoison brings them back.
    let free_one = gm.allocator().frames() - 1;
    assert_eq!(gm.soft_offline(free_one), Ok(SoftOfflineOutcome::Free));
    gm.check().unwrap();
    assert_eq!(gm.unpoison(free_one), Ok(()));
    assert_eq!(
        gm.unpoison(old),
        Ok(()),
        "soft-offlined frames may be unpoisoned"
    );
    assert_eq!(gm.stats().soft_offlined, 0);
    gm.check().unwrap();
    let a = gm.alloc(0, 1).unwrap();
    assert_eq!(gm.soft_offline(a), Err(FailureError::Busy { frame: a }));
}

#[test]
fn killable_lock_takes_the_bit_before_honouring_the_kill() {
    // v4.13 page waitqueue race: a woken killable waiter that bails out
    // without taking the free lock leaves the next waiter asleep forever.
    let locks = Arc::new(PageLocks::new());
    let a = FrameAllocator::new(16, 0, 1, PcpConfig::default());
    let a = &a;
    let d = a.desc(3);
    assert!(locks.try_lock(d));
    let kill = KillSignal::new();
    let c_got = AtomicBool::new(false);
    thread::scope(|s| {
        let b = s.spawn(|| {
            let r = locks.lock_killable(d, 3, &kill);
            if r.is_ok() {
                locks.unlock(d, 3);
            }
            r
        });
        thread::sleep(Duration::from_millis(50)); // B queues first
        let c = s.spawn(|| {
            locks.lock(d, 3);
            c_got.store(true, Ordering::SeqCst);
            locks.unlock(d, 3);
        });
        thread::sleep(Duration::from_millis(50));
        kill.set_pending(); // the kill is pending when B is woken
        locks.unlock(d, 3); // wakes B (exclusive, first in queue)
        assert_eq!(
            b.join().unwrap(),
            Ok(()),
            "woken waiter must take the free bit"
        );
        eventually("the second waiter to get the lock", || {
            c_got.load(Ordering::SeqCst)
        });
        c.join().unwrap();
    });
    // A kill delivered while the lock stays held is honoured.
    assert!(locks.try_lock(d));
    let kill = KillSignal::new();
    thread::scope(|s| {
        let b = s.spawn(|| locks.lock_killable(d, 3, &kill));
        thread::sleep(Duration::from_millis(30));
        kill.kill();
        assert_eq!(b.join().unwrap(), Err(Killed { frame: 3 }));
    });
    locks.unlock(d, 3);
    assert!(locks.try_lock(d), "no WAITERS/LOCKED bit left behind");
    locks.unlock(d, 3);
}

#[test]
fn page_lock_wakes_all_shared_and_one_exclusive_fifo() {
    let a = FrameAllocator::new(16, 0, 1, PcpConfig::default());
    let locks = PageLocks::new();
    let d = a.desc(5);
    locks.lock(d, 5);
    let order = Mutex::new(Vec::new());
    let waited = AtomicU64::new(0);
    thread::scope(|s| {
        for i in 0..3 {
            let (locks, order) = (&locks, &order);
            s.spawn(move || {
                locks.lock(d, 5);
                order.lock().unwrap().push(i);
                thread::sleep(Duration::from_millis(5));
                locks.unlock(d, 5);
            });
            thread::sleep(Duration::from_millis(30));
        }
        for _ in 0..3 {
            s.spawn(|| {
                locks.wait_unlocked(d, 5);
                waited.fetch_add(1, Ordering::SeqCst);
            });
        }
        thread::sleep(Duration::from_millis(30));
        assert_eq!(waited.load(Ordering::SeqCst), 0);
        locks.unlock(d, 5);
    });
    assert_eq!(
        *order.lock().unwrap(),
        vec![0, 1, 2],
        "exclusive waiters served FIFO"
    );
    assert_eq!(waited.load(Ordering::SeqCst), 3);
}

#[test]
fn page_lock_stress_mutual_exclusion() {
    let a = FrameAllocator::new(4, 0, 1, PcpConfig::default());
    let locks = PageLocks::new();
    let inside = AtomicU64::new(0);
    let total = AtomicU64::new(0);
    thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for i in 0..5000u32 {
                    let f = i % 2;
                    locks.lock(a.desc(f), f);
                    assert_eq!(
                        inside.fetch_add(1 << (f * 16), Ordering::SeqCst) >> (f * 16) & 0xffff,
                        0
                    );
                    total.fetch_add(1, Ordering::Relaxed);
                    inside.fetch_sub(1 << (f * 16), Ordering::SeqCst);
                    locks.unlock(a.desc(f), f);
                }
            });
        }
    });
    assert_eq!(total.load(Ordering::Relaxed), 20000);
}

#[test]
fn oom_reports_numbers_and_reclaim_callbacks_run_outside_the_lock() {
    let (gm, _) = mem(4, 2, 0);
    let gm = Arc::new(gm);
    // Fill the guest.
    for gpa in (0..4 * MIB).step_by(4096) {
        gm.resolve(gpa, 0).unwrap();
    }
    let e = gm.alloc(1, 0).unwrap_err();
    let MemAllocError::OutOfMemory(oom) = e else {
        panic!("{e:?}")
    };
    assert_eq!((oom.order, oom.free, oom.total), (0, 0, 1024));
    assert!(e.to_string().contains("order 0"), "{e}");
    // A callback that allocates itself (must not recurse or deadlock) and
    // then balloons out 2 MiB of the guest.
    let calls = Arc::new(AtomicU64::new(0));
    let weak = Arc::downgrade(&gm);
    let c2 = calls.clone();
    thread_local!(static IN_CALLBACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    gm.register_reclaim(Arc::new(move |req: &ReclaimRequest| {
        assert!(
            !IN_CALLBACK.with(|c| c.replace(true)),
            "reclaim re-entered from a nested allocation"
        );
        let earlier = c2.fetch_add(1, Ordering::SeqCst);
        let gm = weak.upgrade().unwrap();
        // The nested allocation takes the fast path only. It can succeed
        // only when the other thread's callback already freed memory.
        if let Ok(f) = gm.alloc(req.cpu, 0) {
            assert!(earlier >= 1, "nested allocation found memory nobody freed");
            gm.free(req.cpu, f, 0).unwrap();
        }
        let r = gm.release_range(GpaRange::new(2 * MIB, 2 * MIB)).unwrap();
        IN_CALLBACK.with(|c| c.set(false));
        r.freed_frames
    }));
    thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|cpu| {
                let gm = &gm;
                s.spawn(move || gm.alloc(cpu, 0))
            })
            .collect();
        for h in hs {
            h.join().unwrap().unwrap();
        }
    });
    assert!(calls.load(Ordering::SeqCst) >= 1);
    let s = gm.stats();
    assert!(s.oom_events >= 1 && s.reclaim_runs >= 1);
    gm.check().unwrap();
}
