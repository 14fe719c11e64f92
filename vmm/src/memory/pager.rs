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
//!
//! Overcommit (`--mem-pool`, see docs/memory.md "Overcommit"): when guestmem
//! answers `OutOfMemory` (its reclaim, zero pages, already ran and freed
//! nothing), the policy decides. `fail`: the VM ends with
//! [`ExitReason::OutOfMemory`] (status 73), a message naming the pool size
//! and what to do. `pause`: the fault is *parked* (its thread keeps
//! sleeping in the kernel, the event is kept in a FIFO queue) and the pager
//! goes on serving other faults. guestmem signals the pager's `freed`
//! eventfd whenever frames come back (release_range from the balloon or free
//! page reporting, reset, a pool grow); the pager then retries the parked
//! faults in order, stopping at the first that still finds no frame. While
//! faults are parked it also retries every [`PARKED_RETRY_MS`] (frames freed
//! on a path that does not signal). [`OomControl`] holds the state `GET
//! /memory` reports.

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use guestmem::notifier::GpaRange;
use guestmem::{GuestMemory, ResolveError};
use mmu::{Backing, FaultError, PrimaryMap, ShadowEpt};
use vmm_sys_util::eventfd::EventFd;

use super::view::{GuestView, KvmMapping};
use crate::config::OnOom;
use crate::exit::{ExitReason, ExitSignal};

/// While faults are parked, retry them at least this often (ms).
pub const PARKED_RETRY_MS: i32 = 1000;

/// What one attempt at a fault came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Handled {
    /// Resolved (mapped, poison marker, or handed back to fault again).
    Done,
    /// No frame left after reclaim; the text says so with the numbers.
    NoFrames(String),
}

/// The overcommit state shared between the pager and the API.
pub struct OomControl {
    /// What to do when the pool runs dry.
    pub policy: OnOom,
    /// Written by guestmem when frames come back (see the module docs).
    pub freed: EventFd,
    state: Mutex<OomState>,
}

#[derive(Default)]
struct OomState {
    /// Since when faults are parked (wall clock ms, monotonic start).
    since: Option<(u64, Instant)>,
    waiting: usize,
    /// Times the pool ran dry and faults were parked (state changes to paused).
    pauses: u64,
    /// Faults parked in all (one fault may be counted again after a retry failed).
    parked_total: u64,
    /// Parked faults resolved after frames came back.
    resumed_faults: u64,
    /// Of those, resolved by the fallback timer (no free-notify signal
    /// pending: frames came back on a path that does not signal).
    resumed_by_timer: u64,
    /// Longest pause so far, ms.
    longest_ms: u64,
}

