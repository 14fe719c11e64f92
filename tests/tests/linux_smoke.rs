//! Linux kernel-only smoke test: one boot of resources/linux's minimal 6.1
//! kernel with 2 vCPUs, 256 MiB and a balloon whose 64 MiB target is set
//! before boot, checked from the kernel log and from the API/host side up to
//! "Run /init as init process":
//!
//! - boot protocol + serial console (`Linux version`, `Command line:`), the
//!   e820 map, the CPUID baseline on emulated-ring-0 hosts (`Clearing CPUID
//!   bits:`), SMP bring-up (`smp: Brought up 1 node, 2 CPUs`);
//! - virtio-mmio probing (`virtio-mmio: Registering device ...`), feature
//!   negotiation (VERSION_1 + STATS_VQ in the device's negotiated features)
//!   and Linux's balloon driver inflating to the target (its worker is a
//!   kernel thread): `actual` reaches the target, the device holds exactly
//!   those pages and the host does not (guestmem resident bytes, VmRSS);
//! - an action-optional machine check on a free guest page (broadcast to
//!   both vCPUs on Intel-style MCA): `Memory failure: 0x...: ... Recovered`;
//! - the emulation assists on emulated-ring-0 hosts (`GET /vm` counts the
//!   kernel's int3 self-test).
//!
//! Then /init reports `VMM-GUEST ready` (on emulated-ring-0 hosts through the
//! kernel patch's ring-3 syscall completion, switched on by `vmm`) and the
//! test powers the guest off. The user-space tier is tests/linux_full.rs.

use std::time::{Duration, Instant};

use vmm_tests::{json_u64 as stat, linux_guest, require_kvm, ring0_emulated, rss_bytes, Vmm};

const MEM_MIB: u64 = 256;
const BALLOON_MIB: u64 = 64;
/// A page the kernel has not allocated when it is poisoned: 3/4 up guest
/// RAM. Memblock allocates top-down just below the initrd (which sits at the
/// top of RAM), and the buddy allocator (early allocations, the balloon)
/// hands out low addresses first.
const POISON_GPA: u64 = (MEM_MIB * 3 / 4) << 20;
/// Generous for this host (~70 s to "Run /init" measured on a loaded
/// 2-core machine, see docs/linux.md); hardware KVM takes ~1 s.
const BOOT_LIMIT: Duration = Duration::from_secs(300);

