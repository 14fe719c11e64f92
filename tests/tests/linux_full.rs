//! Linux tier with user space (needs hardware-speed KVM): resources/linux's
//! kernel + initramfs booted to the `vmm-guest# ` shell with 1 and 2 vCPUs,
//! balloon inflate/deflate seen inside (/proc/meminfo, the driver's sysfs,
//! /proc/vmstat) and from the host (VmRSS, guestmem), hard poison of
//! `poison-victim`'s page ending in SIGBUS BUS_MCEERR_AR and the kernel's
//! recovery, soft poison the guest never notices, and `poweroff` ending
//! `vmm` with status 0.
//!
//! On a host whose KVM emulates guest ring 0 (nested PVM, see
//! shared/HOST.md) Linux user space cannot run, so every test here skips
//! with the probe's numbers — also under CI=true, because the host class
//! decides, not a missing /dev/kvm. tests/linux_smoke.rs covers what such a
//! host can run. On a bare-metal host: `scripts/test-linux-tier.sh`.

use std::time::{Duration, Instant};

use vmm_tests::{field, host_info, linux_guest, require_kvm, ring0_emulated, rss_bytes, Vmm};

const T: Duration = Duration::from_secs(120);

/// True when this host can run the tier; prints the skip reason otherwise.
fn hardware_tier(test: &str) -> bool {
    if ring0_emulated() {
        let i = host_info();
        eprintln!(
            "SKIP {test}: this host's KVM emulates guest ring 0 (probe: {} ring-0 iterations/s, \
             hardware threshold {}), where Linux user space cannot run (a ring-3 `syscall` stays \
             in ring 3). The host class, not a missing /dev/kvm, decides this skip, so it applies \
             under CI=true too. Run scripts/test-linux-tier.sh on a bare-metal host; \
             tests/linux_smoke.rs covers this host.",
            i["ring0_iterations_per_s"], i["hardware_threshold_iterations_per_s"]
        );
        return false;
    }
    true
}

/// Boot the guest and wait for the initramfs to be ready.
fn boot(name: &str, vcpus: u32, extra: &[&str]) -> Option<Vmm> {
    let (kernel, initrd) = linux_guest(name)?;
    let v = vcpus.to_string();
    let mut args = vec![
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--vcpus",
        &v,
        "--mem",
        "256",
    ];
    args.extend_from_slice(extra);
    let mut vm = Vmm::start(name, &args);
    let l = vm.wait_line("VMM-GUEST vcpus:", T);
    assert!(l.contains(&format!("nproc={vcpus}")), "{l}");
    vm.wait_line("VMM-GUEST ready", T);
    shell(&mut vm, "true");
    Some(vm)
}

static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Run `cmd` in the guest shell and return its output lines (up to a
/// marker echoed after it; the marker is computed by the shell, so the
/// echoed command line does not match it).
fn shell(vm: &mut Vmm, cmd: &str) -> Vec<String> {
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    vm.send(&format!("{cmd}; echo DONE-$(( {n} + 1000 ))\n"));
    let done = format!("DONE-{}", n + 1000);
    let mut out = Vec::new();
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let l = vm
            .next_line(left)
            .unwrap_or_else(|| panic!("{cmd}: no {done}; log:\n{}", vm.seen().join("\n")));
        if l.trim_end() == done || (l.ends_with(&done) && !l.contains("echo")) {
            return out;
        }
        out.push(l);
    }
}

