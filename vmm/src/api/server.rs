//! [`ApiServer`]: the listening Unix socket and its non-blocking connections,
//! driven by the VMM's `event_manager` loop.
//!
//! Each connection buffers input until [`parse_request`] yields complete requests
//! (pipelining and keep-alive work), dispatches them to the controller and queues
//! the responses; partial reads and writes simply wait for the next readiness event.
//! While a connection has unsent output it is watched for `OUT` only, so a client
//! that does not read cannot make the server buffer without bound. After a malformed
//! request the server answers, shuts down its write side and discards input until
//! the client closes, so a client still sending its request is not cut off with
//! EPIPE before it reads the error.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, warn};

use super::http::{parse_request, Parsed, Response, CONTINUE, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use super::router::dispatch;
use super::VmController;

/// Most simultaneous client connections; further clients get `503` and are closed.
pub const MAX_CONNECTIONS: usize = 64;
/// Stop parsing more pipelined requests while this much output is unsent.
const MAX_PENDING_OUTPUT: usize = 64 * 1024;
/// Input discarded after an error before the connection is dropped outright.
const MAX_LINGER_BYTES: usize = 1 << 20;
const READ_CHUNK: usize = 4096;

/// Why the API socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The path does not fit in `sockaddr_un`.
    #[error("API socket path {path:?} is {len} bytes; it must be shorter than {max} bytes: choose a shorter --api-sock path")]
    PathTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },
    /// Another process is accepting connections on the path.
    #[error("API socket {0:?} is in use by a running process: stop that process or choose another --api-sock path")]
    InUse(PathBuf),
    /// The path exists and is not a socket; it is never deleted.
    #[error("{0:?} exists and is not a socket: remove it or choose another --api-sock path")]
    NotASocket(PathBuf),
    /// A system call failed while creating the socket.
    #[error("cannot create API socket {path:?}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> ServerError + 'a {
    move |source| ServerError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Removes a stale socket at `path`; refuses a live one or a non-socket.
fn clear_stale(path: &Path) -> Result<(), ServerError> {
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path, "stat")(e)),
    };
    if !md.file_type().is_socket() {
        return Err(ServerError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            warn!("removing stale API socket {}", path.display());
            fs::remove_file(path).map_err(io_err(path, "removing the stale socket"))
        }
        Err(e) => Err(io_err(path, "probing the existing socket")(e)),
    }
}

/// Creates a non-blocking listening socket at `path` with mode 0600.
///
/// The socket is bound and set listening under a temporary name next to
/// `path` and then renamed into place, so the path appears only once
/// clients can connect (a client that waits for the file never sees
/// ECONNREFUSED); when the temporary name would be too long for a socket
/// address, it is bound at `path` directly. The mode is set on the socket
/// before `bind` (Linux creates the file with the socket inode's mode) and
/// again on the file before `listen`, so no client can connect while the
/// file is more permissive than 0600.
fn create_listener(path: &Path) -> Result<UnixListener, ServerError> {
    const SUN_PATH: usize = 108;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= SUN_PATH {
        return Err(ServerError::PathTooLong {
            path: path.to_path_buf(),
            len: bytes.len(),
            max: SUN_PATH,
        });
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.new", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let at = if tmp.as_os_str().len() < SUN_PATH {
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&tmp, "removing a leftover temporary socket")(e)),
        }
        tmp.as_path()
    } else {
        path
    };
    let listener = bind_listen(at)?;
    if at != path {
        if let Err(e) = fs::rename(at, path) {
            let _ = fs::remove_file(at);
            return Err(io_err(path, "renaming the socket into place")(e));
        }
    }
    Ok(listener)
}

/// socket + fchmod + bind at `at` + chmod + listen (see [`create_listener`]).
fn bind_listen(at: &Path) -> Result<UnixListener, ServerError> {
    let bytes = at.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain system call with constant arguments; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(io_err(at, "socket")(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let file = File::from(fd);
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_err(at, "fchmod"))?;
    let fd = OwnedFd::from(file);
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // `addr` is NUL-terminated: callers keep `at` shorter than sun_path.
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call, `len`
    // does not exceed its size; `fd` is an open socket.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io_err(at, "bind")(io::Error::last_os_error()));
    }
    fs::set_permissions(at, fs::Permissions::from_mode(0o600)).map_err(io_err(at, "chmod"))?;
    // SAFETY: `fd` is an open, bound socket; the result is checked.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
        let e = io::Error::last_os_error();
        let _ = fs::remove_file(at);
        return Err(io_err(at, "listen")(e));
    }
    Ok(UnixListener::from(fd))
}

