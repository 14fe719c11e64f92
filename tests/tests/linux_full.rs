//! Linux tier with user space (needs hardware-speed KVM): resources/linux's
//! kernel + initramfs booted to the `vmm-guest# ` shell with 1 and 2 vCPUs,
//! balloon inflate/deflate seen inside (/proc/meminfo MemTotal and MemFree,
//! the driver's sysfs, /proc/vmstat) and from the host (VmRSS, the balloon's
//! release counters), hard poison of `poison-victim`'s page ending in SIGBUS
//! BUS_MCEERR_AR, the victim's own exit status 3 and the kernel's
//! "recovery action for ... LRU page: Recovered" verdict, soft poison the
//! guest never notices, and `poweroff` ending `vmm` with status 0.
//!
//! On a host whose KVM emulates guest ring 0 (nested PVM, see
//! shared/HOST.md) Linux user space cannot run, so every test here skips
//! with the probe's numbers — also under CI=true, because the host class
//! decides, not a missing /dev/kvm. tests/linux_smoke.rs covers what such a
//! host can run. On a bare-metal host: `scripts/test-linux-tier.sh`.
//!
//! The serial console carries both the shell's output and the kernel's
//! console messages, and with 2 vCPUs a kernel message can be printed in
//! the middle of a shell line. Two defences: right after boot the test sets
//! the console log level to [`CONSOLE_LOGLEVEL`] (`dmesg -n`), so only
//! critical messages reach the console later (the kernel's log is read
//! with `dmesg` where a test needs it), and every line is read through
//! [`guest_line`], which cuts kernel records out of shell lines and joins
//! the pieces again. Markers are matched anywhere in a line and are
//! computed by the shell, so the echo of the typed command never matches.

use std::time::{Duration, Instant};

use vmm_tests::{field, host_info, linux_guest, require_kvm, ring0_emulated, rss_bytes, Vmm};

const T: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;
/// Guest RAM of every boot here.
const MEM_MIB: u64 = 256;
/// Console log level once the shell is up: only messages below it (emerg,
/// alert, crit: panics, oopses, `reboot: Restarting system`) still reach
/// the serial console. `Memory failure: ...`, MCE and balloon messages are
/// KERN_ERR or lower and are read with `dmesg`.
const CONSOLE_LOGLEVEL: u32 = 3;

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

/// Where a kernel console record (`[<seconds>.<6 digits>] `, CONFIG_PRINTK_TIME)
/// starts in `s` after its first byte, if one does. A record at index 0 is
/// a whole line (or a `dmesg` output line) and is left alone.
fn kernel_record_after_start(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    (1..b.len()).find(|&i| {
        if b[i] != b'[' {
            return false;
        }
        let mut j = i + 1;
        while j < b.len() && b[j] == b' ' {
            j += 1;
        }
        let int = j;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        if j == int || j >= b.len() || b[j] != b'.' {
            return false;
        }
        let frac = j + 1;
        j = frac;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        j - frac == 6 && b[j..].starts_with(b"] ")
    })
}

/// Feeds one raw serial line; returns the guest line it completes, if any.
/// The kernel writes a console record (up to its newline) under the UART's
/// lock, so a shell line `abcdef` interrupted by a record arrives as
/// `abc[    5.123456] some message` + `def`: the record is cut out and
/// `abc` waits in `pending` for the rest of its line.
fn splice(pending: &mut String, raw: &str) -> Option<String> {
    pending.push_str(raw);
    match kernel_record_after_start(pending) {
        Some(at) => {
            pending.truncate(at);
            None
        }
        None => Some(std::mem::take(pending)),
    }
}

/// The next line of guest output, with kernel console records that were
/// printed in the middle of it cut out ([`splice`]).
fn guest_line(vm: &mut Vmm, deadline: Instant) -> Option<String> {
    let mut pending = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Some(l) = splice(&mut pending, &vm.next_line(left)?) {
            return Some(l);
        }
    }
}

/// Wait for a guest line containing `needle`; returns it.
fn wait_guest(vm: &mut Vmm, needle: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        match guest_line(vm, deadline) {
            Some(l) if l.contains(needle) => return l,
            Some(_) => {}
            None => panic!(
                "no line containing {needle:?} within {T:?}; log:\n{}",
                vm.seen().join("\n")
            ),
        }
    }
}

