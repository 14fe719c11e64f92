//! Intel-style machine checks are broadcast to every vCPU (Linux waits for
//! all CPUs in its #MC handler, "Not all CPUs entered broadcast exception
//! handler" otherwise): the target vCPU gets the error, the others bank 1
//! VAL|UC with MCG_STATUS MCIP|RIPV, as QEMU does. AMD machine checks are
//! local. Checked with the kit's `mce` guest on 2 vCPUs with both started.

use std::time::Duration;

use vmm_tests::{field, host_info, require_kvm, Vmm};

const T: Duration = Duration::from_secs(60);

#[test]
fn action_optional_check_reaches_every_vcpu_on_intel() {
    require_kvm!();
    let intel = host_info()["kvm"]["cpu_vendor"] != "AuthenticAMD"
        && host_info()["kvm"]["cpu_vendor"] != "HygonGenuine";
    let count = if intel { "2" } else { "1" };
    let cmdline = format!("mce=wait aps=1 count={count} wait_ms=20000");
    let mut vm = Vmm::start(
        "mce-broadcast",
        &[
            "--guest",
            "mce",
            "--vcpus",
            "2",
            "--mem",
            "64",
            "--cmdline",
            &cmdline,
        ],
    );
    vm.wait_line("cpu 1: online", T);
    vm.wait_line("mce: ready", T);
    let gpa: u64 = 0x300000;
    let body = format!(r#"{{"gpa": {gpa}, "kind": "hard", "action": "optional"}}"#);
    let (st, rep) = vm.api("POST", "/memory/poison", Some(&body));
    assert_eq!(st, 200, "{rep}");
    let (code, out, err) = vm.finish(T);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(&format!("mce: received count={count}")),
        "{out}"
    );
    let bank = |cpu: u32, bank: u32| {
        out.lines()
            .find(|l| l.starts_with(&format!("mce: summary cpu={cpu} bank={bank} ")))
            .map(|l| (field(l, "status").unwrap(), field(l, "addr").unwrap()))
    };
    let (status, addr) = bank(0, 9).unwrap_or_else(|| panic!("no error on vCPU 0: {out}"));
    assert_eq!(addr, gpa, "{out}");
    assert_ne!(status & (1 << 63), 0, "{out}");
    if intel {
        assert_eq!(
            bank(1, 1),
            Some((0xa000_0000_0000_0000, 0)),
            "broadcast on vCPU 1: {out}"
        );
        let l = out
            .lines()
            .find(|l| l.starts_with("mce: summary cpu=1 "))
            .unwrap();
        assert_eq!(field(l, "mcg_status"), Some(5), "MCIP|RIPV: {l}");
    } else {
        assert!(
            !out.contains("mce: summary cpu=1 "),
            "AMD machine checks are local: {out}"
        );
    }
}