fn meminfo_kib(vm: &mut Vmm, key: &str) -> u64 {
    let out = shell(vm, &format!("grep '^{key}:' /proc/meminfo"));
    let l = out
        .iter()
        .find(|l| l.starts_with(&format!("{key}:")))
        .unwrap_or_else(|| panic!("{key}: {out:?}"));
    l.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn vmstat(vm: &mut Vmm, key: &str) -> u64 {
    let out = shell(vm, &format!("grep '^{key} ' /proc/vmstat"));
    let l = out
        .iter()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("{key}: {out:?}"));
    l.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn balloon_actual(vm: &Vmm) -> u64 {
    let (st, s) = vm.api("GET", "/balloon/statistics", None);
    assert_eq!(st, 200, "{s}");
    s["actual_pages"].as_u64().unwrap()
}

fn wait_balloon(vm: &Vmm, pages: u64) {
    let deadline = Instant::now() + T;
    while balloon_actual(vm) != pages {
        assert!(
            Instant::now() < deadline,
            "balloon did not reach {pages} pages"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn poweroff(mut vm: Vmm) {
    vm.send("poweroff\n");
    let (code, log, err) = vm.finish(T);
    assert_eq!(code, 0, "poweroff must end vmm with 0: {err}\n{log}");
    assert!(log.contains("reboot: Restarting system"), "{log}");
}

#[test]
fn boots_to_shell_with_1_and_2_vcpus_and_powers_off() {
    require_kvm!();
    if !hardware_tier(module_path!()) {
        return;
    }
    for vcpus in [1, 2] {
        let Some(mut vm) = boot(&format!("linux-full-{vcpus}"), vcpus, &[]) else {
            return;
        };
        let out = shell(&mut vm, "cat /sys/devices/system/cpu/online; uname -r");
        let want = if vcpus == 1 { "0" } else { "0-1" };
        assert!(out.iter().any(|l| l.trim() == want), "{out:?}");
        assert!(out.iter().any(|l| l.starts_with("6.1.")), "{out:?}");
        poweroff(vm);
    }
}

#[test]
fn balloon_inflate_deflate_inside_and_outside() {
    require_kvm!();
    if !hardware_tier(module_path!()) {
        return;
    }
    let Some(mut vm) = boot(
        "linux-full-balloon",
        2,
        &[
            "--balloon",
            "amount_mib=0,deflate_on_oom=false,stats_polling_interval_s=1",
        ],
    ) else {
        return;
    };
    let report = shell(&mut vm, "guest-report");
    assert!(
        report
            .iter()
            .any(|l| l.contains("VMM-GUEST balloon: virtio0 driver=virtio_balloon driver_ok=yes")),
        "{report:?}"
    );
    let feats = shell(&mut vm, "cat /sys/bus/virtio/devices/virtio0/features");
    assert!(
        feats.iter().any(|l| l.starts_with("01")),
        "STATS_VQ negotiated: {feats:?}"
    );
    // Populate most of guest RAM (tmpfs), then free it in the guest.
    shell(
        &mut vm,
        "dd if=/dev/zero of=/tmp/fill bs=1M count=160 2>/dev/null; rm /tmp/fill",
    );
    let total0 = meminfo_kib(&mut vm, "MemTotal");
    let inflate0 = vmstat(&mut vm, "balloon_inflate");
    let rss0 = rss_bytes(vm.pid()).unwrap();
    let (st, b) = vm.api("PATCH", "/balloon", Some(r#"{"amount_mib": 128}"#));
    assert_eq!(st, 204, "{b}");
    wait_balloon(&vm, 128 << 8);
    // Inside: MemTotal drops by the balloon (no DEFLATE_ON_OOM), vmstat counts it.
    let total1 = meminfo_kib(&mut vm, "MemTotal");
    assert_eq!(
        total0 - total1,
        128 << 10,
        "MemTotal {total0} -> {total1} kB"
    );
    assert_eq!(vmstat(&mut vm, "balloon_inflate") - inflate0, 128 << 8);
    // Host: the populated frames behind the balloon went back.
    let rss1 = rss_bytes(vm.pid()).unwrap();
    assert!(
        rss0 >= rss1 + (96 << 20),
        "VmRSS {rss0} -> {rss1}: expected >= 96 MiB released"
    );
    let (_, s) = vm.api("GET", "/balloon/statistics", None);
    assert_eq!(s["ballooned_pages"], 128 << 8, "{s}");
    // Deflate: the guest gets its memory back.
    let (st, b) = vm.api("PATCH", "/balloon", Some(r#"{"amount_mib": 0}"#));
    assert_eq!(st, 204, "{b}");
    wait_balloon(&vm, 0);
    assert_eq!(meminfo_kib(&mut vm, "MemTotal"), total0);
    assert_eq!(vmstat(&mut vm, "balloon_deflate"), 128 << 8);
    shell(
        &mut vm,
        "dd if=/dev/zero of=/tmp/fill bs=1M count=160 2>/dev/null; rm /tmp/fill",
    );
    poweroff(vm);
}

/// Start `poison-victim` in the background of the shell; returns its paddr.
fn start_victim(vm: &mut Vmm) -> u64 {
    vm.send("poison-victim -p 4 > /tmp/victim.log 2>&1 < /tmp/victim.fifo &\n");
    let deadline = Instant::now() + T;
    loop {
        let out = shell(vm, "cat /tmp/victim.log");
        if let Some(l) = out.iter().find(|l| l.starts_with("VICTIM READY")) {
            return field(l, "paddr").expect("paddr");
        }
        assert!(Instant::now() < deadline, "victim not ready: {out:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Wake the victim (newline on its stdin) and return its log once it ended.
fn finish_victim(vm: &mut Vmm) -> Vec<String> {
    shell(vm, "echo > /tmp/victim.fifo; wait");
    shell(vm, "cat /tmp/victim.log; echo VICTIM-EXIT-$?")
}

#[test]
fn hard_poison_sigbus_and_recovery() {
    require_kvm!();
    if !hardware_tier(module_path!()) {
        return;
    }
    let Some(mut vm) = boot("linux-full-hard", 2, &[]) else {
        return;
    };
    shell(&mut vm, "mkfifo /tmp/victim.fifo; exec 3<>/tmp/victim.fifo");
    let paddr = start_victim(&mut vm);
    let body = format!(r#"{{"gpa": {paddr}, "kind": "hard", "action": "required"}}"#);
    let (st, rep) = vm.api("POST", "/memory/poison", Some(&body));
    assert_eq!(st, 200, "{rep}");
    let log = finish_victim(&mut vm).join("\n");
    assert!(log.contains("SIGBUS BUS_MCEERR_AR"), "{log}");
    assert!(
        log.contains("VICTIM RECOVERED: other pages intact"),
        "{log}"
    );
    let dmesg = shell(&mut vm, "dmesg | grep 'Memory failure'").join("\n");
    assert!(
        dmesg.contains(&format!("Memory failure: {:#x}:", paddr >> 12)),
        "{dmesg}"
    );
    let hc = meminfo_kib(&mut vm, "HardwareCorrupted");
    assert_eq!(hc, 4, "HardwareCorrupted {hc} kB");
    let (_, m) = vm.api("GET", "/memory", None);
    assert!(m["frames"]["poisoned"].as_u64().unwrap() >= 1, "{m:#}");
    poweroff(vm);
}

#[test]
fn soft_poison_is_invisible_to_the_guest() {
    require_kvm!();
    if !hardware_tier(module_path!()) {
        return;
    }
    let Some(mut vm) = boot("linux-full-soft", 2, &[]) else {
        return;
    };
    shell(&mut vm, "mkfifo /tmp/victim.fifo; exec 3<>/tmp/victim.fifo");
    let paddr = start_victim(&mut vm);
    let body = format!(r#"{{"gpa": {paddr}, "kind": "soft"}}"#);
    let (st, rep) = vm.api("POST", "/memory/poison", Some(&body));
    assert_eq!(st, 200, "{rep}");
    let log = finish_victim(&mut vm).join("\n");
    assert!(log.contains("VICTIM touch ok: all pages intact"), "{log}");
    assert!(!log.contains("SIGBUS"), "{log}");
    assert_eq!(meminfo_kib(&mut vm, "HardwareCorrupted"), 0);
    let (_, c) = vm.api("GET", "/memory/check", None);
    assert_eq!(c["ok"], true, "{c:#}");
    poweroff(vm);
}
