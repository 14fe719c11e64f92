//! Guest RAM served by guestmem through the shadow EPT, through the real
//! binary: demand paging, hard poison (action required / optional) ending in
//! a machine check the guest survives, soft offline under load, the
//! invariant checker and the counters.

use std::time::Duration;

use vmm_tests::{field, require_kvm, rss_bytes, run_vmm, Vmm};

const T: Duration = Duration::from_secs(90);

const MCI_STATUS_VAL: u64 = 1 << 63;
const MCI_STATUS_UC: u64 = 1 << 61;
const MCI_STATUS_EN: u64 = 1 << 60;
const MCI_STATUS_MISCV: u64 = 1 << 59;
const MCI_STATUS_ADDRV: u64 = 1 << 58;
const MCI_STATUS_S: u64 = 1 << 56;
const MCI_STATUS_AR: u64 = 1 << 55;
const MCI_STATUS_DEFERRED: u64 = 1 << 44;
const MCI_STATUS_POISON: u64 = 1 << 43;
const MCG_STATUS_RIPV: u64 = 1;
const MCG_STATUS_EIPV: u64 = 2;
const MCG_STATUS_MCIP: u64 = 4;

fn host_is_amd() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .contains("AuthenticAMD")
}

#[test]
fn demand_paging_patterns_keep_contents() {
    require_kvm!();
    for pattern in ["seq", "random", "huge", "unaligned"] {
        let cmdline = format!("pattern={pattern} verify=1 mib=48 hold=1");
        let mut vm = Vmm::start(
            &format!("touch-{pattern}"),
            &["--guest", "touch", "--mem", "128", "--cmdline", &cmdline],
        );
        vm.wait_line("touch: holding", T);
        // Host side, with the guest's 48 MiB touched: the three views agree
        // page by page, and guestmem's counters match the pool's host
        // memory and the process's RSS.
        let (st, check) = vm.api("GET", "/memory/check", None);
        assert_eq!(st, 200, "{check}");
        assert_eq!(check["ok"], true, "{pattern}: {check:#}");
        let mapped = check["ept_mapped"].as_u64().unwrap();
        assert!(mapped >= 48 * 256, "{pattern}: {check}");
        assert_eq!(check["view_mapped"], mapped, "{pattern}: {check}");
        let (_, mem) = vm.api("GET", "/memory", None);
        let resident = mem["resident_bytes"].as_u64().unwrap();
        let allocated = mem["frames"]["allocated"].as_u64().unwrap() * 4096;
        assert!(
            resident.abs_diff(allocated) <= 4 << 20,
            "{pattern}: pool holds {resident}, guestmem allocated {allocated}: {mem:#}"
        );
        let rss = rss_bytes(vm.pid()).expect("VmRSS");
        assert!(
            rss >= resident && rss <= resident + (64 << 20),
            "{pattern}: VmRSS {rss} vs guest RAM resident {resident}"
        );
        vm.send("done\n");
        let (code, out, err) = vm.finish(T);
        assert_eq!(code, 0, "{pattern}: {out}\n{err}");
        assert!(out.contains("touch: ok"), "{pattern}: {out}");
        assert!(out.contains("signature_ok=1"), "{pattern}: {out}");
    }
}

#[test]
fn checker_and_counters_agree_with_the_host() {
    require_kvm!();
    let mut vm = Vmm::start(
        "memcheck",
        &["--guest", "soft", "--mem", "128", "--cmdline", "mib=16"],
    );
    vm.wait_line("soft: ready", T);
    let (st, check) = vm.api("GET", "/memory/check", None);
    assert_eq!(st, 200, "{check}");
    assert_eq!(check["ok"], true, "{check:#}");
    assert!(check["ept_mapped"].as_u64().unwrap() >= 16 * 256, "{check}");
    assert_eq!(check["ept_mapped"], check["view_mapped"], "{check}");
    let (_, mem) = vm.api("GET", "/memory", None);
    assert_eq!(mem["backing"], "guestmem");
    let frames = &mem["frames"];
    // Host memory held by the pool matches what guestmem handed out (within 4 MiB).
    let resident = mem["resident_bytes"].as_u64().unwrap();
    let accounted =
        (frames["allocated"].as_u64().unwrap() + frames["pcp_cached"].as_u64().unwrap()) * 4096;
    assert!(
        resident <= accounted + (4 << 20),
        "resident {resident} accounted {accounted}: {mem:#}"
    );
    assert!(
        resident + (4 << 20) >= frames["mapped"].as_u64().unwrap() * 4096 / 2,
        "{mem:#}"
    );
    // Demand paging used 2 MiB extents.
    assert!(mem["pager"]["huge_faults"].as_u64().unwrap() > 0, "{mem:#}");
    assert!(
        mem["shadow_ept"]["installs_2m"].as_u64().unwrap() > 0,
        "{mem:#}"
    );
    vm.send("stop\n");
    let (code, out, err) = vm.finish(T);
    assert_eq!(code, 0, "{out}\n{err}");
}

