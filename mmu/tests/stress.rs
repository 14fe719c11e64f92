//! Multi-threaded stress: vCPU-like faulters, a lock-free reader and a
//! primary mutator race; invariant checkers run after every invalidation and at the
//! end. Iteration counts are fixed (no timing): MMU_STRESS_OPS primary
//! changes (default 10,000; docs/benchmarks.md records a 10^6 run).
#![cfg(not(feature = "loom"))]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{assert_consistent, assert_consistent_in, FlatPrimary};
use guestmem::notifier::{GpaRange, InvalidateReason};
use guestmem::PAGE_SIZE;
use mmu::{FaultError, ShadowEpt, HUGE_SIZE};

const LIMIT: u64 = 8 * HUGE_SIZE;

/// xorshift, so runs differ only by seed.
fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn faults_readers_and_invalidations_keep_invariants() {
    let ept = Arc::new(ShadowEpt::new().unwrap());
    let p = Arc::new(FlatPrimary::new(LIMIT, |i| i % 2 == 0));
    p.list.register(ept.clone());
    let done = Arc::new(AtomicBool::new(false));
    // Per-worker progress, so the mutator keeps going until every worker has
    // raced it (on a loaded 2-core machine they may start late).
    let progress: Arc<[std::sync::atomic::AtomicU64; 3]> = Arc::new(Default::default());
    let mut threads = Vec::new();
    for cpu in 0..2 {
        let (ept, p, done, progress) = (ept.clone(), p.clone(), done.clone(), progress.clone());
        threads.push(std::thread::spawn(move || {
            let mut s = 0x9e37_79b9_7f4a_7c15 ^ (cpu as u64 + 1);
            let mut n = 0u64;
            while !done.load(Ordering::Relaxed) {
                let gpa = rng(&mut s) % LIMIT;
                let write = rng(&mut s) % 3 == 1;
                match ept.fault(gpa, write, cpu, &*p) {
                    Ok(t) => {
                        assert!(t.range().overlaps(&GpaRange::new(gpa, 1)));
                        assert!(!write || t.writable);
                    }
                    Err(FaultError::Retry { .. }) => {}
                    Err(e) => panic!("fault at {gpa:#x}: {e}"),
                }
                if let Some(t) = ept.translate(rng(&mut s) % LIMIT, false) {
                    assert_eq!(t.host_addr % (PAGE_SIZE << t.order), 0);
                }
                n += 1;
                progress[cpu].store(n, Ordering::Relaxed);
            }
            n
        }));
    }
    {
        // A lock-free reader walking every page while leaves are installed,
        // split and zapped: whatever it finds is a whole, aligned leaf
        // covering the page.
        let (ept, done, progress) = (ept.clone(), done.clone(), progress.clone());
        threads.push(std::thread::spawn(move || {
            let mut n = 0;
            while !done.load(Ordering::Relaxed) {
                for gpa in (0..LIMIT).step_by(PAGE_SIZE as usize) {
                    if let Some(t) = ept.translate(gpa, false) {
                        assert!(t.range().overlaps(&GpaRange::new(gpa, 1)), "{t:x?}");
                        assert_eq!(t.host_addr % (PAGE_SIZE << t.order), 0, "{t:x?}");
                    }
                }
                n += 1;
                progress[2].store(n, Ordering::Relaxed);
                std::thread::yield_now();
            }
            n
        }));
    }
    // The mutator: after each invalidate_range_end, the old frames may be
    // freed, so no leaf may map them any more.
    let mut s = 42u64;
    while progress.iter().any(|c| c.load(Ordering::Relaxed) == 0) {
        std::thread::yield_now();
    }
    let ops: u64 = std::env::var("MMU_STRESS_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut i = 0u64;
    while i < ops || progress.iter().any(|c| c.load(Ordering::Relaxed) < 100) {
        i += 1;
        let gpa = rng(&mut s) % LIMIT;
        let old = match i % 4 {
            0 => p.migrate(gpa).into_iter().collect(),
            1 => p.unmap(
                GpaRange::new(gpa & !(PAGE_SIZE - 1), PAGE_SIZE * (1 + rng(&mut s) % 600)),
                InvalidateReason::Release,
            ),
            2 => {
                p.split(gpa);
                Vec::new()
            }
            _ => {
                // Poison / soft offline / partial release of a few pages
                // inside a 2 MiB mapping the faulters are using: half the
                // time make the slot a 2 MiB mapping (and leaf) again first,
                // as `split` and earlier changes leave it in 4 KiB pages.
                let mut old = Vec::new();
                if rng(&mut s).is_multiple_of(2) {
                    let slot = GpaRange::new(gpa & !(HUGE_SIZE - 1), HUGE_SIZE);
                    old = p.unmap(slot, InvalidateReason::Release);
                    p.allow_huge(slot.start);
                    match ept.fault(gpa, false, 2, &*p) {
                        Ok(_) | Err(FaultError::Retry { .. }) => {}
                        Err(e) => panic!("fault at {gpa:#x}: {e}"),
                    }
                }
                let changed =
                    GpaRange::new(gpa & !(PAGE_SIZE - 1), PAGE_SIZE * (1 + rng(&mut s) % 3));
                let (cover, changed_old) = p.change_range(changed, rng(&mut s).is_multiple_of(2));
                old.extend(changed_old);
                // The rest of the invalidated range kept its frames: any
                // leaf there maps what the primary maps (or is absent).
                assert_consistent_in(&ept, &p, cover);
                old
            }
        };
        for (base, order, host) in old {
            let len = PAGE_SIZE << order;
            for t in ept.mappings(GpaRange::new(base, len)) {
                let lo = t.gpa_base.max(base);
                let hi = (t.gpa_base + t.len()).min(base + len);
                let mut g = lo;
                while g < hi {
                    assert_ne!(
                        t.host_addr_of(g),
                        host + (g - base),
                        "stale leaf {t:x?} after invalidate_range_end"
                    );
                    g += PAGE_SIZE;
                }
            }
        }
    }
    done.store(true, Ordering::Relaxed);
    let counts: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        counts.iter().all(|&c| c > 0),
        "every worker ran: {counts:?}"
    );
    assert_eq!(ept.invalidations_in_progress(), 0);
    assert_consistent(&ept, &p);
    let st = ept.stats();
    eprintln!("{i} primary changes, {counts:?} worker iterations, {st:?}");
    assert!(
        st.installs_4k > 0 && st.installs_2m > 0 && st.zapped_leaves > 0 && st.splits > 0,
        "{st:?}"
    );
}
