//! Overcommit through the real binary: a frame pool smaller than guest RAM
//! (`--mem-pool`), zero-page reclaim, `--on-oom pause` (parked faults,
//! `GET /memory` → `oom`, resumed by `PATCH /memory {"pool_mib": N}`) and
//! `--on-oom fail` (exit status 73). Every wait is bounded.

use std::time::{Duration, Instant};

use vmm_tests::{json_u64, require_kvm, run_vmm, Vmm};

const T: Duration = Duration::from_secs(90);

/// Poll `GET /memory` until `pred` holds; panics with the last answer after `timeout`.
fn wait_memory(
    vm: &Vmm,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let (st, mem) = vm.api("GET", "/memory", None);
        assert_eq!(st, 200, "{mem}");
        if pred(&mem) {
            return mem;
        }
        assert!(
            start.elapsed() < timeout,
            "GET /memory: not {what} within {timeout:?}; last answer: {mem:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A guest reading 3x the pool (48 MiB through a 16 MiB pool) runs to the
/// end: every page it reads is zero, so zero-page reclaim keeps giving
/// frames back and the pager never has to park a fault.
#[test]
fn reading_three_times_the_pool_runs_through_zero_reclaim() {
    require_kvm!();
    let mut vm = Vmm::start(
        "oc-read",
        &[
            "--guest",
            "touch",
            "--mem",
            "128",
            "--mem-pool",
            "16",
            "--cmdline",
            "mib=48 op=read hold=1",
        ],
    );
    vm.wait_line("touch: holding", T);
    let (_, mem) = vm.api("GET", "/memory", None);
    assert_eq!(mem["pool_mib"], 16, "{mem:#}");
    assert_eq!(mem["oom"]["state"], "running", "{mem:#}");
    assert_eq!(mem["oom"]["pauses"], 0, "{mem:#}");
    assert!(json_u64(&mem, &["frames", "oom_events"]) > 0, "{mem:#}");
    let resident = json_u64(&mem, &["resident_bytes"]);
    assert!(
        resident <= 16 << 20,
        "pool holds {resident} B > 16 MiB: {mem:#}"
    );
    vm.finish_done(T, &["op=read", "touch: ok"]);
}

/// Same with op=zero: writing zeros leaves reclaimable pages too.
#[test]
fn writing_zeros_over_three_times_the_pool_runs_through_zero_reclaim() {
    require_kvm!();
    let out = run_vmm(
        &[
            "run",
            "--guest",
            "touch",
            "--mem",
            "128",
            "--mem-pool",
            "16",
            "--cmdline",
            "mib=48 op=zero",
        ],
        b"",
        T,
    );
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("touch: ok"), "{out:?}");
}

/// A guest writing data over more than the pool pauses at OOM (the API
/// says so, with since_ms and the waiting faults), a shrink is refused
/// with a reason, and growing the pool resumes the guest, whose data is
/// intact.
#[test]
fn writing_past_the_pool_pauses_until_the_pool_grows() {
    require_kvm!();
    let mut vm = Vmm::start(
        "oc-pause",
        &[
            "--guest",
            "touch",
            "--mem",
            "128",
            "--mem-pool",
            "24",
            "--cmdline",
            "mib=48 verify=1 hold=1",
        ],
    );
    vm.wait_line("touch: mib=48", T);
    let mem = wait_memory(&vm, "paused", T, |m| m["oom"]["state"] == "paused");
    assert_eq!(mem["oom"]["policy"], "pause", "{mem:#}");
    assert!(json_u64(&mem, &["oom", "waiting_faults"]) >= 1, "{mem:#}");
    assert!(
        json_u64(&mem, &["oom", "since_ms"]) > 1_600_000_000_000,
        "{mem:#}"
    );
    assert_eq!(mem["pool_mib"], 24, "{mem:#}");
    // Still paused a moment later: nothing resumes it by itself.
    std::thread::sleep(Duration::from_millis(1500));
    let (_, mem) = vm.api("GET", "/memory", None);
    assert_eq!(mem["oom"]["state"], "paused", "{mem:#}");
    assert!(json_u64(&mem, &["oom", "paused_for_ms"]) >= 1000, "{mem:#}");
    assert!(
        !vm.seen().iter().any(|l| l.contains("touch: ok")),
        "guest finished while paused: {:?}",
        vm.seen()
    );
    // Shrinking is refused, with the reason.
    let (st, body) = vm.api("PATCH", "/memory", Some(r#"{"pool_mib": 16}"#));
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("cannot shrink"), "{body}");
    let (st, body) = vm.api("PATCH", "/memory", Some(r#"{"pool_mib": 4096}"#));
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("guest RAM is 128 MiB"), "{body}");
    // Growing resumes the parked faults.
    let (st, body) = vm.api("PATCH", "/memory", Some(r#"{"pool_mib": 128}"#));
    assert_eq!(st, 204, "{body}");
    vm.wait_line("touch: holding", T);
    let (_, mem) = vm.api("GET", "/memory", None);
    assert_eq!(mem["pool_mib"], 128, "{mem:#}");
    assert_eq!(mem["oom"]["state"], "running", "{mem:#}");
    assert_eq!(mem["oom"]["waiting_faults"], 0, "{mem:#}");
    assert!(json_u64(&mem, &["oom", "pauses"]) >= 1, "{mem:#}");
    assert!(json_u64(&mem, &["oom", "resumed_faults"]) >= 1, "{mem:#}");
    // Resumed by guestmem's signal, not by the pager's fallback timer.
    assert_eq!(mem["oom"]["resumed_by_timer"], 0, "{mem:#}");
    let (st, check) = vm.api("GET", "/memory/check", None);
    assert_eq!(st, 200, "{check}");
    assert_eq!(check["ok"], true, "{check:#}");
    vm.finish_done(T, &["signature_ok=1"]);
}

/// `--on-oom fail`: the VMM ends with status 73 and a message naming the
/// pool size and what to do, never an internal error (70).
#[test]
fn on_oom_fail_exits_73_with_advice() {
    require_kvm!();
    let out = run_vmm(
        &[
            "run",
            "--guest",
            "touch",
            "--mem",
            "128",
            "--mem-pool",
            "24",
            "--on-oom",
            "fail",
            "--cmdline",
            "mib=48",
        ],
        b"",
        T,
    );
    assert_eq!(out.code(), 73, "{out:?}");
    assert!(
        out.stderr.contains("frame pool of 24 MiB")
            && out.stderr.contains("--mem-pool")
            && out.stderr.contains("PATCH /memory"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("internal error"), "{}", out.stderr);
    assert!(!out.stdout.contains("touch: ok"), "{}", out.stdout);
}

/// Bad pool sizes are configuration errors (64) with a reason.
#[test]
fn bad_pool_sizes_are_refused() {
    require_kvm!();
    for (pool, extra) in [("256", None), ("1", None), ("64", Some("anon"))] {
        let mut args = vec![
            "run",
            "--guest",
            "touch",
            "--mem",
            "128",
            "--mem-pool",
            pool,
        ];
        if let Some(b) = extra {
            args.extend_from_slice(&["--mem-backing", b]);
        }
        let out = run_vmm(&args, b"", T);
        assert_eq!(out.code(), 64, "--mem-pool {pool}: {out:?}");
        assert!(out.stderr.contains("--mem-pool"), "{}", out.stderr);
    }
}
