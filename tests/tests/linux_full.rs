//! The Linux tier: resources/linux's kernel + initramfs booted to the
//! `vmm-guest# ` shell, on every host class. On hosts whose KVM emulates
//! guest ring 0 (this project's machines, shared/HOST.md) user space runs
//! through the guest kernel's ring-3 syscall completion (resources/linux/
//! patches, switched on by `vmm`'s emulation assists; docs/linux.md).
//!
//! Four boots, each checking one area, every assertion one that fails when
//! the area breaks:
//! - 1 vCPU: the shell, the syscall completion cannot be abused (a process
//!   that jumps to the entry address with IOPL/NT/VM bits in R11 gets a
//!   plain system call, no port access, and survives bad return
//!   addresses), `poweroff` ends `vmm` with 0;
//! - 2 vCPUs + balloon: inflate/deflate seen inside (MemTotal, MemFree,
//!   /proc/vmstat, the driver's sysfs) and outside (counters, VmRSS);
//! - 1 vCPU + balloon with free page reporting and deflate-on-OOM: host
//!   memory comes back after a guest process frees a large allocation, and
//!   a process that allocates past what the balloon left gets its memory
//!   from the balloon instead of the OOM killer;
//! - 1 vCPU, a frame pool smaller than RAM (`--mem-pool`) and a balloon
//!   with deflate-on-OOM: the guest's OOM takes pages back from the
//!   balloon, touching them runs the host pool dry, the VMM pauses the
//!   vCPU (`GET /memory` → `oom.state` paused) instead of dying, and
//!   growing the pool (`PATCH /memory`) lets the guest finish;
//! - 2 vCPUs, `--on-reset restart`: action-optional machine checks on a
//!   free page and on a process page, action required on a process page
//!   (SIGBUS BUS_MCEERR_AR at the right address, the kernel's "Recovered"
//!   verdict), soft offline of a process's pages while it checksums them,
//!   then a reboot into a working shell with the poisoned pages usable
//!   (`poweroff` is a reset here too, so this boot ends by killing `vmm`).
//!
//! Console handling and shell helpers: vmm_tests::guest_shell.

use std::time::{Duration, Instant};

use vmm_tests::guest_shell::{
    dmesg_grep, guest_line, meminfo_kib, number_after, poweroff, shell, touch_guest_ram, touch_mib,
    vmstat, wait_ready, LinuxGuest, T,
};
use vmm_tests::{field, json_u64 as u, require_kvm, rss_bytes, Vmm};

const MIB: u64 = 1 << 20;
/// Guest RAM of every boot here.
const MEM_MIB: u64 = 256;

fn guest(test: &str) -> Option<LinuxGuest> {
    LinuxGuest::find(test)
}

fn api_ok(vm: &Vmm, method: &str, path: &str, body: Option<&str>) -> serde_json::Value {
    let (st, v) = vm.api(method, path, body);
    assert!((200..300).contains(&st), "{method} {path}: {st} {v}");
    v
}

