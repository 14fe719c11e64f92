//! Functional tests of the fault path, invalidation and split.
#![cfg(not(feature = "loom"))]

mod common;

use std::sync::Arc;

use common::{assert_consistent, FlatPrimary, PrimaryError, HOST_BASE};
use guestmem::notifier::{GpaRange, InvalidateReason, Invalidation, MmuNotifier};
use guestmem::PAGE_SIZE;
use mmu::{Backing, FaultError, PrimaryMap, ShadowEpt, HUGE_ORDER, HUGE_SIZE};

const MIB: u64 = 1 << 20;

fn setup(huge: bool) -> (Arc<ShadowEpt>, FlatPrimary) {
    let ept = Arc::new(ShadowEpt::new().unwrap());
    let primary = FlatPrimary::new(64 * MIB, move |_| huge);
    primary.list.register(ept.clone());
    (ept, primary)
}

#[test]
fn fault_installs_4k_and_translate_finds_it() {
    let (ept, p) = setup(false);
    assert_eq!(ept.translate(0x5000, false), None);
    let t = ept.fault(0x5123, false, 0, &p).unwrap();
    assert_eq!((t.gpa_base, t.order), (0x5000, 0));
    assert_eq!(t.host_addr, p.host_of(0x5000).unwrap());
    assert!(t.writable, "read fault on a writable page maps it writable");
    let (t2, e) = ept.peek(0x5fff).unwrap();
    assert_eq!(t2, t);
    assert!(e.readable() && e.writable() && !e.is_large());
    assert_eq!(ept.translate(0x6000, false), None);
    assert_eq!(ept.translate(0x5000, true), Some(t));
    assert_consistent(&ept, &p);
}

#[test]
fn huge_backing_installs_one_2m_leaf() {
    let (ept, p) = setup(true);
    let t = ept.fault(3 * MIB, true, 0, &p).unwrap();
    assert_eq!((t.gpa_base, t.order), (2 * MIB, HUGE_ORDER));
    let (t2, e) = ept.peek(4 * MIB - 1).unwrap();
    assert_eq!(t2, t);
    assert!(e.is_large() && e.writable());
    assert_eq!(ept.stats().installs_2m, 1);
    assert_consistent(&ept, &p);
}

#[test]
fn misaligned_huge_host_block_falls_back_to_4k() {
    struct Odd;
    impl PrimaryMap for Odd {
        type Error = PrimaryError;
        fn resolve(&self, gpa: u64, _: usize) -> Result<Backing, PrimaryError> {
            Ok(Backing {
                gpa_base: gpa & !(HUGE_SIZE - 1),
                order: HUGE_ORDER,
                host_addr: HOST_BASE + 0x1000, // contiguous but not 2 MiB aligned
                frame: 1,
                writable: true,
            })
        }
    }
    let ept = ShadowEpt::new().unwrap();
    let t = ept.fault(HUGE_SIZE + 0x3000, false, 0, &Odd).unwrap();
    assert_eq!((t.gpa_base, t.order), (HUGE_SIZE + 0x3000, 0));
    assert_eq!(t.host_addr, HOST_BASE + 0x4000);
}

#[test]
fn bad_backing_and_bad_gpa_are_errors() {
    struct Bad(u32, u64);
    impl PrimaryMap for Bad {
        type Error = PrimaryError;
        fn resolve(&self, _gpa: u64, _: usize) -> Result<Backing, PrimaryError> {
            Ok(Backing {
                gpa_base: self.1,
                order: self.0,
                host_addr: HOST_BASE,
                frame: 0,
                writable: false,
            })
        }
    }
    let ept = ShadowEpt::new().unwrap();
    let e = ept.fault(0x1000, false, 0, &Bad(3, 0)).unwrap_err();
    assert!(e.to_string().contains("neither 0 nor 9"), "{e}");
    let e = ept.fault(0x9000, false, 0, &Bad(0, 0)).unwrap_err();
    assert!(e.to_string().contains("does not contain"), "{e}");
    let e = ept.fault(0x0, true, 0, &Bad(0, 0)).unwrap_err();
    assert!(matches!(e, FaultError::ReadOnly { gpa: 0 }), "{e}");
    let e = ept.fault(1 << 48, false, 0, &Bad(0, 0)).unwrap_err();
    assert!(matches!(e, FaultError::OutOfRange { .. }), "{e}");
    let p = FlatPrimary::new(MIB, |_| false);
    let e = ept.fault(2 * MIB, false, 0, &p).unwrap_err();
    assert!(matches!(e, FaultError::Primary { .. }), "{e}");
    assert!(ept.mappings(GpaRange::new(0, 1 << 48)).is_empty());
}

