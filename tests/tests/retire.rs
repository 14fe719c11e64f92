//! Retired frames give their host memory back, through the real binary:
//! many soft offlines (and some hard poisons) of a guest's populated pages,
//! then `GET /memory/check` (whose host-memory accounting is exact: no
//! frame out of use may hold host memory) must pass and the pool's host
//! memory must not have grown by the retired frames.

use std::time::Duration;

use vmm_tests::{field, require_kvm, Vmm};

const T: Duration = Duration::from_secs(90);
const SOFT_OFFLINES: u64 = 1500;
const HARD_POISONS: u64 = 64;

fn resident_bytes(vm: &Vmm) -> u64 {
    let (st, mem) = vm.api("GET", "/memory", None);
    assert_eq!(st, 200, "{mem}");
    mem["resident_bytes"].as_u64().expect("resident_bytes")
}

#[track_caller]
fn assert_check_ok(vm: &Vmm, when: &str) -> serde_json::Value {
    let (st, check) = vm.api("GET", "/memory/check", None);
    assert_eq!(st, 200, "{when}: {check}");
    assert_eq!(check["ok"], true, "{when}: {check:#}");
    check
}

#[test]
fn retired_frames_give_their_host_memory_back() {
    require_kvm!();
    let mut vm = Vmm::start(
        "retire",
        &[
            "--guest",
            "touch",
            "--mem",
            "128",
            "--cmdline",
            "mib=16 verify=1 hold=1",
        ],
    );
    let range = vm.wait_line("touch: range", T);
    let first = field(&range, "start").expect("start");
    let pages = (field(&range, "end").expect("end") - first) / 4096;
    assert!(pages >= SOFT_OFFLINES + HARD_POISONS, "{range}");
    vm.wait_line("touch: holding", T);
    assert_check_ok(&vm, "before");
    let before = resident_bytes(&vm);
    // Distinct pages (an odd stride visits each page of the range once).
    let page = |i: u64| first + (i * 7919 % pages) * 4096;
    let mut migrated = 0;
    for i in 0..SOFT_OFFLINES {
        let gpa = page(i);
        let (st, rep) = vm.api(
            "POST",
            "/memory/poison",
            Some(&format!(r#"{{"gpa":{gpa},"kind":"soft"}}"#)),
        );
        assert_eq!(st, 200, "soft offline {i} of {gpa:#x}: {rep}");
        migrated += u64::from(rep["outcome"] == "migrated");
    }
    assert_eq!(migrated, SOFT_OFFLINES, "every page was populated");
    let check = assert_check_ok(&vm, "after the soft offlines");
    let after_soft = resident_bytes(&vm);
    assert!(
        after_soft <= before,
        "{SOFT_OFFLINES} soft offlines grew the pool's host memory from {before} to \
         {after_soft} bytes (retired frames keep their memory): {check:#}"
    );
    let (_, mem) = vm.api("GET", "/memory", None);
    assert!(
        mem["frames"]["soft_offlined"].as_u64().unwrap() >= SOFT_OFFLINES,
        "{mem:#}"
    );
    // Hard poison of mapped pages the guest no longer touches (it holds).
    for i in SOFT_OFFLINES..SOFT_OFFLINES + HARD_POISONS {
        let gpa = page(i);
        let (st, rep) = vm.api(
            "POST",
            "/memory/poison",
            Some(&format!(
                r#"{{"gpa":{gpa},"kind":"hard","action":"required"}}"#
            )),
        );
        assert_eq!(
            (st, rep["outcome"].as_str()),
            (200, Some("mapped")),
            "hard poison of {gpa:#x}: {rep}"
        );
    }
    let check = assert_check_ok(&vm, "after the hard poisons");
    let after_hard = resident_bytes(&vm);
    assert!(
        after_hard + HARD_POISONS * 4096 <= after_soft,
        "{HARD_POISONS} hard poisons of mapped pages left the pool's host memory at \
         {after_hard} bytes (was {after_soft}): {check:#}"
    );
    eprintln!(
        "resident: {before} before, {after_soft} after {SOFT_OFFLINES} soft offlines, \
         {after_hard} after {HARD_POISONS} hard poisons"
    );
    vm.finish_done(T, &["signature_ok=1"]);
}