/// Sends without raising SIGPIPE if the peer has gone.
fn send(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes and `stream` is an open
    // socket for the duration of the call; the result is checked.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One client connection.
struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Bytes of `output` already sent.
    sent: usize,
    /// Events the connection is registered for.
    interest: EventSet,
    /// `100 Continue` was sent for the request being received.
    continue_sent: bool,
    /// No more requests are parsed; the connection ends once `output` is sent.
    closing: bool,
    /// Our write side is shut down; input is discarded until the peer closes.
    write_shut: bool,
    peer_eof: bool,
    discarded: usize,
}

impl Connection {
    fn new(stream: UnixStream) -> Self {
        Connection {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            sent: 0,
            interest: EventSet::IN,
            continue_sent: false,
            closing: false,
            write_shut: false,
            peer_eof: false,
            discarded: 0,
        }
    }

    fn pending(&self) -> usize {
        self.output.len() - self.sent
    }

    /// Reads what is available. Input is bounded: the parser rejects anything
    /// longer than one maximal request before more is needed.
    fn read_available(&mut self) -> io::Result<()> {
        let limit = 2 * MAX_HEAD_BYTES + MAX_BODY_BYTES + READ_CHUNK;
        let mut chunk = [0u8; READ_CHUNK];
        while !self.peer_eof && (self.write_shut || self.input.len() < limit) {
            match self.stream.read(&mut chunk) {
                Ok(0) => self.peer_eof = true,
                Ok(n) if self.write_shut => self.discarded += n,
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Parses and answers complete requests; returns whether any was answered.
    fn process(&mut self, vm: &mut dyn VmController) -> bool {
        let mut answered = false;
        while !self.closing && self.pending() < MAX_PENDING_OUTPUT {
            match parse_request(&self.input) {
                Ok(Parsed::Complete(req, used)) => {
                    self.input.drain(..used);
                    self.continue_sent = false;
                    let resp = dispatch(vm, &req);
                    debug!(
                        "API {} {} -> {}",
                        req.method.as_str(),
                        req.path,
                        resp.status
                    );
                    // Without Content-Length the framing of what follows is unknown.
                    let close = !req.keep_alive || resp.status == 411;
                    resp.write_to(&mut self.output, close);
                    self.closing = close;
                    answered = true;
                }
                Ok(Parsed::Incomplete { expect_continue }) => {
                    if expect_continue && !self.continue_sent {
                        self.output.extend_from_slice(CONTINUE);
                        self.continue_sent = true;
                    }
                    // A partial request at EOF can never complete.
                    self.closing |= self.peer_eof;
                    break;
                }
                Err(e) => {
                    warn!("API: rejecting malformed request: {e}");
                    Response::fault(e.status(), &e.to_string()).write_to(&mut self.output, true);
                    self.input.clear();
                    self.closing = true;
                    answered = true;
                }
            }
        }
        answered
    }

    /// Sends queued output until done or the socket is full.
    fn flush(&mut self) -> io::Result<()> {
        while self.sent < self.output.len() {
            match send(&self.stream, &self.output[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.output.clear();
        self.sent = 0;
        if self.closing && !self.write_shut {
            // Half-close so the client sees the response and EOF, then drain its
            // input until it closes: closing our end while it is still sending would
            // fail its writes (EPIPE), and clients such as curl then report the send
            // error instead of our response.
            self.stream.shutdown(std::net::Shutdown::Write)?;
            self.write_shut = true;
            self.input.clear();
        }
        Ok(())
    }

    /// Handles readiness; returns `Ok(false)` when the connection is finished.
    fn on_ready(&mut self, vm: &mut dyn VmController) -> io::Result<bool> {
        self.read_available()?;
        loop {
            let answered = self.process(vm);
            self.flush()?;
            if !answered || self.pending() > 0 {
                break;
            }
        }
        let finished = (self.peer_eof && self.pending() == 0)
            || (self.write_shut && self.discarded > MAX_LINGER_BYTES);
        Ok(!finished)
    }

    fn wanted_interest(&self) -> EventSet {
        if self.pending() > 0 {
            EventSet::OUT
        } else {
            EventSet::IN
        }
    }
}

/// The API server: owns the listening socket, the connections and the controller.
///
/// Register it with the VMM's `EventManager`; all work happens in
/// [`MutEventSubscriber::process`] on the event-loop thread. Dropping it removes the
/// socket file.
pub struct ApiServer<C: VmController> {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we created, to remove only our own file.
    file_id: (u64, u64),
    controller: C,
    connections: HashMap<RawFd, Connection>,
    /// Accepting is suspended after running out of file descriptors.
    accept_paused: bool,
}

impl<C: VmController> ApiServer<C> {
    /// Creates the socket at `path` (mode 0600) and takes ownership of `controller`.
    ///
    /// A stale socket file at `path` is removed; a live socket or any other file is
    /// an error. Clients are served once the server is added to an `EventManager`.
    pub fn new(path: &Path, controller: C) -> Result<Self, ServerError> {
        clear_stale(path)?;
        let listener = create_listener(path)?;
        let md = fs::symlink_metadata(path).map_err(io_err(path, "stat"))?;
        Ok(ApiServer {
            listener,
            path: path.to_path_buf(),
            file_id: (md.dev(), md.ino()),
            controller,
            connections: HashMap::new(),
            accept_paused: false,
        })
    }

    /// Path of the listening socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The controller the server dispatches to.
    pub fn controller(&self) -> &C {
        &self.controller
    }

    /// Mutable access to the controller.
    pub fn controller_mut(&mut self) -> &mut C {
        &mut self.controller
    }

    /// Number of open client connections.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    fn accept_all(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // Typically EMFILE: stop watching the listener (it would stay
                    // readable and spin the loop) until a connection closes.
                    error!("API: accept failed, pausing new connections: {e}");
                    self.set_accepting(ops, false);
                    return;
                }
            };
            if let Err(e) = stream.set_nonblocking(true) {
                warn!("API: dropping connection: cannot make it non-blocking: {e}");
                continue;
            }
            if self.connections.len() >= MAX_CONNECTIONS {
                let mut out = Vec::new();
                let msg = format!(
                    "too many API connections (limit {MAX_CONNECTIONS}); close idle ones and retry"
                );
                Response::fault(503, &msg).write_to(&mut out, true);
                // Best effort: a fresh socket buffer holds this small response.
                let _ = send(&stream, &out);
                warn!("API: {msg}");
                continue;
            }
            if let Err(e) = ops.add(Events::new(&stream, EventSet::IN)) {
                error!("API: dropping connection: cannot register it: {e}");
                continue;
            }
            self.connections
                .insert(stream.as_raw_fd(), Connection::new(stream));
        }
    }

    fn set_accepting(&mut self, ops: &mut EventOps, on: bool) {
        if self.accept_paused != on {
            return;
        }
        let set = if on { EventSet::IN } else { EventSet::empty() };
        match ops.modify(Events::new(&self.listener, set)) {
            Ok(()) => self.accept_paused = !on,
            Err(e) => error!("API: cannot update the listener registration: {e}"),
        }
    }

    fn close(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(conn) = self.connections.remove(&fd) {
            // Unregister before the descriptor is closed (when `conn` drops), or a
            // reused descriptor number could not be registered again.
            if let Err(e) = ops.remove(Events::empty(&conn.stream)) {
                error!("API: cannot unregister connection: {e}");
            }
        }
        self.set_accepting(ops, true);
    }

    fn on_connection(&mut self, fd: RawFd, set: EventSet, ops: &mut EventOps) {
        let Some(conn) = self.connections.get_mut(&fd) else {
            return;
        };
        if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            return self.close(fd, ops);
        }
        match conn.on_ready(&mut self.controller) {
            Ok(true) => {
                let want = conn.wanted_interest();
                if want != conn.interest {
                    match ops.modify(Events::new(&conn.stream, want)) {
                        Ok(()) => conn.interest = want,
                        Err(e) => {
                            error!("API: cannot update connection registration: {e}");
                            self.close(fd, ops);
                        }
                    }
                }
            }
            Ok(false) => self.close(fd, ops),
            Err(e) => {
                debug!("API: connection error: {e}");
                self.close(fd, ops);
            }
        }
    }
}

impl<C: VmController> MutEventSubscriber for ApiServer<C> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            error!("API: cannot register the listening socket: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.listener.as_raw_fd() {
            self.accept_all(ops);
        } else {
            self.on_connection(events.fd(), events.event_set(), ops);
        }
    }
}

impl<C: VmController> Drop for ApiServer<C> {
    fn drop(&mut self) {
        if let Ok(md) = fs::symlink_metadata(&self.path) {
            if (md.dev(), md.ino()) == self.file_id {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