#[test]
fn read_only_primary_page_maps_read_only() {
    struct Ro;
    impl PrimaryMap for Ro {
        type Error = PrimaryError;
        fn resolve(&self, gpa: u64, _: usize) -> Result<Backing, PrimaryError> {
            Ok(Backing {
                gpa_base: gpa & !(PAGE_SIZE - 1),
                order: 0,
                host_addr: HOST_BASE + (gpa & !(PAGE_SIZE - 1)),
                frame: gpa / PAGE_SIZE,
                writable: false,
            })
        }
    }
    let ept = ShadowEpt::new().unwrap();
    let t = ept.fault(0x3000, false, 0, &Ro).unwrap();
    assert!(!t.writable);
    assert!(!ept.peek(0x3000).unwrap().1.writable());
    assert_eq!(ept.translate(0x3000, false), Some(t));
    assert_eq!(
        ept.translate(0x3000, true),
        None,
        "write through a read-only leaf"
    );
    let e = ept.fault(0x3000, true, 0, &Ro).unwrap_err();
    assert!(matches!(e, FaultError::ReadOnly { gpa: 0x3000 }), "{e}");
}

#[test]
fn small_invalidation_inside_huge_leaf_zaps_whole_leaf() {
    let (ept, p) = setup(true);
    ept.fault(0, false, 0, &p).unwrap();
    let inv = Invalidation {
        range: GpaRange::new(0x7000, PAGE_SIZE),
        reason: InvalidateReason::Release,
    };
    ept.invalidate_range_start(&inv);
    for gpa in [0, 0x7000, HUGE_SIZE - 1] {
        assert_eq!(
            ept.peek(gpa),
            None,
            "{gpa:#x} still mapped inside the invalidation"
        );
    }
    ept.invalidate_range_end(&inv);
    assert_eq!(ept.stats().zapped_leaves, 1);
}

#[test]
fn no_install_between_start_and_end() {
    let p = FlatPrimary::new(64 * MIB, |_| false);
    let ept = ShadowEpt::new().unwrap().with_max_fault_attempts(3);
    let _ = ept.fault(0x1000, false, 0, &p).unwrap();
    let inv = Invalidation {
        range: GpaRange::new(0, 0x10000),
        reason: InvalidateReason::Unmap,
    };
    ept.invalidate_range_start(&inv);
    assert_eq!(ept.invalidations_in_progress(), 1);
    let e = ept.fault(0x1000, false, 0, &p).unwrap_err();
    assert!(matches!(e, FaultError::Retry { attempts: 3, .. }), "{e}");
    assert_eq!(ept.peek(0x1000), None);
    // Outside the range faults proceed.
    ept.fault(0x10000, false, 0, &p).unwrap();
    let seq = ept.invalidate_seq();
    ept.invalidate_range_end(&inv);
    assert_eq!(ept.invalidate_seq(), seq + 1);
    assert_eq!(ept.invalidations_in_progress(), 0);
    ept.fault(0x1000, false, 0, &p).unwrap();
    assert_eq!(ept.stats().retries, 3);
}

