//! guestmem vs buddy_system_allocator, same run.
//! `CARGO_TARGET_DIR=/work/targets/guestmem cargo bench -p guestmem --bench alloc`

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use buddy_system_allocator::{FrameAllocator as PeerAlloc, LockedFrameAllocator};
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use guestmem::{
    FrameAllocator, GpaRange, GuestMemory, GuestMemoryConfig, MfFlags, MfOutcome, PcpConfig,
};

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
    // The benchmarking thread owns list 2 (first use): the drain needs no
    // membarrier for it, and lists 0, 1 and 3 have no owner yet.
    g.bench_function("poison_frame_on_own_vcpu_list_incl_drain", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let f = gm.alloc(2, 0).unwrap();
                gm.free(2, f, 0).unwrap();
                let s = Instant::now();
                let out = gm.memory_failure(f, MfFlags::default()).unwrap();
                t += s.elapsed();
                assert_eq!(out, MfOutcome::PerCpuList);
                gm.unpoison(f).unwrap();
            }
            t
        })
    });
    remote_poison(&gm, &mut g);
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

/// List of the remote owner thread.
const REMOTE_CPU: usize = 3;
/// Request states: idle, "put a frame on your list", frame ready.
const IDLE: u32 = 0;
const WANT: u32 = 1;
const READY: u32 = 2;

/// memory_failure of a frame sitting on a list that another running thread
/// owns and keeps using (alloc + free on its fast path): the drain takes
/// that list remotely (`req` + membarrier + wait for the owner's section),
/// like a poison reported while vCPU threads run. The owner puts the frame
/// on its list on request; its churn (free its held frame, allocate it
/// back) never takes the requested frame off the list. The owner uses the
/// allocator directly (its frames are never written): `GuestMemory::free`
/// would punch each frame, a syscall per iteration.
fn remote_poison(gm: &GuestMemory, g: &mut BenchmarkGroup<'_, WallTime>) {
    let req = AtomicU32::new(IDLE);
    let frame = AtomicU32::new(0);
    let stop = AtomicBool::new(false);
    let a = gm.allocator();
    std::thread::scope(|s| {
        s.spawn(|| {
            // First use: this thread owns list REMOTE_CPU.
            let mut held = a.alloc(REMOTE_CPU, 0).unwrap();
            while !stop.load(Ordering::Relaxed) {
                if req.load(Ordering::Acquire) == WANT {
                    let f = a.alloc(REMOTE_CPU, 0).unwrap();
                    a.free(REMOTE_CPU, f, 0).unwrap();
                    frame.store(f, Ordering::Relaxed);
                    req.store(READY, Ordering::Release);
                }
                a.free(REMOTE_CPU, held, 0).unwrap();
                held = a.alloc(REMOTE_CPU, 0).unwrap();
            }
            a.free(REMOTE_CPU, held, 0).unwrap();
        });
        g.bench_function("poison_frame_on_remote_owners_list_incl_drain", |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    req.store(WANT, Ordering::Release);
                    let mut spins = 0u32;
                    while req.load(Ordering::Acquire) != READY {
                        spins += 1;
                        if spins.is_multiple_of(64) {
                            std::thread::yield_now();
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                    req.store(IDLE, Ordering::Relaxed);
                    let f = frame.load(Ordering::Relaxed);
                    let s = Instant::now();
                    let out = gm.memory_failure(f, MfFlags::default()).unwrap();
                    t += s.elapsed();
                    assert_eq!(out, MfOutcome::PerCpuList, "frame {f} left the list");
                    gm.unpoison(f).unwrap();
                }
                t
            })
        });
        stop.store(true, Ordering::Relaxed);
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = order0, order9, failure
}
criterion_main!(benches);
