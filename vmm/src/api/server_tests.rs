//! Real-socket tests: an `ApiServer` on a Unix socket in a temporary directory,
//! driven by an `EventManager` loop on its own thread, with a simple in-memory VM.

use super::super::cli::{run_with_output, CtlCommand};
use super::super::client::{read_response, run_ctl};
use super::super::test_support::TestVm;
use super::super::{VmController, VmState};
use super::*;
use event_manager::{EventManager, SubscriberOps};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

type Server = ApiServer<Box<dyn VmController + Send>>;

fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vmm-api-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir(&dir).unwrap();
    dir
}

struct Running {
    dir: PathBuf,
    sock: PathBuf,
    server: Arc<Mutex<Server>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Running {
    fn start(vm: TestVm) -> Running {
        let dir = temp_dir();
        let sock = dir.join("api.sock");
        let server = Arc::new(Mutex::new(
            ApiServer::new(&sock, Box::new(vm) as Box<dyn VmController + Send>).unwrap(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (server.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
            em.add_subscriber(s);
            while !st.load(Ordering::Relaxed) {
                em.run_with_timeout(20).unwrap();
            }
        });
        Running {
            dir,
            sock,
            server,
            stop,
            thread: Some(thread),
        }
    }

    fn state(&self) -> VmState {
        self.server.lock().unwrap().controller().vm_info().state
    }

    fn get_vm_ok(&self) {
        let (status, body) = run_ctl(&self.sock, "GET", "/vm", None).unwrap();
        assert_eq!(status, 200, "{body}");
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn fault(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "error body {:?} is not JSON: {e}",
            String::from_utf8_lossy(body)
        )
    });
    v["fault_message"]
        .as_str()
        .expect("fault_message")
        .to_string()
}

fn wait_for(mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    panic!("condition not reached in 5 s");
}

#[test]
fn serves_vm_and_memory_through_run_ctl() {
    let srv = Running::start(TestVm::new());
    let (status, body) = run_ctl(&srv.sock, "GET", "/vm", None).unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"state": "Running", "vcpus": 2, "mem_mib": 256})
    );

    let paused = r#"{"state":"Paused"}"#;
    assert_eq!(
        run_ctl(&srv.sock, "PATCH", "/vm", Some(paused)).unwrap(),
        (204, String::new())
    );
    assert_eq!(srv.state(), VmState::Paused);
    let (status, body) = run_ctl(&srv.sock, "PATCH", "/vm", Some(paused)).unwrap();
    assert_eq!(status, 409);
    assert!(fault(body.as_bytes()).contains("Paused"), "{body}");
    let resumed = r#"{"state":"Resumed"}"#;
    assert_eq!(
        run_ctl(&srv.sock, "PATCH", "/vm", Some(resumed)).unwrap().0,
        204
    );
    assert_eq!(srv.state(), VmState::Running);

    let (status, body) = run_ctl(&srv.sock, "GET", "/memory", None).unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["total_mib"], 256);
}