#[test]
fn primary_changes_through_notifier_list_keep_ept_consistent() {
    let (ept, p) = setup(true);
    for gpa in (0..16 * MIB).step_by(0x3000) {
        ept.fault(gpa, gpa % 2 == 0, 0, &p).unwrap();
    }
    assert_consistent(&ept, &p);
    let (base, order, old) = p.migrate(5 * MIB).unwrap();
    assert_eq!((base, order), (4 * MIB, HUGE_ORDER));
    assert_eq!(ept.peek(5 * MIB), None);
    let t = ept.fault(5 * MIB, false, 0, &p).unwrap();
    assert_ne!(t.host_addr, old);
    assert!(p.split(8 * MIB));
    assert_eq!(ept.peek(8 * MIB), None);
    let t = ept.fault(9 * MIB, false, 0, &p).unwrap();
    assert_eq!(t.order, 0, "primary split: 4 KiB leaves from now on");
    p.unmap(GpaRange::new(MIB, 0x1000), InvalidateReason::Release);
    assert_eq!(ept.peek(0), None, "2 MiB primary mapping is unmapped whole");
    assert_consistent(&ept, &p);
    let s = ept.stats();
    assert_eq!(s.invalidations, 3);
    assert!(s.zapped_leaves >= 3);
}

#[test]
fn huge_fault_collapses_linked_pt() {
    // 4 KiB leaves in a slot, then the primary hands out a huge block there
    // (e.g. after khugepaged-like collapse, which invalidates first).
    let (ept, p) = setup(false);
    ept.fault(0x1000, true, 0, &p).unwrap();
    ept.fault(0x2000, false, 0, &p).unwrap();
    p.unmap(GpaRange::new(0, HUGE_SIZE), InvalidateReason::Unmap);
    let huge = FlatPrimary::new(64 * MIB, |_| true);
    let t = ept.fault(0x1000, false, 0, &huge).unwrap();
    assert_eq!(t.order, HUGE_ORDER);
    assert_eq!(ept.mappings(GpaRange::new(0, HUGE_SIZE)), vec![t]);
}

#[test]
fn release_drops_everything_and_refuses_faults() {
    let (ept, p) = setup(true);
    ept.fault(0, false, 0, &p).unwrap();
    ept.fault(10 * MIB, false, 0, &p).unwrap();
    p.list.release_all();
    assert!(p.list.is_empty());
    assert!(ept.mappings(GpaRange::new(0, 1 << 48)).is_empty());
    assert!(matches!(
        ept.fault(0, false, 0, &p),
        Err(FaultError::Released)
    ));
}

#[test]
fn overlapping_invalidations_track_widened_range() {
    let p = FlatPrimary::new(64 * MIB, |_| false);
    let ept = ShadowEpt::new().unwrap().with_max_fault_attempts(2);
    let a = Invalidation {
        range: GpaRange::new(0, 0x2000),
        reason: InvalidateReason::Unmap,
    };
    let b = Invalidation {
        range: GpaRange::new(0x8000, 0x1000),
        reason: InvalidateReason::Unmap,
    };
    ept.invalidate_range_start(&a);
    ept.invalidate_range_start(&b);
    assert_eq!(ept.invalidations_in_progress(), 2);
    // Between the two ranges: blocked too (the tracked range is the union).
    assert!(ept.fault(0x4000, false, 0, &p).is_err());
    ept.invalidate_range_end(&a);
    assert!(ept.fault(0x4000, false, 0, &p).is_err());
    ept.invalidate_range_end(&b);
    ept.fault(0x4000, false, 0, &p).unwrap();
}

#[test]
fn register_and_unregister_while_invalidations_run() {
    let p = Arc::new(FlatPrimary::new(64 * MIB, |i| i % 2 == 0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mutator = {
        let (p, stop) = (p.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                p.migrate((i * 0x1000) % (8 * MIB));
                p.unmap(
                    GpaRange::new((i * 0x3000) % (8 * MIB), 0x1000),
                    InvalidateReason::Release,
                );
                i += 1;
            }
        })
    };
    for _ in 0..50 {
        let ept = Arc::new(ShadowEpt::new().unwrap());
        let id = p.list.register(ept.clone());
        for gpa in (0..8 * MIB).step_by(0x11000) {
            let _ = ept.fault(gpa, false, 0, &*p);
        }
        assert!(p.list.unregister(id));
        // Unregister waited for invalidations in flight; nothing calls it now.
        assert_eq!(ept.invalidations_in_progress(), 0);
        assert_eq!(Arc::strong_count(&ept), 1);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    mutator.join().unwrap();
}
