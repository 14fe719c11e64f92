//! Run/pause/stop control shared between the event loop and vCPU threads.
//!
//! Protocol: the controller sets the target state, then kicks every vCPU
//! thread with [`kick_signal`] until each one has acknowledged (a vCPU
//! blocked in KVM_RUN returns with EINTR; one about to enter KVM_RUN checks
//! the target first). Kicks repeat because a signal that lands just before a
//! thread enters KVM_RUN would otherwise be lost.

use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// What the vCPUs should be doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Run the guest.
    Run,
    /// Stay out of KVM_RUN until resumed.
    Pause,
    /// Leave the run loop for good.
    Stop,
}

#[derive(Debug)]
struct Inner {
    target: Target,
    /// vCPU threads currently parked (out of KVM_RUN, waiting for Run).
    parked: u32,
    /// pthread → Linux thread id of each vCPU thread (for [`kick_is_safe`]).
    tids: std::collections::HashMap<libc::pthread_t, i32>,
}

/// Shared run state of all vCPUs.
#[derive(Debug)]
pub struct VcpuControl {
    inner: Mutex<Inner>,
    cond: Condvar,
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the (empty) kick handler; KVM_RUN then returns EINTR on a kick.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self::new()
    }
}

impl VcpuControl {
    /// Start in the running state.
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                target: Target::Run,
                parked: 0,
                tids: Default::default(),
            }),
            cond: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current target.
    pub fn target(&self) -> Target {
        self.lock().target
    }

    /// Called once by each vCPU thread: remember its thread id.
    pub fn register_current_thread(&self) {
        // SAFETY: pthread_self and gettid have no preconditions.
        let (pt, tid) = unsafe { (libc::pthread_self(), libc::gettid()) };
        self.lock().tids.insert(pt, tid);
    }

    /// Called by a vCPU thread before each KVM_RUN: blocks while paused.
    /// Returns false when the thread must stop.
    pub fn wait_runnable(&self) -> bool {
        let mut g = self.lock();
        if g.target == Target::Pause {
            g.parked += 1;
            self.cond.notify_all();
            while g.target == Target::Pause {
                g = self.cond.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            g.parked -= 1;
        }
        g.target != Target::Stop
    }

    fn set(&self, t: Target) {
        self.lock().target = t;
        self.cond.notify_all();
    }

    /// Pause `threads` (all vCPU threads): returns once every one is parked
    /// or has exited.
    pub fn pause<T>(&self, threads: &[JoinHandle<T>]) {
        self.set(Target::Pause);
        loop {
            let live = threads.iter().filter(|t| !t.is_finished()).count() as u32;
            if self.lock().parked >= live {
                return;
            }
            let tids = self.lock().tids.clone();
            for t in threads.iter().filter(|t| !t.is_finished()) {
                use std::os::unix::thread::JoinHandleExt;
                if tids
                    .get(&t.as_pthread_t())
                    .is_none_or(|&tid| kick_is_safe(tid))
                {
                    let _ = t.kill(kick_signal());
                }
            }
            let g = self.lock();
            let _ = self.cond.wait_timeout(g, Duration::from_millis(2));
        }
    }

    /// Let paused vCPUs run again.
    pub fn resume(&self) {
        if self.target() == Target::Pause {
            self.set(Target::Run);
        }
    }

    /// Back to running after a stop (the VM was reset and its vCPU threads
    /// are started again).
    pub fn restart(&self) {
        self.set(Target::Run);
    }

    /// Stop every vCPU thread and join them.
    pub fn stop<T>(&self, threads: Vec<JoinHandle<T>>) -> Vec<std::thread::Result<T>> {
        self.set(Target::Stop);
        while threads.iter().any(|t| !t.is_finished()) {
            kick(&threads);
            std::thread::sleep(Duration::from_millis(1));
        }
        threads.into_iter().map(|t| t.join()).collect()
    }
}

/// False while thread `tid` sleeps in the kernel on a userfaultfd fault
/// (KVM resolving a guest page through the pager). On this project's
/// nested-PVM hosts a signal that interrupts such a fault makes KVM inject a
/// spurious #PF into the guest (seen as a guest #DF/triple fault with CR2 =
/// RIP), so kicks wait until the fault is resolved (it always is: the pager
/// runs independently). Stopping the VM kicks regardless.
pub fn kick_is_safe(tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan"))
        .map(|w| w.trim() != "handle_userfault")
        .unwrap_or(true)
}

fn kick<T>(threads: &[JoinHandle<T>]) {
    for t in threads.iter().filter(|t| !t.is_finished()) {
        // ESRCH means the thread is exiting; nothing to kick.
        let _ = t.kill(kick_signal());
    }
}