impl OomControl {
    /// A control for `policy`.
    pub fn new(policy: OnOom) -> std::io::Result<Self> {
        Ok(Self {
            policy,
            freed: EventFd::new(libc::EFD_NONBLOCK)?,
            state: Mutex::new(OomState::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OomState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_waiting(&self, n: usize, newly_parked: u64, resumed: u64, by_timer: bool) {
        let mut st = self.lock();
        st.parked_total += newly_parked;
        st.resumed_faults += resumed;
        if by_timer {
            st.resumed_by_timer += resumed;
        }
        st.waiting = n;
        match (n, st.since) {
            (0, Some((_, t0))) => {
                st.longest_ms = st.longest_ms.max(t0.elapsed().as_millis() as u64);
                st.since = None;
            }
            (n, None) if n > 0 => {
                let wall = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                st.since = Some((wall, Instant::now()));
                st.pauses += 1;
            }
            _ => {}
        }
    }

    /// What `GET /memory` reports under `"oom"`.
    pub fn report(&self) -> serde_json::Value {
        let st = self.lock();
        let (state, since_ms, paused_for_ms) = match st.since {
            Some((wall, t0)) => (
                "paused",
                serde_json::json!(wall),
                serde_json::json!(t0.elapsed().as_millis() as u64),
            ),
            None => ("running", serde_json::Value::Null, serde_json::Value::Null),
        };
        serde_json::json!({
            "policy": self.policy,
            "state": state,
            "since_ms": since_ms,
            "paused_for_ms": paused_for_ms,
            "waiting_faults": st.waiting,
            "pauses": st.pauses,
            "parked_faults": st.parked_total,
            "resumed_faults": st.resumed_faults,
            "resumed_by_timer": st.resumed_by_timer,
            "longest_pause_ms": st.longest_ms,
        })
    }
}

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
    /// Overcommit policy and state.
    pub(super) oom: Arc<OomControl>,
}

/// A fault waiting for frames.
#[derive(Clone, Copy)]
struct Parked {
    addr: u64,
    write: bool,
    tid: u32,
}

impl Pager {
    /// The thread body: poll the userfaultfd until `stop` is signalled.
    pub fn run(&self) {
        let mut faults = Vec::new();
        let mut parked: VecDeque<Parked> = VecDeque::new();
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
            libc::pollfd {
                fd: self.oom.freed.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            let timeout = if parked.is_empty() {
                -1
            } else {
                PARKED_RETRY_MS
            };
            // SAFETY: polling three descriptors we own, array length 3.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, timeout) };
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
            if fds[2].revents != 0 || (n == 0 && !parked.is_empty()) {
                // Frames came back (or the fallback timer): retry the
                // parked faults first, in order.
                let signalled = self.oom.freed.read().is_ok();
                let before = parked.len();
                while let Some(p) = parked.front().copied() {
                    match self.handle_once(p.addr, p.write, p.tid) {
                        Ok(Handled::Done) => {
                            parked.pop_front();
                        }
                        Ok(Handled::NoFrames(_)) => break,
                        Err(msg) => {
                            self.fail(msg);
                            return;
                        }
                    }
                }
                if before != parked.len() {
                    self.oom.set_waiting(
                        parked.len(),
                        0,
                        (before - parked.len()) as u64,
                        !signalled,
                    );
                }
            }
            if fds[0].revents == 0 {
                continue;
            }
            faults.clear();
            if let Err(e) = self.view.uffd().read_faults(&mut faults) {
                self.fail(format!("pager: {e}"));
                return;
            }
            let mut newly = 0;
            for f in &faults {
                match self.handle_once(f.addr, f.write, f.tid) {
                    Ok(Handled::Done) => {}
                    Ok(Handled::NoFrames(msg)) => match self.oom.policy {
                        OnOom::Fail => {
                            log::error!("{msg}");
                            self.exit.request(ExitReason::OutOfMemory(msg));
                            return;
                        }
                        OnOom::Pause => {
                            if parked.is_empty() {
                                log::warn!("{msg}; faulting vCPUs wait (--on-oom pause)");
                            }
                            parked.push_back(Parked {
                                addr: f.addr,
                                write: f.write,
                                tid: f.tid,
                            });
                            newly += 1;
                        }
                    },
                    Err(msg) => {
                        self.fail(msg);
                        return;
                    }
                }
            }
            if newly > 0 {
                self.oom.set_waiting(parked.len(), newly, 0, false);
            }
        }
    }

    fn fail(&self, msg: String) {
        log::error!("{msg}");
        self.exit.request(ExitReason::Internal(msg));
    }

    /// Resolve one fault at host address `addr` of the view; running out
    /// of frames is an error here (callers outside the pager loop).
    pub fn handle(&self, addr: u64, write: bool, tid: u32) -> Result<(), String> {
        match self.handle_once(addr, write, tid)? {
            Handled::Done => Ok(()),
            Handled::NoFrames(msg) => Err(msg),
        }
    }

    /// The message for a pool that ran dry: its size and what to do.
    fn no_frames_message(&self, gpa: u64, e: &guestmem::OutOfMemory) -> String {
        let pool_mib = (self.gm.pool_frames() * guestmem::PAGE_SIZE) >> 20;
        let ram_mib = (self.gm.max_pool_frames() * guestmem::PAGE_SIZE).div_ceil(1 << 20);
        format!(
            "guest RAM access at {gpa:#x} needs a frame but the frame pool of {pool_mib} MiB \
             (guest RAM {ram_mib} MiB) is exhausted after reclaiming zero pages ({e}); \
             grow the pool (vmm run --mem-pool MIB, or PATCH /memory {{\"pool_mib\": N}} \
             on the API socket), add a balloon (--balloon) so the guest can give memory \
             back, or give the guest less RAM"
        )
    }

    /// One attempt at the fault at host address `addr` of the view.
    fn handle_once(&self, addr: u64, write: bool, tid: u32) -> Result<Handled, String> {
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
                    self.view.wake(range).map_err(|e| format!("pager: {e}"))?;
                    return Ok(Handled::Done);
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
                    return Ok(Handled::Done);
                }
                Err(FaultError::Primary {
                    source: ResolveError::OutOfMemory(e),
                    ..
                }) => return Ok(Handled::NoFrames(self.no_frames_message(gpa, &e))),
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
            .map_err(|e| format!("pager: {e}"))?;
        Ok(Handled::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guestmem::notifier::{InvalidateReason, Invalidation, MmuNotifier};
    use guestmem::GuestMemoryConfig;

    /// A pager over 4 MiB of guest RAM, not running its thread.
    fn pager() -> Arc<Pager> {
        pager_with_pool(None)
    }

    /// The same with a frame pool of `pool_frames` frames.
    fn pager_with_pool(pool_frames: Option<u64>) -> Arc<Pager> {
        let mut cfg = GuestMemoryConfig::x86(4 << 20, 1);
        cfg.pool_frames = pool_frames;
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
            oom: Arc::new(OomControl::new(OnOom::Pause).unwrap()),
        })
    }

    /// Out of frames is `NoFrames` (never an error) with the pool size and
    /// what to do; a grow signals `freed` and the same fault then resolves.
    #[test]
    fn an_empty_pool_is_no_frames_until_it_grows() {
        let p = pager_with_pool(Some(256));
        let o = p.oom.clone();
        p.gm.set_free_notify(Some(Arc::new(move || {
            let _ = o.freed.write(1);
        })));
        let base = p.view.base();
        let mut gpa = 1 << 20;
        let msg = loop {
            match p.handle_once(base + gpa, true, 0).unwrap() {
                Handled::Done => gpa += guestmem::PAGE_SIZE,
                Handled::NoFrames(m) => break m,
            }
            assert!(gpa < 4 << 20, "never ran dry");
        };
        assert!(
            msg.contains("frame pool of 1 MiB") && msg.contains("PATCH /memory"),
            "{msg}"
        );
        assert!(p.handle(base + gpa, true, 0).is_err());
        assert!(
            p.oom.freed.read().is_err(),
            "signalled before any frame came back"
        );
        p.gm.grow_pool(p.gm.max_pool_frames()).unwrap();
        assert_eq!(p.oom.freed.read().unwrap(), 1);
        assert_eq!(p.handle_once(base + gpa, true, 0), Ok(Handled::Done));
        let r = p.oom.report();
        assert_eq!(r["state"], "running", "{r}");
        assert_eq!(r["policy"], "pause", "{r}");
        p.oom.set_waiting(2, 2, 0, false);
        let r = p.oom.report();
        assert_eq!(
            (r["state"].as_str(), r["waiting_faults"].as_u64()),
            (Some("paused"), Some(2)),
            "{r}"
        );
        p.oom.set_waiting(0, 0, 2, false);
        let r = p.oom.report();
        assert_eq!(r["state"], "running", "{r}");
        assert_eq!(
            (r["pauses"].as_u64(), r["resumed_faults"].as_u64()),
            (Some(1), Some(2)),
            "{r}"
        );
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
