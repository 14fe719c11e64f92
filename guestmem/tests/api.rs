//! Deterministic tests of the public API. Every `GuestMemory` here runs
//! with a [`BracketChecker`]: each change of the primary map and each free,
//! punch or retirement of a frame that left it must happen inside an
//! invalidation covering it.
#![cfg(not(feature = "loom"))]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use guestmem::*;

const MIB: u64 = 1 << 20;

/// Records every invalidation and checks start/end bracketing; its
/// `checker` checks that every primary change lies inside one.
struct Recorder {
    log: Mutex<Vec<(bool, Invalidation)>>,
    open: AtomicU64,
    checker: Arc<BracketChecker>,
}

impl MmuNotifier for Recorder {
    fn invalidate_range_start(&self, inv: &Invalidation) {
        self.open.fetch_add(1, Ordering::SeqCst);
        self.log.lock().unwrap().push((true, *inv));
    }
    fn invalidate_range_end(&self, inv: &Invalidation) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        self.log.lock().unwrap().push((false, *inv));
    }
}

impl Recorder {
    fn starts(&self) -> Vec<Invalidation> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.0)
            .map(|e| e.1)
            .collect()
    }
    fn assert_bracketed(&self) {
        let log = self.log.lock().unwrap();
        assert_eq!(self.open.load(Ordering::SeqCst), 0);
        for pair in log.chunks(2) {
            assert!(pair[0].0 && !pair[1].0 && pair[0].1 == pair[1].1, "{log:?}");
        }
        self.checker.assert_clean();
    }
}

/// `gm` with a [`Recorder`] subscribed (after a [`BracketChecker`]).
fn watched(gm: GuestMemory) -> (GuestMemory, Arc<Recorder>) {
    let rec = Arc::new(Recorder {
        log: Mutex::default(),
        open: AtomicU64::default(),
        checker: BracketChecker::install(&gm),
    });
    gm.notifiers().register(rec.clone());
    (gm, rec)
}

/// 8 MiB of RAM at [0, 8M), 2 vCPUs, no spare frames.
fn small(vcpus: usize) -> (GuestMemory, Arc<Recorder>) {
    watched(
        GuestMemory::new(GuestMemoryConfig::new(
            vec![GpaRange::new(0, 8 * MIB)],
            vcpus,
        ))
        .unwrap(),
    )
}

fn write(gm: &GuestMemory, r: &Resolved, off: u64, v: u8) {
    // SAFETY: tests write into frames mapped into the (absent) guest.
    unsafe { *((r.host_addr + off) as *mut u8) = v };
    let _ = gm;
}

fn read(r: &Resolved, off: u64) -> u8 {
    // SAFETY: as in `write`.
    unsafe { *((r.host_addr + off) as *const u8) }
}

#[test]
fn buddy_split_and_coalesce() {
    let a = FrameAllocator::new(2048, 0, 1, PcpConfig::default());
    assert_eq!(a.free_blocks(MAX_ORDER), 2);
    let f = a.alloc(0, 3).unwrap();
    assert_eq!(f % 8, 0);
    assert_eq!(a.free_blocks(MAX_ORDER), 1);
    // Splitting left one free block of each order 3..10.
    for o in 3..MAX_ORDER {
        assert_eq!(a.free_blocks(o), 1, "order {o}");
    }
    a.free(0, f, 3).unwrap();
    assert_eq!(a.free_blocks(MAX_ORDER), 2);
    assert_eq!(a.free_blocks(3), 0);
    assert!(
        matches!(a.free(0, f, 3), Err(AllocError::NotAllocated { .. })),
        "double free refused"
    );
    assert!(matches!(
        a.alloc(0, MAX_ORDER + 1),
        Err(AllocError::BadOrder { .. })
    ));
    assert!(matches!(
        a.alloc(5, 0),
        Err(AllocError::BadCpu { cpu: 5, vcpus: 1 })
    ));
}

