//! Why the VM ended, the `vmm` exit status for it, and the signal vCPU
//! threads and devices use to end the VM.
//!
//! Statuses (documented in README and docs/ARCHITECTURE.md):
//! 0 guest shutdown/reset or debug-exit 0; `v` for debug-exit byte `v` in
//! 1..=63; 64 bad configuration; 65 bad input file; 69 KVM unavailable;
//! 70 internal VMM error; 71 guest crash; 72 debug-exit byte above 63
//! (those would collide with the VMM's own statuses; stderr names it);
//! 73 the frame pool ran dry with `--on-oom fail` (stderr names the pool
//! size and what to do).

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Exit status for bad command-line or configuration values.
pub const EXIT_USAGE: i32 = 64;
/// Exit status for a bad kernel/initrd file.
pub const EXIT_DATAERR: i32 = 65;
/// Exit status when KVM is unavailable.
pub const EXIT_UNAVAILABLE: i32 = 69;
/// Exit status for an internal VMM error.
pub const EXIT_SOFTWARE: i32 = 70;
/// Exit status when the guest crashed.
pub const EXIT_GUEST_CRASH: i32 = 71;
/// Exit status for a debug-exit byte above [`DEBUG_EXIT_MAX`].
pub const EXIT_DEBUG_OUT_OF_RANGE: i32 = 72;
/// Exit status when guest RAM ran out of frames with `--on-oom fail`.
pub const EXIT_OUT_OF_MEMORY: i32 = 73;
/// Largest debug-exit byte passed through as the exit status.
pub const DEBUG_EXIT_MAX: u8 = 63;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote this byte to the debug-exit port.
    DebugExit(u8),
    /// The guest reset the machine (i8042 reset, KVM reset event).
    Reset,
    /// The guest powered off (KVM shutdown event).
    Shutdown,
    /// The guest crashed; the text says how (and carries register state).
    Crash(String),
    /// The VMM failed while running the guest.
    Internal(String),
    /// The frame pool ran dry (overcommit with `--on-oom fail`); the text
    /// names the pool size and what to do.
    OutOfMemory(String),
}

impl ExitReason {
    /// The process exit status for this reason.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::DebugExit(v) if *v <= DEBUG_EXIT_MAX => i32::from(*v),
            ExitReason::DebugExit(_) => EXIT_DEBUG_OUT_OF_RANGE,
            ExitReason::Reset | ExitReason::Shutdown => 0,
            ExitReason::Crash(_) => EXIT_GUEST_CRASH,
            ExitReason::Internal(_) => EXIT_SOFTWARE,
            ExitReason::OutOfMemory(_) => EXIT_OUT_OF_MEMORY,
        }
    }
}

/// First-wins record of the exit reason plus an EventFd the event loop
/// watches.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    /// A fresh signal.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Request the VM to end for `reason`. Only the first request counts.
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
            // Cannot fail short of the counter overflowing.
            let _ = self.evt.write(1);
        }
    }

    /// Forget the recorded reason (the VM was reset and runs again).
    pub fn clear(&self) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        *r = None;
        let _ = self.evt.read();
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The EventFd that becomes readable on the first request.
    pub fn event(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        assert_eq!(ExitReason::DebugExit(63).status(), 63);
        assert_eq!(ExitReason::DebugExit(64).status(), EXIT_DEBUG_OUT_OF_RANGE);
        assert_eq!(ExitReason::DebugExit(255).status(), EXIT_DEBUG_OUT_OF_RANGE);
        s.request(ExitReason::DebugExit(7));
        s.request(ExitReason::Reset);
        assert_eq!(s.reason(), Some(ExitReason::DebugExit(7)));
        assert_eq!(s.reason().unwrap().status(), 7);
        assert_eq!(s.event().read().unwrap(), 1);
        assert_eq!(ExitReason::Crash("x".into()).status(), EXIT_GUEST_CRASH);
        assert_eq!(ExitReason::OutOfMemory("x".into()).status(), 73);
    }
}