/// Boot the guest, wait for the initramfs to be ready and quiet the console.
fn boot(name: &str, vcpus: u32, extra: &[&str]) -> Option<Vmm> {
    let (kernel, initrd) = linux_guest(name)?;
    let v = vcpus.to_string();
    let mem = MEM_MIB.to_string();
    let mut args = vec![
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--vcpus",
        &v,
        "--mem",
        &mem,
    ];
    args.extend_from_slice(extra);
    let mut vm = Vmm::start(name, &args);
    let l = wait_guest(&mut vm, "VMM-GUEST vcpus:");
    assert!(l.contains(&format!("nproc={vcpus}")), "{l}");
    wait_guest(&mut vm, "VMM-GUEST ready");
    let out = shell(
        &mut vm,
        &format!("dmesg -n {CONSOLE_LOGLEVEL}; cat /proc/sys/kernel/printk"),
    );
    let level = CONSOLE_LOGLEVEL.to_string();
    assert!(
        out.iter()
            .any(|l| l.split_whitespace().next() == Some(level.as_str())
                && l.split_whitespace().count() == 4),
        "console log level: {out:?}"
    );
    Some(vm)
}

static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Run `cmd` in the guest shell and return its output lines (everything
/// read before the end marker, the echo of the typed command included).
/// The marker `:DONE:<n>:` is computed by the shell (`$(( ... ))`), so the
/// echoed command line does not contain it; it is found anywhere in a line
/// (text before it, output without a final newline, is kept).
fn shell(vm: &mut Vmm, cmd: &str) -> Vec<String> {
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1000;
    let sep = if cmd.trim_end().ends_with('&') {
        " "
    } else {
        "; "
    };
    vm.send(&format!("{cmd}{sep}echo \":DONE:$(( {n} + 0 )):\"\n"));
    let done = format!(":DONE:{n}:");
    let mut out = Vec::new();
    let deadline = Instant::now() + T;
    loop {
        let l = guest_line(vm, deadline)
            .unwrap_or_else(|| panic!("{cmd}: no {done}; log:\n{}", vm.seen().join("\n")));
        if let Some(at) = l.find(&done) {
            if at > 0 {
                out.push(l[..at].to_string());
            }
            return out;
        }
        out.push(l);
    }
}

/// `key` of /proc/meminfo in kB.
fn meminfo_kib(vm: &mut Vmm, key: &str) -> u64 {
    let out = shell(vm, &format!("grep '^{key}:' /proc/meminfo"));
    let l = out
        .iter()
        .find(|l| l.starts_with(&format!("{key}:")))
        .unwrap_or_else(|| panic!("{key}: {out:?}"));
    l.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `key` of /proc/vmstat.
fn vmstat(vm: &mut Vmm, key: &str) -> u64 {
    let out = shell(vm, &format!("grep '^{key} ' /proc/vmstat"));
    let l = out
        .iter()
        .find(|l| l.starts_with(&format!("{key} ")))
        .unwrap_or_else(|| panic!("{key}: {out:?}"));
    l.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The number after `key=` anywhere in `lines` (skipping occurrences not
/// followed by a number, e.g. the echo of `echo key=$?`).
fn number_after(lines: &[String], key: &str) -> Option<u64> {
    lines.iter().find_map(|l| {
        l.match_indices(key).find_map(|(i, _)| {
            let rest = &l[i + key.len()..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        })
    })
}

/// Touch all but `leave_mib` MiB of the guest's free RAM (MemFree) in a
/// process that then exits: its pages go back to the guest's free lists,
/// the host keeps them populated. `poison-victim -n` maps the pages with
/// MAP_POPULATE, writes and checks a pattern in each and exits 0; unlike a
/// tmpfs file it is not capped at half of RAM (/tmp's default size).
/// Returns the MiB touched.
fn touch_guest_ram(vm: &mut Vmm, leave_mib: u64) -> u64 {
    let mib = (meminfo_kib(vm, "MemFree") >> 10) - leave_mib;
    let out = shell(
        vm,
        &format!(
            "poison-victim -n -p {} >/dev/null 2>&1; echo \"TOUCH-EXIT=$?\"",
            mib << 8
        ),
    );
    assert_eq!(
        number_after(&out, "TOUCH-EXIT="),
        Some(0),
        "poison-victim -n -p {}: {out:?}",
        mib << 8
    );
    mib
}

fn balloon_stats(vm: &Vmm) -> serde_json::Value {
    let (st, s) = vm.api("GET", "/balloon/statistics", None);
    assert_eq!(st, 200, "{s}");
    s
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

#[test]
fn balloon_inflate_deflate_inside_and_outside() {
    require_kvm!();
    if !hardware_tier(module_path!()) {
        return;
    }
    const BALLOON_MIB: u64 = 128;
    const PAGES: u64 = BALLOON_MIB << 8;
    // MemFree moves by the balloon give or take this much (page cache,
    // slab, the shell's own processes).
    const SLACK_KIB: u64 = 16 << 10;
    let Some(mut vm) = boot(
        "linux-full-balloon",
        2,
        &[
            "--balloon",
            "amount_mib=0,deflate_on_oom=false,stats_polling_interval_s=1,free_page_reporting=false",
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

    let (st, b) = vm.api(
        "PATCH",
        "/balloon",
        Some(&format!(r#"{{"amount_mib": {BALLOON_MIB}}}"#)),
    );
    assert_eq!(st, 204, "{b}");
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
    let c = &s["counters"];
    let released = c["released_frames"].as_u64().unwrap();
    let unpopulated = c["unpopulated_pages"].as_u64().unwrap();
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
    let (st, b) = vm.api("PATCH", "/balloon", Some(r#"{"amount_mib": 0}"#));
    assert_eq!(st, 204, "{b}");
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
    let regrow = released * 4096 - (FREE_LEFT_MIB + 8) * MIB;
    assert!(
        rss2 >= rss1 + regrow,
        "VmRSS {} -> {} MiB after the guest reused the deflated memory: expected >= +{} MiB",
        rss1 / MIB,
        rss2 / MIB,
        regrow / MIB
    );
    poweroff(vm);
}

/// A `poison-victim -p 4` running in the background of the guest shell.
struct Victim {
    pid: u64,
    vaddr: u64,
    paddr: u64,
}

/// Start `poison-victim -p 4` in a background subshell that appends the
/// victim's own exit status (`$?` of the simple command: its exit code, or
/// 128 + the signal that killed it) to its log; wait until it is ready.
fn start_victim(vm: &mut Vmm) -> Victim {
    // fd 3 keeps a writer open, so the victim's read() waits for a line
    // instead of seeing EOF.
    shell(vm, "mkfifo /tmp/victim.fifo; exec 3<>/tmp/victim.fifo");
    shell(
        vm,
        "(poison-victim -p 4 </tmp/victim.fifo >/tmp/victim.log 2>&1; \
         echo \"VICTIM-EXIT=$?\" >>/tmp/victim.log) &",
    );
    let deadline = Instant::now() + T;
    loop {
        let out = shell(vm, "cat /tmp/victim.log");
        if let Some(r) = out
            .iter()
            .find_map(|l| l.find("VICTIM READY").map(|i| &l[i..]))
        {
            let v = Victim {
                pid: field(r, "pid").expect("pid"),
                vaddr: field(r, "vaddr").expect("vaddr"),
                paddr: field(r, "paddr").expect("paddr"),
            };
            assert_ne!(v.paddr, 0, "no physical address (pagemap): {out:?}");
            return v;
        }
        assert!(Instant::now() < deadline, "victim not ready: {out:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Wake the victim (a newline on its stdin), wait for its subshell, and
/// return its log and its own exit status.
fn finish_victim(vm: &mut Vmm) -> (Vec<String>, u64) {
    shell(vm, "echo > /tmp/victim.fifo; wait");
    let log = shell(vm, "cat /tmp/victim.log");
    let code = number_after(&log, "VICTIM-EXIT=")
        .unwrap_or_else(|| panic!("no exit status in the victim's log: {log:?}"));
    (log, code)
}

/// The kernel's memory-failure and machine-check lines (`dmesg`).
fn dmesg_memory_failure(vm: &mut Vmm) -> Vec<String> {
    shell(
        vm,
        "dmesg | grep -i -e 'memory failure' -e 'memory error' -e 'mce'",
    )
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
    let v = start_victim(&mut vm);
    let body = format!(
        r#"{{"gpa": {}, "kind": "hard", "action": "required"}}"#,
        v.paddr
    );
    let (st, rep) = vm.api("POST", "/memory/poison", Some(&body));
    assert_eq!(st, 200, "{rep}");
    let (log, code) = finish_victim(&mut vm);
    let dmesg = dmesg_memory_failure(&mut vm);
    let ctx = format!(
        "victim log:\n{}\ndmesg:\n{}",
        log.join("\n"),
        dmesg.join("\n")
    );

    // The victim: exactly one SIGBUS, action required, for page 0 at the
    // address it was told, then the other pages intact and exit 3.
    // (The handler writes "SIGBUS <si_code name> ..." at the start of a
    // line; "VICTIM survived SIGBUS ..." is the main program's.)
    let sigbus: Vec<&str> = log
        .iter()
        .filter(|l| l.starts_with("SIGBUS "))
        .map(String::as_str)
        .collect();
    assert_eq!(sigbus.len(), 1, "{ctx}");
    let s = sigbus[0];
    assert!(s.starts_with("SIGBUS BUS_MCEERR_AR si_code=4 "), "{ctx}");
    assert_eq!(field(s, "si_addr"), Some(v.vaddr), "{ctx}");
    assert_eq!(field(s, "si_addr_lsb"), Some(12), "{ctx}");
    assert_eq!(field(s, "page"), Some(0), "{ctx}");
    assert!(
        log.iter()
            .any(|l| l.contains("VICTIM survived SIGBUS on page 0")),
        "{ctx}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("VICTIM RECOVERED: other pages intact")),
        "{ctx}"
    );
    assert_eq!(
        code, 3,
        "the victim's exit status (3 = recovered from BUS_MCEERR_AR): {ctx}"
    );

    // The kernel (mm/memory-failure.c, pr_fmt "Memory failure: "): the
    // victim was signalled, and the page (anonymous, on the LRU) was
    // isolated with the verdict "Recovered".
    let pfn = format!("Memory failure: {:#x}: ", v.paddr >> 12);
    assert!(
        dmesg.iter().any(|l| l.contains(&format!(
            "{pfn}Sending SIGBUS to poison-victim:{} due to hardware memory corruption",
            v.pid
        ))),
        "{ctx}"
    );
    let verdict = dmesg
        .iter()
        .find(|l| l.contains(&format!("{pfn}recovery action for ")))
        .unwrap_or_else(|| panic!("no recovery verdict for {pfn}: {ctx}"));
    assert!(
        verdict.trim_end().ends_with("LRU page: Recovered"),
        "{verdict}: {ctx}"
    );
    assert!(
        !dmesg
            .iter()
            .any(|l| l.contains("Memory error not recovered") || l.contains("forcibly killing")),
        "{ctx}"
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
    let v = start_victim(&mut vm);
    let body = format!(r#"{{"gpa": {}, "kind": "soft"}}"#, v.paddr);
    let (st, rep) = vm.api("POST", "/memory/poison", Some(&body));
    assert_eq!(st, 200, "{rep}");
    let (log, code) = finish_victim(&mut vm);
    let text = log.join("\n");
    assert!(text.contains("VICTIM touch ok: all pages intact"), "{text}");
    assert!(!text.contains("SIGBUS"), "{text}");
    assert_eq!(code, 0, "the victim's exit status: {text}");
    let dmesg = dmesg_memory_failure(&mut vm);
    assert!(
        !dmesg.iter().any(|l| l.contains("Memory failure:")),
        "{dmesg:?}"
    );
    assert_eq!(meminfo_kib(&mut vm, "HardwareCorrupted"), 0);
    let (_, c) = vm.api("GET", "/memory/check", None);
    assert_eq!(c["ok"], true, "{c:#}");
    poweroff(vm);
}

/// The console splicing on made-up serial lines (no VM needed).
#[test]
fn console_splicing_cuts_kernel_records_out_of_shell_lines() {
    let feed = |raw: &[&str]| -> Vec<String> {
        let mut pending = String::new();
        let out = raw.iter().filter_map(|r| splice(&mut pending, r)).collect();
        assert_eq!(pending, "", "{raw:?}");
        out
    };
    // A record in the middle of the end marker.
    assert_eq!(
        feed(&[":DONE:10[   12.345678] random: crng init done", "00:"]),
        [":DONE:1000:"]
    );
    // Two records back to back inside one shell line.
    assert_eq!(
        feed(&["VICTIM RE[    3.000001] a", "[    3.000002] b", "ADY pid=5"]),
        ["VICTIM READY pid=5"]
    );
    // A record right before the shell line's newline.
    assert_eq!(feed(&["MemFree: 1 kB[ 1.000000] x", ""]), ["MemFree: 1 kB"]);
    // Whole lines stay: kernel records and `dmesg` output start at 0;
    // a `dmesg` line interrupted by a live record is joined again.
    assert_eq!(
        feed(&[
            "[    1.000000] whole record",
            "[    2.000000] Memory fa[    9.000000] live",
            "ilure: 0x1: x",
            "[1]+  Done  poison-victim",
            "vmm-guest# echo [1.5] x",
        ]),
        [
            "[    1.000000] whole record",
            "[    2.000000] Memory failure: 0x1: x",
            "[1]+  Done  poison-victim",
            "vmm-guest# echo [1.5] x",
        ]
    );
    assert_eq!(
        number_after(&["echo \"X=$?\"".into(), "X=135".into()], "X="),
        Some(135)
    );
}
