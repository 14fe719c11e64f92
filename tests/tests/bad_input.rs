//! Bad input: each gives a clear message and a non-zero exit, never a panic.

use std::time::Duration;

use vmm_tests::{require_kvm, run_vmm, temp_dir};

const T: Duration = Duration::from_secs(60);

fn assert_clean_error(args: &[&str], status: i32, needle: &str) {
    let out = run_vmm(args, b"", T);
    assert_eq!(out.code(), status, "{args:?}: {out:?}");
    assert!(
        out.stderr.contains(needle),
        "{args:?}: expected {needle:?} in stderr:\n{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("panicked"),
        "{args:?} panicked: {}",
        out.stderr
    );
}

#[test]
fn missing_kernel_file_is_named() {
    assert_clean_error(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        65,
        "cannot read /nonexistent/vmlinux",
    );
}

#[test]
fn malformed_kernel_is_named_with_the_problem() {
    require_kvm!();
    let d = temp_dir("badkernel");
    let k = d.join("garbage");
    std::fs::write(&k, vec![0x42u8; 4096]).unwrap();
    assert_clean_error(
        &["run", "--kernel", k.to_str().unwrap()],
        65,
        "is not a bootable x86-64 kernel",
    );
    // A truncated ELF: right magic, nothing else.
    let e = d.join("truncated.elf");
    std::fs::write(&e, b"\x7fELF\x02\x01\x01").unwrap();
    assert_clean_error(
        &["run", "--kernel", e.to_str().unwrap()],
        65,
        "truncated.elf",
    );
}

#[test]
fn initrd_that_does_not_fit_is_refused() {
    require_kvm!();
    let d = temp_dir("biginitrd");
    let i = d.join("initrd");
    let f = std::fs::File::create(&i).unwrap();
    f.set_len(40 << 20).unwrap();
    assert_clean_error(
        &["run", "--initrd", i.to_str().unwrap(), "--mem", "32"],
        65,
        "does not fit",
    );
}

#[test]
fn unreadable_initrd_is_named() {
    require_kvm!();
    assert_clean_error(
        &["run", "--initrd", "/nonexistent/initrd"],
        65,
        "/nonexistent/initrd",
    );
}

#[test]
fn memory_sizes_out_of_range() {
    assert_clean_error(&["run", "--mem", "1"], 64, "too small");
    assert_clean_error(
        &["run", "--mem", "100000000"],
        64,
        "more than this host's RAM",
    );
    assert_clean_error(&["run", "--mem", "abc"], 2, "invalid value");
}

#[test]
fn too_many_vcpus() {
    assert_clean_error(&["run", "--vcpus", "0"], 64, "at least 1");
    assert_clean_error(&["run", "--vcpus", "5000"], 64, "--vcpus 5000");
}

#[test]
fn cmdline_too_long() {
    let long = "x".repeat(5000);
    assert_clean_error(&["run", "--cmdline", &long], 64, "--cmdline is 5000 bytes");
}

#[test]
fn unknown_guest_lists_the_kit() {
    assert_clean_error(&["run", "--guest", "nope"], 64, "available: demo");
}

#[test]
fn api_socket_path_that_is_a_regular_file_is_refused() {
    require_kvm!();
    let d = temp_dir("apifile");
    let p = d.join("not-a-socket");
    std::fs::write(&p, b"keep me").unwrap();
    let out = run_vmm(&["run", "--api-sock", p.to_str().unwrap()], b"", T);
    assert_eq!(out.code(), 64, "{out:?}");
    assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
}

/// Run `vmm run` through a wrapper command (root only); None when the
/// wrapper cannot be used here (not root, tool missing, binary not reachable).
fn run_wrapped(wrapper: &[&str]) -> Option<(i32, String)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: needs root to drop privileges / hide /dev/kvm");
        return None;
    }
    let bin = vmm_tests::vmm_bin();
    let mut args: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
    let last = args.pop().unwrap();
    args.push(format!("{last} {} run", bin.display()));
    let out = std::process::Command::new(&args[0])
        .args(&args[1..])
        .output()
        .ok()?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if !err.contains("vmm: ") {
        eprintln!("SKIP: {wrapper:?} could not run vmm here: {err}");
        return None;
    }
    Some((out.status.code().unwrap_or(-1), err))
}

#[test]
fn missing_dev_kvm_says_how_to_fix() {
    // A private mount namespace with an empty /dev.
    let Some((code, err)) = run_wrapped(&[
        "unshare",
        "-m",
        "sh",
        "-c",
        "mount -t tmpfs none /dev && exec",
    ]) else {
        return;
    };
    assert_eq!(code, 69, "{err}");
    assert!(
        err.contains("/dev/kvm does not exist") && err.contains("modprobe"),
        "{err}"
    );
}

#[test]
fn no_permission_on_dev_kvm_says_how_to_fix() {
    let Some((code, err)) = run_wrapped(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "sh",
        "-c",
        "exec",
    ]) else {
        return;
    };
    assert_eq!(code, 69, "{err}");
    assert!(
        err.contains("permission denied") && err.contains("usermod -aG kvm"),
        "{err}"
    );
}
