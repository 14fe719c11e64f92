//! Emulation assists (`--emulation-assists`) with the `assist` test guest:
//! `int3` and `fwait` in guest ring 0. What each mode must do depends on the
//! host class the probe reports (`vmm host-info`): on a host that emulates
//! ring 0 the instructions fail without assists (status 71); on hardware
//! KVM they run natively and assists are never used.

use std::time::Duration;

use vmm_tests::{require_kvm, ring0_emulated, run_vmm};

const T: Duration = Duration::from_secs(60);

fn run(mode: &str) -> vmm_tests::RunOutput {
    run_vmm(
        &[
            "--log-level",
            "info",
            "run",
            "--guest",
            "assist",
            "--emulation-assists",
            mode,
        ],
        b"",
        T,
    )
}

#[test]
fn assists_complete_int3_and_fwait_where_needed() {
    require_kvm!();
    let emulated = ring0_emulated();
    for mode in ["auto", "on"] {
        let out = run(mode);
        assert_eq!(out.code(), 0, "{mode}: {out:?}");
        assert!(
            out.stdout.contains("assist: int3 ok breakpoints=1"),
            "{mode}: {}",
            out.stdout
        );
        assert!(
            out.stdout.contains("assist: fwait ok"),
            "{mode}: {}",
            out.stdout
        );
        assert!(out.stdout.contains("assist: ok"), "{mode}: {}", out.stdout);
        assert!(
            out.stderr.contains("emulation assists on") == (mode == "on" || emulated),
            "{mode}: {}",
            out.stderr
        );
        // Counted: once each where the host needs them, never elsewhere.
        let used = if emulated {
            "int3: 1, fwait: 1"
        } else {
            "int3: 0, fwait: 0"
        };
        assert!(
            out.stderr.contains(used) || (mode == "auto" && !emulated),
            "{mode}: {}",
            out.stderr
        );
    }
}

#[test]
fn without_assists_int3_is_a_crash_on_emulated_ring0() {
    require_kvm!();
    let out = run("off");
    assert!(
        out.stderr.contains("emulation assists off"),
        "{}",
        out.stderr
    );
    if ring0_emulated() {
        assert_eq!(out.code(), 71, "{out:?}");
        assert!(
            out.stdout.contains("assist: int3 in ring 0"),
            "{}",
            out.stdout
        );
        assert!(!out.stdout.contains("assist: ok"), "{}", out.stdout);
        assert!(out.stderr.contains("emulation failure"), "{}", out.stderr);
        assert!(
            out.stderr.contains("instruction bytes [cc"),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr.contains("--emulation-assists on"),
            "{}",
            out.stderr
        );
    } else {
        assert_eq!(
            out.code(),
            0,
            "hardware KVM runs int3/fwait natively: {out:?}"
        );
        assert!(out.stdout.contains("assist: ok"), "{}", out.stdout);
    }
}

#[test]
fn host_info_reports_the_probe() {
    require_kvm!();
    let info = vmm_tests::host_info();
    let rate = info["ring0_iterations_per_s"].as_f64().expect("rate");
    let class = info["class"].as_str().expect("class");
    assert!(rate > 0.0, "{info}");
    let threshold = info["hardware_threshold_iterations_per_s"]
        .as_f64()
        .unwrap();
    assert_eq!(class == "hardware-ring0", rate >= threshold, "{info}");
    assert_eq!(
        info["emulation_assists_auto"],
        class == "emulated-ring0",
        "{info}"
    );
    assert_eq!(info["kvm"]["api_version"], 12, "{info}");
    assert!(info["kvm"]["caps"]["irqchip"].as_bool().unwrap(), "{info}");
}