#[test]
fn shell_1_vcpu_syscall_completion_is_safe_and_poweroff() {
    require_kvm!();
    let Some(g) = guest(module_path!()) else {
        return;
    };
    let entry = g.symbol("entry_SYSCALL_64");
    let mut vm = g.boot("linux-full-1", 1, MEM_MIB, &[]);
    let out = shell(&mut vm, "cat /sys/devices/system/cpu/online; uname -r");
    assert!(out.iter().any(|l| l.trim() == "0"), "{out:?}");
    assert!(out.iter().any(|l| l.starts_with("6.1.")), "{out:?}");

    // A process jumps to the syscall entry itself (resources/linux/
    // initramfs/syscall-jump.c). Where the completion is on, that is a
    // system call with sanitized flags; where it is off, a SIGSEGV.
    let out = shell(
        &mut vm,
        &format!("syscall-jump {entry:x}; echo \"SJ-EXIT=$?\""),
    );
    let text = out.join("\n");
    let line = |p: &str| {
        out.iter()
            .find(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("no {p:?} line:\n{text}"))
            .clone()
    };
    assert_eq!(number_after(&out, "SJ-EXIT="), Some(0), "{text}");
    assert!(out.iter().any(|l| l == "SYSJUMP done"), "{text}");
    let (_, info) = vm.api("GET", "/vm", None);
    if info["emulation_assists"]["enabled"] == true {
        let g = [line("SYSJUMP getpid ret=")];
        assert_eq!(
            number_after(&g, "ret="),
            number_after(&g, "real="),
            "the jump ran getpid: {text}"
        );
        let f = [line("SYSJUMP flags=")];
        assert_eq!(number_after(&f, "iopl="), Some(0), "IOPL leaked: {text}");
        assert_eq!(number_after(&f, "nt="), Some(0), "NT leaked: {text}");
        assert_eq!(number_after(&f, "if="), Some(1), "{text}");
        // The frame IRET will load, seen by a tracer at the entry stop
        // (this host's IRET may drop IOPL itself; the frame must not ask).
        let t = [line("SYSJUMP traced flags=")];
        assert_eq!(
            number_after(&t, "iopl="),
            Some(0),
            "IOPL in the frame: {text}"
        );
        assert_eq!(number_after(&t, "nt="), Some(0), "NT in the frame: {text}");
        assert_eq!(
            number_after(&[line("SYSJUMP enosys")], "ret="),
            Some(-38),
            "{text}"
        );
    } else {
        assert_eq!(line("SYSJUMP getpid"), "SYSJUMP getpid: SIGSEGV", "{text}");
    }
    assert!(
        line("SYSJUMP port 0x80:").contains("refused"),
        "port access from user mode: {text}"
    );
    for bad in ["0x8000000000000000", "0xffffffff81000000"] {
        assert_eq!(
            line(&format!("SYSJUMP bad rcx {bad}:")),
            format!("SYSJUMP bad rcx {bad}: SIGSEGV"),
            "{text}"
        );
    }
    // The kernel did not oops on the way.
    let oops = dmesg_grep(&mut vm, &["BUG:", "Oops", "general protection fault:"]);
    assert!(
        !oops
            .iter()
            .any(|l| l.contains("BUG:") || l.contains("Oops")),
        "{oops:?}"
    );
    poweroff(vm);
}

/// The balloon device's virtio sysfs in the guest: the 64-character
/// `features` bit string and the `status` byte.
fn balloon_sysfs(vm: &mut Vmm) -> (String, u64) {
    let d = "/sys/bus/virtio/devices/virtio0";
    let out = shell(vm, &format!("cat {d}/features {d}/status"));
    let feats = out
        .iter()
        .map(|l| l.trim())
        .find(|l| l.len() == 64 && l.bytes().all(|b| b == b'0' || b == b'1'))
        .unwrap_or_else(|| panic!("no feature bits: {out:?}"))
        .to_string();
    let status = out
        .iter()
        .find_map(|l| l.trim().strip_prefix("0x"))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| panic!("no status: {out:?}"));
    (feats, status)
}

fn balloon_stats(vm: &Vmm) -> serde_json::Value {
    api_ok(vm, "GET", "/balloon/statistics", None)
}

