//! Proptest: random fault / translate / invalidate / split sequences
//! against a flat model of what the shadow EPT must hold.
#![cfg(not(feature = "loom"))]

mod common;

use std::collections::BTreeMap;

use common::{assert_consistent, FlatPrimary};
use guestmem::notifier::{GpaRange, InvalidateReason};
use guestmem::PAGE_SIZE;
use mmu::{ShadowEpt, HUGE_ORDER, HUGE_SIZE};
use proptest::prelude::*;

/// 8 MiB of RAM: 4 slots of 2 MiB, plus addresses past the end.
const LIMIT: u64 = 4 * HUGE_SIZE;
const PAGES: u64 = LIMIT / PAGE_SIZE + 16;

#[derive(Clone, Debug)]
enum Op {
    Fault { page: u64, write: bool },
    Translate { page: u64, write: bool },
    Unmap { page: u64, pages: u64 },
    Migrate { page: u64 },
    SplitPrimary { slot: u64 },
    // Poison / soft offline / partial release of `pages` pages (fresh
    // frames when `mig`, else none) through a split-aware invalidation.
    ChangePages { page: u64, pages: u64, mig: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PAGES, any::<bool>()).prop_map(|(page, write)| Op::Fault { page, write }),
        2 => (0..PAGES, any::<bool>()).prop_map(|(page, write)| Op::Translate { page, write }),
        1 => (0..PAGES, 1..700u64).prop_map(|(page, pages)| Op::Unmap { page, pages }),
        1 => (0..PAGES).prop_map(|page| Op::Migrate { page }),
        1 => (0..4u64).prop_map(|slot| Op::SplitPrimary { slot }),
        2 => (0..PAGES, prop_oneof![3 => Just(1u64), 1 => 1..700u64], any::<bool>())
            .prop_map(|(page, pages, mig)| Op::ChangePages { page, pages, mig }),
    ]
}

/// The model: leaves the EPT must hold, base -> (order, host). The flat
/// primary maps everything writable, so every leaf is writable.
type Model = BTreeMap<u64, (u32, u64)>;

fn model_find(m: &Model, gpa: u64) -> Option<(u64, u32, u64)> {
    let (&b, &(o, h)) = m.range(..=gpa).next_back()?;
    (gpa < b + (PAGE_SIZE << o)).then_some((b, o, h))
}

fn model_zap(m: &mut Model, r: GpaRange) {
    m.retain(|&b, &mut (o, _)| !GpaRange::new(b, PAGE_SIZE << o).overlaps(&r));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn ept_matches_flat_model(huge in proptest::collection::vec(any::<bool>(), 4),
                              ops in proptest::collection::vec(op(), 1..60)) {
        let ept = std::sync::Arc::new(ShadowEpt::new().unwrap());
        let p = FlatPrimary::new(LIMIT, |i| huge[i as usize]);
        p.list.register(ept.clone());
        let mut m = Model::new();
        for op in ops {
            match op {
                Op::Fault { page, write } => {
                    let gpa = page * PAGE_SIZE;
                    let r = ept.fault(gpa, write, 0, &p);
                    if gpa >= LIMIT {
                        prop_assert!(r.is_err());
                        continue;
                    }
                    let t = r.unwrap();
                    prop_assert!(t.writable);
                    match model_find(&m, gpa) {
                        Some((b, o, h)) => {
                            // Already mapped: the fast path returns it.
                            prop_assert_eq!((t.gpa_base, t.order, t.host_addr), (b, o, h));
                        }
                        _ => {
                            let (pb, po, ph) = p.mapping(gpa).unwrap();
                            if po == HUGE_ORDER {
                                prop_assert_eq!((t.gpa_base, t.order, t.host_addr), (pb, po, ph));
                                model_zap(&mut m, GpaRange::new(pb, HUGE_SIZE));
                            } else {
                                prop_assert_eq!((t.gpa_base, t.order), (gpa, 0));
                                prop_assert_eq!(t.host_addr, ph);
                            }
                            m.insert(t.gpa_base, (t.order, t.host_addr));
                        }
                    }
                }
                Op::Translate { page, write } => {
                    let gpa = page * PAGE_SIZE;
                    let got = ept.translate(gpa, write).map(|t| (t.gpa_base, t.order, t.host_addr));
                    let want = model_find(&m, gpa);
                    prop_assert_eq!(got, want);
                }
                Op::Unmap { page, pages } => {
                    let r = GpaRange::new(page * PAGE_SIZE, pages * PAGE_SIZE);
                    let mut wide = r;
                    for (b, o, _) in p.unmap(r, InvalidateReason::Release) {
                        wide.start = wide.start.min(b);
                        wide.end = wide.end.max(b + (PAGE_SIZE << o));
                    }
                    model_zap(&mut m, wide);
                }
                Op::Migrate { page } => {
                    if let Some((b, o, _)) = p.migrate(page * PAGE_SIZE) {
                        model_zap(&mut m, GpaRange::new(b, PAGE_SIZE << o));
                    }
                }
                Op::SplitPrimary { slot } => {
                    p.split(slot * HUGE_SIZE);
                    model_zap(&mut m, GpaRange::new(slot * HUGE_SIZE, HUGE_SIZE));
                }
                Op::ChangePages { page, pages, mig } => {
                    let changed = GpaRange::new(page * PAGE_SIZE, pages * PAGE_SIZE);
                    let before = ept.stats().splits;
                    let (cover, old) = p.change_range(changed, mig);
                    // The EPT splits its 2 MiB leaves in the invalidated
                    // range (children keep frame, permissions) and zaps only
                    // the changed pages.
                    let huge: Vec<_> = m
                        .iter()
                        .filter(|&(&b, v)| v.0 == HUGE_ORDER
                            && GpaRange::new(b, HUGE_SIZE).overlaps(&cover))
                        .map(|(&b, v)| (b, v.1))
                        .collect();
                    prop_assert_eq!(ept.stats().splits - before, huge.len() as u64);
                    for (b, h) in huge {
                        m.remove(&b);
                        for i in 0..512 {
                            m.insert(b + i * PAGE_SIZE, (0, h + i * PAGE_SIZE));
                        }
                    }
                    model_zap(&mut m, changed);
                    // No leaf left to an old frame of a changed page.
                    for (g, _, host) in old {
                        if let Some((t, _)) = ept.peek(g) {
                            prop_assert_ne!(t.host_addr_of(g), host);
                        }
                    }
                }
            }
            let all = ept.mappings(GpaRange::new(0, 1 << 48));
            prop_assert!(all.iter().all(|t| t.writable));
            let got: Model = all
                .into_iter()
                .map(|t| (t.gpa_base, (t.order, t.host_addr)))
                .collect();
            prop_assert_eq!(&got, &m);
            assert_consistent(&ept, &p);
        }
    }
}
