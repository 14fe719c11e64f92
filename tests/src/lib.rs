//! Helpers for the integration tests in `tests/tests/`: they run the real
//! `vmm` binary on real KVM.
//!
//! The binary is expected next to the test executable's profile directory
//! (`target/<profile>/vmm`); build it first with `cargo build --bins`
//! (the README's test command does).

pub mod guest_shell;

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

/// The first complete HTTP response at the front of `buf`: (status, body
/// bytes, bytes it takes), or None while it is incomplete.
pub fn http_response(buf: &[u8]) -> Option<(u16, &[u8], usize)> {
    let h = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..h]);
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    if buf.len() < h + 4 + len {
        return None;
    }
    let status = head.get(9..12)?.parse().ok()?;
    Some((status, &buf[h + 4..h + 4 + len], h + 4 + len))
}

/// One raw HTTP/1.1 exchange over a Unix socket; returns (status, body).
pub fn http(sock: &Path, req: &str) -> (u16, String) {
    use std::os::unix::net::UnixStream;
    let mut s =
        UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        let n = s
            .read(&mut tmp)
            .unwrap_or_else(|e| panic!("{req:?}: {e}; got {:?}", String::from_utf8_lossy(&buf)));
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&tmp[..n]);
        if http_response(&buf).is_some() {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A JSON request; returns (status, parsed body or Null).
pub fn api(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let req = match body {
        Some(b) => format!(
            "{method} {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ),
        None => format!("{method} {path} HTTP/1.1\r\n\r\n"),
    };
    let (st, text) = http(sock, &req);
    (
        st,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// A running `vmm` with an API socket whose serial output is read line by line.
pub struct Vmm {
    child: Option<Child>,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
    /// The API socket.
    pub sock: PathBuf,
}

impl Vmm {
    /// Start `vmm run <args> --api-sock <tmp>` and wait for the socket.
    pub fn start(name: &str, args: &[&str]) -> Self {
        let dir = temp_dir(name);
        let sock = dir.join("api.sock");
        let mut a: Vec<&str> = vec!["run"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--api-sock", sock.to_str().unwrap()]);
        let mut child = vmm(&a)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(l) = line else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let start = Instant::now();
        while !sock.exists() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("vmm exited early with {st}: {}", stderr.join().unwrap());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "API socket did not appear"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Vmm {
            child: Some(child),
            lines: rx,
            seen: Vec::new(),
            stderr: Some(stderr),
            sock,
        }
    }

    /// Wait for a serial line containing `needle`; returns it.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no line containing {needle:?} within {timeout:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Send `text` to the guest's serial port.
    pub fn send(&mut self, text: &str) {
        let child = self.child.as_mut().unwrap();
        let stdin = child.stdin.as_mut().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// An API request.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        api(&self.sock, method, path, body)
    }

    /// Tell a waiting test guest to finish (`done` on its console), wait
    /// for `vmm` to exit with 0 and check the output has every one of
    /// `want`; returns the serial output.
    pub fn finish_done(mut self, timeout: Duration, want: &[&str]) -> String {
        self.send("done\n");
        let (code, out, err) = self.finish(timeout);
        assert_eq!(code, 0, "{out}\n{err}");
        for w in want {
            assert!(out.contains(w), "no {w:?} in:\n{out}");
        }
        out
    }

    /// Wait for the VMM to exit; returns its status, all serial lines and stderr.
    pub fn finish(mut self, timeout: Duration) -> (i32, String, String) {
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "vmm did not exit within {timeout:?}; output:\n{}",
                    self.seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(l);
        }
        let err = self.stderr.take().unwrap().join().unwrap();
        (status.code().unwrap_or(-1), self.seen.join("\n"), err)
    }
}

impl Drop for Vmm {
    /// Kill `vmm` and reap it, waiting at most 10 s: a process stuck in an
    /// unkillable sleep (a kernel bug or a VMM bug like a fault left waiting
    /// at teardown) must not hang the test that already failed.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The unsigned number at `path` in a JSON value; panics naming the path.
pub fn json_u64(v: &serde_json::Value, path: &[&str]) -> u64 {
    path.iter()
        .fold(v, |x, p| &x[p])
        .as_u64()
        .unwrap_or_else(|| panic!("{path:?} missing in {v:#}"))
}

/// Parse `key=0x...` or `key=123` from a line.
pub fn field(line: &str, key: &str) -> Option<u64> {
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))?;
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// This host's class from `vmm host-info` (its ring-0 probe), measured once
/// per test process: true when KVM emulates guest ring 0 (nested PVM: slow
/// ring 0, emulation assists needed, no Linux user space), false on
/// hardware-speed KVM. Panics if the probe cannot run (call after
/// `require_kvm!`).
pub fn ring0_emulated() -> bool {
    host_info()["class"] == "emulated-ring0"
}

/// `vmm host-info` as JSON (cached per process).
pub fn host_info() -> serde_json::Value {
    static INFO: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    INFO.get_or_init(|| {
        let out = vmm(&["host-info"]).output().expect("run vmm host-info");
        assert!(
            out.status.success(),
            "vmm host-info failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("host-info JSON")
    })
    .clone()
}

/// The Linux guest (vmlinux, initramfs) of resources/linux: `VMM_LINUX_KERNEL`
/// and `VMM_LINUX_INITRD` if set, else what `resources/linux/prepare.sh`
/// prints (it builds them on first use, minutes; then a cache hit). When
/// they cannot be had: under `CI=true` this panics (CI prepares them in
/// `.ci/run`), otherwise it prints why `test` is skipped and returns None.
pub fn linux_guest(test: &str) -> Option<(PathBuf, PathBuf)> {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let fail = |why: String| {
        if ci {
            panic!("{test}: {why} and CI=true: .ci/run prepares the Linux guest (resources/linux/prepare.sh)");
        }
        eprintln!("SKIP {test}: {why}");
        None
    };
    if let Ok(k) = std::env::var("VMM_LINUX_KERNEL") {
        let i = std::env::var("VMM_LINUX_INITRD").unwrap_or_default();
        let (k, i) = (PathBuf::from(k), PathBuf::from(i));
        if !k.is_file() || !i.is_file() {
            return fail(format!(
                "VMM_LINUX_KERNEL={} / VMM_LINUX_INITRD={} are not both files",
                k.display(),
                i.display()
            ));
        }
        return Some((k, i));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/linux/prepare.sh");
    let out = match Command::new(&script).stderr(Stdio::inherit()).output() {
        Ok(o) => o,
        Err(e) => return fail(format!("cannot run {}: {e}", script.display())),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |k: &str| {
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix(k))
            .map(PathBuf::from)
    };
    match (out.status.success(), get("KERNEL="), get("INITRD=")) {
        (true, Some(k), Some(i)) if k.is_file() && i.is_file() => Some((k, i)),
        _ => fail(format!(
            "{} could not prepare the Linux guest (status {}; set VMM_LINUX_KERNEL and VMM_LINUX_INITRD to use prebuilt files)",
            script.display(),
            out.status
        )),
    }
}

impl Vmm {
    /// The next serial line within `timeout`, or None (no panic).
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        let l = self.lines.recv_timeout(timeout).ok()?;
        self.seen.push(l.clone());
        Some(l)
    }

    /// Every serial line read so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// The `vmm` process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

/// Resident set size of process `pid` in bytes (VmRSS), if readable.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}