#[test]
fn pcp_watermarks_refill_trim_drain() {
    let cfg = PcpConfig { high: 8, batch: 4 };
    let a = FrameAllocator::new(64, 0, 2, cfg);
    let f = a.alloc(0, 0).unwrap();
    let c = a.counts();
    assert_eq!((c.pcp_cached, c.allocated, c.free), (3, 1, 60));
    let mut v: Vec<_> = (0..20).map(|_| a.alloc(1, 0).unwrap()).collect();
    v.push(f);
    for f in v {
        a.free(0, f, 0).unwrap();
        assert!(a.counts().pcp_cached <= 8 + 3 + 4);
    }
    let c = a.counts();
    assert_eq!(c.allocated, 0);
    assert!(c.pcp_cached > 0);
    assert_eq!(a.drain_all() as u64, c.pcp_cached);
    assert_eq!(a.counts().free, 64);
    assert_eq!(a.free_blocks(6), 1, "everything coalesced back");
}

#[test]
fn resolve_uses_huge_blocks_where_possible() {
    let (gm, rec) = watched(GuestMemory::new(GuestMemoryConfig::x86(16 * MIB, 1)).unwrap());
    // [0,2M) contains the 640K..1M hole: 4 KiB mappings only.
    let low = gm.resolve(0x1000, 0).unwrap();
    assert_eq!((low.gpa, low.order), (0x1000, 0));
    assert_eq!(
        gm.resolve(0xa0000, 0),
        Err(ResolveError::OutOfRange { gpa: 0xa0000 })
    );
    assert_eq!(
        gm.resolve(16 * MIB, 0),
        Err(ResolveError::OutOfRange { gpa: 16 * MIB })
    );
    let hi = gm.resolve(4 * MIB + 0x5123, 0).unwrap();
    assert_eq!((hi.gpa, hi.order), (4 * MIB, 9));
    assert_eq!(hi.file_offset, gm.pool().file_offset(hi.frame));
    assert_eq!(hi.host_addr, gm.pool().host_addr(hi.frame));
    // Same mapping again, no new allocation.
    assert_eq!(gm.resolve(4 * MIB + 0x1fffff, 0).unwrap(), hi);
    let s = gm.stats();
    assert_eq!((s.mapped, s.allocated), (513, 513));
    gm.check().unwrap();
    assert_eq!(rec.checker.seen(PrimaryChange::Install), 2);
    rec.assert_bracketed();
}

#[test]
fn new_frames_are_zero_even_when_reused() {
    let (gm, rec) = small(1);
    let a = gm.alloc(0, 0).unwrap();
    // SAFETY: we own frame `a`.
    unsafe { gm.pool().frame_bytes_mut(a, 1) }.fill(0x5a);
    assert_eq!(gm.stats().resident_bytes, 4096);
    gm.free(0, a, 0).unwrap();
    // Its host memory went back with it (a frame out of use holds none).
    assert_eq!(gm.stats().resident_bytes, 0);
    gm.check().unwrap();
    // The frame is the hot one on vCPU 0's list; resolve of a 4 KiB slot
    // gets it and it reads zero.
    gm.resolve(0, 0).unwrap(); // fills [0,2M) as huge: use a split slot instead
    gm.release_range(GpaRange::new(0x1000, 0x1000)).unwrap();
    let r = gm.resolve(0x1000, 0).unwrap();
    assert_eq!(r.order, 0);
    assert_eq!(r.frame, a, "test premise: the dirty frame is reused");
    assert!((0..4096).all(|i| read(&r, i) == 0));
    assert_eq!(gm.stats().zeroed, 0, "punched frames need no zeroing");
    gm.check().unwrap();
    rec.assert_bracketed();
}

/// Every kind of primary change happens inside an invalidation covering
/// it: the checker sees each kind at least once and no violation.
#[test]
fn every_primary_change_lies_inside_a_covering_invalidation() {
    let mut cfg = GuestMemoryConfig::new(vec![GpaRange::new(0, 8 * MIB)], 1);
    cfg.extra_frames = 16;
    let (gm, rec) = watched(GuestMemory::new(cfg).unwrap());
    for gpa in (0..8 * MIB).step_by(4096) {
        gm.resolve(gpa, 0).unwrap();
    }
    let r = gm.resolve(2 * MIB, 0).unwrap();
    write(&gm, &r, 0x5000, 9);
    // Split + remove + punch + free.
    gm.release_range(GpaRange::new(2 * MIB + 0x3000, 0x2000))
        .unwrap();
    // Split + replace + punch + retire.
    let f = gm.frame_of_gpa(4 * MIB + 0x7000).unwrap();
    assert!(matches!(
        gm.soft_offline(f),
        Ok(SoftOfflineOutcome::Migrated { .. })
    ));
    // Remove + punch + retire.
    let f = gm.frame_of_gpa(6 * MIB + 0x1000).unwrap();
    assert!(matches!(
        gm.memory_failure(f, MfFlags::default()),
        Ok(MfOutcome::Mapped { .. })
    ));
    // Zero reclaim: remove + punch + free, one bracket per mapping.
    assert!(gm.reclaim_zero_pages(64).freed_frames > 0);
    gm.reset();
    gm.check().unwrap();
    rec.assert_bracketed();
    for change in PrimaryChange::ALL {
        assert!(rec.checker.seen(change) > 0, "no {change:?} seen");
    }
}

