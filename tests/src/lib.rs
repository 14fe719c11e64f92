//! Helpers for the integration tests in `tests/tests/`: they run the real
//! `vmm` binary on real KVM.
//!
//! The binary is expected next to the test executable's profile directory
//! (`target/<profile>/vmm`); build it first with `cargo build --bins`
//! (the README's test command does).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Path of the `vmm` binary built by cargo for the same profile.
pub fn vmm_bin() -> PathBuf {
    if let Ok(p) = std::env::var("VMM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/vmm
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("vmm");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build --bins` (same profile as the tests) or set VMM_BIN",
        bin.display()
    );
    bin
}

/// True when KVM can be used. When it cannot: under `CI=true` this panics
/// (a CI host without KVM is a broken host, not a skip); otherwise it prints
/// why the test is skipped and returns false.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    match ok {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: /dev/kvm is not usable ({e}) and CI=true: KVM is required in CI");
            }
            eprintln!("SKIP {test}: needs /dev/kvm ({e})");
            false
        }
    }
}

/// Skip (return) from a test when KVM is unavailable outside CI.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::kvm_available(module_path!()) {
            return;
        }
    };
}

/// The result of one `vmm` run.
#[derive(Debug)]
pub struct RunOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything the guest printed (serial → stdout).
    pub stdout: String,
    /// The VMM's own messages.
    pub stderr: String,
}

impl RunOutput {
    /// The exit code (panics if killed by a signal).
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("vmm killed by a signal: {self:?}"))
    }
}

/// A `vmm` command with the given arguments.
pub fn vmm(args: &[&str]) -> Command {
    let mut c = Command::new(vmm_bin());
    c.args(args);
    c
}

/// Run `vmm` with `args`, feed `stdin`, wait at most `timeout`.
pub fn run_vmm(args: &[&str], stdin: &[u8], timeout: Duration) -> RunOutput {
    let mut child = vmm(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
        // Keep stdin open briefly so the guest can read before EOF.
        std::thread::sleep(Duration::from_millis(50));
    });
    let out = wait_output(child, timeout);
    let _ = writer.join();
    out
}

/// Wait for `child` (stdout/stderr piped) with a timeout; kills it on timeout
/// and panics with what it printed.
pub fn wait_output(mut child: Child, timeout: Duration) -> RunOutput {
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = so.read_to_end(&mut s);
        s
    });
    let t2 = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = se.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let so = String::from_utf8_lossy(&t1.join().unwrap()).into_owned();
            let se = String::from_utf8_lossy(&t2.join().unwrap()).into_owned();
            panic!(
                "vmm did not exit within {timeout:?}\n--- stdout ---\n{so}\n--- stderr ---\n{se}"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    RunOutput {
        status,
        stdout: String::from_utf8_lossy(&t1.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&t2.join().unwrap()).into_owned(),
    }
}

/// A unique temporary directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Wait until `path` exists (e.g. the API socket), or panic after `timeout`.
pub fn wait_for_path(path: &Path, timeout: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < timeout,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
