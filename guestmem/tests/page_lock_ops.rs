//! Every operation that changes a frame's mapping or state takes the
//! frame's page lock: with the lock held elsewhere, each one waits (and
//! finishes once it is released); zero-page reclaim, like Linux's reclaim,
//! skips a locked frame instead. Waits are bounded: a broken rule fails,
//! never hangs.
#![cfg(not(feature = "loom"))]

use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use guestmem::*;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Longest wait for the operation after the unlock.
const LIMIT: Duration = Duration::from_secs(10);
/// How long the operation must stay blocked while the lock is held.
const BLOCKED: Duration = Duration::from_millis(200);

fn mem(ram: u64) -> Arc<GuestMemory> {
    Arc::new(GuestMemory::new(GuestMemoryConfig::new(vec![GpaRange::new(0, ram)], 1)).unwrap())
}

/// Run `op` on another thread while `frame`'s page lock is held here: it
/// must not finish within [`BLOCKED`], and must finish within [`LIMIT`]
/// after the unlock. Returns its result.
fn waits_for_lock<T: Send + 'static>(
    what: &str,
    gm: &Arc<GuestMemory>,
    frame: FrameId,
    op: impl FnOnce(&GuestMemory) -> T + Send + 'static,
) -> T {
    gm.lock_frame(frame);
    let (tx, rx) = mpsc::channel();
    let t = {
        let gm = gm.clone();
        thread::spawn(move || {
            let _ = tx.send(op(&gm));
        })
    };
    let early = rx.recv_timeout(BLOCKED);
    gm.unlock_frame(frame);
    assert!(
        early.is_err(),
        "{what} finished while frame {frame}'s page lock was held"
    );
    let out = rx
        .recv_timeout(LIMIT)
        .unwrap_or_else(|_| panic!("{what} did not finish after the unlock"));
    t.join().unwrap();
    out
}

#[test]
fn release_waits_for_the_page_lock() {
    let gm = mem(4 * MIB);
    let m = gm.resolve(0, 0).unwrap();
    assert_eq!(m.order, 9);
    let rep = waits_for_lock(
        "release_range (4 KiB of a huge mapping)",
        &gm,
        m.frame,
        |gm| gm.release_range(GpaRange::new(PAGE, PAGE)).unwrap(),
    );
    assert_eq!((rep.freed_frames, rep.split_huge), (1, 1));
    let m = gm.resolve(2 * MIB, 0).unwrap();
    let rep = waits_for_lock("release_range (whole mapping)", &gm, m.frame, |gm| {
        gm.release_range(GpaRange::new(2 * MIB, 2 * MIB)).unwrap()
    });
    assert_eq!(rep.freed_frames, 512);
    gm.check().unwrap();
}

#[test]
fn reset_waits_for_the_page_lock() {
    let gm = mem(4 * MIB);
    gm.resolve(0, 0).unwrap();
    let m = gm.resolve(2 * MIB, 0).unwrap();
    waits_for_lock("reset", &gm, m.frame, |gm| gm.reset());
    assert_eq!(gm.lookup(2 * MIB), None);
    gm.check().unwrap();
}

#[test]
fn memory_failure_and_soft_offline_wait_for_the_page_lock() {
    let gm = mem(4 * MIB);
    let m = gm.resolve(0, 0).unwrap();
    let out = waits_for_lock("memory_failure", &gm, m.frame, move |gm| {
        gm.memory_failure(m.frame + 3, MfFlags::default())
    });
    assert!(matches!(out, Ok(MfOutcome::Mapped { .. })), "{out:?}");
    let f = gm.resolve(0, 0).unwrap().frame;
    let out = waits_for_lock("soft_offline", &gm, f, move |gm| gm.soft_offline(f));
    assert!(
        matches!(out, Ok(SoftOfflineOutcome::Migrated { .. })),
        "{out:?}"
    );
    gm.check().unwrap();
}

#[test]
fn population_waits_for_the_page_lock_of_its_new_frame() {
    // Two pages of RAM, one vCPU: after the first is mapped, the only free
    // frame is the one the second population must take.
    let gm = mem(2 * PAGE);
    let first = gm.resolve(0, 0).unwrap().frame;
    let spare = gm.alloc(0, 0).unwrap();
    gm.free(0, spare, 0).unwrap();
    assert_ne!(spare, first);
    let m = waits_for_lock("resolve", &gm, spare, |gm| gm.resolve(PAGE, 0).unwrap());
    assert_eq!(m.frame, spare);
    gm.check().unwrap();
}

#[test]
fn zero_page_reclaim_skips_a_locked_frame() {
    let gm = mem(4 * MIB);
    let m = gm.resolve(0, 0).unwrap();
    gm.lock_frame(m.frame);
    let rep = gm.reclaim_zero_pages(512);
    gm.unlock_frame(m.frame);
    assert_eq!(
        (rep.candidates, rep.freed_frames),
        (1, 0),
        "zero-page reclaim took a locked frame: {rep:?}"
    );
    assert_eq!(gm.lookup(0), Some(m));
    let rep = gm.reclaim_zero_pages(512);
    assert_eq!(rep.freed_frames, 512, "{rep:?}");
    gm.check().unwrap();
}
