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
