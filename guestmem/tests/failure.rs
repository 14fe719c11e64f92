//! Memory failure, soft offline, unpoison, page lock, OOM.
#![cfg(not(feature = "loom"))]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

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
    let gm = Arc::new(gm);
    let r = gm.resolve(0x3000, 0).unwrap();
    let f = r.frame;
    gm.lock_frame(f);
    // A detached thread and a bounded receive: if the unlock below never
    // woke memory_failure, the test fails instead of hanging.
    let (tx, rx) = mpsc::channel();
    let g2 = gm.clone();
    thread::spawn(move || {
        let _ = tx.send(g2.memory_failure(f, MfFlags::default()));
    });
    thread::sleep(Duration::from_millis(100));
    assert!(
        rx.try_recv().is_err(),
        "memory_failure did not wait for the page lock"
    );
    assert!(
        gm.lookup(0x3000).is_some(),
        "unmapped while the page was locked"
    );
    gm.unlock_frame(f);
    let out = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|e| {
            panic!(
                "memory_failure not done 10 s after the unlock ({e}): frame {f} lock word {:#x}",
                gm.allocator().desc(f).raw()
            )
        });
    assert!(matches!(out, Ok(MfOutcome::Mapped { .. })), "{out:?}");
    gm.check().unwrap();
}

/// Retired frames give their host memory back: soft offline (the data is
/// copied first) and hard poison of mapped pages punch the old frame, so
/// the pool's host memory does not grow with retirements and the exact
/// host-memory rules of `check()` hold (no slack).
#[test]
fn retired_frames_give_their_host_memory_back() {
    const SOFT: u64 = 1500;
    const HARD: u64 = 100;
    let (gm, _) = mem(8, 1, SOFT + 16);
    let pages = 8 * MIB / 4096;
    for page in 0..pages {
        let r = gm.resolve(page * 4096, 0).unwrap();
        let p = (r.host_addr + (page * 4096 - r.gpa)) as *mut u8;
        // SAFETY: the test plays the guest writing its mapped page.
        unsafe { p.write_volatile(page as u8 | 1) };
    }
    let resident = gm.stats().resident_bytes;
    assert_eq!(resident, 8 * MIB);
    for page in 0..SOFT {
        let f = gm.frame_of_gpa(page * 4096).unwrap();
        let out = gm.soft_offline(f).unwrap();
        assert!(
            matches!(out, SoftOfflineOutcome::Migrated { .. }),
            "{out:?}"
        );
    }
    gm.check()
        .unwrap_or_else(|e| panic!("after {SOFT} soft offlines: {e}"));
    let s = gm.stats();
    assert_eq!(s.retired, SOFT);
    assert_eq!(
        s.resident_bytes, resident,
        "{SOFT} soft offlines: the pool's host memory grew by the retired frames"
    );
    for page in pages - HARD..pages {
        let out = gm.memory_failure_gpa(page * 4096, MfFlags::default());
        assert!(matches!(out, Ok(MfOutcome::Mapped { .. })), "{out:?}");
    }
    gm.check()
        .unwrap_or_else(|e| panic!("after {HARD} hard poisons: {e}"));
    let s = gm.stats();
    assert_eq!(s.retired, SOFT + HARD);
    assert_eq!(
        s.resident_bytes,
        resident - HARD * 4096,
        "hard-poisoned frames keep their host memory"
    );
    // The migrated pages kept their contents.
    for page in 0..SOFT {
        let r = gm.lookup(page * 4096).unwrap();
        // SAFETY: as above, reading.
        let v = unsafe { ((r.host_addr + (page * 4096 - r.gpa)) as *const u8).read_volatile() };
        assert_eq!(v, page as u8 | 1, "page {page}");
    }
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
    // Set when a callback runs on a thread holding the OOM lock (recorded,
    // not asserted in the callback: the allocation must still complete).
    let under_lock = Arc::new(AtomicBool::new(false));
    let u2 = under_lock.clone();
    thread_local!(static IN_CALLBACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    gm.register_reclaim(Arc::new(move |req: &ReclaimRequest| {
        assert!(
            !IN_CALLBACK.with(|c| c.replace(true)),
            "reclaim re-entered from a nested allocation"
        );
        let earlier = c2.fetch_add(1, Ordering::SeqCst);
        let gm = weak.upgrade().unwrap();
        if gm.oom_lock_held_by_current_thread() {
            u2.store(true, Ordering::SeqCst);
        }
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
    assert!(
        !under_lock.load(Ordering::SeqCst),
        "a reclaim callback ran while its thread held the OOM lock"
    );
    let s = gm.stats();
    assert!(s.oom_events >= 1 && s.reclaim_runs >= 1);
    gm.check().unwrap();
}

/// One allocating thread: inside its reclaim callback nobody may hold the
/// OOM lock (a `try_lock` of it succeeds), and the callback can free
/// memory and allocate without deadlocking.
#[test]
fn reclaim_callbacks_run_without_the_oom_lock() {
    let (gm, _) = mem(4, 1, 0);
    let gm = Arc::new(gm);
    for gpa in (0..4 * MIB).step_by(4096) {
        gm.resolve(gpa, 0).unwrap();
    }
    // (held by anyone, held by this thread) seen inside each callback.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (weak, s2) = (Arc::downgrade(&gm), seen.clone());
    gm.register_reclaim(Arc::new(move |_req: &ReclaimRequest| {
        let gm = weak.upgrade().unwrap();
        s2.lock()
            .unwrap()
            .push((gm.oom_lock_held(), gm.oom_lock_held_by_current_thread()));
        gm.release_range(GpaRange::new(0, 2 * MIB))
            .unwrap()
            .freed_frames
    }));
    assert!(!gm.oom_lock_held(), "held before the allocation");
    let f = gm.alloc(0, 0).expect("the callback freed memory");
    gm.free(0, f, 0).unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the reclaim callback never ran");
    assert!(
        seen.iter().all(|&(any, mine)| !any && !mine),
        "reclaim callbacks ran with the OOM lock held (held by anyone, by the callback's thread): {seen:?}"
    );
    assert!(!gm.oom_lock_held(), "left held");
    gm.check().unwrap();
}
