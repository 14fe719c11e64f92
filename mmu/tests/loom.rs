//! Loom models of the fault/invalidate protocol.
//!
//! `cargo test -p mmu --features loom --release --test loom`
//! (`-- --nocapture --test-threads 1` prints each model's interleavings).
//!
//! The real `ShadowEpt` runs inside the models, and loom sees every access
//! the models reason about:
//! - the mmu lock, the invalidation sequence and the page-table entries are
//!   loom types (crate `sync` module), so lock-free walks race installs,
//!   splits and zaps under loom's memory model;
//! - the model primaries keep their translation in a loom atomic, read and
//!   written `Relaxed`: the protocol must not lean on the primary's own
//!   synchronization (a primary behind a mutex hid a fault path that read
//!   the sequence after resolving: the mutex's ordering made up for it);
//! - invalidations go through the real `NotifierList` (its std lock only
//!   guards the subscriber list, fixed before the threads start).
//!
//! Every model must explore more than one interleaving (asserted); the
//! preemption bound is `LOOM_MAX_PREEMPTIONS`, 2 when unset.
#![cfg(feature = "loom")]

use std::sync::atomic::{AtomicUsize, Ordering as StdOrdering};
use std::sync::Arc as StdArc;
use std::time::Instant;

use guestmem::notifier::{GpaRange, InvalidateReason, NotifierList};
use guestmem::PAGE_SIZE;
use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::Arc;
use mmu::{Backing, FaultSeq, MmuLock, PrimaryMap, ShadowEpt, HUGE_ORDER, HUGE_SIZE};

/// Preemption bound when `LOOM_MAX_PREEMPTIONS` is not set.
const DEFAULT_PREEMPTIONS: usize = 2;

/// Prints a model's name, explored interleavings and time, also when the
/// model fails (a negative model reports after how many it was caught).
struct Report {
    name: &'static str,
    runs: StdArc<AtomicUsize>,
    bound: Option<usize>,
    start: Instant,
}

impl Drop for Report {
    fn drop(&mut self) {
        println!(
            "loom model {}: {} interleavings, {:.2?}, preemption bound {:?}{}",
            self.name,
            self.runs.load(StdOrdering::Relaxed),
            self.start.elapsed(),
            self.bound,
            if std::thread::panicking() {
                " (failed)"
            } else {
                ""
            }
        );
    }
}

/// Run `f` under loom; returns the number of interleavings explored, which
/// must be more than one (a model that explores a single interleaving
/// checks nothing about concurrency).
fn model(name: &'static str, f: impl Fn() + Sync + Send + 'static) -> usize {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(DEFAULT_PREEMPTIONS);
    }
    // A split writes 512 entries and every atomic access is a branch.
    b.max_branches = b.max_branches.max(20_000);
    let report = Report {
        name,
        runs: StdArc::new(AtomicUsize::new(0)),
        bound: b.preemption_bound,
        start: Instant::now(),
    };
    let runs = report.runs.clone();
    b.check(move || {
        runs.fetch_add(1, StdOrdering::Relaxed);
        f();
    });
    let n = report.runs.load(StdOrdering::Relaxed);
    drop(report);
    assert!(n > 1, "loom model {name} explored {n} interleaving(s)");
    n
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

/// One primary mapping at GPA 0 of `order`, whose host block changes on
/// every migration. Loom sees the translation (a `Relaxed` atomic).
struct Primary {
    host: AtomicU64,
    order: u32,
}

impl Primary {
    fn new(order: u32) -> Self {
        Self {
            host: AtomicU64::new(OLD),
            order,
        }
    }
}

impl PrimaryMap for Primary {
    type Error = Never;
    fn resolve(&self, _gpa: u64, _cpu: usize) -> Result<Backing, Never> {
        let host = self.host.load(Ordering::Relaxed);
        Ok(Backing {
            gpa_base: 0,
            order: self.order,
            host_addr: host,
            frame: host >> 12,
            writable: true,
        })
    }
}

const OLD: u64 = 0x4000_0000;
const NEW: u64 = 0x8000_0000;

