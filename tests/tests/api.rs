//! The control API of a running `vmm`, over its real Unix socket.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use vmm_tests::{http, require_kvm, temp_dir, vmm, wait_for_path, wait_output};

fn ctl(sock: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut a = vec!["ctl", "--api-sock", sock.to_str().unwrap()];
    a.extend_from_slice(args);
    vmm(&a).output().unwrap()
}

#[test]
fn api_controls_a_running_vm_and_survives_bad_requests() {
    require_kvm!();
    let dir = temp_dir("api");
    let sock = dir.join("api.sock");
    let mut child = vmm(&[
        "run",
        "--guest",
        "echo",
        "--vcpus",
        "2",
        "--api-sock",
        sock.to_str().unwrap(),
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for_path(&sock, Duration::from_secs(10));
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");

    let (st, body) = http(&sock, "GET /vm HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "Running");
    assert_eq!(v["vcpus"], 2);
    assert_eq!(v["mem_mib"], 128);

    // Pause and resume through the CLI client.
    let o = ctl(&sock, &["pause"]);
    assert!(o.status.success(), "{o:?}");
    let o = ctl(&sock, &["info"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "Paused");
    let (st, _) = http(
        &sock,
        "PATCH /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}",
    );
    assert_eq!(st, 409, "pausing twice is a conflict");
    let o = ctl(&sock, &["resume"]);
    assert!(o.status.success(), "{o:?}");

    // Malformed requests: clear errors, and the VM keeps running.
    for (req, want) in [
        ("GARBAGE\r\n\r\n", 400),
        ("GET /nope HTTP/1.1\r\n\r\n", 404),
        ("DELETE /vm HTTP/1.1\r\n\r\n", 405),
        ("PATCH /vm HTTP/1.1\r\nContent-Length: 5\r\n\r\n{bad}", 400),
        (
            "PATCH /vm HTTP/1.1\r\nContent-Length: 16\r\n\r\n{\"state\":\"Nope\"}",
            400,
        ),
    ] {
        let (st, body) = http(&sock, req);
        assert_eq!(st, want, "{req:?} -> {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["fault_message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    let (st, body) = http(&sock, "GET /memory HTTP/1.1\r\n\r\n");
    assert_eq!(st, 200, "{body}");
    let (st, body) = http(&sock, "GET /vm HTTP/1.1\r\n\r\n");
    assert_eq!((st, body.contains("Running")), (200, true), "{body}");

    // Let the guest finish: it echoes one line and exits 0.
    child.stdin.take().unwrap().write_all(b"bye\n").unwrap();
    let out = wait_output(child, Duration::from_secs(60));
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("echo: bye"), "{}", out.stdout);
    assert!(!sock.exists(), "the socket is removed on exit");
}

#[test]
fn ctl_without_a_running_vmm_says_so() {
    let dir = temp_dir("noapi");
    let o = ctl(&dir.join("missing.sock"), &["info"]);
    assert_eq!(o.status.code(), Some(69), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("missing.sock"),
        "{o:?}"
    );
}
