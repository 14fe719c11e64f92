//! `release_range` against a concurrent `resolve` of the same 2 MiB extent:
//! the invalidation must cover every mapping the release changes, also a
//! huge mapping that `resolve` installed after the release first looked at
//! the map (it is split or removed inside the bracket).
#![cfg(not(feature = "loom"))]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use guestmem::*;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// A secondary MMU whose `invalidate_range_start` takes a while (like a
/// real one zapping a view), which widens the window between the release
/// choosing its range and changing the map.
struct SlowStart;

impl MmuNotifier for SlowStart {
    fn invalidate_range_start(&self, _inv: &Invalidation) {
        thread::sleep(Duration::from_micros(50));
    }
    fn invalidate_range_end(&self, _inv: &Invalidation) {}
}

#[test]
fn release_of_4k_pages_covers_a_huge_mapping_resolved_meanwhile() {
    let gm = Arc::new(
        GuestMemory::new(GuestMemoryConfig::new(vec![GpaRange::new(0, 8 * MIB)], 2)).unwrap(),
    );
    let checker = BracketChecker::install(&gm);
    gm.notifiers().register(Arc::new(SlowStart));
    let extent = 2 * MIB;
    let stop = Arc::new(AtomicBool::new(false));
    let resolver = {
        let (gm, stop) = (gm.clone(), stop.clone());
        thread::spawn(move || {
            let mut huge = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if gm.resolve(extent + 511 * PAGE, 1).unwrap().order == 9 {
                    huge += 1;
                }
            }
            huge
        })
    };
    let mut splits = 0;
    for round in 0..2000u64 {
        // Empty the extent, so the resolver can map it huge again ...
        gm.release_range(GpaRange::new(extent, 2 * MIB)).unwrap();
        // ... while this release of one 4 KiB page looks at the map.
        let page = extent + (round % 511) * PAGE;
        let rep = gm.release_range(GpaRange::new(page, PAGE)).unwrap();
        splits += rep.split_huge;
        if checker.violations().len() > 4 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let huge = resolver.join().unwrap();
    checker.assert_clean();
    assert!(
        huge > 0 && splits > 0,
        "the race was not exercised: {huge} huge resolves, {splits} splits"
    );
}