/// A fault at `fault_gpa` races a migration of the mapping at 0: the
/// invalidator runs `invalidate_range_start(inv_range)` (the sequence /
/// in-progress update and the zap), changes the primary's translation, then
/// `invalidate_range_end`. After end returns no leaf may map the old block.
/// A fault path that reads the sequence after resolving can resolve `OLD`,
/// let the whole invalidation run, snapshot the bumped sequence and install
/// `OLD`: this model catches it.
fn fault_vs_migrate(name: &'static str, order: u32, fault_gpa: u64, inv_range: GpaRange) {
    model(name, move || {
        let ept = StdArc::new(ShadowEpt::new().unwrap().with_max_fault_attempts(2));
        let list = StdArc::new(NotifierList::new());
        list.register(ept.clone());
        let primary = Arc::new(Primary::new(order));
        let faulter = {
            let (ept, primary) = (ept.clone(), primary.clone());
            loom::thread::spawn(move || {
                // Retry errors are fine (the VMM re-enters the guest).
                let _ = ept.fault(fault_gpa, false, 0, &*primary);
            })
        };
        let guard = list.invalidate_range_start(inv_range, InvalidateReason::Migrate);
        primary.host.store(NEW, Ordering::Relaxed);
        guard.end();
        // The old block may now be freed: nothing may still map it.
        for gpa in [0, fault_gpa] {
            if let Some((t, _)) = ept.peek(gpa) {
                assert_ne!(
                    t.host_addr, OLD,
                    "stale translation after invalidate_range_end"
                );
            }
        }
        faulter.join().unwrap();
        for gpa in [0, fault_gpa] {
            if let Some((t, _)) = ept.peek(gpa) {
                assert_eq!(
                    t.host_addr, NEW,
                    "stale translation installed after invalidate_range_end"
                );
            }
        }
    });
}

#[test]
fn fault_4k_vs_invalidation() {
    fault_vs_migrate(
        "fault_4k_vs_invalidation",
        0,
        0,
        GpaRange::new(0, PAGE_SIZE),
    );
}

#[test]
fn fault_2m_vs_invalidation() {
    fault_vs_migrate(
        "fault_2m_vs_invalidation",
        HUGE_ORDER,
        0x5000,
        GpaRange::new(0, HUGE_SIZE),
    );
}

#[test]
fn two_faults_vs_invalidation() {
    model("two_faults_vs_invalidation", || {
        let ept = StdArc::new(ShadowEpt::new().unwrap().with_max_fault_attempts(2));
        let primary = Arc::new(Primary::new(0));
        let list = StdArc::new(NotifierList::new());
        list.register(ept.clone());
        let threads: Vec<_> = (0..2)
            .map(|cpu| {
                let (ept, primary) = (ept.clone(), primary.clone());
                loom::thread::spawn(move || {
                    let _ = ept.fault(0, cpu == 1, cpu, &*primary);
                })
            })
            .collect();
        let guard =
            list.invalidate_range_start(GpaRange::new(0, PAGE_SIZE), InvalidateReason::Unmap);
        primary.host.store(NEW, Ordering::Relaxed);
        guard.end();
        if let Some((t, _)) = ept.peek(0) {
            assert_eq!(
                t.host_addr, NEW,
                "stale translation after invalidate_range_end"
            );
        }
        for t in threads {
            t.join().unwrap();
        }
        if let Some((t, _)) = ept.peek(0) {
            assert_eq!(t.host_addr, NEW, "stale translation after the faults");
        }
    });
}

/// A minimal subscriber built on the public `MmuLock`, with the fault
/// protocol done right or wrong. The wrong variants must fail the model:
/// this proves the model can catch a broken protocol.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Correct,
    SeqAfterResolve,
    NoRetryCheck,
}

fn mini(name: &'static str, variant: Variant) {
    model(name, move || {
        let mmu = Arc::new(MmuLock::new(0u64)); // the cached translation (0 = none)
        let primary = Arc::new(AtomicU64::new(OLD));
        let faulter = {
            let (mmu, primary) = (mmu.clone(), primary.clone());
            loom::thread::spawn(move || {
                let range = GpaRange::new(0, PAGE_SIZE);
                for _ in 0..2 {
                    let mut snap = mmu.fault_begin();
                    let host = primary.load(Ordering::Relaxed);
                    if variant == Variant::SeqAfterResolve {
                        snap = FaultSeq(mmu.seq());
                    }
                    let mut g = mmu.lock();
                    if variant != Variant::NoRetryCheck && g.retry_needed(snap, range) {
                        continue;
                    }
                    *g = host;
                    return;
                }
            })
        };
        let range = GpaRange::new(0, PAGE_SIZE);
        {
            let mut g = mmu.lock();
            g.invalidate_begin(range);
            *g = 0;
        }
        primary.store(NEW, Ordering::Relaxed);
        mmu.lock().invalidate_end();
        assert_ne!(
            *mmu.lock(),
            OLD,
            "stale translation after invalidate_range_end"
        );
        faulter.join().unwrap();
        assert_ne!(*mmu.lock(), OLD, "stale translation after the fault");
    });
}

#[test]
fn mini_subscriber_correct_protocol_holds() {
    mini("mini_subscriber_correct_protocol_holds", Variant::Correct);
}

