//! Cost of one KVM_SET_USER_MEMORY_REGION on this host, as a function of
//! how many memslots the VM already has (docs/benchmarks.md, "KVM memslot
//! updates"; docs/memory.md cites it for why guest RAM is not mapped with
//! one memslot per populated range).
//!
//! Ignored by default; run with
//! `cargo test --release -p vmm-tests --test bench_memslot -- --ignored --nocapture`.
//!
//! One VM (no vCPU, no irqchip), `N` existing 2 MiB slots (distinct guest
//! and host ranges of one untouched MAP_NORESERVE mapping), then per
//! operation `ROUNDS` timed ioctls of a further 2 MiB slot:
//! - add: create the slot (KVM_MR_CREATE);
//! - delete: remove it again (`memory_size` 0, KVM_MR_DELETE);
//! - move: change its guest address, same size and host address
//!   (KVM_MR_MOVE), alternating between two addresses;
//! - replace: point its guest range at other host memory, which KVM only
//!   allows as delete + create (two ioctls, timed together).
//!
//! Every ioctl is timed on its own with `Instant`; the table gives the
//! median, the 10th and 90th percentile in microseconds, and for the `N`
//! setup adds (each a new slot id at a new address) the median and mean.
//! One untimed pass with one slot runs first.

use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};

const SLOT_BYTES: u64 = 2 << 20;
/// Existing-slot counts to measure.
const EXISTING: [u32; 4] = [1, 100, 1000, 10_000];
/// Timed repetitions per operation and slot count.
const ROUNDS: usize = 1001;
/// Untimed repetitions first.
const WARMUP: usize = 10;
/// Guest address of existing slot `i`: `BASE_GPA + i * 2 MiB` (up to
/// ~20.5 GiB for 10 000 slots); the measured slot lives above.
const BASE_GPA: u64 = 1 << 30;
const TEST_GPA: u64 = 24 << 30;
const MOVED_GPA: u64 = 26 << 30;

/// An anonymous MAP_NORESERVE mapping, never touched (KVM does not touch
/// slot memory when a slot is created or deleted).
struct Backing {
    addr: *mut libc::c_void,
    len: usize,
}

impl Backing {
    fn new(len: usize) -> Backing {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks;
        // nothing else refers to it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap {len} bytes: {}",
            std::io::Error::last_os_error()
        );
        Backing { addr, len }
    }

    /// Host address of the `i`-th 2 MiB piece.
    fn piece(&self, i: u64) -> u64 {
        assert!((i + 1) * SLOT_BYTES <= self.len as u64);
        self.addr as u64 + i * SLOT_BYTES
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        // SAFETY: our own mapping; the VM (and with it every memslot that
        // referred to it) is dropped before this (declared after it).
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// One KVM_SET_USER_MEMORY_REGION; `size` 0 deletes the slot.
fn set_slot(vm: &VmFd, slot: u32, gpa: u64, size: u64, hva: u64) {
    let region = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: hva,
    };
    // SAFETY: `hva..hva + size` lies in a live `Backing` mapping that
    // outlives the VM; no vCPU ever runs, so KVM never accesses it anyway.
    unsafe { vm.set_user_memory_region(region) }.unwrap_or_else(|e| {
        panic!("KVM_SET_USER_MEMORY_REGION slot {slot} gpa {gpa:#x} size {size:#x}: {e}")
    });
}

/// Runs `op` WARMUP + ROUNDS times; `op` returns the time it measured.
fn sample(mut op: impl FnMut() -> Duration) -> Vec<f64> {
    for _ in 0..WARMUP {
        op();
    }
    let mut v: Vec<f64> = (0..ROUNDS).map(|_| op().as_secs_f64() * 1e6).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// (median, p10, p90) of sorted samples.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.1), at(0.9))
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// The numbers for one existing-slot count: the samples of the `existing`
/// setup adds (each a new slot id at a new address: fresh kernel
/// allocations), then add, delete, move and replace of one more slot.
fn measure(kvm: &Kvm, existing: u32) -> (Vec<f64>, [Vec<f64>; 4]) {
    // Pieces 0..existing for the existing slots, then two for the test slot.
    let backing = Backing::new((existing as usize + 2) * SLOT_BYTES as usize);
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let mut setup: Vec<f64> = (0..existing)
        .map(|i| {
            let gpa = BASE_GPA + u64::from(i) * SLOT_BYTES;
            let hva = backing.piece(u64::from(i));
            timed(|| set_slot(&vm, i, gpa, SLOT_BYTES, hva)).as_secs_f64() * 1e6
        })
        .collect();
    setup.sort_by(f64::total_cmp);
    let slot = existing;
    let hva_a = backing.piece(u64::from(existing));
    let hva_b = backing.piece(u64::from(existing) + 1);

    // add and delete alternate; each ioctl timed on its own.
    let mut deletes = Vec::with_capacity(ROUNDS);
    let adds = sample(|| {
        let add = timed(|| set_slot(&vm, slot, TEST_GPA, SLOT_BYTES, hva_a));
        deletes.push(timed(|| set_slot(&vm, slot, TEST_GPA, 0, hva_a)).as_secs_f64() * 1e6);
        add
    });
    let mut deletes = deletes.split_off(WARMUP);
    deletes.sort_by(f64::total_cmp);

    set_slot(&vm, slot, TEST_GPA, SLOT_BYTES, hva_a);
    let mut at = TEST_GPA;
    let moves = sample(|| {
        at = if at == TEST_GPA { MOVED_GPA } else { TEST_GPA };
        timed(|| set_slot(&vm, slot, at, SLOT_BYTES, hva_a))
    });

    let mut hva = hva_a;
    let replaces = sample(|| {
        hva = if hva == hva_a { hva_b } else { hva_a };
        timed(|| {
            set_slot(&vm, slot, at, 0, 0);
            set_slot(&vm, slot, at, SLOT_BYTES, hva);
        })
    });
    drop(vm);
    drop(backing);
    (setup, [adds, deletes, moves, replaces])
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture (docs/benchmarks.md)"]
fn memslot_update_cost() {
    vmm_tests::require_kvm!();
    let kvm = Kvm::new().expect("open /dev/kvm");
    let max_slots = kvm.get_nr_memslots();
    let uname = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "KVM_SET_USER_MEMORY_REGION, 2 MiB slots, host kernel {}, KVM_CAP_NR_MEMSLOTS {max_slots}, {ROUNDS} rounds per cell",
        uname.trim()
    );
    println!("us per ioctl: median (p10-p90); replace = delete + add, two ioctls");
    // An untimed pass first: the first VM of a process showed stalls of
    // several ms in some runs.
    measure(&kvm, 1);
    println!();
    println!(
        "| existing slots | add | delete | move | replace (delete + add) | creating the existing slots: per add | mean |"
    );
    println!("|---|---|---|---|---|---|---|");
    for n in EXISTING {
        if n as usize + 1 > max_slots {
            println!("| {n} | skipped: KVM_CAP_NR_MEMSLOTS is {max_slots} ||||||");
            continue;
        }
        let (setup, cells) = measure(&kvm, n);
        let cell = |v: &[f64]| {
            let (m, lo, hi) = stats(v);
            format!("**{m:.1}** ({lo:.1}-{hi:.1})")
        };
        let mean = setup.iter().sum::<f64>() / setup.len() as f64;
        println!(
            "| {n} | {} | {} | {} | {} | {} | {mean:.1} |",
            cell(&cells[0]),
            cell(&cells[1]),
            cell(&cells[2]),
            cell(&cells[3]),
            cell(&setup),
        );
    }
}