#[test]
fn ctl_verbs_print_json_and_report_errors() {
    let srv = Running::start(TestVm::new());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(
        run_with_output(&srv.sock, &CtlCommand::Info, &mut out, &mut err).unwrap(),
        0
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["state"], "Running");
    assert!(err.is_empty());

    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(
        run_with_output(&srv.sock, &CtlCommand::Pause, &mut out, &mut err).unwrap(),
        0
    );
    assert!(out.is_empty() && err.is_empty());
    assert_eq!(srv.state(), VmState::Paused);

    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(
        run_with_output(&srv.sock, &CtlCommand::Pause, &mut out, &mut err).unwrap(),
        1
    );
    let err = String::from_utf8(err).unwrap();
    assert!(
        err.contains("409 Conflict") && err.contains("Paused"),
        "{err}"
    );

    let get = CtlCommand::Get {
        path: "/nope".into(),
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(
        run_with_output(&srv.sock, &get, &mut out, &mut err).unwrap(),
        1
    );
    assert!(String::from_utf8(err).unwrap().contains("404 Not Found"));
    assert_eq!(
        run_with_output(&srv.sock, &CtlCommand::Resume, &mut out, &mut Vec::new()).unwrap(),
        0
    );
}

#[test]
fn socket_file_mode_stale_and_live_sockets() {
    let dir = temp_dir();
    let sock = dir.join("api.sock");
    let server = Server::new(&sock, Box::new(TestVm::new())).unwrap();
    let mode = fs::symlink_metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    // A live socket is refused and left alone.
    let err = Server::new(&sock, Box::new(TestVm::new())).err().unwrap();
    assert!(matches!(err, ServerError::InUse(_)), "{err}");
    assert!(err.to_string().contains("--api-sock"));
    assert!(sock.exists());
    // Dropping the server removes its socket file.
    drop(server);
    assert!(!sock.exists());

    // A stale socket (no listener) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(fs::symlink_metadata(&sock).unwrap().file_type().is_socket());
    let server = Server::new(&sock, Box::new(TestVm::new())).unwrap();
    assert!(UnixStream::connect(&sock).is_ok());
    drop(server);

    // A regular file is never deleted.
    fs::write(&sock, b"data").unwrap();
    let err = Server::new(&sock, Box::new(TestVm::new())).err().unwrap();
    assert!(matches!(err, ServerError::NotASocket(_)), "{err}");
    assert_eq!(fs::read(&sock).unwrap(), b"data");

    let long = dir.join("x".repeat(120));
    let err = Server::new(&long, Box::new(TestVm::new())).err().unwrap();
    assert!(matches!(err, ServerError::PathTooLong { .. }), "{err}");
    let err = Server::new(&dir.join("missing/api.sock"), Box::new(TestVm::new()))
        .err()
        .unwrap();
    assert!(err.to_string().contains("bind"), "{err}");
    fs::remove_dir_all(&dir).unwrap();
}

/// Sends `raw` on a fresh connection; returns the response and whether the server
/// then closed the connection.
fn exchange(srv: &Running, raw: &[u8]) -> (u16, Vec<u8>, bool) {
    let mut s = srv.connect();
    s.write_all(raw).unwrap();
    let (status, body) = read_response(&mut s).unwrap();
    // Keep-alive connections stay open: a read then times out instead of seeing EOF.
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let closed = matches!(s.read(&mut [0u8; 64]), Ok(0));
    (status, body, closed)
}

#[test]
fn malformed_requests_get_json_errors_and_the_server_keeps_running() {
    let srv = Running::start(TestVm::new());
    let big_head = format!(
        "GET /vm HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(MAX_HEAD_BYTES)
    );
    let cases: Vec<(Vec<u8>, u16, &str, bool)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), 400, "bad request line", true),
        (b"GET /vm HTTP/1.1\n\n".to_vec(), 400, "CRLF", true),
        (b"GET /vm HTTP/3\r\n\r\n".to_vec(), 505, "HTTP/3", true),
        (b"GET /vm?x=1 HTTP/1.1\r\n\r\n".to_vec(), 400, "query", true),
        (
            b"GET /vm HTTP/1.1\r\nBad Header\r\n\r\n".to_vec(),
            400,
            "Bad Header",
            true,
        ),
        (b"GET /nope HTTP/1.1\r\n\r\n".to_vec(), 404, "/nope", false),
        (
            b"DELETE /vm HTTP/1.1\r\n\r\n".to_vec(),
            405,
            "DELETE",
            false,
        ),
        (
            b"PATCH /vm HTTP/1.1\r\nContent-Length: 5\r\n\r\n{bad}".to_vec(),
            400,
            "bad JSON body",
            false,
        ),
        (
            b"PATCH /vm HTTP/1.1\r\nContent-Length: 28\r\n\r\n{\"state\":\"Paused\",\"more\":1}\n"
                .to_vec(),
            400,
            "unknown field `more`",
            false,
        ),
        (
            b"PATCH /vm HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            400,
            "missing field `state`",
            false,
        ),
        (
            b"PATCH /vm HTTP/1.1\r\n\r\n{\"state\":\"Paused\"}".to_vec(),
            411,
            "Content-Length",
            true,
        ),
        (
            b"PATCH /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            411,
            "Content-Length",
            true,
        ),
        (
            b"PATCH /vm HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n".to_vec(),
            413,
            "99999999",
            true,
        ),
        (big_head.into_bytes(), 431, "header section", true),
    ];
    for (raw, want_status, want_text, want_closed) in cases {
        let (status, body, closed) = exchange(&srv, &raw);
        let what = String::from_utf8_lossy(&raw[..raw.len().min(60)]).to_string();
        assert_eq!(status, want_status, "{what:?}");
        let msg = fault(&body);
        assert!(
            msg.contains(want_text),
            "{what:?}: {msg:?} lacks {want_text:?}"
        );
        assert_eq!(closed, want_closed, "{what:?}: connection closed");
        srv.get_vm_ok();
    }
    assert_eq!(srv.state(), VmState::Running);
    wait_for(|| srv.server.lock().unwrap().connection_count() == 0);
}

#[test]
fn oversized_body_is_answered_even_while_the_client_keeps_sending() {
    let srv = Running::start(TestVm::new());
    let mut s = srv.connect();
    let mut writer = s.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let n = 4 * MAX_BODY_BYTES;
        let head = format!("PUT /vm HTTP/1.1\r\nContent-Length: {n}\r\n\r\n");
        writer.write_all(head.as_bytes())?;
        // The server discards the body instead of closing on the sender, so the
        // client (like curl) is not cut off with EPIPE before it reads the 413.
        writer.write_all(&vec![b'x'; n])?;
        writer.shutdown(std::net::Shutdown::Write)
    });
    let (status, body) = read_response(&mut s).unwrap();
    assert_eq!(status, 413);
    assert!(fault(&body).contains("exceeds the limit"));
    let sent: io::Result<()> = sender.join().unwrap();
    sent.expect("client could send its whole request");
    srv.get_vm_ok();
    wait_for(|| srv.server.lock().unwrap().connection_count() == 0);
}

