//! guestmem vs buddy_system_allocator, same run.
//! `CARGO_TARGET_DIR=/work/targets/guestmem cargo bench -p guestmem --bench alloc`

use std::hint::black_box;
use std::time::{Duration, Instant};

use buddy_system_allocator::{FrameAllocator as PeerAlloc, LockedFrameAllocator};
use criterion::{criterion_group, criterion_main, Criterion};
use guestmem::{FrameAllocator, GpaRange, GuestMemory, GuestMemoryConfig, MfFlags, PcpConfig};

const FRAMES: u32 = 1 << 18; // 1 GiB of frames

fn order0(c: &mut Criterion) {
    let mut g = c.benchmark_group("order0_alloc_free_pair");
    let a = FrameAllocator::new(FRAMES, 0, 4, PcpConfig::default());
    g.bench_function("guestmem_pcp", |b| {
        b.iter(|| {
            let f = a.alloc(1, 0).unwrap();
            a.free(1, black_box(f), 0).unwrap();
        })
    });
    let mut peer = PeerAlloc::<33>::new();
    peer.add_frame(0, FRAMES as usize);
    g.bench_function("buddy_system_allocator", |b| {
        b.iter(|| {
            let f = peer.alloc(1).unwrap();
            peer.dealloc(black_box(f), 1);
        })
    });
    let locked = LockedFrameAllocator::<33>::new();
    locked.lock().add_frame(0, FRAMES as usize);
    g.bench_function("buddy_system_allocator_locked", |b| {
        b.iter(|| {
            let f = locked.lock().alloc(1).unwrap();
            locked.lock().dealloc(black_box(f), 1);
        })
    });
    g.finish();
}

fn order9(c: &mut Criterion) {
    let mut g = c.benchmark_group("order9_alloc_free_pair");
    let a = FrameAllocator::new(FRAMES, 0, 4, PcpConfig::default());
    // Fragment a little so allocation has to split.
    let keep: Vec<_> = (0..64).map(|_| a.alloc(0, 0).unwrap()).collect();
    g.bench_function("guestmem", |b| {
        b.iter(|| {
            let f = a.alloc(0, 9).unwrap();
            a.free(0, black_box(f), 9).unwrap();
        })
    });
    let mut peer = PeerAlloc::<33>::new();
    peer.add_frame(0, FRAMES as usize);
    let pkeep: Vec<_> = (0..64).map(|_| peer.alloc(1).unwrap()).collect();
    g.bench_function("buddy_system_allocator", |b| {
        b.iter(|| {
            let f = peer.alloc(512).unwrap();
            peer.dealloc(black_box(f), 512);
        })
    });
    black_box((keep, pkeep));
    g.finish();
}

fn failure(c: &mut Criterion) {
    let mut cfg = GuestMemoryConfig::new(vec![GpaRange::new(0, 64 << 20)], 4);
    cfg.extra_frames = 1024;
    let gm = GuestMemory::new(cfg).unwrap();
    let mut g = c.benchmark_group("failure");
    g.bench_function("poison_frame_on_other_vcpu_list_incl_drain", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let f = gm.alloc(2, 0).unwrap();
                gm.free(2, f, 0).unwrap();
                let s = Instant::now();
                black_box(gm.memory_failure(f, MfFlags::default()).unwrap());
                t += s.elapsed();
                gm.unpoison(f).unwrap();
            }
            t
        })
    });
    gm.resolve(0x1000, 0).unwrap();
    // The first soft offline splits the 2 MiB mapping; measure 4 KiB ones.
    let f = gm.frame_of_gpa(0x1000).unwrap();
    gm.soft_offline(f).unwrap();
    gm.unpoison(f).unwrap();
    assert_eq!(gm.lookup(0x1000).unwrap().order, 0);
    g.bench_function("soft_offline_4k_mapped", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let f = gm.frame_of_gpa(0x1000).unwrap();
                let s = Instant::now();
                black_box(gm.soft_offline(f).unwrap());
                t += s.elapsed();
                gm.unpoison(f).unwrap();
            }
            t
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = order0, order9, failure
}
criterion_main!(benches);
