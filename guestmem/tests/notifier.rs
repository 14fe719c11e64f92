//! The notifier list: a subscriber registered while invalidations are open
//! is told about each of them at once (its start runs inside `register`)
//! and gets their ends, so it never misses a start and never sees an end
//! without its start.
#![cfg(not(feature = "loom"))]

use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

mod common;

use common::Gate;
use guestmem::*;

const MIB: u64 = 1 << 20;
/// Longest wait for another thread here: a broken rule fails, never hangs.
const LIMIT: Duration = Duration::from_secs(10);

/// One callback as a subscriber saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Start(GpaRange),
    StartSplit(GpaRange, GpaRange),
    End(GpaRange),
}

#[derive(Default)]
struct Log(Mutex<Vec<Seen>>);

impl Log {
    fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }
}

impl MmuNotifier for Log {
    fn invalidate_range_start(&self, inv: &Invalidation) {
        self.0.lock().unwrap().push(Seen::Start(inv.range));
    }
    fn invalidate_range_start_split(&self, inv: &Invalidation, changed: GpaRange) {
        self.0
            .lock()
            .unwrap()
            .push(Seen::StartSplit(inv.range, changed));
    }
    fn invalidate_range_end(&self, inv: &Invalidation) {
        self.0.lock().unwrap().push(Seen::End(inv.range));
    }
}

#[test]
fn subscriber_registered_during_invalidations_sees_their_starts_and_ends() {
    let list = NotifierList::new();
    let early = Arc::new(Log::default());
    list.register(early.clone());
    let a = GpaRange::new(2 * MIB, 2 * MIB);
    let b = GpaRange::new(6 * MIB, 2 * MIB);
    let b_changed = GpaRange::new(6 * MIB + 0x1000, 0x1000);
    let guard_a = list.invalidate_range_start(a, InvalidateReason::Release);
    let guard_b = list.invalidate_range_start_split(b, b_changed, InvalidateReason::Poison);
    let late = Arc::new(Log::default());
    let checker = Arc::new(BracketChecker::new());
    let id = list.register(late.clone());
    list.register(checker.clone());
    assert_eq!(
        late.seen(),
        [Seen::Start(a), Seen::StartSplit(b, b_changed)],
        "a subscriber registered during two open invalidations must be told about both"
    );
    drop(guard_b);
    drop(guard_a);
    assert_eq!(
        late.seen(),
        [
            Seen::Start(a),
            Seen::StartSplit(b, b_changed),
            Seen::End(b),
            Seen::End(a)
        ],
        "each open invalidation ends once for the late subscriber"
    );
    // Registered after an end: that invalidation is not reported at all.
    let c = GpaRange::new(0, 4096);
    list.invalidate_range_start(c, InvalidateReason::Unmap)
        .end();
    let after = Arc::new(Log::default());
    list.register(after.clone());
    assert!(after.seen().is_empty(), "{:?}", after.seen());
    assert_eq!(late.seen()[4..], [Seen::Start(c), Seen::End(c)]);
    assert_eq!(
        early.seen(),
        [
            Seen::Start(a),
            Seen::StartSplit(b, b_changed),
            Seen::End(b),
            Seen::End(a),
            Seen::Start(c),
            Seen::End(c)
        ]
    );
    checker.assert_clean();
    // No invalidation still holds the late subscriber.
    assert!(list.unregister(id));
}

/// Receive within [`LIMIT`] or fail naming what did not happen.
#[track_caller]
fn recv<T>(rx: &mpsc::Receiver<T>, what: &str) -> T {
    rx.recv_timeout(LIMIT)
        .unwrap_or_else(|e| panic!("{what}: nothing after {LIMIT:?} ({e})"))
}

/// A checker that subscribes while a balloon release is inside its
/// bracket (stopped in another subscriber's start) still finds every
/// change of that release covered by an invalidation it was told about.
#[test]
fn checker_registered_during_a_release_sees_its_changes_covered() {
    let gm = Arc::new(
        GuestMemory::new(GuestMemoryConfig::new(vec![GpaRange::new(0, 4 * MIB)], 1)).unwrap(),
    );
    for gpa in (0..4 * MIB).step_by(4096) {
        gm.resolve(gpa, 0).unwrap();
    }
    let gate = Arc::new(Gate::new());
    gm.notifiers().register(gate.clone());
    let checker = Arc::new(BracketChecker::new());
    assert!(gm.set_primary_observer(checker.clone()));
    let (done_tx, done_rx) = mpsc::channel();
    {
        let gm = gm.clone();
        thread::spawn(move || {
            let _ = done_tx.send(gm.release_range(GpaRange::new(0, 2 * MIB)));
        });
    }
    let (step_tx, step_rx) = mpsc::channel();
    {
        let (gm, gate, checker) = (gm.clone(), gate.clone(), checker.clone());
        thread::spawn(move || {
            gate.entered.wait();
            // The release is inside its bracket now.
            gm.notifiers().register(checker);
            let _ = step_tx.send(());
            gate.leave.wait();
        });
    }
    recv(&step_rx, "registration during the open invalidation");
    let rep = recv(&done_rx, "the release").unwrap();
    assert_eq!(rep.freed_frames, 512);
    checker.assert_clean();
    assert_eq!(checker.starts(), 1, "told about the open invalidation");
    assert!(checker.seen(PrimaryChange::Remove) >= 1);
    assert!(checker.seen(PrimaryChange::Punch) >= 1);
    gm.check().unwrap();
}