fn poison_body(gpa: u64, kind: &str, action: &str) -> String {
    format!(r#"{{"gpa":{gpa},"kind":"{kind}","action":"{action}"}}"#)
}

/// `POST /memory/poison` of guest page `gpa`; returns (status, outcome, body).
fn post_poison(vm: &Vmm, gpa: u64, kind: &str, action: &str) -> (u16, String, serde_json::Value) {
    let (st, rep) = vm.api(
        "POST",
        "/memory/poison",
        Some(&poison_body(gpa, kind, action)),
    );
    let outcome = rep["outcome"].as_str().unwrap_or_default().to_string();
    (st, outcome, rep)
}

/// Start the `poison` guest (extra `vmm run` args) and wait until it names
/// its target page; returns the VM and the target GPA.
fn start_poison_guest(name: &str, args: &[&str]) -> (Vmm, u64) {
    let mut all = vec!["--guest", "poison"];
    all.extend_from_slice(args);
    let mut vm = Vmm::start(name, &all);
    let ready = vm.wait_line("poison: target gpa=", T);
    let gpa = field(&ready, "gpa").expect("target gpa");
    (vm, gpa)
}

/// Find the bank report line of the machine check for `gpa`.
fn mce_line(out: &str, gpa: u64) -> String {
    out.lines()
        .find(|l| l.contains(": mce cpu=") && field(l, "addr") == Some(gpa))
        .unwrap_or_else(|| panic!("no machine check for {gpa:#x} reported:\n{out}"))
        .to_string()
}

#[test]
fn hard_poison_action_required_raises_a_recoverable_machine_check() {
    require_kvm!();
    let (mut vm, gpa) = start_poison_guest("poison-ar", &["--mem", "64"]);
    let (st, _, rep) = post_poison(&vm, gpa, "hard", "required");
    assert_eq!(st, 200, "{rep}");
    assert_eq!(rep["outcome"], "mapped", "{rep}");
    // A second failure of the same page is reported, not handled again.
    let (st, _, rep2) = post_poison(&vm, gpa, "hard", "required");
    assert_eq!(
        (st, rep2["outcome"].as_str()),
        (200, Some("already_poisoned")),
        "{rep2}"
    );
    let (_, check) = vm.api("GET", "/memory/check", None);
    assert_eq!(check["ok"], true, "{check:#}");
    vm.send("go\n");
    let (code, out, err) = vm.finish(T);
    assert_eq!(code, 0, "guest must survive:\n{out}\n{err}");
    let l = mce_line(&out, gpa);
    let status = field(&l, "status").unwrap();
    let mcg = field(&l, "mcg_status").unwrap();
    assert_eq!(
        field(&l, "misc"),
        Some(0x8c),
        "physical address mode, LSB 12: {l}"
    );
    for bit in [
        MCI_STATUS_VAL,
        MCI_STATUS_UC,
        MCI_STATUS_EN,
        MCI_STATUS_MISCV,
        MCI_STATUS_ADDRV,
    ] {
        assert_ne!(status & bit, 0, "bit {bit:#x} missing: {l}");
    }
    if host_is_amd() {
        assert_ne!(status & MCI_STATUS_POISON, 0, "AMD: POISON: {l}");
        assert_eq!(
            status & MCI_STATUS_DEFERRED,
            0,
            "AMD AR is not deferred: {l}"
        );
    } else {
        assert_ne!(status & MCI_STATUS_S, 0, "{l}");
        assert_ne!(status & MCI_STATUS_AR, 0, "{l}");
        assert_eq!(status & 0xffff, 0x134, "{l}");
    }
    assert_eq!(
        mcg & (MCG_STATUS_MCIP | MCG_STATUS_EIPV),
        MCG_STATUS_MCIP | MCG_STATUS_EIPV,
        "{l}"
    );
    assert!(out.contains("poison: recovered"), "{out}");
    assert!(out.contains("poison: survived other_pages_ok=1"), "{out}");
}

#[test]
fn hard_poison_action_optional_is_reported_at_once() {
    require_kvm!();
    let (mut vm, gpa) = start_poison_guest(
        "poison-ao",
        &["--mem", "64", "--cmdline", "mode=ao wait_ms=20000"],
    );
    vm.send("go\n");
    // Either order is valid (a check that arrives before `go` counts too);
    // the pause makes the usual one, the guest already waiting, likely.
    std::thread::sleep(Duration::from_millis(300));
    // Through the CLI verb this time.
    let sock = vm.sock.to_str().unwrap().to_string();
    let gpa_hex = format!("{gpa:#x}");
    let ctl = run_vmm(
        &[
            "ctl",
            "--api-sock",
            &sock,
            "memory",
            "poison",
            "--gpa",
            &gpa_hex,
            "--action",
            "optional",
        ],
        b"",
        T,
    );
    assert_eq!(ctl.code(), 0, "{ctl:?}");
    assert!(ctl.stdout.contains("\"outcome\""), "{}", ctl.stdout);
    let (code, out, err) = vm.finish(T);
    assert_eq!(code, 0, "{out}\n{err}");
    let l = mce_line(&out, gpa);
    let status = field(&l, "status").unwrap();
    let mcg = field(&l, "mcg_status").unwrap();
    assert_eq!(mcg & 7, MCG_STATUS_MCIP | MCG_STATUS_RIPV, "{l}");
    assert_eq!(field(&l, "addr"), Some(gpa), "{l}");
    assert_eq!(field(&l, "misc"), Some(0x8c), "{l}");
    for bit in [
        MCI_STATUS_VAL,
        MCI_STATUS_EN,
        MCI_STATUS_MISCV,
        MCI_STATUS_ADDRV,
        MCI_STATUS_S,
    ] {
        assert_ne!(status & bit, 0, "bit {bit:#x} missing: {l}");
    }
    if host_is_amd() {
        assert_ne!(status & MCI_STATUS_DEFERRED, 0, "{l}");
        assert_ne!(status & MCI_STATUS_POISON, 0, "{l}");
        assert_eq!(status & MCI_STATUS_UC, 0, "{l}");
    } else {
        assert_eq!(status & MCI_STATUS_AR, 0, "{l}");
        assert_ne!(status & MCI_STATUS_UC, 0, "{l}");
        assert_eq!(status & 0xffff, 0xc0, "{l}");
    }
    assert!(out.contains("poison: survived"), "{out}");
}

#[test]
fn soft_offline_under_load_loses_no_data() {
    require_kvm!();
    let mut vm = Vmm::start(
        "soft",
        &["--guest", "soft", "--mem", "128", "--cmdline", "mib=8"],
    );
    let ready = vm.wait_line("soft: ready", T);
    let first = field(&ready, "first").unwrap();
    let last = field(&ready, "last").unwrap();
    let pages = (last - first) / 4096 + 1;
    let mut migrated = 0;
    for i in 0..24 {
        let gpa = first + (i * 97 % pages) * 4096;
        let (st, rep) = vm.api(
            "POST",
            "/memory/poison",
            Some(&format!(r#"{{"gpa":{gpa},"kind":"soft"}}"#)),
        );
        assert_eq!(st, 200, "{rep}");
        migrated += u32::from(rep["outcome"] == "migrated");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(migrated >= 20, "{migrated} of 24 soft offlines migrated");
    let (_, check) = vm.api("GET", "/memory/check", None);
    assert_eq!(check["ok"], true, "{check:#}");
    let (_, mem) = vm.api("GET", "/memory", None);
    assert!(
        mem["frames"]["soft_offlined"].as_u64().unwrap() >= u64::from(migrated),
        "{mem:#}"
    );
    vm.send("stop\n");
    let (code, out, err) = vm.finish(T);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains(" ok"), "{out}");
    assert!(
        !out.contains(": mce "),
        "soft offline must be invisible to the guest: {out}"
    );
}

#[test]
fn poison_requests_are_validated() {
    require_kvm!();
    let mut vm = Vmm::start("poison-bad", &["--guest", "echo", "--mem", "64"]);
    vm.wait_line("echo: ready", T);
    for (body, want) in [
        (r#"{"gpa":4097,"kind":"hard"}"#, "not 4 KiB aligned"),
        (r#"{"gpa":17179869184,"kind":"hard"}"#, "not guest RAM"),
        (r#"{"gpa":4096,"kind":"melt"}"#, "unknown variant"),
        (r#"{"gpa":4096,"kind":"hard","extra":1}"#, "unknown field"),
    ] {
        let (st, v) = vm.api("POST", "/memory/poison", Some(body));
        assert_eq!(st, 400, "{body}: {v}");
        let msg = v["fault_message"].as_str().unwrap_or_default();
        assert!(msg.contains(want), "{body}: {msg}");
    }
    vm.send("still alive\n");
    let (code, out, _) = vm.finish(T);
    assert_eq!(code, 0);
    assert!(out.contains("echo: still alive"));
}

#[test]
fn anonymous_backing_runs_the_same_guests() {
    require_kvm!();
    let out = run_vmm(
        &[
            "run",
            "--guest",
            "touch",
            "--mem",
            "64",
            "--mem-backing",
            "anon",
            "--cmdline",
            "mib=16 verify=1",
        ],
        b"",
        T,
    );
    assert_eq!(out.code(), 0, "{out:?}");
}

#[test]
fn reset_after_poison_gives_the_gpa_a_fresh_frame() {
    require_kvm!();
    let (mut vm, gpa) = start_poison_guest(
        "poison-reset",
        &[
            "--mem",
            "64",
            "--on-reset",
            "restart",
            "--cmdline",
            "reset=1",
        ],
    );
    let (st, _, rep) = post_poison(&vm, gpa, "hard", "required");
    assert_eq!(
        (st, rep["outcome"].as_str()),
        (200, Some("mapped")),
        "{rep}"
    );
    vm.send("go\n");
    vm.wait_line("poison: survived", T);
    vm.wait_line("poison: resetting", T);
    // Second boot: same guest, same GPA, no poison left on it.
    let ready2 = vm.wait_line("poison: target gpa=", T);
    assert_eq!(field(&ready2, "gpa"), Some(gpa));
    let (_, mem) = vm.api("GET", "/memory", None);
    assert_eq!(mem["frames"]["poisoned_gfns"], 0, "{mem:#}");
    assert!(
        mem["frames"]["retired"].as_u64().unwrap() >= 1,
        "the failed frame stays retired: {mem:#}"
    );
    let (_, check) = vm.api("GET", "/memory/check", None);
    assert_eq!(check["ok"], true, "{check:#}");
    vm.send("go\n");
    let (code, out, err) = vm.finish(T);
    // Exit 2 = "no machine check": the page reads back its pattern from a fresh frame.
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        out.trim_end().ends_with("poison: no machine check"),
        "{out}"
    );
}

#[test]
fn poisoned_free_and_per_vcpu_frames_are_never_handed_out() {
    require_kvm!();
    // The guest waits, the host poisons a frame that is free in the buddy
    // allocator and one that sits on a per-vCPU list, then the guest touches
    // almost all of its RAM (heavy allocation) and verifies it.
    let mut vm = Vmm::start(
        "poison-free",
        &[
            "--guest",
            "touch",
            "--mem",
            "96",
            "--cmdline",
            "wait=1 hold=1 verify=1 pattern=random",
        ],
    );
    vm.wait_line("touch: waiting", T);
    let (st, free) = vm.api(
        "POST",
        "/memory/poison",
        Some(r#"{"frame":"free","kind":"hard"}"#),
    );
    assert_eq!(
        (st, free["outcome"].as_str()),
        (200, Some("free")),
        "{free}"
    );
    // A frame can leave a per-vCPU list between the pick and the failure:
    // retry a few times; a pick that went elsewhere is still a valid poison.
    let mut pcp_done = false;
    for _ in 0..8 {
        let (st, rep) = vm.api(
            "POST",
            "/memory/poison",
            Some(r#"{"frame":"pcp","kind":"hard"}"#),
        );
        if st == 200 && rep["outcome"] == "per_cpu_list" {
            pcp_done = true;
            break;
        }
    }
    assert!(pcp_done, "no frame was poisoned while on a per-vCPU list");
    let (_, mem) = vm.api("GET", "/memory", None);
    let poisoned = mem["frames"]["poisoned"].as_u64().unwrap();
    assert!(poisoned >= 2, "{mem:#}");
    assert_eq!(
        mem["frames"]["pcp_cached"].as_u64(),
        Some(0),
        "all per-vCPU lists drained: {mem:#}"
    );
    vm.send("go\n");
    vm.wait_line("touch: holding", T);
    // Nothing mapped a poisoned frame (the checker looks at every shadow
    // entry; guestmem's own check finds no poisoned frame on a free list),
    // and the frames are still counted as poisoned.
    let (_, check) = vm.api("GET", "/memory/check", None);
    assert_eq!(check["ok"], true, "{check:#}");
    assert!(
        check["ept_mapped"].as_u64().unwrap() > 20_000,
        "heavy allocation happened: {check}"
    );
    let (_, mem) = vm.api("GET", "/memory", None);
    assert_eq!(
        mem["frames"]["poisoned"].as_u64(),
        Some(poisoned),
        "{mem:#}"
    );
    vm.finish_done(T, &["signature_ok=1"]);
}

/// Randomized stress with the invariant checker: while the guest keeps
/// rewriting and verifying its memory, the host soft-offlines random pages of
/// it and runs the checker, in random order, hundreds of times.
#[test]
fn stress_soft_offline_and_checker_while_the_guest_writes() {
    require_kvm!();
    let mut vm = Vmm::start(
        "stress",
        &[
            "--guest",
            "soft",
            "--mem",
            "128",
            "--vcpus",
            "2",
            "--cmdline",
            "mib=32",
        ],
    );
    let ready = vm.wait_line("soft: ready", T);
    let first = field(&ready, "first").unwrap();
    let pages = (field(&ready, "last").unwrap() - first) / 4096 + 1;
    let mut seed = std::process::id() as u64 | 1;
    let mut rng = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // VMM_STRESS_OPS operations (default 800). Each soft offline retires
    // a frame for good, so the count is bounded by the guest's RAM.
    let ops: u32 = std::env::var("VMM_STRESS_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(800);
    let (mut migrated, mut checks) = (0u32, 0u32);
    for _ in 0..ops {
        if rng() % 4 == 0 {
            let (st, check) = vm.api("GET", "/memory/check", None);
            assert_eq!(
                (st, &check["ok"]),
                (200, &serde_json::Value::Bool(true)),
                "{check:#}"
            );
            checks += 1;
        } else {
            let gpa = first + rng() % pages * 4096;
            let (st, rep) = vm.api(
                "POST",
                "/memory/poison",
                Some(&format!(r#"{{"gpa":{gpa},"kind":"soft"}}"#)),
            );
            assert_eq!(st, 200, "{rep}");
            migrated += u32::from(rep["outcome"] == "migrated");
        }
    }
    assert!(
        migrated > ops / 2 && checks > ops / 8,
        "migrated {migrated}, checks {checks} of {ops} operations"
    );
    eprintln!("{ops} operations: {migrated} pages migrated, {checks} checks");
    let (_, check) = vm.api("GET", "/memory/check", None);
    assert_eq!(check["ok"], true, "{check:#}");
    vm.send("stop\n");
    let (code, out, err) = vm.finish(T);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains(" ok"), "{out}");
}
