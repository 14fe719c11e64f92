//! Host stdin → guest UART, driven by the event loop.
//!
//! Flow control: the UART's receive FIFO is small. When it is full the
//! subscriber stops watching stdin and keeps what it read; the UART's
//! "input buffer empty" event (the guest drained the FIFO) makes it flush and
//! watch stdin again. Nothing typed is lost.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::serial::SerialDevice;

/// Moves bytes from an input fd to the UART.
pub struct SerialInput<R: Read + AsRawFd + Send> {
    input: R,
    serial: Arc<Mutex<SerialDevice>>,
    drained: EventFd,
    pending: Vec<u8>,
    watching_input: bool,
    eof: bool,
}

impl<R: Read + AsRawFd + Send> SerialInput<R> {
    /// Feed `serial` from `input`; `drained` is signalled by the UART when the
    /// guest empties its receive FIFO.
    pub fn new(input: R, serial: Arc<Mutex<SerialDevice>>, drained: EventFd) -> Self {
        Self {
            input,
            serial,
            drained,
            pending: Vec::new(),
            watching_input: false,
            eof: false,
        }
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let n = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_input(&self.pending);
        self.pending.drain(..n);
    }

    fn set_watch(&mut self, ops: &mut EventOps, on: bool) {
        if on == self.watching_input || self.eof {
            return;
        }
        let ev = Events::new(&self.input, EventSet::IN);
        let r = if on { ops.add(ev) } else { ops.remove(ev) };
        match r {
            Ok(()) => {}
            // epoll refuses regular files and /dev/null: there is no
            // interactive input to forward.
            Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EPERM => {
                log::debug!("serial input: stdin cannot be polled (regular file or /dev/null); no serial input");
                self.eof = true;
                return;
            }
            Err(e) => log::warn!(
                "serial input: cannot {} stdin: {e:?}",
                if on { "watch" } else { "unwatch" }
            ),
        }
        self.watching_input = on;
    }
}

impl<R: Read + AsRawFd + Send> MutEventSubscriber for SerialInput<R> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.drained, EventSet::IN)) {
            log::warn!("serial input: cannot watch the UART: {e:?}");
        }
        self.set_watch(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.drained.as_raw_fd() {
            let _ = self.drained.read();
            self.flush();
            if self.pending.is_empty() {
                self.set_watch(ops, true);
            }
            return;
        }
        let mut buf = [0u8; 256];
        match self.input.read(&mut buf) {
            Ok(0) => {
                self.set_watch(ops, false);
                self.eof = true;
            }
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                self.flush();
                if !self.pending.is_empty() {
                    self.set_watch(ops, false);
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::Interrupted
                    || e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                log::warn!("serial input: read failed, no more input: {e}");
                self.set_watch(ops, false);
                self.eof = true;
            }
        }
    }
}