/// Wait for a serial line containing `needle` (also among lines read
/// already) until `deadline`; panics with the log otherwise.
fn wait_for(vm: &mut Vmm, needle: &str, deadline: Instant) -> String {
    loop {
        if let Some(l) = vm.seen().iter().find(|l| l.contains(needle)) {
            eprintln!("linux smoke: found {l:?}");
            return l.clone();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if vm.next_line(left.min(Duration::from_millis(500))).is_none() && left.is_zero() {
            panic!(
                "no kernel log line containing {needle:?} in time; log:\n{}",
                vm.seen().join("\n")
            );
        }
    }
}

/// The tests of this file run one at a time under `cargo test`: each boots an
/// emulated kernel that wants a whole core (under nextest the `linux-smoke`
/// test group of .config/nextest.toml does the same).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn linux_kernel_boots_to_init_with_balloon_and_memory_failure() {
    require_kvm!();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some((kernel, initrd)) = linux_guest(module_path!()) else {
        return;
    };
    let emulated = ring0_emulated();
    let start = Instant::now();
    let deadline = start + BOOT_LIMIT;
    let balloon =
        format!("amount_mib={BALLOON_MIB},deflate_on_oom=false,stats_polling_interval_s=5");
    let mem = MEM_MIB.to_string();
    let mut vm = Vmm::start(
        "linux-smoke",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 reboot=k panic=1",
            "--vcpus",
            "2",
            "--mem",
            &mem,
            "--balloon",
            &balloon,
        ],
    );
    let mut timeline = Vec::new();
    let mut mark =
        |what: &str| timeline.push(format!("{what} at {:.1}s", start.elapsed().as_secs_f64()));

    // Boot protocol, serial console, command line (with the CPUID baseline
    // words where assists are active), e820.
    wait_for(&mut vm, "Linux version 6.1", deadline);
    let cmdline = wait_for(&mut vm, "Command line:", deadline);
    assert!(
        cmdline.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{cmdline}"
    );
    assert_eq!(
        cmdline.contains("clearcpuid=popcnt,cx16"),
        emulated,
        "{cmdline}"
    );
    assert_eq!(
        cmdline.contains("ring3_syscall_completion"),
        emulated,
        "{cmdline}"
    );
    wait_for(
        &mut vm,
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        deadline,
    );
    wait_for(
        &mut vm,
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
        deadline,
    );
    if emulated {
        let c = wait_for(&mut vm, "Clearing CPUID bits:", deadline);
        assert!(c.contains("cx16") && c.contains("umip"), "{c}");
    }
    // SMP bring-up through the MP table and INIT/SIPI.
    wait_for(&mut vm, "smpboot: Allowing 2 CPUs", deadline);
    wait_for(&mut vm, "smp: Brought up 1 node, 2 CPUs", deadline);
    wait_for(
        &mut vm,
        "smpboot: Total of 2 processors activated",
        deadline,
    );
    mark("2 CPUs up");
    // virtio-mmio device from the command line.
    wait_for(
        &mut vm,
        "virtio-mmio: Registering device virtio-mmio.0 at 0xd0000000-0xd0000fff, IRQ 5.",
        deadline,
    );
    mark("virtio-mmio registered");

    // The balloon driver negotiates and inflates to the target set before boot.
    let target_pages = BALLOON_MIB << 8;
    let stats = loop {
        let (st, s) = vm.api("GET", "/balloon/statistics", None);
        assert_eq!(st, 200, "{s}");
        if stat(&s, &["actual_pages"]) >= target_pages {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the balloon did not reach {target_pages} pages in time (last statistics {s:#}); log:\n{}",
            vm.seen().join("\n")
        );
        let _ = vm.next_line(Duration::from_millis(500));
    };
    mark("balloon at target");
    assert_eq!(stat(&stats, &["target_pages"]), target_pages, "{stats:#}");
    assert_eq!(stat(&stats, &["actual_pages"]), target_pages, "{stats:#}");
    assert_eq!(
        stat(&stats, &["ballooned_pages"]),
        target_pages,
        "device bitmap: {stats:#}"
    );
    let features = stat(&stats, &["negotiated_features"]);
    assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1: {features:#x}");
    assert_ne!(
        features & (1 << 1),
        0,
        "VIRTIO_BALLOON_F_STATS_VQ: {features:#x}"
    );
    // Host side: no ballooned page holds a frame. Each was released, or
    // never populated (the guest had not touched it).
    let c = &stats["counters"];
    let accounted = stat(c, &["released_frames"]) + stat(c, &["unpopulated_pages"]);
    assert!(
        accounted >= target_pages,
        "released + unpopulated < inflated: {stats:#}"
    );
    let (_, m) = vm.api("GET", "/memory", None);
    let resident = stat(&m, &["resident_bytes"]);
    assert!(
        resident + (BALLOON_MIB << 20) <= MEM_MIB << 20,
        "guestmem resident {resident}: {m:#}"
    );
    let rss = rss_bytes(vm.pid()).expect("VmRSS");
    assert!(
        rss <= resident + (64 << 20),
        "vmm VmRSS {rss} vs guest RAM resident {resident}"
    );
    eprintln!(
        "balloon at target: resident {} MiB, VmRSS {} MiB",
        resident >> 20,
        rss >> 20
    );

    // Action-optional machine check on a free page: Linux offlines it.
    let body = format!(r#"{{"gpa": {POISON_GPA}, "kind": "hard", "action": "optional"}}"#);
    let (st, rep) = vm.api("POST", "/memory/poison", Some(&body));
    assert_eq!(st, 200, "{rep}");
    let pfn = format!("Memory failure: {:#x}:", POISON_GPA >> 12);
    let mf = wait_for(&mut vm, &pfn, deadline);
    assert!(mf.contains("Recovered"), "{mf}");
    mark("memory failure recovered");
    let (_, m) = vm.api("GET", "/memory", None);
    let f = &m["frames"];
    assert!(
        stat(f, &["poisoned"]) + stat(f, &["poisoned_gfns"]) >= 1,
        "{m:#}"
    );

    wait_for(&mut vm, "Run /init as init process", deadline);
    mark("Run /init");
    let (st, info) = vm.api("GET", "/vm", None);
    assert_eq!(st, 200, "{info}");
    let a = &info["emulation_assists"];
    assert_eq!(a["enabled"], emulated, "{info}");
    if emulated {
        // Linux's int3 self-test at least.
        assert!(a["int3"].as_u64().unwrap() >= 1, "{info}");
    }

    if emulated {
        let on = wait_for(&mut vm, "ring-3 SYSCALL completion", deadline);
        assert!(on.contains("enabled"), "{on}");
    }
    wait_for(&mut vm, "VMM-GUEST ready", deadline);
    mark("VMM-GUEST ready");
    eprintln!("linux smoke timeline: {}", timeline.join(", "));
    vm.send("poweroff\n");
    let (code, _, err) = vm.finish(Duration::from_secs(120));
    assert_eq!(code, 0, "{err}");
}

/// The bzImage of the same build boots through the bzImage path (setup
/// header, boot_params, 64-bit entry of the decompressor) as far as the
/// kernel's first log lines: its version, our command line and the e820 map
/// we passed. ~10 s here (the decompressor runs emulated); then it is killed.
#[test]
fn linux_bzimage_boots_to_the_kernel_log() {
    require_kvm!();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some((kernel, _)) = linux_guest(module_path!()) else {
        return;
    };
    let bz = kernel.with_file_name("bzImage");
    if !bz.is_file() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{} missing; resources/linux/build-kernel.sh builds it",
            bz.display()
        );
        eprintln!("SKIP: no {} next to the kernel", bz.display());
        return;
    }
    let mut vm = Vmm::start(
        "linux-bzimage",
        &[
            "--kernel",
            bz.to_str().unwrap(),
            "--mem",
            "128",
            "--cmdline",
            "console=ttyS0 earlyprintk=serial panic=-1 bzimage_marker",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    wait_for(&mut vm, "Linux version 6.1", deadline);
    let cmd = wait_for(&mut vm, "Command line:", deadline);
    assert!(cmd.contains("bzimage_marker"), "{cmd}");
    wait_for(
        &mut vm,
        "BIOS-e820: [mem 0x0000000000100000-0x0000000007ffffff] usable",
        deadline,
    );
}