fn wait_balloon(vm: &Vmm, pages: u64) {
    let deadline = Instant::now() + T;
    loop {
        let s = balloon_stats(vm);
        if s["actual_pages"].as_u64() == Some(pages) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "balloon did not reach {pages} pages: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn balloon_inflate_deflate_with_2_vcpus() {
    require_kvm!();
    let Some(g) = guest(module_path!()) else {
        return;
    };
    const BALLOON_MIB: u64 = 128;
    const PAGES: u64 = BALLOON_MIB << 8;
    // MemFree moves by the balloon give or take this much (page cache,
    // slab, the shell's own processes).
    const SLACK_KIB: u64 = 16 << 10;
    let mut vm = g.boot(
        "linux-full-balloon",
        2,
        MEM_MIB,
        &[
            "--balloon",
            "amount_mib=0,deflate_on_oom=false,stats_polling_interval_s=1,free_page_reporting=false",
        ],
    );
    let out = shell(&mut vm, "cat /sys/devices/system/cpu/online");
    assert!(out.iter().any(|l| l.trim() == "0-1"), "{out:?}");
    let report = shell(&mut vm, "guest-report");
    assert!(
        report
            .iter()
            .any(|l| l.contains("VMM-GUEST balloon: virtio0 driver=virtio_balloon driver_ok=yes")),
        "{report:?}"
    );
    // The driver's view (virtio sysfs): STATS_VQ (bit 1) and VERSION_1
    // (bit 32) negotiated, DEFLATE_ON_OOM (bit 2) not — without it the
    // 6.1 driver takes inflated pages out of totalram
    // (adjust_managed_page_count), which the MemTotal checks below rely on.
    let (feats, status) = balloon_sysfs(&mut vm);
    let bit = |i: usize| feats.as_bytes()[i] == b'1';
    assert!(bit(1) && bit(32) && !bit(2), "features {feats}");
    assert_eq!(
        status & 0xcf,
        0x0f,
        "status {status:#x}: ACK|DRIVER|FEATURES_OK|DRIVER_OK"
    );

    // Make the host populate nearly all guest RAM, then free it in the
    // guest: at most FREE_LEFT_MIB (plus what the kernel keeps) stays
    // unpopulated, so most of what the balloon takes must be released.
    const FREE_LEFT_MIB: u64 = 24;
    let fill_mib = touch_guest_ram(&mut vm, FREE_LEFT_MIB);
    let total0 = meminfo_kib(&mut vm, "MemTotal");
    let free0 = meminfo_kib(&mut vm, "MemFree");
    let inflate0 = vmstat(&mut vm, "balloon_inflate");
    let deflate0 = vmstat(&mut vm, "balloon_deflate");
    let rss0 = rss_bytes(vm.pid()).unwrap();
    assert!(
        rss0 >= fill_mib * MIB,
        "VmRSS {rss0} after the guest touched {fill_mib} MiB: the host does not back it"
    );

    api_ok(
        &vm,
        "PATCH",
        "/balloon",
        Some(&format!(r#"{{"amount_mib": {BALLOON_MIB}}}"#)),
    );
    wait_balloon(&vm, PAGES);

    // Inside: MemTotal drops by exactly the balloon (no DEFLATE_ON_OOM),
    // MemFree by about as much (the pages came off the free lists),
    // /proc/vmstat counts them, the device is still healthy.
    let total1 = meminfo_kib(&mut vm, "MemTotal");
    assert_eq!(
        total0.checked_sub(total1),
        Some(BALLOON_MIB << 10),
        "MemTotal {total0} -> {total1} kB"
    );
    let free1 = meminfo_kib(&mut vm, "MemFree");
    let dropped = free0 as i64 - free1 as i64;
    assert!(
        dropped.abs_diff((BALLOON_MIB << 10) as i64) <= SLACK_KIB,
        "MemFree {free0} -> {free1} kB: expected a drop of {} +- {SLACK_KIB} kB",
        BALLOON_MIB << 10
    );
    assert_eq!(vmstat(&mut vm, "balloon_inflate") - inflate0, PAGES);
    let (_, status) = balloon_sysfs(&mut vm);
    assert_eq!(status & 0xcf, 0x0f, "status after inflate {status:#x}");

    // Host: the device holds the pages, released the populated frames
    // behind them, and the process's RSS went down by at least the part
    // that must have been populated.
    let s = balloon_stats(&vm);
    assert_eq!(s["ballooned_pages"], PAGES, "{s:#}");
    let released = u(&s, &["counters", "released_frames"]);
    let unpopulated = u(&s, &["counters", "unpopulated_pages"]);
    assert!(released + unpopulated >= PAGES, "{s:#}");
    let must_release = BALLOON_MIB - FREE_LEFT_MIB - 8;
    assert!(
        released >= must_release << 8,
        "released {released} frames, expected >= {must_release} MiB: {s:#}"
    );
    let rss1 = rss_bytes(vm.pid()).unwrap();
    assert!(
        rss1 + must_release * MIB <= rss0,
        "VmRSS {} -> {} MiB: expected >= {must_release} MiB released",
        rss0 / MIB,
        rss1 / MIB
    );

    // Deflate: the guest gets its memory back, and using it populates
    // host frames again.
    api_ok(&vm, "PATCH", "/balloon", Some(r#"{"amount_mib": 0}"#));
    wait_balloon(&vm, 0);
    assert_eq!(meminfo_kib(&mut vm, "MemTotal"), total0);
    let free2 = meminfo_kib(&mut vm, "MemFree");
    assert!(
        free2 + SLACK_KIB >= free0,
        "MemFree after deflate {free2} kB, before inflate {free0} kB"
    );
    assert_eq!(vmstat(&mut vm, "balloon_deflate") - deflate0, PAGES);
    touch_guest_ram(&mut vm, FREE_LEFT_MIB);
    let rss2 = rss_bytes(vm.pid()).unwrap();
    // Of the free pages, at least the `released` deflated ones are
    // unpopulated; touching all but FREE_LEFT_MIB of them populates at
    // least released - FREE_LEFT_MIB again (8 MiB of slack).
    let regrow = (released * 4096).saturating_sub((FREE_LEFT_MIB + 8) * MIB);
    assert!(
        rss2 >= rss1 + regrow,
        "VmRSS {} -> {} MiB after the guest reused the deflated memory: expected >= +{} MiB",
        rss1 / MIB,
        rss2 / MIB,
        regrow / MIB
    );
    poweroff(vm);
}

#[test]
fn free_page_reporting_and_deflate_on_oom() {
    require_kvm!();
    let Some(g) = guest(module_path!()) else {
        return;
    };
    let mut vm = g.boot(
        "linux-full-fpr-oom",
        1,
        MEM_MIB,
        &[
            "--balloon",
            "amount_mib=0,deflate_on_oom=true,stats_polling_interval_s=1,free_page_reporting=true",
        ],
    );
    // Free page reporting: a process touches 128 MiB and exits; the guest
    // reports the freed blocks (2 MiB and up, after ~2 s) and the host
    // gives their memory back.
    const ALLOC_MIB: u64 = 128;
    let s0 = balloon_stats(&vm);
    let reported0 = u(&s0, &["counters", "reported_pages"]);
    let rss0 = rss_bytes(vm.pid()).unwrap();
    touch_mib(&mut vm, ALLOC_MIB);
    let deadline = Instant::now() + T;
    let (reported, rss1) = loop {
        let s = balloon_stats(&vm);
        let reported = u(&s, &["counters", "reported_pages"]) - reported0;
        let rss = rss_bytes(vm.pid()).unwrap();
        // At least 3/4 of the allocation reported, and VmRSS back within
        // 32 MiB of where it was before the allocation.
        if reported >= (ALLOC_MIB * 3 / 4) << 8 && rss <= rss0 + 32 * MIB {
            break (reported, rss);
        }
        assert!(
            Instant::now() < deadline,
            "free page reporting: {reported} pages reported, VmRSS {} MiB (before the allocation {} MiB): {s:#}",
            rss / MIB,
            rss0 / MIB
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "free page reporting: {reported} pages reported, VmRSS {} -> {} MiB",
        rss0 / MIB,
        rss1 / MIB
    );

    // Deflate on OOM: the balloon takes 160 MiB, then a process allocates
    // 32 MiB more than the guest has free. The driver's OOM notifier gives
    // pages back (1 MiB per call), so the process gets its memory and no
    // process is killed.
    const BALLOON_MIB: u64 = 160;
    api_ok(
        &vm,
        "PATCH",
        "/balloon",
        Some(&format!(r#"{{"amount_mib": {BALLOON_MIB}}}"#)),
    );
    wait_balloon(&vm, BALLOON_MIB << 8);
    let deflate0 = vmstat(&mut vm, "balloon_deflate");
    let free = meminfo_kib(&mut vm, "MemFree") >> 10;
    touch_mib(&mut vm, free + 32);
    let s = balloon_stats(&vm);
    let actual = u(&s, &["actual_pages"]);
    assert!(
        actual + (32 << 8) <= BALLOON_MIB << 8,
        "the balloon did not give back at least 32 MiB: {s:#}"
    );
    assert!(u(&s, &["counters", "deflated_pages"]) >= 32 << 8, "{s:#}");
    assert!(vmstat(&mut vm, "balloon_deflate") - deflate0 >= 32 << 8);
    let oom = dmesg_grep(&mut vm, &["out of memory", "oom-kill", "killed process"]);
    assert!(oom.is_empty(), "the OOM killer ran: {oom:?}");
    poweroff(vm);
}

/// A `poison-victim` running in the background of the guest shell, reading
/// its stdin from a FIFO and logging to a file of its own.
struct Victim {
    name: &'static str,
    pid: u64,
    vaddr: u64,
    /// Physical address of each page.
    paddrs: Vec<u64>,
}

/// Start `poison-victim ARGS` as `name` in a background subshell that
/// appends the victim's own exit status (`$?`: its exit code, or 128 + the
/// signal that killed it) to its log; wait until it is ready.
fn start_victim(vm: &mut Vmm, name: &'static str, args: &str) -> Victim {
    // fd 3.. keeps a writer open, so the victim's read() waits for a line
    // instead of seeing EOF.
    shell(
        vm,
        &format!(
            "mkfifo /tmp/{name}.fifo; exec {}<>/tmp/{name}.fifo",
            fd_of(name)
        ),
    );
    shell(
        vm,
        &format!(
            "(poison-victim {args} </tmp/{name}.fifo >/tmp/{name}.log 2>&1; \
             echo \"VICTIM-EXIT=$?\" >>/tmp/{name}.log) &"
        ),
    );
    let deadline = Instant::now() + T;
    loop {
        let out = shell(vm, &format!("cat /tmp/{name}.log"));
        if let Some(r) = out
            .iter()
            .find_map(|l| l.find("VICTIM READY").map(|i| &l[i..]))
        {
            let paddrs: Vec<u64> = out
                .iter()
                .filter(|l| l.starts_with("VICTIM page "))
                .map(|l| field(l, "paddr").expect("paddr"))
                .collect();
            let v = Victim {
                name,
                pid: field(r, "pid").expect("pid"),
                vaddr: field(r, "vaddr").expect("vaddr"),
                paddrs,
            };
            assert!(
                !v.paddrs.is_empty() && !v.paddrs.contains(&0),
                "no physical addresses (pagemap): {out:?}"
            );
            return v;
        }
        assert!(Instant::now() < deadline, "{name} not ready: {out:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The shell fd that keeps victim `name`'s FIFO open.
fn fd_of(name: &str) -> u32 {
    3 + name.bytes().map(u32::from).sum::<u32>() % 6
}

/// Wake the victim (a newline on its stdin), wait for it, and return its
/// log and its own exit status.
fn finish_victim(vm: &mut Vmm, v: &Victim) -> (Vec<String>, i64) {
    let n = v.name;
    shell(vm, &format!("echo > /tmp/{n}.fifo"));
    let deadline = Instant::now() + T;
    loop {
        let log = shell(vm, &format!("cat /tmp/{n}.log"));
        if let Some(code) = number_after(&log, "VICTIM-EXIT=") {
            return (log, code);
        }
        assert!(Instant::now() < deadline, "{n} did not finish: {log:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn poison(vm: &Vmm, gpa: u64, kind: &str, action: Option<&str>) -> serde_json::Value {
    let body = match action {
        Some(a) => format!(r#"{{"gpa": {gpa}, "kind": "{kind}", "action": "{a}"}}"#),
        None => format!(r#"{{"gpa": {gpa}, "kind": "{kind}"}}"#),
    };
    let (st, rep) = vm.api("POST", "/memory/poison", Some(&body));
    assert_eq!(st, 200, "poison {gpa:#x} {kind} {action:?}: {rep}");
    rep
}

/// Wait until the kernel logs its memory-failure verdict for `gpa`.
fn wait_verdict(vm: &mut Vmm, gpa: u64) -> String {
    let pfn = format!("Memory failure: {:#x}: recovery action for ", gpa >> 12);
    let deadline = Instant::now() + T;
    loop {
        let d = dmesg_grep(vm, &["memory failure"]);
        if let Some(l) = d.iter().find(|l| l.contains(&pfn)) {
            return l.clone();
        }
        assert!(Instant::now() < deadline, "no {pfn:?} in dmesg: {d:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The victim got exactly one SIGBUS, action required, for page 0 at its
/// address, recovered and exited 3.
fn assert_recovered_from_ar(v: &Victim, log: &[String], code: i64) {
    let ctx = log.join("\n");
    let sigbus: Vec<&String> = log.iter().filter(|l| l.starts_with("SIGBUS ")).collect();
    assert_eq!(sigbus.len(), 1, "{ctx}");
    let s = sigbus[0];
    assert!(s.starts_with("SIGBUS BUS_MCEERR_AR si_code=4 "), "{ctx}");
    assert_eq!(field(s, "si_addr"), Some(v.vaddr), "{ctx}");
    assert_eq!(field(s, "si_addr_lsb"), Some(12), "{ctx}");
    assert_eq!(field(s, "page"), Some(0), "{ctx}");
    assert!(
        log.iter()
            .any(|l| l.contains("VICTIM RECOVERED: other pages intact")),
        "{ctx}"
    );
    assert_eq!(
        code, 3,
        "exit status (3 = recovered from BUS_MCEERR_AR): {ctx}"
    );
}

#[test]
fn memory_failure_soft_offline_and_reset() {
    require_kvm!();
    let Some(g) = guest(module_path!()) else {
        return;
    };
    let mut vm = g.boot("linux-full-poison", 2, MEM_MIB, &["--on-reset", "restart"]);
    let lru_recovered = |verdict: &str| {
        let v = verdict.trim_end();
        v.ends_with("dirty LRU page: Recovered") || v.ends_with("clean LRU page: Recovered")
    };

    // 1. Action optional on a free page: 3/4 up RAM is free this early
    //    (memblock allocates top-down below the initrd, the buddy
    //    allocator hands out low addresses first). Linux takes it off the
    //    free lists.
    let free_gpa = (MEM_MIB * 3 / 4) << 20;
    poison(&vm, free_gpa, "hard", Some("optional"));
    let verdict = wait_verdict(&mut vm, free_gpa);
    assert!(
        verdict.trim_end().ends_with("free buddy page: Recovered"),
        "{verdict}"
    );

    // 2. Action optional on a process page: the kernel unmaps it in the
    //    background ("Recovered"); the process's next touch is SIGBUS
    //    BUS_MCEERR_AR (no early kill: vm.memory_failure_early_kill=0).
    let ao = start_victim(&mut vm, "ao", "-p 4");
    poison(&vm, ao.paddrs[0], "hard", Some("optional"));
    let verdict = wait_verdict(&mut vm, ao.paddrs[0]);
    assert!(lru_recovered(&verdict), "{verdict}");
    let (log, code) = finish_victim(&mut vm, &ao);
    assert_recovered_from_ar(&ao, &log, code);

    // 3. Action required: the host poisons the page; the victim's touch
    //    faults, the vCPU gets the machine check in the victim's context.
    let ar = start_victim(&mut vm, "ar", "-p 4");
    poison(&vm, ar.paddrs[0], "hard", Some("required"));
    let (log, code) = finish_victim(&mut vm, &ar);
    assert_recovered_from_ar(&ar, &log, code);
    let verdict = wait_verdict(&mut vm, ar.paddrs[0]);
    assert!(lru_recovered(&verdict), "{verdict}");
    let sent = dmesg_grep(&mut vm, &["sending sigbus"]);
    assert!(
        sent.iter().any(|l| l.contains(&format!(
            "Memory failure: {:#x}: Sending SIGBUS to poison-victim:{} due to hardware memory corruption",
            ar.paddrs[0] >> 12,
            ar.pid
        ))),
        "{sent:?}"
    );
    let bad = dmesg_grep(&mut vm, &["not recovered", "forcibly killing"]);
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(meminfo_kib(&mut vm, "HardwareCorrupted"), 12);

    // 4. Soft offline of every page of a process while it checksums them:
    //    the host migrates each frame; the guest sees nothing.
    let soft = start_victim(&mut vm, "soft", "-c -p 16");
    assert_eq!(soft.paddrs.len(), 16);
    for &pa in &soft.paddrs {
        let rep = poison(&vm, pa, "soft", None);
        assert_eq!(rep["outcome"], "migrated", "{rep}");
    }
    let (log, code) = finish_victim(&mut vm, &soft);
    let text = log.join("\n");
    let passes = number_after(&log, "VICTIM checksum ok: passes=");
    assert!(passes.is_some_and(|p| p >= 1), "{text}");
    assert!(!text.contains("SIGBUS"), "{text}");
    assert_eq!(code, 0, "{text}");
    assert_eq!(meminfo_kib(&mut vm, "HardwareCorrupted"), 12);
    let check = api_ok(&vm, "GET", "/memory/check", None);
    assert_eq!(check["ok"], true, "{check:#}");
    let m = api_ok(&vm, "GET", "/memory", None);
    assert!(u(&m, &["frames", "poisoned_gfns"]) >= 3, "{m:#}");

    // 5. Reset (`reboot -f` -> i8042) with --on-reset restart: the guest
    //    boots again with fresh RAM; the poisoned pages are usable.
    let start = Instant::now();
    vm.send("reboot -f\n");
    wait_ready(&mut vm, 2, start);
    assert_eq!(meminfo_kib(&mut vm, "HardwareCorrupted"), 0);
    let m = api_ok(&vm, "GET", "/memory", None);
    assert_eq!(u(&m, &["frames", "poisoned_gfns"]), 0, "{m:#}");
    // Touch all but 16 MiB of the guest's free RAM, the once poisoned
    // pages most likely among it: no machine check, no SIGBUS.
    touch_guest_ram(&mut vm, 16);
    let mf = dmesg_grep(&mut vm, &["memory failure", "hardware error"]);
    assert!(mf.is_empty(), "{mf:?}");
    let check = api_ok(&vm, "GET", "/memory/check", None);
    assert_eq!(check["ok"], true, "{check:#}");
    // No `poweroff` here: without ACPI it is an i8042 reset, which
    // --on-reset restart turns into another boot. Dropping `vm` kills it.
}

#[test]
fn overcommit_pauses_on_deflate_on_oom_until_the_pool_grows() {
    require_kvm!();
    let Some(g) = guest(module_path!()) else {
        return;
    };
    // The guest may use 256 - 96 = 160 MiB; the host pool backs 176 MiB.
    // Allocating 48 MiB past what the guest has free makes Linux's OOM
    // notifier deflate the balloon, and touching the deflated pages needs
    // more host frames than the pool has.
    const BALLOON_MIB: u64 = 96;
    let mut vm = g.boot(
        "linux-full-overcommit",
        1,
        MEM_MIB,
        &[
            "--mem-pool",
            "176",
            "--balloon",
            "amount_mib=96,deflate_on_oom=true,stats_polling_interval_s=1",
        ],
    );
    wait_balloon(&vm, BALLOON_MIB << 8);
    let m = api_ok(&vm, "GET", "/memory", None);
    assert_eq!(m["pool_mib"], 176, "{m:#}");
    assert_eq!(m["oom"]["state"], "running", "{m:#}");
    let free = meminfo_kib(&mut vm, "MemFree") >> 10;
    // Not through `shell`: the command cannot finish until the pool grows.
    vm.send(&format!(
        "poison-victim -n -p {} >/dev/null 2>&1; echo \"OOMTOUCH:$?:\"\n",
        (free + 48) << 8
    ));
    let deadline = Instant::now() + T + Duration::from_secs(3 * (free + 48));
    let paused = loop {
        let m = api_ok(&vm, "GET", "/memory", None);
        if m["oom"]["state"] == "paused" {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the pool never ran dry (deflate-on-OOM did not happen?): {m:#}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(u(&paused, &["oom", "waiting_faults"]) >= 1, "{paused:#}");
    let s = balloon_stats(&vm);
    assert!(
        u(&s, &["actual_pages"]) < BALLOON_MIB << 8,
        "paused although the balloon gave nothing back: {s:#}"
    );
    // Still paused a while later: nothing else frees frames.
    std::thread::sleep(Duration::from_secs(2));
    let m = api_ok(&vm, "GET", "/memory", None);
    assert_eq!(m["oom"]["state"], "paused", "{m:#}");
    api_ok(&vm, "PATCH", "/memory", Some(r#"{"pool_mib": 256}"#));
    let code = loop {
        let l = guest_line(&mut vm, deadline)
            .unwrap_or_else(|| panic!("the allocation did not finish after the pool grew"));
        if let Some(rest) = l.strip_prefix("OOMTOUCH:") {
            break rest.trim_end_matches(':').parse::<i64>().unwrap_or(-1);
        }
    };
    assert_eq!(code, 0, "the allocating process");
    let m = api_ok(&vm, "GET", "/memory", None);
    assert_eq!(m["oom"]["state"], "running", "{m:#}");
    assert!(u(&m, &["oom", "resumed_faults"]) >= 1, "{m:#}");
    let oom = dmesg_grep(&mut vm, &["out of memory", "oom-kill", "killed process"]);
    assert!(oom.is_empty(), "the guest's OOM killer ran: {oom:?}");
    let check = api_ok(&vm, "GET", "/memory/check", None);
    assert_eq!(check["ok"], true, "{check:#}");
    poweroff(vm);
}

/// `--on-oom fail` with a Linux guest: the pool runs dry while a process
/// allocates, `vmm` ends with status 73 and its message, and it really ends:
/// before teardown released the fault still waiting (a KVM async-page-fault
/// work item), the process hung in an unkillable sleep destroying the VM.
#[test]
fn overcommit_fail_ends_vmm_with_73() {
    require_kvm!();
    let Some(g) = guest(module_path!()) else {
        return;
    };
    let mut vm = g.boot(
        "linux-full-oom-fail",
        1,
        MEM_MIB,
        &["--mem-pool", "64", "--on-oom", "fail"],
    );
    vm.send("poison-victim -n -p 32768 >/dev/null 2>&1\n");
    let (code, _, err) = vm.finish(T);
    assert_eq!(code, 73, "{err}");
    assert!(
        err.contains("frame pool of 64 MiB") && err.contains("--mem-pool"),
        "{err}"
    );
}
