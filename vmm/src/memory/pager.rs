//! The pager: resolves missing-page faults of the guest view.
//!
//! Fault path (KVM's protocol, twice over):
//! 1. A vCPU (inside KVM) or a VMM thread touches an unpopulated GPA; the
//!    host reports it on the view's userfaultfd and the thread sleeps.
//! 2. `seq = kvm_mapping.fault_begin()`.
//! 3. `ShadowEpt::fault` snapshots its own sequence, resolves the frame
//!    from guestmem (populating a 2 MiB block when it can, else 4 KiB),
//!    and installs the shadow entry under its mmu lock, retrying if an
//!    invalidation intervened.
//! 4. `KvmMapping::install(seq, ..)` maps the same extent into the view
//!    under its own lock, unless an invalidation overlapping it ran since
//!    step 2 (then back to step 2).
//! 5. Wake the sleeping thread: it retries and finds the page.
//!
//! A poisoned GPA is resolved with a poison marker instead: KVM turns the
//! access into SIGBUS(BUS_MCEERR_AR) on the vCPU thread, which injects a
//! machine check into the guest (see `vstate::mce`).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use guestmem::notifier::GpaRange;
use guestmem::{GuestMemory, ResolveError};
use mmu::{Backing, FaultError, PrimaryMap, ShadowEpt};
use vmm_sys_util::eventfd::EventFd;

use super::view::{GuestView, KvmMapping};
use crate::exit::{ExitReason, ExitSignal};

/// guestmem's map as the shadow EPT's primary.
pub struct Primary(pub Arc<GuestMemory>);

impl PrimaryMap for Primary {
    type Error = ResolveError;
    fn resolve(&self, gpa: u64, cpu: usize) -> Result<Backing, ResolveError> {
        let r = self.0.resolve(gpa, cpu)?;
        Ok(Backing {
            gpa_base: r.gpa,
            order: r.order,
            host_addr: r.host_addr,
            frame: u64::from(r.frame),
            writable: true,
        })
    }
}

/// Counters of the pager.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PagerStats {
    /// Faults resolved by mapping frames.
    pub faults: u64,
    /// Of those, resolved with a 2 MiB extent.
    pub huge_faults: u64,
    /// Faults resolved with a poison marker.
    pub poisoned: u64,
    /// Retries because an invalidation intervened.
    pub retries: u64,
}

/// Everything the pager thread needs.
pub struct Pager {
    pub(super) gm: Arc<GuestMemory>,
    pub(super) ept: Arc<ShadowEpt>,
    pub(super) view: Arc<GuestView>,
    pub(super) kvm: Arc<KvmMapping>,
    pub(super) exit: Arc<ExitSignal>,
    /// Thread id → vCPU index (for the per-vCPU frame lists).
    pub(super) vcpu_tids: Mutex<HashMap<u32, usize>>,
    pub(super) stats: Mutex<PagerStats>,
    pub(super) stop: EventFd,
}

impl Pager {
    /// The thread body: poll the userfaultfd until `stop` is signalled.
    pub fn run(&self) {
        let mut faults = Vec::new();
        let mut fds = [
            libc::pollfd {
                fd: self.view.uffd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: polling two descriptors we own, array length 2.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                self.fail(format!(
                    "pager: poll failed: {}",
                    std::io::Error::last_os_error()
                ));
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            faults.clear();
            if let Err(e) = self.view.uffd().read_faults(&mut faults) {
                self.fail(format!("pager: {e}"));
                return;
            }
            for f in &faults {
                if let Err(msg) = self.handle(f.addr, f.write, f.tid) {
                    self.fail(msg);
                    return;
                }
            }
        }
    }

    fn fail(&self, msg: String) {
        log::error!("{msg}");
        self.exit.request(ExitReason::Internal(msg));
    }

    /// Resolve one fault at host address `addr` of the view.
    pub fn handle(&self, addr: u64, write: bool, tid: u32) -> Result<(), String> {
        let Some(gpa) = self.view.gpa_of(addr) else {
            return Err(format!("pager: fault at {addr:#x} outside the guest view"));
        };
        let gpa = gpa & !(guestmem::PAGE_SIZE - 1);
        let cpu = self
            .vcpu_tids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&tid)
            .copied()
            .unwrap_or(0);
        let primary = Primary(self.gm.clone());
        loop {
            let seq = self.kvm.fault_begin();
            match self.ept.fault(gpa, write, cpu, &primary) {
                Ok(t) => {
                    let range = t.range();
                    let pool = self.gm.pool();
                    let frame = ((t.host_addr - pool.host_addr(0)) >> guestmem::PAGE_SHIFT)
                        as guestmem::FrameId;
                    let offset = pool.file_offset(frame);
                    let installed = self.kvm.install(seq, range, offset).map_err(|e| {
                        format!("pager: mapping {gpa:#x} for the guest failed: {e}")
                    })?;
                    if !installed {
                        self.stats.lock().unwrap_or_else(|e| e.into_inner()).retries += 1;
                        continue;
                    }
                    let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
                    st.faults += 1;
                    st.huge_faults += u64::from(t.order > 0);
                    drop(st);
                    return self.view.wake(range).map_err(|e| format!("pager: {e}"));
                }
                Err(FaultError::Primary {
                    source: ResolveError::Poisoned { .. },
                    ..
                }) => {
                    self.stats
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .poisoned += 1;
                    return self
                        .view
                        .poison(GpaRange::new(gpa, guestmem::PAGE_SIZE))
                        .map_err(|e| format!("pager: {e}"));
                }
                Err(FaultError::Retry { .. }) => {
                    self.stats.lock().unwrap_or_else(|e| e.into_inner()).retries += 1;
                    std::thread::yield_now();
                }
                Err(e) => {
                    return Err(format!(
                        "pager: guest access at {gpa:#x} cannot be served: {e}"
                    ))
                }
            }
        }
    }
}
