//! Zero-page reclaim: zero frames go back to the host inside a notifier
//! bracket, written ones stay, a write that lands before the bracket wins,
//! and the OOM path uses it as a reclaim callback. Every `GuestMemory` here
//! runs with a [`BracketChecker`].
#![cfg(not(feature = "loom"))]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

mod common;

use common::Gate;
use guestmem::*;

const MIB: u64 = 1 << 20;
const HUGE: u64 = 2 * MIB;

/// Records brackets; optionally writes `value` at host address `poke` when
/// a bracket starts (a guest write that landed just before the zap).
#[derive(Default)]
struct Recorder {
    starts: Mutex<Vec<GpaRange>>,
    open: AtomicU64,
    poke: AtomicU64,
    checker: std::sync::OnceLock<Arc<BracketChecker>>,
}

impl Recorder {
    /// Every primary change so far lay inside a covering invalidation.
    #[track_caller]
    fn assert_bracketed(&self) {
        self.checker.get().expect("installed").assert_clean();
    }
}

impl MmuNotifier for Recorder {
    fn invalidate_range_start(&self, inv: &Invalidation) {
        self.open.fetch_add(1, Ordering::SeqCst);
        self.starts.lock().unwrap().push(inv.range);
        let p = self.poke.swap(0, Ordering::SeqCst);
        if p != 0 {
            // SAFETY: the test stored the direct-map address of a frame
            // mapped to the guest; it stays mapped until this bracket ends.
            unsafe { (p as *mut u64).write_volatile(0x5a5a) };
        }
    }
    fn invalidate_range_end(&self, _inv: &Invalidation) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn mem(mib: u64) -> (Arc<GuestMemory>, Arc<Recorder>) {
    let gm =
        GuestMemory::new(GuestMemoryConfig::new(vec![GpaRange::new(0, mib * MIB)], 1)).unwrap();
    let rec = Arc::new(Recorder::default());
    let _ = rec.checker.set(BracketChecker::install(&gm));
    gm.notifiers().register(rec.clone());
    (Arc::new(gm), rec)
}

fn host(gm: &GuestMemory, gpa: u64) -> *mut u64 {
    let r = gm.lookup(gpa).expect("mapped");
    (r.host_addr + (gpa - r.gpa)) as *mut u64
}

fn write(gm: &GuestMemory, gpa: u64, v: u64) {
    // SAFETY: `gpa` is mapped; nothing else touches it in these tests.
    unsafe { host(gm, gpa).write_volatile(v) }
}

fn read(gm: &GuestMemory, gpa: u64) -> u64 {
    // SAFETY: as in `write`.
    unsafe { host(gm, gpa).read_volatile() }
}

/// 6 MiB: block 0 huge with one written page, block 1 split into 4 KiB
/// mappings with one written page, block 2 huge and all zero.
fn populate(gm: &GuestMemory) {
    for gpa in (0..6 * MIB).step_by(4096) {
        gm.resolve(gpa, 0).unwrap();
    }
    assert_eq!(gm.lookup(0).unwrap().order, 9, "huge where possible");
    gm.release_range(GpaRange::new(HUGE, 4096)).unwrap();
    gm.resolve(HUGE, 0).unwrap();
    assert_eq!(gm.lookup(HUGE + 4096).unwrap().order, 0, "split");
    write(gm, 0x1000, 7);
    write(gm, HUGE + 0x3000, 9);
}

#[test]
fn zero_pages_are_released_and_written_ones_kept() {
    let (gm, rec) = mem(6);
    populate(&gm);
    let resident = gm.pool().resident_bytes();
    rec.starts.lock().unwrap().clear();
    let r = gm.reclaim_zero_pages(u64::MAX);
    // Block 1: 511 zero 4 KiB pages; block 2: one whole huge mapping.
    assert_eq!(r.freed_frames, 511 + 512, "{r:?}");
    assert_eq!(r.raced, 0);
    assert_eq!(rec.open.load(Ordering::SeqCst), 0);
    let starts = rec.starts.lock().unwrap().clone();
    assert_eq!(starts.len(), 512, "one bracket per mapping");
    assert!(
        starts.contains(&GpaRange::new(2 * HUGE, HUGE)),
        "huge as a whole"
    );
    assert!(starts
        .iter()
        .all(|r| r.len() == 4096 || *r == GpaRange::new(2 * HUGE, HUGE)));
    // Written pages keep their frames and contents; zero ones are gone.
    assert_eq!(read(&gm, 0x1000), 7);
    assert_eq!(read(&gm, HUGE + 0x3000), 9);
    assert!(gm.lookup(HUGE + 0x4000).is_none());
    assert!(gm.lookup(2 * HUGE).is_none());
    assert!(gm.pool().resident_bytes() <= resident - 1000 * 4096);
    gm.check().unwrap();
    // The guest's next access gets a fresh zero frame.
    gm.resolve(HUGE + 0x4000, 0).unwrap();
    assert_eq!(read(&gm, HUGE + 0x4000), 0);
    gm.check().unwrap();
    rec.assert_bracketed();
}

#[test]
fn a_write_before_the_bracket_keeps_the_page() {
    let (gm, rec) = mem(6);
    populate(&gm);
    // The first candidate is block 1's first zero page: it gets written
    // after the pre-check, just before its secondary mappings go.
    rec.poke
        .store(host(&gm, HUGE + 0x1000) as u64, Ordering::SeqCst);
    let r = gm.reclaim_zero_pages(u64::MAX);
    assert_eq!(r.raced, 1, "{r:?}");
    assert_eq!(r.freed_frames, 510 + 512, "{r:?}");
    assert_eq!(read(&gm, HUGE + 0x1000), 0x5a5a);
    gm.check().unwrap();
    rec.assert_bracketed();
}

#[test]
fn max_pages_bounds_the_work() {
    let (gm, rec) = mem(6);
    populate(&gm);
    let r = gm.reclaim_zero_pages(16);
    assert_eq!((r.candidates, r.freed_frames), (16, 16), "{r:?}");
    gm.check().unwrap();
    rec.assert_bracketed();
}

#[test]
fn oom_reclaims_zero_pages() {
    let (gm, rec) = mem(6);
    populate(&gm);
    assert!(gm.alloc(0, 0).is_err(), "the guest holds every frame");
    let weak = Arc::downgrade(&gm);
    gm.register_reclaim(Arc::new(move |req: &ReclaimRequest| {
        weak.upgrade().map_or(0, |gm| {
            gm.reclaim_zero_pages(512.max(1 << req.order)).freed_frames
        })
    }));
    let f = gm.alloc(0, 0).expect("zero pages reclaimed");
    gm.free(0, f, 0).unwrap();
    assert!(gm.stats().reclaim_runs >= 1);
    assert_eq!(read(&gm, 0x1000), 7);
    assert_eq!(read(&gm, HUGE + 0x3000), 9);
    gm.check().unwrap();
    rec.assert_bracketed();
}

#[test]
fn busy_memory_operation_means_no_reclaim_now() {
    // Another memory operation (here a balloon release, stopped inside its
    // bracket) holds guestmem's operation lock: reclaim must not wait for
    // it (that operation may be the allocation that asked for reclaim).
    let (gm, rec) = mem(4);
    for gpa in (0..4 * MIB).step_by(4096) {
        gm.resolve(gpa, 0).unwrap();
    }
    let gate = Arc::new(Gate::new());
    gm.notifiers().register(gate.clone());
    std::thread::scope(|s| {
        let g2 = gm.clone();
        let t = s.spawn(move || g2.release_range(GpaRange::new(0, 4096)).unwrap());
        gate.entered.wait();
        let r = gm.reclaim_zero_pages(u64::MAX);
        gate.leave.wait();
        assert_eq!(r, ZeroReclaim::default(), "returned at once, did nothing");
        t.join().unwrap();
    });
    // Once the operation is over, reclaim works.
    assert_eq!(gm.reclaim_zero_pages(u64::MAX).freed_frames, 1023);
    gm.check().unwrap();
    rec.assert_bracketed();
}
