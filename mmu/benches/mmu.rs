//! ShadowEpt vs a `RwLock<BTreeMap>` map, same run.
//!
//! `CARGO_TARGET_DIR=/work/targets/mmu cargo bench -p mmu --bench mmu`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use guestmem::notifier::{GpaRange, InvalidateReason, Invalidation, MmuNotifier};
use guestmem::PAGE_SIZE;
use mmu::{Backing, PrimaryMap, ShadowEpt, HUGE_ORDER, HUGE_SIZE};

const HOST: u64 = 0x7000_0000_0000;
const MIB: u64 = 1 << 20;

/// A primary map that costs nothing: gpa -> HOST + gpa, 4 KiB or 2 MiB.
struct Linear {
    order: u32,
}

impl PrimaryMap for Linear {
    type Error = std::convert::Infallible;
    fn resolve(&self, gpa: u64, _cpu: usize) -> Result<Backing, Self::Error> {
        let base = gpa & !((PAGE_SIZE << self.order) - 1);
        Ok(Backing {
            gpa_base: base,
            order: self.order,
            host_addr: HOST + base,
            frame: base / PAGE_SIZE,
            writable: true,
        })
    }
}

/// The baseline secondary map: base -> (order, host) under a RwLock.
#[derive(Default)]
struct BTreeMmu {
    map: RwLock<BTreeMap<u64, (u32, u64)>>,
}

impl BTreeMmu {
    fn fault(&self, gpa: u64, primary: &Linear) -> (u64, u32, u64) {
        let b = primary.resolve(gpa, 0).unwrap();
        self.map
            .write()
            .unwrap()
            .insert(b.gpa_base, (b.order, b.host_addr));
        (b.gpa_base, b.order, b.host_addr)
    }

    fn lookup(&self, gpa: u64) -> Option<u64> {
        let map = self.map.read().unwrap();
        let (&b, &(o, h)) = map.range(..=gpa).next_back()?;
        (gpa < b + (PAGE_SIZE << o)).then_some(h + gpa - b)
    }

    fn zap(&self, r: GpaRange) {
        let mut map = self.map.write().unwrap();
        let mut tail = map.split_off(&r.start);
        let mut rest = tail.split_off(&r.end);
        map.append(&mut rest);
        drop(tail);
    }
}

fn zap(ept: &ShadowEpt, r: GpaRange) {
    let inv = Invalidation {
        range: r,
        reason: InvalidateReason::Unmap,
    };
    ept.invalidate_range_start(&inv);
    ept.invalidate_range_end(&inv);
}

fn populated_ept(len: u64, order: u32) -> ShadowEpt {
    let ept = ShadowEpt::new().unwrap();
    let p = Linear { order };
    for gpa in (0..len).step_by((PAGE_SIZE << order) as usize) {
        ept.fault(gpa, false, 0, &p).unwrap();
    }
    ept
}

fn populated_btree(len: u64, order: u32) -> BTreeMmu {
    let m = BTreeMmu::default();
    let p = Linear { order };
    for gpa in (0..len).step_by((PAGE_SIZE << order) as usize) {
        m.fault(gpa, &p);
    }
    m
}

fn fault_install(c: &mut Criterion) {
    for (name, order, n) in [("4k", 0, 4096u64), ("2m", HUGE_ORDER, 512)] {
        let mut g = c.benchmark_group(format!("fault_install_{name}"));
        g.throughput(Throughput::Elements(n));
        let p = Linear { order };
        let step = PAGE_SIZE << order;
        g.bench_function("shadow_ept", |b| {
            b.iter_batched(
                || ShadowEpt::new().unwrap(),
                |ept| {
                    for i in 0..n {
                        black_box(ept.fault(i * step, true, 0, &p).unwrap());
                    }
                    ept
                },
                BatchSize::LargeInput,
            )
        });
        g.bench_function("btreemap_baseline", |b| {
            b.iter_batched(
                BTreeMmu::default,
                |m| {
                    for i in 0..n {
                        black_box(m.fault(i * step, &p));
                    }
                    m
                },
                BatchSize::LargeInput,
            )
        });
        g.finish();
    }
}

fn lookup(c: &mut Criterion) {
    let len = 64 * MIB;
    let ept = populated_ept(len, 0);
    let bt = populated_btree(len, 0);
    let addrs: Vec<u64> = {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        (0..4096)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s % len
            })
            .collect()
    };
    let mut g = c.benchmark_group("lookup_4k_random_64m");
    g.throughput(Throughput::Elements(addrs.len() as u64));
    g.bench_function("shadow_ept", |b| {
        b.iter(|| {
            for &a in &addrs {
                black_box(ept.translate(a, false));
            }
        })
    });
    g.bench_function("btreemap_baseline", |b| {
        b.iter(|| {
            for &a in &addrs {
                black_box(bt.lookup(a));
            }
        })
    });
    g.finish();
}

fn zaps(c: &mut Criterion) {
    for (name, len, order) in [
        ("2m_of_4k_leaves", 2 * MIB, 0),
        ("64m_of_4k_leaves", 64 * MIB, 0),
        ("2m_of_2m_leaves", 2 * MIB, HUGE_ORDER),
        ("64m_of_2m_leaves", 64 * MIB, HUGE_ORDER),
        ("1g_of_2m_leaves", 1024 * MIB, HUGE_ORDER),
    ] {
        let mut g = c.benchmark_group(format!("zap_{name}"));
        let r = GpaRange::new(0, len);
        g.bench_function("shadow_ept", |b| {
            b.iter_batched(
                || populated_ept(len, order),
                |ept| {
                    zap(&ept, r);
                    ept
                },
                BatchSize::LargeInput,
            )
        });
        g.bench_function("btreemap_baseline", |b| {
            b.iter_batched(
                || populated_btree(len, order),
                |m| {
                    m.zap(r);
                    m
                },
                BatchSize::LargeInput,
            )
        });
        g.finish();
    }
    // Sanity: the zap really removed the leaves.
    let ept = populated_ept(HUGE_SIZE * 4, HUGE_ORDER);
    zap(&ept, GpaRange::new(0, HUGE_SIZE * 4));
    assert!(ept.mappings(GpaRange::new(0, HUGE_SIZE * 4)).is_empty());
    let _ = Arc::new(ept);
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = fault_install, lookup, zaps
}
criterion_main!(benches);
