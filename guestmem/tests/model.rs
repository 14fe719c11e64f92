//! Property tests against a simple model, and multi-threaded stress with
//! the invariant checker. Both run with a [`BracketChecker`]: every primary
//! change, free, punch and retirement lies inside a covering invalidation.
//!
//! The stress test runs `GUESTMEM_STRESS_OPS` operations of its API thread
//! (default [`ROUND_OPS`], the CI run), in rounds of at most [`ROUND_OPS`],
//! each on a fresh `GuestMemory` (memory failures retire frames for good, so
//! one long-lived pool would run out of usable frames).
#![cfg(not(feature = "loom"))]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Instant;

mod common;

use common::stress_ops;
use guestmem::*;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
const PAGES: u64 = 8 * MIB / 4096;

#[derive(Clone, Debug)]
enum Op {
    Resolve { page: u64, cpu: usize },
    Release { page: u64, n: u64 },
    Alloc { cpu: usize, order: u32 },
    Free { idx: usize, cpu: usize },
    Fail { page: u64 },
    FailFrame { frame: u32 },
    SoftOffline { page: u64 },
    Drain { cpu: Option<usize> },
    Reset,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PAGES, 0..2usize).prop_map(|(page, cpu)| Op::Resolve { page, cpu }),
        2 => (0..PAGES, 1..600u64).prop_map(|(page, n)| Op::Release { page, n }),
        3 => (0..2usize, prop_oneof![Just(0u32), 0..4u32]).prop_map(|(cpu, order)| Op::Alloc { cpu, order }),
        3 => (any::<usize>(), 0..2usize).prop_map(|(idx, cpu)| Op::Free { idx, cpu }),
        1 => (0..PAGES).prop_map(|page| Op::Fail { page }),
        1 => (0..(PAGES as u32 + 8)).prop_map(|frame| Op::FailFrame { frame }),
        1 => (0..PAGES).prop_map(|page| Op::SoftOffline { page }),
        1 => prop_oneof![Just(None), (0..2usize).prop_map(Some)].prop_map(|cpu| Op::Drain { cpu }),
        1 => Just(Op::Reset),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Model: which guest pages are mapped (and to what byte), which are
    /// poisoned, which blocks the test holds. Contents must survive
    /// everything except release/reset/poison of that very page.
    #[test]
    fn random_ops_match_model(ops in proptest::collection::vec(op(), 1..80)) {
        let mut cfg = GuestMemoryConfig::new(vec![GpaRange::new(0, 8 * MIB)], 2);
        cfg.extra_frames = 8;
        cfg.pcp = PcpConfig { high: 16, batch: 4 };
        let gm = GuestMemory::new(cfg).unwrap();
        let checker = BracketChecker::install(&gm);
        let mut mapped: BTreeMap<u64, u8> = BTreeMap::new();
        let mut poisoned: BTreeSet<u64> = BTreeSet::new();
        let mut held: Vec<(FrameId, u32)> = Vec::new();
        let mut stamp = 0u8;
        for op in ops {
            match op {
                Op::Resolve { page, cpu } => {
                    let r = gm.resolve(page * 4096, cpu);
                    if poisoned.contains(&page) {
                        prop_assert_eq!(r, Err(ResolveError::Poisoned { gpa: page * 4096 }));
                        continue;
                    }
                    let r = match r {
                        Ok(r) => r,
                        Err(ResolveError::OutOfMemory(_)) => continue,
                        Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
                    };
                    let off = page * 4096 - r.gpa;
                    // SAFETY: the test plays the guest.
                    let p = unsafe { &mut *((r.host_addr + off) as *mut u8) };
                    match mapped.get(&page) {
                        Some(&v) => prop_assert_eq!(*p, v, "page {} lost its contents", page),
                        None => prop_assert_eq!(*p, 0, "new page {} not zero", page),
                    }
                    stamp = stamp.wrapping_add(1).max(1);
                    *p = stamp;
                    mapped.insert(page, stamp);
                    // A huge mapping populated the other pages of its 2 MiB.
                    for g in (r.gpa / 4096)..(r.gpa / 4096 + (1 << r.order)) {
                        mapped.entry(g).or_insert(0);
                    }
                }
                Op::Release { page, n } => {
                    let n = n.min(PAGES - page);
                    gm.release_range(GpaRange::new(page * 4096, n * 4096)).unwrap();
                    for g in page..page + n {
                        mapped.remove(&g);
                    }
                }
                Op::Alloc { cpu, order } => {
                    if let Ok(f) = gm.alloc(cpu, order) {
                        held.push((f, order));
                    }
                }
                Op::Free { idx, cpu } => {
                    if !held.is_empty() {
                        let (f, o) = held.swap_remove(idx % held.len());
                        gm.free(cpu, f, o).unwrap();
                    }
                }
                Op::Fail { page } => {
                    if let Some(f) = gm.frame_of_gpa(page * 4096) {
                        let out = gm.memory_failure(f, MfFlags::default()).unwrap();
                        prop_assert!(matches!(out, MfOutcome::Mapped { .. }), "{:?}", out);
                        mapped.remove(&page);
                        poisoned.insert(page);
                    }
                }
                Op::FailFrame { frame } => {
                    let r = gm.memory_failure(frame, MfFlags::default());
                    if frame >= gm.allocator().frames() {
                        prop_assert!(r.is_err());
                    } else if let Ok(MfOutcome::Mapped { gpa, .. }) = r {
                        mapped.remove(&(gpa / 4096));
                        poisoned.insert(gpa / 4096);
                    }
                }
                Op::SoftOffline { page } => {
                    if let Some(f) = gm.frame_of_gpa(page * 4096) {
                        match gm.soft_offline(f) {
                            Ok(_) | Err(FailureError::NoTarget { .. }) => {}
                            Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
                        }
                    }
                }
                Op::Drain { cpu: Some(c) } => { gm.drain_cpu(c).unwrap(); }
                Op::Drain { cpu: None } => { gm.drain_all(); }
                Op::Reset => {
                    gm.reset();
                    mapped.clear();
                    poisoned.clear();
                }
            }
            gm.check().map_err(|e| TestCaseError::fail(format!("{e}")))?;
            let v = checker.violations();
            prop_assert!(v.is_empty(), "notifier bracket violations: {:#?}", v);
            for &p in &poisoned {
                prop_assert!(gm.is_poisoned_gfn(p));
            }
            let s = gm.stats();
            prop_assert_eq!(s.mapped, mapped.len() as u64);
            prop_assert_eq!(s.free + s.pcp_cached + s.allocated + s.retired, s.total);
        }
        for (f, o) in held {
            gm.free(0, f, o).unwrap();
        }
        gm.reset();
        gm.check().map_err(|e| TestCaseError::fail(format!("{e}")))?;
        checker.assert_clean();
        let s = gm.stats();
        prop_assert_eq!(s.free + s.retired, s.total);
    }
}

