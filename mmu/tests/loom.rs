//! Loom models of the fault/invalidate protocol.
//!
//! `cargo test -p mmu --features loom --release --test loom`
//!
//! The real `ShadowEpt` runs inside the model: its mmu lock and invalidation
//! sequence are loom types (crate `sync` module), the primary map here is a
//! loom mutex, and invalidations go through the real `NotifierList`. The
//! page-table entries are std atomics written under the (loom) mmu lock.
#![cfg(feature = "loom")]

use std::sync::Arc as StdArc;

use guestmem::notifier::{GpaRange, InvalidateReason, NotifierList};
use guestmem::PAGE_SIZE;
use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::{Arc, Mutex};
use mmu::{Backing, FaultSeq, MmuLock, PrimaryMap, ShadowEpt, HUGE_ORDER, HUGE_SIZE};

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(2);
    b.check(f);
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

/// One primary mapping at GPA 0 of `order`, whose host block changes on
/// every migration.
struct Primary {
    host: Mutex<u64>,
    order: u32,
}

impl PrimaryMap for Primary {
    type Error = Never;
    fn resolve(&self, _gpa: u64, _cpu: usize) -> Result<Backing, Never> {
        let host = *self.host.lock().unwrap();
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

/// Fault at `fault_gpa` races a migration of the mapping at 0, invalidated
/// with `inv_range`; after `invalidate_range_end` returns, no leaf may map
/// the old block.
fn fault_vs_migrate(order: u32, fault_gpa: u64, inv_range: GpaRange) {
    model(move || {
        let ept = StdArc::new(ShadowEpt::new().unwrap().with_max_fault_attempts(2));
        let list = StdArc::new(NotifierList::new());
        list.register(ept.clone());
        let primary = Arc::new(Primary {
            host: Mutex::new(OLD),
            order,
        });
        let faulter = {
            let (ept, primary) = (ept.clone(), primary.clone());
            loom::thread::spawn(move || {
                // Retry errors are fine (the VMM re-enters the guest).
                let _ = ept.fault(fault_gpa, false, 0, &*primary);
            })
        };
        let guard = list.invalidate_range_start(inv_range, InvalidateReason::Migrate);
        *primary.host.lock().unwrap() = NEW;
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
                assert_eq!(t.host_addr, NEW);
            }
        }
    });
}

#[test]
fn fault_4k_vs_invalidation() {
    fault_vs_migrate(0, 0, GpaRange::new(0, PAGE_SIZE));
}

#[test]
fn fault_2m_vs_invalidation() {
    fault_vs_migrate(HUGE_ORDER, 0x5000, GpaRange::new(0, HUGE_SIZE));
}

#[test]
fn two_faults_vs_invalidation() {
    model(|| {
        let ept = StdArc::new(ShadowEpt::new().unwrap().with_max_fault_attempts(2));
        let primary = Arc::new(Primary {
            host: Mutex::new(OLD),
            order: 0,
        });
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
        *primary.host.lock().unwrap() = NEW;
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

fn mini(variant: Variant) {
    model(move || {
        let mmu = Arc::new(MmuLock::new(0u64)); // the cached translation (0 = none)
        let primary = Arc::new(AtomicU64::new(OLD));
        let faulter = {
            let (mmu, primary) = (mmu.clone(), primary.clone());
            loom::thread::spawn(move || {
                let range = GpaRange::new(0, PAGE_SIZE);
                for _ in 0..2 {
                    let mut snap = mmu.fault_begin();
                    let host = primary.load(Ordering::Acquire);
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
        primary.store(NEW, Ordering::Release);
        mmu.lock().invalidate_end();
        assert_ne!(
            *mmu.lock(),
            OLD,
            "stale translation after invalidate_range_end"
        );
        faulter.join().unwrap();
    });
}

#[test]
fn mini_subscriber_correct_protocol_holds() {
    mini(Variant::Correct);
}

#[test]
#[should_panic(expected = "stale translation")]
fn mini_subscriber_seq_read_after_resolve_is_caught() {
    mini(Variant::SeqAfterResolve);
}

#[test]
#[should_panic(expected = "stale translation")]
fn mini_subscriber_without_retry_check_is_caught() {
    mini(Variant::NoRetryCheck);
}

/// The primary of the split models: one 2 MiB block at GPA 0 (host
/// `OLD`), until a page change splits it into 4 KiB mappings of the same
/// frames except page `CHANGED`, which gets frame `NEW` (soft offline) or
/// none (poison). The split invalidation only changes that page.
struct SplitPrimary {
    /// `None` while huge; then the new host of the changed page, if any.
    split: Mutex<Option<Option<u64>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("page {0:#x} is poisoned")]
struct Poisoned(u64);

const CHANGED: u64 = 0x3000;
const UNCHANGED: u64 = 0x5000;

impl PrimaryMap for SplitPrimary {
    type Error = Poisoned;
    fn resolve(&self, gpa: u64, _cpu: usize) -> Result<Backing, Poisoned> {
        let page = gpa & !(PAGE_SIZE - 1);
        let (gpa_base, order, host_addr) = match *self.split.lock().unwrap() {
            None => (0, HUGE_ORDER, OLD),
            Some(new) if page == CHANGED => (page, 0, new.ok_or(Poisoned(page))?),
            Some(_) => (page, 0, OLD + page),
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

/// A fault on `fault_gpa` (an unchanged page or the changed one) races
/// the split-aware invalidation of page `CHANGED` inside the 2 MiB block
/// (`invalidate_range_start_split`, as memory failure and soft offline
/// issue it). `installed`: the 2 MiB leaf is mapped before the race.
/// After `invalidate_range_end`: no leaf maps the changed page's old frame,
/// the other pages map their original frames or nothing, and no 2 MiB leaf
/// is left; the same once the fault is done.
fn fault_vs_split_invalidation(faults: &'static [u64], installed: bool, new: Option<u64>) {
    model(move || {
        let ept = StdArc::new(ShadowEpt::new().unwrap().with_max_fault_attempts(2));
        let list = StdArc::new(NotifierList::new());
        list.register(ept.clone());
        let primary = Arc::new(SplitPrimary {
            split: Mutex::new(None),
        });
        if installed {
            let t = ept.fault(UNCHANGED, false, 0, &*primary).unwrap();
            assert_eq!((t.order, t.host_addr), (HUGE_ORDER, OLD));
        }
        let faulters: Vec<_> = faults
            .iter()
            .map(|&gpa| {
                let (ept, primary) = (ept.clone(), primary.clone());
                loom::thread::spawn(move || (gpa, ept.fault(gpa, false, 0, &*primary)))
            })
            .collect();
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
        *primary.split.lock().unwrap() = Some(new);
        guard.end();
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
    fault_vs_split_invalidation(&[UNCHANGED], false, Some(NEW));
}

#[test]
fn fault_changed_page_vs_split_poison() {
    fault_vs_split_invalidation(&[CHANGED], false, None);
}

#[test]
fn fault_changed_page_vs_split_of_installed_leaf() {
    fault_vs_split_invalidation(&[CHANGED], true, Some(NEW));
}

#[test]
fn fault_unchanged_page_vs_split_poison_of_installed_leaf() {
    fault_vs_split_invalidation(&[UNCHANGED + 0x1000], true, None);
}

/// Both at once: one fault may install the 2 MiB leaf the invalidation
/// then splits while the other faults the changed page.
#[test]
fn faults_on_changed_and_unchanged_pages_vs_split_invalidation() {
    fault_vs_split_invalidation(&[UNCHANGED, CHANGED], false, Some(NEW));
}
