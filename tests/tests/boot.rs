//! Booting guests through the real `vmm` binary: the embedded demo guest,
//! SMP, debug-exit codes, serial input, crash reporting.

use std::time::Duration;

use vmm_tests::{require_kvm, run_vmm};

const T: Duration = Duration::from_secs(120);

#[test]
fn default_run_boots_the_demo_guest() {
    require_kvm!();
    let out = run_vmm(&["run"], b"", T);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        out.stdout.contains("demo: vcpus=1 mem_mib=128"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("memtest: ok"), "{}", out.stdout);
    assert!(out.stdout.contains("demo: ok"), "{}", out.stdout);
}

#[test]
fn vcpus_and_mem_are_reflected_and_every_vcpu_reports_in() {
    require_kvm!();
    let out = run_vmm(&["run", "--vcpus", "2", "--mem", "256"], b"", T);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        out.stdout.contains("demo: vcpus=2 mem_mib=256"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("cpu 0: online"), "{}", out.stdout);
    assert!(out.stdout.contains("cpu 1: online"), "{}", out.stdout);
    assert!(out.stdout.contains("demo: online=2"), "{}", out.stdout);
}

#[test]
fn smp_guest_shares_an_atomic_counter() {
    require_kvm!();
    let out = run_vmm(&["run", "--guest", "smp", "--vcpus", "2"], b"", T);
    assert_eq!(out.code(), 0, "{out:?}");
}

#[test]
fn debug_exit_codes_become_the_exit_status() {
    require_kvm!();
    for code in [0, 1, 7, 42] {
        let cmdline = format!("exit={code}");
        let out = run_vmm(
            &["run", "--guest", "exitcode", "--cmdline", &cmdline],
            b"",
            T,
        );
        assert_eq!(out.code(), code, "{out:?}");
    }
    // Bytes above 63 would collide with vmm's own statuses (64 usage, 71
    // guest crash, ...): they map to 72 and stderr names the value.
    for code in [64, 71, 200] {
        let cmdline = format!("exit={code}");
        let out = run_vmm(
            &["run", "--guest", "exitcode", "--cmdline", &cmdline],
            b"",
            T,
        );
        assert_eq!(out.code(), 72, "{out:?}");
        assert!(
            out.stderr.contains(&format!("wrote {code} ")),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn serial_input_reaches_the_guest() {
    require_kvm!();
    let out = run_vmm(&["run", "--guest", "echo"], b"hello from the host\n", T);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        out.stdout.contains("echo: hello from the host"),
        "{}",
        out.stdout
    );
}

#[test]
fn long_serial_input_is_not_lost() {
    require_kvm!();
    // Longer than the UART's 64-byte FIFO: exercises the flow control.
    let line: String = (0..200)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let out = run_vmm(
        &["run", "--guest", "echo"],
        format!("{line}\n").as_bytes(),
        T,
    );
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        out.stdout.contains(&format!("echo: {line}")),
        "{}",
        out.stdout
    );
}

#[test]
fn triple_fault_is_reported_as_a_crash() {
    require_kvm!();
    let out = run_vmm(&["run", "--guest", "crash"], b"", T);
    assert_eq!(out.code(), 71, "{out:?}");
    assert!(out.stderr.contains("guest crashed"), "{}", out.stderr);
    assert!(out.stderr.contains("triple fault"), "{}", out.stderr);
    assert!(out.stderr.contains("rip="), "{}", out.stderr);
}

#[test]
fn guests_can_be_extracted_and_booted_from_a_file() {
    require_kvm!();
    let dir = vmm_tests::temp_dir("extract");
    let out = vmm_tests::vmm(&["guests", "--extract", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let demo = dir.join("demo.elf");
    let out = run_vmm(
        &["run", "--kernel", demo.to_str().unwrap(), "--mem", "64"],
        b"",
        T,
    );
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        out.stdout.contains("demo: vcpus=1 mem_mib=64"),
        "{}",
        out.stdout
    );
}

#[test]
fn guest_reset_restores_the_interrupt_controllers() {
    require_kvm!();
    let mut vm = vmm_tests::Vmm::start(
        "reset-platform",
        &[
            "--guest",
            "portio",
            "--cmdline",
            "reset",
            "--on-reset",
            "restart",
        ],
    );
    // Each boot prints the masks it found, then sets others and resets.
    let first = vm.wait_line("portio: pic imr", T);
    for _ in 0..2 {
        let again = vm.wait_line("portio: pic imr", T);
        assert_eq!(again, first, "state survived a reset");
    }
}
