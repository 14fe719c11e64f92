//! Machine checks in quick succession (Intel SDM vol. 3 §15.10: a machine
//! check while MCG_STATUS.MCIP is set is a shutdown; KVM's KVM_X86_SET_MCE
//! turns one into a triple fault). `vmm` injects a check only while the
//! vCPU's MCIP is clear and holds the others until the guest's handler has
//! cleared it; a full queue drops action-optional checks (counted); an
//! action-required check for a vCPU whose MCIP is set ends the VM as a guest
//! crash (71), as the hardware would. Checked with the kit's `mce` guest,
//! whose handler dwells with MCIP set (`dwell_ms`) so that the next check
//! surely arrives during it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_tests::{field, host_info, require_kvm, Vmm};

const T: Duration = Duration::from_secs(60);
const PAGE: u64 = 4096;
const MCI_STATUS_AR: u64 = 1 << 55;

fn poison_body(gpa: u64, action: &str) -> String {
    format!(r#"{{"gpa": {gpa}, "kind": "hard", "action": "{action}"}}"#)
}

/// Several requests written in one `write` on one connection (HTTP/1.1
/// pipelining), then every response read back: (status, JSON body) each.
fn pipelined(sock: &Path, bodies: &[String]) -> Vec<(u16, serde_json::Value)> {
    let mut s = UnixStream::connect(sock).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let all: String = bodies
        .iter()
        .map(|b| {
            format!(
                "POST /memory/poison HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )
        })
        .collect();
    s.write_all(all.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < bodies.len() {
        // Take every complete response at the front of `buf`.
        if let Some((status, body, used)) = vmm_tests::http_response(&buf) {
            let body = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
            out.push((status, body));
            buf.drain(..used);
            continue;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} responses: {:?}",
            out.len(),
            bodies.len(),
            String::from_utf8_lossy(&buf)
        );
        let mut tmp = [0u8; 4096];
        let n = s.read(&mut tmp).expect("read API responses");
        assert!(n > 0, "connection closed after {} responses", out.len());
        buf.extend_from_slice(&tmp[..n]);
    }
    out
}

/// Start the `mce` guest with `cmdline` on `vcpus` vCPUs; returns it and
/// the GPA of its buffer (`pages=N` in `cmdline`).
fn start(name: &str, vcpus: &str, cmdline: &str) -> (Vmm, u64) {
    let mut vm = Vmm::start(
        name,
        &[
            "--guest",
            "mce",
            "--vcpus",
            vcpus,
            "--mem",
            "64",
            "--cmdline",
            cmdline,
        ],
    );
    let l = vm.wait_line("mce: ready buffer=", T);
    let buffer = field(&l, "buffer").unwrap_or_else(|| panic!("no buffer in {l:?}"));
    (vm, buffer)
}

/// Wait for a serial line containing `needle`; if `vmm` ends first (or
/// `T` passes), fail with its exit status, output and stderr.
fn wait_for(mut vm: Vmm, needle: &str) -> Vmm {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        match vm.next_line(Duration::from_millis(200)) {
            Some(l) if l.contains(needle) => return vm,
            Some(_) => {}
            None if UnixStream::connect(&vm.sock).is_err() => break,
            None => {}
        }
    }
    let (code, out, err) = vm.finish(T);
    panic!("no line containing {needle:?}; vmm exited with {code}:\n{out}\n--- stderr ---\n{err}");
}

/// Every `POST /memory/poison` answered 200 with outcome "mapped".
fn assert_mapped(resps: &[(u16, serde_json::Value)]) {
    for (st, v) in resps {
        assert_eq!((*st, v["outcome"].as_str()), (200, Some("mapped")), "{v}");
    }
}

fn counters(vm: &Vmm) -> serde_json::Value {
    let (st, mem) = vm.api("GET", "/memory", None);
    assert_eq!(st, 200, "{mem}");
    mem["poison"]["counters"].clone()
}

/// The machine checks vCPU 0 took, in order, as (bank status, bank addr);
/// also checks that each began after the previous one was resumed (the
/// kit clears MCIP just before it prints `resumed`): never nested.
fn checks_in_order(out: &str) -> Vec<(u64, u64)> {
    let mut checks = Vec::new();
    let mut open = false;
    for l in out.lines() {
        if l.starts_with("mce: cpu=0 mcg_cap=") {
            assert!(
                !open,
                "a machine check began during the previous one:\n{out}"
            );
            open = true;
        } else if l.starts_with("mce: cpu=0 bank=") {
            checks.push((field(l, "status").unwrap(), field(l, "addr").unwrap()));
        } else if l == "mce: cpu=0 resumed" {
            assert!(open, "resumed without a machine check:\n{out}");
            open = false;
        }
    }
    assert!(!open, "the last machine check was not resumed:\n{out}");
    checks
}

#[test]
fn pipelined_action_optional_checks_wait_for_mcip_and_both_arrive() {
    require_kvm!();
    let (vm, buf) = start(
        "mce-pipelined-ao",
        "1",
        "pages=4 count=2 dwell_ms=400 wait_ms=30000",
    );
    let (a, b) = (buf + PAGE, buf + 2 * PAGE);
    let resps = pipelined(
        &vm.sock,
        &[poison_body(a, "optional"), poison_body(b, "optional")],
    );
    assert_mapped(&resps);
    // The second check is taken while the first handler still dwells (MCIP
    // set): it was held, not injected.
    let vm = wait_for(vm, &format!("addr={b:#x}"));
    let c = counters(&vm);
    assert_eq!(c["mce_optional_injected"], 2, "{c}");
    assert_eq!(c["mce_deferred"], 1, "{c}");
    assert_eq!(c["mce_dropped"], 0, "{c}");
    let (code, out, err) = vm.finish(T);
    assert_eq!(code, 0, "the guest must survive both:\n{out}\n{err}");
    assert!(out.contains("mce: received count=2"), "{out}");
    let checks = checks_in_order(&out);
    let addrs: Vec<u64> = checks.iter().map(|c| c.1).collect();
    assert_eq!(addrs, [a, b], "in request order:\n{out}");
}

#[test]
fn action_optional_during_an_action_required_handler_waits() {
    require_kvm!();
    let (vm, buf) = start(
        "mce-ar-then-ao",
        "1",
        "pages=4 probe=1 count=2 dwell_ms=400 wait_ms=30000",
    );
    let (ar, ao) = (buf + PAGE, buf + 2 * PAGE);
    // The guest keeps reading page 1: poisoned, its next load takes an
    // action-required check; while that handler dwells, an action-optional one.
    let (st, v) = vm.api("POST", "/memory/poison", Some(&poison_body(ar, "required")));
    assert_eq!((st, v["outcome"].as_str()), (200, Some("mapped")), "{v}");
    let vm = wait_for(vm, &format!("addr={ar:#x}"));
    let (st, v) = vm.api("POST", "/memory/poison", Some(&poison_body(ao, "optional")));
    assert_eq!((st, v["outcome"].as_str()), (200, Some("mapped")), "{v}");
    let vm = wait_for(vm, &format!("addr={ao:#x}"));
    let c = counters(&vm);
    assert_eq!(c["mce_required_injected"], 1, "{c}");
    assert_eq!(c["mce_optional_injected"], 1, "{c}");
    assert_eq!(c["mce_deferred"], 1, "{c}");
    let (code, out, err) = vm.finish(T);
    assert_eq!(code, 0, "the guest must survive both:\n{out}\n{err}");
    assert!(
        out.contains(&format!("mce: cpu=0 recovered probe gpa={ar:#x}")),
        "{out}"
    );
    let checks = checks_in_order(&out);
    assert_eq!(checks.len(), 2, "{out}");
    assert_eq!(checks[0].1, ar, "{out}");
    assert_ne!(
        checks[0].0 & MCI_STATUS_AR,
        0,
        "action required first: {out}"
    );
    assert_eq!(checks[1].1, ao, "{out}");
    assert_eq!(
        checks[1].0 & MCI_STATUS_AR,
        0,
        "then action optional: {out}"
    );
}

/// Boot the 1-vCPU mce guest with `guest_args`, pipeline an
/// action-required poison of its page 1 and an action-optional one of page
/// 2, check both were answered `mapped`, and wait for `vmm` to end:
/// (status, serial output, stderr, AR gpa, AO gpa).
fn ar_and_ao_pipelined(name: &str, guest_args: &str) -> (i32, String, String, u64, u64) {
    let (vm, buf) = start(name, "1", guest_args);
    let (ar, ao) = (buf + PAGE, buf + 2 * PAGE);
    let resps = pipelined(
        &vm.sock,
        &[poison_body(ar, "required"), poison_body(ao, "optional")],
    );
    assert_mapped(&resps);
    let (code, out, err) = vm.finish(T);
    (code, out, err, ar, ao)
}

#[test]
fn pipelined_action_required_and_optional_both_arrive() {
    require_kvm!();
    let (code, out, err, ar, ao) = ar_and_ao_pipelined(
        "mce-pipelined-ar-ao",
        "pages=4 probe=1 count=2 dwell_ms=400 wait_ms=30000",
    );
    assert_eq!(code, 0, "the guest must survive both:\n{out}\n{err}");
    assert!(out.contains("mce: received count=2"), "{out}");
    assert!(
        out.contains(&format!("mce: cpu=0 recovered probe gpa={ar:#x}")),
        "{out}"
    );
    // Either may come first (the probe usually faults before the second
    // request is handled); never one inside the other.
    let mut addrs: Vec<u64> = checks_in_order(&out).iter().map(|c| c.1).collect();
    addrs.sort();
    assert_eq!(addrs, [ar, ao], "{out}");
}

#[test]
fn action_required_while_mcip_is_set_is_a_shutdown() {
    require_kvm!();
    // The handler of an action-optional check reads a poisoned page: a
    // machine check during a machine check.
    let (code, out, err, ar, _) = ar_and_ao_pipelined(
        "mce-ar-in-handler",
        "pages=4 handler_touch=1 count=2 wait_ms=30000",
    );
    assert_eq!(code, 71, "guest crash expected:\n{out}\n{err}");
    assert!(
        out.contains(&format!("handler reading gpa={ar:#x} with MCIP set")),
        "{out}"
    );
    assert!(!out.contains("handler read 0x"), "{out}");
    assert!(
        err.contains(&format!(
            "action-required machine check for gpa {ar:#x} while MCG_STATUS.MCIP is set"
        )),
        "{err}"
    );
}

#[test]
fn a_full_queue_drops_action_optional_checks_and_counts_them() {
    require_kvm!();
    const N: u64 = 18;
    const QUEUE_LEN: u64 = 16;
    let (vm, buf) = start(
        "mce-overflow",
        "1",
        &format!("pages={N} count={QUEUE_LEN} wait_ms=30000"),
    );
    // Paused, the vCPU takes nothing: the queue fills, the rest is dropped.
    let (st, v) = vm.api("PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    assert_eq!(st, 204, "{v}");
    let bodies: Vec<String> = (0..N)
        .map(|i| poison_body(buf + i * PAGE, "optional"))
        .collect();
    assert_mapped(&pipelined(&vm.sock, &bodies));
    let c = counters(&vm);
    assert_eq!(c["mce_dropped"], N - QUEUE_LEN, "{c}");
    assert_eq!(c["mce_optional_injected"], 0, "{c}");
    let (st, v) = vm.api("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#));
    assert_eq!(st, 204, "{v}");
    let vm = wait_for(vm, &format!("mce: received count={QUEUE_LEN}"));
    let (code, out, err) = vm.finish(T);
    assert_eq!(code, 0, "{out}\n{err}");
    let count = |what: &str| err.lines().filter(|l| l.contains(what)).count() as u64;
    assert_eq!(
        count("machine check (Optional) injected"),
        QUEUE_LEN,
        "{err}"
    );
    assert_eq!(count(" dropped: "), N - QUEUE_LEN, "{err}");
    let addrs: Vec<u64> = checks_in_order(&out).iter().map(|c| c.1).collect();
    let want: Vec<u64> = (0..QUEUE_LEN).map(|i| buf + i * PAGE).collect();
    assert_eq!(addrs, want, "the first {QUEUE_LEN}, in order:\n{out}");
}

#[test]
fn pipelined_broadcasts_wait_for_each_vcpu() {
    require_kvm!();
    let vendor = host_info()["kvm"]["cpu_vendor"].clone();
    if vendor == "AuthenticAMD" || vendor == "HygonGenuine" {
        eprintln!("SKIP: AMD machine checks are local (no broadcast)");
        return;
    }
    // Two errors on vCPU 0, two broadcast placeholders on vCPU 1 (parked in
    // ring 0): each vCPU's second check arrives while its first handler
    // dwells.
    let (vm, buf) = start(
        "mce-pipelined-broadcast",
        "2",
        "aps=1 pages=4 count=4 dwell_ms=400 wait_ms=30000",
    );
    let resps = pipelined(
        &vm.sock,
        &[
            poison_body(buf + PAGE, "optional"),
            poison_body(buf + 2 * PAGE, "optional"),
        ],
    );
    assert_mapped(&resps);
    let (code, out, err) = vm.finish(T);
    assert_eq!(code, 0, "the guest must survive all four:\n{out}\n{err}");
    assert!(out.contains("mce: received count=4"), "{out}");
}