/// API operations per stress round (and the default of
/// `GUESTMEM_STRESS_OPS`).
const ROUND_OPS: u64 = 1500;

/// Sets the flag when dropped, also when the thread that owns it panics:
/// the worker threads then stop and the panic is reported, no hang.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// vCPU threads populate and allocate while an API thread releases, poisons,
/// soft-offlines and drains; the checker runs throughout and at the end.
#[test]
fn stress_vcpus_against_failure_and_release() {
    let ops = stress_ops(ROUND_OPS);
    let start = Instant::now();
    let (mut done, mut rounds, mut vcpu_ops) = (0, 0, 0);
    while done < ops {
        let n = ROUND_OPS.min(ops - done);
        vcpu_ops += stress_round(rounds, n);
        done += n;
        rounds += 1;
    }
    eprintln!(
        "{done} API operations in {rounds} rounds (+ {vcpu_ops} vCPU resolves/allocs/frees) in {:?}",
        start.elapsed()
    );
}

/// One round of `ops` API operations; returns the vCPU threads' operations.
fn stress_round(round: u64, ops: u64) -> u64 {
    let mut cfg = GuestMemoryConfig::new(vec![GpaRange::new(0, 16 * MIB)], 3);
    cfg.extra_frames = 64;
    cfg.pcp = PcpConfig { high: 32, batch: 8 };
    let gm = GuestMemory::new(cfg).unwrap();
    let checker = BracketChecker::install(&gm);
    let stop = AtomicBool::new(false);
    let vcpu_ops = AtomicU64::new(0);
    let pages = 16 * MIB / 4096;
    let seed = round.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    thread::scope(|s| {
        for cpu in 0..3usize {
            let (gm, stop, vcpu_ops) = (&gm, &stop, &vcpu_ops);
            s.spawn(move || {
                let mut x = (seed ^ (cpu as u64 * 7919)) | 1;
                let mut held = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    match gm.resolve((x % pages) * 4096, cpu) {
                        Ok(_)
                        | Err(ResolveError::Poisoned { .. })
                        | Err(ResolveError::OutOfMemory(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                    if x.is_multiple_of(3) {
                        if let Ok(f) = gm.alloc(cpu, 0) {
                            held.push(f);
                        }
                    }
                    if held.len() > 40 || (x.is_multiple_of(5) && !held.is_empty()) {
                        let f = held.swap_remove((x as usize) % held.len());
                        gm.free(cpu, f, 0).unwrap();
                    }
                }
                for f in held {
                    gm.free(cpu, f, 0).unwrap();
                }
                vcpu_ops.fetch_add(n, Ordering::Relaxed);
            });
        }
        let _stop = StopOnDrop(&stop);
        let mut x = (seed ^ 12345) | 1;
        for i in 0..ops {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let frame = (x % gm.allocator().frames() as u64) as u32;
            match i % 6 {
                0 => {
                    gm.memory_failure(frame, MfFlags::default()).unwrap();
                }
                1 => {
                    let _ = gm.soft_offline(frame);
                }
                2 | 3 => {
                    let p = x % pages;
                    let n = (x >> 20) % 700 + 1;
                    gm.release_range(GpaRange::new(p * 4096, n.min(pages - p) * 4096))
                        .unwrap();
                }
                4 => {
                    gm.drain_all();
                }
                _ => {
                    if i % 60 == 5 {
                        gm.reset();
                    }
                    gm.check()
                        .unwrap_or_else(|e| panic!("round {round}, op {i}: {e}"));
                    let v = checker.violations();
                    assert!(v.is_empty(), "round {round}, op {i}: {v:#?}");
                }
            }
        }
    });
    gm.check().unwrap();
    checker.assert_clean();
    let s = gm.stats();
    assert_eq!(s.free + s.pcp_cached + s.allocated + s.retired, s.total);
    if ops >= 60 {
        assert!(s.poisoned > 0 && s.retired > 0, "round {round}: {s:?}");
    }
    vcpu_ops.into_inner()
}