#[test]
fn keep_alive_pipelining_and_expect_continue() {
    let srv = Running::start(TestVm::new());
    let mut s = srv.connect();
    s.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
    // Read exactly one response without consuming beyond it (byte at a time).
    let mut one = Vec::new();
    let mut byte = [0u8; 1];
    while !one.ends_with(b"}") {
        s.read_exact(&mut byte).unwrap();
        one.push(byte[0]);
    }
    assert!(one.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert!(!String::from_utf8_lossy(&one).contains("Connection: close"));

    // Expect: 100-continue gets an interim response before the body is sent.
    s.write_all(b"PATCH /vm HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 18\r\n\r\n")
        .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(br#"{"state":"Paused"}"#).unwrap();
    let mut resp = [0u8; 12];
    s.read_exact(&mut resp).unwrap();
    assert_eq!(&resp, b"HTTP/1.1 204");
    let mut rest = Vec::new();
    while !rest.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        rest.push(byte[0]);
    }
    assert_eq!(srv.state(), VmState::Paused);

    // Three pipelined requests in one write, the last closing the connection.
    s.write_all(
        b"GET /vm HTTP/1.1\r\n\r\nPATCH /vm HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"state\":\"Resumed\"}GET /vm HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let text = String::from_utf8(all).unwrap();
    let statuses: Vec<&str> = text.matches("HTTP/1.1 ").collect();
    assert_eq!(statuses.len(), 3, "{text}");
    let first = text.find(r#""state":"Paused""#).unwrap();
    let no_content = text.find("HTTP/1.1 204").unwrap();
    let last = text.find(r#""state":"Running""#).unwrap();
    assert!(first < no_content && no_content < last, "{text}");
    assert!(text.contains("Connection: close"));
}

#[test]
fn slow_clients_do_not_block_others() {
    let srv = Running::start(TestVm::new());
    let mut slow = srv.connect();
    let raw = b"PATCH /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}";
    for (i, b) in raw.iter().enumerate() {
        slow.write_all(&[*b]).unwrap();
        if i % 10 == 0 {
            // Other clients are served while this request is half received.
            srv.get_vm_ok();
            assert_eq!(srv.state(), VmState::Running);
        }
    }
    let (status, _) = read_response(&mut slow).unwrap();
    assert_eq!(status, 204);
    assert_eq!(srv.state(), VmState::Paused);
}

#[test]
fn large_responses_are_written_in_parts() {
    let mut vm = TestVm::new();
    vm.memory_blob = 4 << 20;
    let srv = Running::start(vm);
    let mut s = srv.connect();
    s.write_all(b"GET /memory HTTP/1.1\r\n\r\n").unwrap();
    // The response does not fit in the socket buffer; while the server waits for
    // this client to read, it keeps serving others.
    thread::sleep(Duration::from_millis(100));
    srv.get_vm_ok();
    let (status, body) = read_response(&mut s).unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["blob"].as_str().unwrap().len(), 4 << 20);
    // Same connection is still usable.
    s.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().0, 200);
}

#[test]
fn concurrent_clients() {
    let srv = Running::start(TestVm::new());
    let workers: Vec<_> = (0..8)
        .map(|i| {
            let sock = srv.sock.clone();
            thread::spawn(move || {
                for j in 0..25 {
                    let (method, body) = if (i + j) % 3 == 0 {
                        ("PATCH", Some(r#"{"state":"Paused"}"#))
                    } else {
                        ("GET", None)
                    };
                    let (status, text) = run_ctl(&sock, method, "/vm", body).unwrap();
                    // Pausing an already paused VM is a 409 from the controller.
                    assert!(matches!(status, 200 | 204 | 409), "{status} {text}");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(srv.state(), VmState::Paused);
    wait_for(|| srv.server.lock().unwrap().connection_count() == 0);
}

#[test]
fn connection_limit_answers_503() {
    let srv = Running::start(TestVm::new());
    let idle: Vec<UnixStream> = (0..MAX_CONNECTIONS).map(|_| srv.connect()).collect();
    wait_for(|| srv.server.lock().unwrap().connection_count() == MAX_CONNECTIONS);
    let (status, body) = run_ctl(&srv.sock, "GET", "/vm", None).unwrap();
    assert_eq!(status, 503);
    assert!(fault(body.as_bytes()).contains("too many"));
    drop(idle);
    wait_for(|| srv.server.lock().unwrap().connection_count() == 0);
    srv.get_vm_ok();
}
