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
//! A poisoned GPA is resolved with a poison marker instead, under the same
//! sequence check as step 4 (a reset in between heals the page): KVM turns
//! the access into SIGBUS(BUS_MCEERR_AR) on the vCPU thread, which injects a
//! machine check into the guest (see `vstate::mce`).
//!
//! Retries are bounded: after [`MAX_ATTEMPTS`] refused installs in a row
//! the pager wakes the waiting thread without mapping anything. The access
//! then faults again and comes back as a new event, after the faults queued
//! behind it (as a KVM fault that returns RET_PF_RETRY re-enters the guest
//! and faults again), so a range under constant invalidation cannot stall
//! the single pager thread and every other vCPU with it.

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

/// Resolve attempts for one fault event before the pager hands it back to
/// the faulting thread (it faults again: a new event).
pub const MAX_ATTEMPTS: u32 = 8;

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
    /// Fault events handed back unresolved after [`MAX_ATTEMPTS`] attempts
    /// (the thread faults again).
    pub requeued: u64,
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
        for _ in 0..MAX_ATTEMPTS {
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
                    let page = GpaRange::new(gpa, guestmem::PAGE_SIZE);
                    let installed = self
                        .kvm
                        .install_poison(seq, page)
                        .map_err(|e| format!("pager: {e}"))?;
                    let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
                    if !installed {
                        st.retries += 1;
                        continue;
                    }
                    st.poisoned += 1;
                    return Ok(());
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
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requeued += 1;
        self.view
            .wake(GpaRange::new(gpa, guestmem::PAGE_SIZE))
            .map_err(|e| format!("pager: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guestmem::notifier::{InvalidateReason, Invalidation, MmuNotifier};
    use guestmem::GuestMemoryConfig;

    /// A pager over 4 MiB of guest RAM, not running its thread.
    fn pager() -> Arc<Pager> {
        let cfg = GuestMemoryConfig::x86(4 << 20, 1);
        let ram = cfg.ram.clone();
        let gm = Arc::new(GuestMemory::new(cfg).unwrap());
        let span = ram.iter().map(|r| r.end).max().unwrap();
        let view = Arc::new(GuestView::new(span, &ram, &[], gm.pool().fd()).unwrap());
        let ept = Arc::new(ShadowEpt::new().unwrap());
        let kvm = Arc::new(KvmMapping::new(view.clone()));
        gm.notifiers().register(ept.clone());
        gm.notifiers().register(kvm.clone());
        Arc::new(Pager {
            gm,
            ept,
            view,
            kvm,
            exit: Arc::new(ExitSignal::new().unwrap()),
            vcpu_tids: Mutex::new(HashMap::new()),
            stats: Mutex::new(PagerStats::default()),
            stop: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        })
    }

    /// A fault on a range whose invalidation never ends (the install is
    /// refused every time) is handed back after MAX_ATTEMPTS instead of
    /// keeping the single pager thread (and every other fault) busy.
    #[test]
    fn retries_are_bounded_and_the_fault_is_handed_back() {
        let p = pager();
        let gpa = 2 << 20;
        let inv = Invalidation {
            range: GpaRange::new(gpa, 2 << 20),
            reason: InvalidateReason::Migrate,
        };
        p.kvm.invalidate_range_start(&inv);
        let (tx, rx) = std::sync::mpsc::channel();
        let q = p.clone();
        std::thread::spawn(move || {
            let addr = q.view.base() + gpa;
            let _ = tx.send(q.handle(addr, true, 0));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("pager::handle still retrying after 10 s: retries are unbounded");
        assert_eq!(r, Ok(()));
        let st = *p.stats.lock().unwrap();
        assert_eq!(st.requeued, 1, "{st:?}");
        assert_eq!(st.retries, u64::from(MAX_ATTEMPTS), "{st:?}");
        assert_eq!(st.faults, 0, "{st:?}");
        p.kvm.invalidate_range_end(&inv);
        // Once the invalidation is over the same fault resolves.
        p.handle(p.view.base() + gpa, true, 0).unwrap();
        assert_eq!(p.stats.lock().unwrap().faults, 1);
    }
}