#[test]
#[should_panic(expected = "stale translation")]
fn mini_subscriber_seq_read_after_resolve_is_caught() {
    mini(
        "mini_subscriber_seq_read_after_resolve_is_caught",
        Variant::SeqAfterResolve,
    );
}

#[test]
#[should_panic(expected = "stale translation")]
fn mini_subscriber_without_retry_check_is_caught() {
    mini(
        "mini_subscriber_without_retry_check_is_caught",
        Variant::NoRetryCheck,
    );
}

/// The primary of the split models: one 2 MiB block at GPA 0 (host
/// `OLD`), until a page change splits it into 4 KiB mappings of the same
/// frames except page `CHANGED`, which gets frame `NEW` (soft offline) or
/// none (poison). The split invalidation only changes that page. The state
/// is one loom atomic: `HUGE`, `SPLIT_POISONED`, or the changed page's new
/// host address.
struct SplitPrimary {
    state: AtomicU64,
}

const HUGE: u64 = 0;
const SPLIT_POISONED: u64 = 1;

#[derive(Debug, thiserror::Error)]
#[error("page {0:#x} is poisoned")]
struct Poisoned(u64);

const CHANGED: u64 = 0x3000;
const UNCHANGED: u64 = 0x5000;

impl PrimaryMap for SplitPrimary {
    type Error = Poisoned;
    fn resolve(&self, gpa: u64, _cpu: usize) -> Result<Backing, Poisoned> {
        let page = gpa & !(PAGE_SIZE - 1);
        let (gpa_base, order, host_addr) = match self.state.load(Ordering::Relaxed) {
            HUGE => (0, HUGE_ORDER, OLD),
            SPLIT_POISONED if page == CHANGED => return Err(Poisoned(page)),
            new if page == CHANGED => (page, 0, new),
            _ => (page, 0, OLD + page),
        };
        Ok(Backing {
            gpa_base,
            order,
            host_addr,
            frame: host_addr >> 12,
            writable: true,
        })
    }
}

/// After the invalidation ended, every leaf in the 2 MiB block maps each of
/// its pages where the primary maps it: the changed page to `new` (never
/// to its old frame `OLD + CHANGED`), every other page to its original
/// frame; a page may also be absent.
fn assert_split_leaves(ept: &ShadowEpt, new: Option<u64>) {
    for t in ept.mappings(GpaRange::new(0, HUGE_SIZE)) {
        let mut g = t.gpa_base;
        while g < t.gpa_base + t.len() {
            let host = t.host_addr_of(g);
            if g == CHANGED {
                assert!(
                    Some(host) == new,
                    "changed page maps {host:#x} after invalidate_range_end ({t:x?})"
                );
            } else {
                assert_eq!(host, OLD + g, "unchanged page {g:#x} remapped ({t:x?})");
            }
            g += PAGE_SIZE;
        }
    }
}

/// Set up the split models: the EPT on a notifier list, the primary still
/// huge, and (when `installed`) the 2 MiB leaf mapped before the race.
fn split_setup(installed: bool) -> (StdArc<ShadowEpt>, StdArc<NotifierList>, Arc<SplitPrimary>) {
    let ept = StdArc::new(ShadowEpt::new().unwrap().with_max_fault_attempts(2));
    let list = StdArc::new(NotifierList::new());
    list.register(ept.clone());
    let primary = Arc::new(SplitPrimary {
        state: AtomicU64::new(HUGE),
    });
    if installed {
        let t = ept.fault(UNCHANGED, false, 0, &*primary).unwrap();
        assert_eq!((t.order, t.host_addr), (HUGE_ORDER, OLD));
    }
    (ept, list, primary)
}

/// The split-aware invalidation of page `CHANGED` inside the 2 MiB block
/// (`invalidate_range_start_split`, as memory failure and soft offline
/// issue it): start, change the primary, end.
fn split_invalidation(list: &NotifierList, primary: &SplitPrimary, new: Option<u64>) {
    let reason = if new.is_some() {
        InvalidateReason::Migrate
    } else {
        InvalidateReason::Poison
    };
    let guard = list.invalidate_range_start_split(
        GpaRange::new(0, HUGE_SIZE),
        GpaRange::new(CHANGED, PAGE_SIZE),
        reason,
    );
    primary
        .state
        .store(new.unwrap_or(SPLIT_POISONED), Ordering::Relaxed);
    guard.end();
}