#[test]
fn release_splits_huge_mapping_and_returns_memory() {
    let (gm, rec) = small(1);
    let r = gm.resolve(2 * MIB, 0).unwrap();
    assert_eq!(r.order, 9);
    for i in 0..512 {
        write(&gm, &r, i * 4096, 1);
    }
    assert_eq!(gm.stats().resident_bytes, 2 * MIB);
    let rep = gm
        .release_range(GpaRange::new(2 * MIB + 0x3000, 0x1000))
        .unwrap();
    assert_eq!(
        (rep.freed_frames, rep.split_huge, rep.unpopulated),
        (1, 1, 0)
    );
    assert_eq!(
        rec.starts(),
        vec![Invalidation {
            range: GpaRange::new(2 * MIB, 2 * MIB),
            reason: InvalidateReason::Release
        }]
    );
    rec.assert_bracketed();
    // The other 511 pages keep their frames, now as 4 KiB mappings.
    for i in [0u64, 2, 4, 511] {
        let m = gm.lookup(2 * MIB + i * 4096).unwrap();
        assert_eq!((m.order, m.frame), (0, r.frame + i as u32));
        assert_eq!(read(&m, 0), 1);
    }
    assert!(gm.lookup(2 * MIB + 0x3000).is_none());
    assert_eq!(gm.stats().resident_bytes, 2 * MIB - 4096, "punched");
    // Releasing the rest, including the already released page.
    let rep = gm.release_range(GpaRange::new(2 * MIB, 2 * MIB)).unwrap();
    assert_eq!((rep.freed_frames, rep.unpopulated), (511, 1));
    let s = gm.stats();
    assert_eq!(
        (s.mapped, s.allocated, s.resident_bytes, s.released),
        (0, 0, 0, 512)
    );
    gm.check().unwrap();
    assert!(matches!(
        gm.release_range(GpaRange::new(1, 4096)),
        Err(ReleaseError::Unaligned { .. })
    ));
    assert!(matches!(
        gm.release_range(GpaRange::new(8 * MIB, 4096)),
        Err(ReleaseError::OutOfRange { .. })
    ));
    rec.assert_bracketed();
}

#[test]
fn reset_unmaps_everything_and_forgets_gfn_poison() {
    let (gm, rec) = small(2);
    let r = gm.resolve(0x5000, 1).unwrap();
    gm.resolve(6 * MIB, 0).unwrap();
    let f = gm.frame_of_gpa(0x5000).unwrap();
    assert_eq!(f, r.frame + 5);
    assert!(matches!(
        gm.memory_failure(f, MfFlags::default()),
        Ok(MfOutcome::Mapped {
            gpa: 0x5000,
            order: 9
        })
    ));
    assert!(gm.is_poisoned_gfn(5));
    assert_eq!(
        gm.resolve(0x5000, 0),
        Err(ResolveError::Poisoned { gpa: 0x5000 })
    );
    gm.reset();
    rec.assert_bracketed();
    assert!(!gm.is_poisoned_gfn(5));
    let s = gm.stats();
    assert_eq!((s.mapped, s.allocated, s.retired, s.poisoned), (0, 0, 1, 1));
    // The guest frame is usable again, backed by another frame.
    let r2 = gm.resolve(0x5000, 0).unwrap();
    assert_ne!(gm.frame_of_gpa(0x5000), Some(f));
    assert!(
        !(r2.frame..r2.frame + (1 << r2.order)).contains(&f),
        "retired frame reused"
    );
    gm.check().unwrap();
    rec.assert_bracketed();
}