/// Faults on `faults` (unchanged pages or the changed one) race the split
/// invalidation. After `invalidate_range_end`: no leaf maps the changed
/// page's old frame, the other pages map their original frames or nothing,
/// and no 2 MiB leaf is left; the same once the faults are done.
fn fault_vs_split_invalidation(
    name: &'static str,
    faults: &'static [u64],
    installed: bool,
    new: Option<u64>,
) {
    model(name, move || {
        let (ept, list, primary) = split_setup(installed);
        let faulters: Vec<_> = faults
            .iter()
            .map(|&gpa| {
                let (ept, primary) = (ept.clone(), primary.clone());
                loom::thread::spawn(move || (gpa, ept.fault(gpa, false, 0, &*primary)))
            })
            .collect();
        split_invalidation(&list, &primary, new);
        // The old frame of the changed page may now be freed or retired.
        assert_split_leaves(&ept, new);
        let results: Vec<_> = faulters.into_iter().map(|f| f.join().unwrap()).collect();
        assert_split_leaves(&ept, new);
        assert!(
            ept.mappings(GpaRange::new(0, HUGE_SIZE))
                .iter()
                .all(|t| t.order == 0),
            "2 MiB leaf over a changed page"
        );
        // What the fault returned was valid at some point: the huge block
        // before the change, the new 4 KiB mappings after.
        for (fault_gpa, r) in results {
            match r {
                Ok(t) => {
                    let host = t.host_addr_of(fault_gpa & !(PAGE_SIZE - 1));
                    let now = if fault_gpa == CHANGED {
                        new
                    } else {
                        Some(OLD + fault_gpa)
                    };
                    assert!(
                        host == OLD + (fault_gpa & !(PAGE_SIZE - 1)) || Some(host) == now,
                        "fault returned {t:x?}"
                    );
                }
                Err(mmu::FaultError::Retry { .. }) => {}
                Err(mmu::FaultError::Primary { .. }) => {
                    assert!(fault_gpa == CHANGED && new.is_none())
                }
                Err(e) => panic!("{e}"),
            }
        }
        if let Some((t, _)) = ept.peek(UNCHANGED) {
            assert_eq!(t.host_addr_of(UNCHANGED), OLD + UNCHANGED);
        }
    });
}

#[test]
fn fault_unchanged_page_vs_split_invalidation() {
    fault_vs_split_invalidation(
        "fault_unchanged_page_vs_split_invalidation",
        &[UNCHANGED],
        false,
        Some(NEW),
    );
}

#[test]
fn fault_changed_page_vs_split_poison() {
    fault_vs_split_invalidation(
        "fault_changed_page_vs_split_poison",
        &[CHANGED],
        false,
        None,
    );
}

#[test]
fn fault_changed_page_vs_split_of_installed_leaf() {
    fault_vs_split_invalidation(
        "fault_changed_page_vs_split_of_installed_leaf",
        &[CHANGED],
        true,
        Some(NEW),
    );
}

#[test]
fn fault_unchanged_page_vs_split_poison_of_installed_leaf() {
    fault_vs_split_invalidation(
        "fault_unchanged_page_vs_split_poison_of_installed_leaf",
        &[UNCHANGED + 0x1000],
        true,
        None,
    );
}

/// Both at once: one fault may install the 2 MiB leaf the invalidation
/// then splits while the other faults the changed page.
#[test]
fn faults_on_changed_and_unchanged_pages_vs_split_invalidation() {
    fault_vs_split_invalidation(
        "faults_on_changed_and_unchanged_pages_vs_split_invalidation",
        &[UNCHANGED, CHANGED],
        false,
        Some(NEW),
    );
}

/// The lock-free walk racing the split of the 2 MiB leaf it is reading: an
/// unchanged page keeps its frame through the split, so every walk finds it
/// (through the 2 MiB leaf or its 4 KiB child), never a hole. The children
/// must be written before the PT is linked, with a `Release` link.
#[test]
fn translate_vs_split_of_installed_leaf() {
    model("translate_vs_split_of_installed_leaf", || {
        let (ept, list, primary) = split_setup(true);
        let reader = {
            let ept = ept.clone();
            loom::thread::spawn(move || {
                for gpa in [UNCHANGED, CHANGED] {
                    let t = ept.translate(gpa, false);
                    if gpa == UNCHANGED {
                        let t = t.expect("unchanged page missing during a split");
                        assert_eq!(t.host_addr_of(gpa), OLD + gpa, "{t:x?}");
                    } else if let Some(t) = t {
                        // Before the zap: the old frame is still valid.
                        assert_eq!(t.host_addr_of(gpa), OLD + gpa, "{t:x?}");
                    }
                }
            })
        };
        split_invalidation(&list, &primary, Some(NEW));
        assert_split_leaves(&ept, Some(NEW));
        reader.join().unwrap();
        let t = ept
            .translate(UNCHANGED, false)
            .expect("unchanged page lost");
        assert_eq!((t.order, t.host_addr), (0, OLD + UNCHANGED));
        assert_eq!(ept.translate(CHANGED, false), None);
    });
}
