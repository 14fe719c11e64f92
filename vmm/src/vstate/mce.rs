//! Machine checks for the guest: MCA setup per vCPU, the encoding of
//! memory-failure errors for the vendor the guest sees, injection, and the
//! SIGBUS handler that turns KVM's hardware-poison signal into an
//! action-required machine check on the accessing vCPU.
//!
//! Encoding (what QEMU emits, so guest kernels classify it as recoverable):
//! - Intel-style: MCi_STATUS = VAL|UC|EN|MISCV|ADDRV|S, plus AR and MCACOD
//!   0x134 (data load) for action-required, MCACOD 0xC0 (memory scrubbing)
//!   for action-optional. MCG_STATUS = MCIP|EIPV|RIPV (AR) or MCIP|RIPV (AO).
//! - AMD-style (AuthenticAMD guests; this project's host passes its AMD EPYC
//!   vendor through): MCi_STATUS = VAL|EN|MISCV|ADDRV plus UC|POISON for
//!   action-required or DEFERRED|POISON|S for action-optional (S so that
//!   Linux's #MC handler, which with MCG_SER_P skips banks without S, logs
//!   it at once); MCG_STATUS as above. Linux's AMD severity logic rates a deferred error as
//!   "deferred" (handled by memory_failure() from the deferred-error path)
//!   and a UC error in user context as action-required when the CPU
//!   advertises SUCCOR, which `boot::cpuid` makes sure the guest sees.
//!
//! In both: MCi_ADDR = the GPA, MCi_MISC = physical address mode, LSB 12.
//! Intel machine checks are broadcast: with more than one vCPU the others
//! get [`encode_broadcast`] (see [`MceState::queue_for`]).
//!
//! Delivery (the rule of Intel SDM vol. 3 §15.10 / §16: a machine check that
//! arrives while MCG_STATUS.MCIP is set puts the processor in shutdown; KVM's
//! KVM_X86_SET_MCE does exactly that, KVM_REQ_TRIPLE_FAULT): every check
//! waits in its vCPU's [`MceState`] queue and the vCPU thread injects at most
//! one per entry, only after reading MCG_STATUS (KVM_GET_MSRS) and finding
//! MCIP clear, i.e. after the guest's handler wrote MCG_STATUS (Linux: at the
//! end of do_machine_check); a queued check also waits until that handler
//! has had time to return ([`Gate`], [`GRACE`]). What cannot go in yet is
//! held, and a poller kicks the vCPU every [`HOLD_POLL`] until it can.
//! - An action-required check (the vCPU's own access) goes first and, with
//!   MCIP clear, at once.
//! - Action-optional checks (and the broadcast placeholders of Intel-style
//!   MCA) are queued, at most [`QUEUE_LEN`] per vCPU; a full queue drops the
//!   new one, counted in `GET /memory` (`poison.counters.mce_dropped`).
//!   Queued rather than dropped: an AO error is exactly what Linux is built
//!   to take later (it runs memory_failure() from a work queue,
//!   memory_failure_queue(), and a scrubber's error found in a bank by the
//!   poller is handled the same way); dropping the second of two close
//!   errors would lose the early offlining of a page for no reason. The
//!   bound is Linux's own (its per-CPU memory_failure_queue kfifo holds 16
//!   and drops on overflow, "buffer overflow when queuing memory failure").
//! - An action-required check for a vCPU whose MCIP is set means the guest
//!   touched poisoned memory while still handling a machine check (AR is
//!   raised in answer to the vCPU's own access, and a vCPU with MCIP set runs
//!   only its #MC handler unless the guest never clears MCIP). The
//!   architecture says shutdown, so the VM ends as a guest crash (status 71)
//!   with a message saying so. Holding it instead cannot work: the only code
//!   that clears MCIP is that vCPU's handler, which is the code that faulted
//!   (held: it never runs again; re-entered: it faults again, forever).

use std::cell::Cell;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kvm_bindings::kvm_x86_mce;

/// Banks the guest gets (QEMU's default).
pub const MCE_BANKS: u64 = 10;
/// Bank memory errors are reported in.
pub const MCE_BANK: u8 = 9;

const MCG_CTL_P: u64 = 1 << 8;
const MCG_SER_P: u64 = 1 << 24;
const MCG_STATUS_RIPV: u64 = 1 << 0;
const MCG_STATUS_EIPV: u64 = 1 << 1;
const MCG_STATUS_MCIP: u64 = 1 << 2;
const MCI_STATUS_VAL: u64 = 1 << 63;
const MCI_STATUS_UC: u64 = 1 << 61;
const MCI_STATUS_EN: u64 = 1 << 60;
const MCI_STATUS_MISCV: u64 = 1 << 59;
const MCI_STATUS_ADDRV: u64 = 1 << 58;
const MCI_STATUS_S: u64 = 1 << 56;
const MCI_STATUS_AR: u64 = 1 << 55;
const MCI_STATUS_DEFERRED: u64 = 1 << 44;
const MCI_STATUS_POISON: u64 = 1 << 43;
const MCACOD_DATA_LOAD: u64 = 0x134;
const MCACOD_SCRUB: u64 = 0xc0;
const MCM_ADDR_PHYS: u64 = 2;

const MSR_IA32_MCG_STATUS: u32 = 0x17a;

const KVM_X86_GET_MCE_CAP_SUPPORTED: libc::c_ulong = 0x8008_ae9d;
const KVM_X86_SETUP_MCE: libc::c_ulong = 0x4008_ae9c;
const KVM_X86_SET_MCE: libc::c_ulong = 0x4040_ae9e;

/// Which vendor's MCA encoding the guest expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum McaVendor {
    /// GenuineIntel (and anything not AMD).
    Intel,
    /// AuthenticAMD / HygonGenuine.
    Amd,
}

/// Action-required (consumed by an access) or action-optional (found by a
/// scrubber, reported at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum McAction {
    /// Synchronous: the access that consumed poison.
    Required,
    /// Asynchronous: poison found, not consumed.
    Optional,
}

/// Errors of MCE ioctls.
#[derive(Debug, thiserror::Error)]
#[error("KVM {what} failed: {err}")]
pub struct MceError {
    what: &'static str,
    err: std::io::Error,
}

/// The MCG_CAP value the guest gets: KVM's supported SER_P/CTL_P bits and
/// [`MCE_BANKS`] banks. None when KVM has no MCE support.
pub fn guest_mcg_cap(kvm: &kvm_ioctls::Kvm) -> Option<u64> {
    let mut supported: u64 = 0;
    // SAFETY: the ioctl writes one u64 into `supported`.
    let r = unsafe {
        libc::ioctl(
            kvm.as_raw_fd(),
            KVM_X86_GET_MCE_CAP_SUPPORTED,
            &mut supported,
        )
    };
    (r == 0).then_some((supported & (MCG_SER_P | MCG_CTL_P)) | MCE_BANKS)
}

/// Enable MCA on a vCPU with `mcg_cap`.
pub fn setup(vcpu: &kvm_ioctls::VcpuFd, mcg_cap: u64) -> Result<(), MceError> {
    // SAFETY: the ioctl reads one u64.
    let r = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_X86_SETUP_MCE, &mcg_cap) };
    if r != 0 {
        return Err(MceError {
            what: "KVM_X86_SETUP_MCE",
            err: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The machine check reporting a memory failure at `gpa`.
pub fn encode(vendor: McaVendor, action: McAction, gpa: u64) -> kvm_x86_mce {
    let common = MCI_STATUS_VAL | MCI_STATUS_EN | MCI_STATUS_MISCV | MCI_STATUS_ADDRV;
    let status = match (vendor, action) {
        (McaVendor::Intel, McAction::Required) => {
            common | MCI_STATUS_UC | MCI_STATUS_S | MCI_STATUS_AR | MCACOD_DATA_LOAD
        }
        (McaVendor::Intel, McAction::Optional) => {
            common | MCI_STATUS_UC | MCI_STATUS_S | MCACOD_SCRUB
        }
        (McaVendor::Amd, McAction::Required) => common | MCI_STATUS_UC | MCI_STATUS_POISON,
        // S (bit 56, ErrCoreIdVal on AMD, which Linux ignores there): with
        // MCG_SER_P Linux's #MC handler only looks at banks with S set; a
        // deferred error without it would wait for the 5-minute bank poll.
        (McaVendor::Amd, McAction::Optional) => {
            common | MCI_STATUS_DEFERRED | MCI_STATUS_POISON | MCI_STATUS_S
        }
    };
    let mcg_status = match action {
        McAction::Required => MCG_STATUS_MCIP | MCG_STATUS_EIPV | MCG_STATUS_RIPV,
        McAction::Optional => MCG_STATUS_MCIP | MCG_STATUS_RIPV,
    };
    kvm_x86_mce {
        status,
        addr: gpa,
        misc: (MCM_ADDR_PHYS << 6) | u64::from(guestmem::PAGE_SHIFT),
        mcg_status,
        bank: MCE_BANK,
        ..Default::default()
    }
}

/// What the other vCPUs get when an Intel-style machine check is broadcast
/// (as QEMU does): bank 1 VAL|UC, MCG_STATUS MCIP|RIPV, no address. Linux
/// on Intel waits in its #MC handler until every CPU has entered it.
pub fn encode_broadcast() -> kvm_x86_mce {
    kvm_x86_mce {
        status: MCI_STATUS_VAL | MCI_STATUS_UC,
        mcg_status: MCG_STATUS_MCIP | MCG_STATUS_RIPV,
        bank: 1,
        ..Default::default()
    }
}

/// Inject `mce` into the vCPU (delivered on its next entry).
pub fn inject(vcpu: &kvm_ioctls::VcpuFd, mce: &kvm_x86_mce) -> Result<(), MceError> {
    // SAFETY: the ioctl reads one kvm_x86_mce.
    let r = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_X86_SET_MCE, mce) };
    if r != 0 {
        return Err(MceError {
            what: "KVM_X86_SET_MCE",
            err: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// How long a vCPU must have run with MCIP clear after the check injected
/// before it, counted in its thread's CPU time, before a queued check goes
/// in (see [`Gate`]).
pub const GRACE: Duration = Duration::from_millis(10);

/// Whether the next check may go in now (see [`Gate::check`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateState {
    /// Yes.
    Open,
    /// MCG_STATUS.MCIP is set: the guest is handling a machine check.
    Mcip,
    /// MCIP was cleared only just now: the handler may not have returned.
    Grace,
}

/// Per-vCPU delivery gate (vCPU thread only).
///
/// MCIP clear is necessary but not enough for a *queued* check: a handler
/// clears MCIP before it returns (Linux at the end of do_machine_check, then
/// the return path and IRET; the kit's handler also prints), and a check
/// delivered in that tail nests on the same IST stack and overwrites the
/// live frame (seen here: a kit guest looping on its corrupted return). On
/// hardware that window is a few hundred nanoseconds an error rarely hits;
/// polling for MCIP would hit it systematically (an exit, or a poll, lands
/// there, most of all where guest ring 0 is emulated). So after an
/// injection the next asynchronous check waits until the vCPU has run for
/// [`GRACE`] with MCIP clear (its thread's CPU time, so host preemption does
/// not count), or is halted (the handler has returned). Action-required
/// checks do not wait: they answer an access made after MCIP was cleared,
/// which is when the hardware would raise them.
#[derive(Debug, Default)]
pub struct Gate {
    /// A check was injected and its handler is not known to be over.
    busy: bool,
    /// Thread CPU time when MCIP was first seen clear since then.
    clear_since: Option<Duration>,
}

impl Gate {
    /// May a check (`required`: action-required) go in now?
    pub fn check(
        &mut self,
        vcpu: &kvm_ioctls::VcpuFd,
        required: bool,
    ) -> Result<GateState, MceError> {
        if mcip(vcpu)? {
            self.clear_since = None;
            return Ok(GateState::Mcip);
        }
        if !self.busy || required {
            return Ok(GateState::Open);
        }
        let now = thread_cpu_time();
        let since = *self.clear_since.get_or_insert(now);
        let halted = vcpu
            .get_mp_state()
            .is_ok_and(|s| s.mp_state == kvm_bindings::KVM_MP_STATE_HALTED);
        if now.saturating_sub(since) >= GRACE || halted {
            self.busy = false;
            return Ok(GateState::Open);
        }
        Ok(GateState::Grace)
    }

    /// A check was injected.
    pub fn injected(&mut self) {
        self.busy = true;
        self.clear_since = None;
    }
}

/// CPU time of the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Whether MCG_STATUS.MCIP is set on the vCPU: the guest has not finished
/// handling the last machine check (it clears MCIP by writing MCG_STATUS).
pub fn mcip(vcpu: &kvm_ioctls::VcpuFd) -> Result<bool, MceError> {
    let err = |err| MceError {
        what: "KVM_GET_MSRS (MCG_STATUS)",
        err,
    };
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: MSR_IA32_MCG_STATUS,
        ..Default::default()
    }])
    .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => Ok(msrs.as_slice()[0].data & MCG_STATUS_MCIP != 0),
        Ok(_) => Err(err(std::io::Error::other("MSR not read"))),
        Err(e) => Err(err(std::io::Error::from_raw_os_error(e.errno()))),
    }
}

/// The vendor of a CPUID leaf 0 (`ebx`, `edx`, `ecx` spell the name).
pub fn vendor_of(ebx: u32, edx: u32, ecx: u32) -> McaVendor {
    let mut name = [0u8; 12];
    name[..4].copy_from_slice(&ebx.to_le_bytes());
    name[4..8].copy_from_slice(&edx.to_le_bytes());
    name[8..].copy_from_slice(&ecx.to_le_bytes());
    match &name {
        b"AuthenticAMD" | b"HygonGenuine" => McaVendor::Amd,
        _ => McaVendor::Intel,
    }
}

thread_local! {
    /// Set on vCPU threads: the host address of the last hardware-poison
    /// SIGBUS not yet turned into a machine check (0 = none).
    static POISON_HVA: Cell<u64> = const { Cell::new(0) };
    static IS_VCPU: Cell<bool> = const { Cell::new(false) };
}

const BUS_MCEERR_AR: i32 = 4;
const BUS_MCEERR_AO: i32 = 5;

extern "C" fn sigbus_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as u64) };
    let handled = (code == BUS_MCEERR_AR || code == BUS_MCEERR_AO)
        && IS_VCPU.try_with(|v| v.get()).unwrap_or(false)
        && POISON_HVA.try_with(|p| p.set(addr)).is_ok();
    if !handled {
        // A VMM thread touched poisoned or missing memory: nothing sane to do.
        let msg = b"vmm: fatal: SIGBUS outside a vCPU (poisoned guest memory touched by the VMM)\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(70);
        }
    }
}

/// Install the SIGBUS handler (process-wide, once).
pub fn install_sigbus_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGBUS, sigbus_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Mark the calling thread as a vCPU thread (its poison SIGBUS is recoverable).
pub fn mark_vcpu_thread() {
    IS_VCPU.with(|v| v.set(true));
}

/// Take the pending poisoned host address of this vCPU thread, if any.
pub fn take_poison() -> Option<u64> {
    let a = POISON_HVA.with(|p| p.replace(0));
    (a != 0).then_some(a)
}

/// Most checks that wait on one vCPU (action-optional errors and broadcast
/// placeholders; an action-required one is never dropped). Linux's per-CPU
/// memory_failure_queue() kfifo has the same size.
pub const QUEUE_LEN: usize = 16;

/// How often a vCPU holding checks is kicked out of KVM_RUN to look at
/// MCG_STATUS again (a guest can clear MCIP without any exit to the VMM).
pub const HOLD_POLL: Duration = Duration::from_millis(2);

/// A queued machine check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingMce {
    /// The memory error itself.
    Error(McAction, u64),
    /// The placeholder other vCPUs get when an Intel-style check is broadcast.
    Broadcast,
}

#[derive(Default)]
struct Queue {
    /// Not yet injected, oldest first, except that an action-required check
    /// goes first (it answers the access the vCPU is executing). The flag
    /// says the check was already counted as deferred.
    items: VecDeque<(PendingMce, bool)>,
    /// Something was queued that the vCPU thread has not looked at yet
    /// ([`MceState::kick_until_taken`] waits for it to look).
    unseen: bool,
}

/// Machine-check configuration and the per-vCPU queues of pending checks.
///
/// Lock order: `threads` before a queue (kicks look at both).
pub struct MceState {
    /// MCG_CAP given to every vCPU (None: KVM has no MCE support).
    pub mcg_cap: Option<u64>,
    /// Encoding the guest expects.
    pub vendor: McaVendor,
    queues: Vec<Mutex<Queue>>,
    /// pthread of each vCPU thread while it is in its run loop (None outside).
    threads: Mutex<Vec<Option<(libc::pthread_t, i32)>>>,
    /// vCPUs holding checks until their guest clears MCIP.
    holding: Vec<AtomicBool>,
    /// The thread kicking holding vCPUs is running.
    poller: AtomicBool,
    /// Where drops are counted (`GET /memory`); set by the first vCPU.
    ram: OnceLock<Arc<crate::memory::GuestRam>>,
}

impl MceState {
    /// State for `vcpus` vCPUs.
    pub fn new(mcg_cap: Option<u64>, vendor: McaVendor, vcpus: u32) -> Self {
        Self {
            mcg_cap,
            vendor,
            queues: (0..vcpus).map(|_| Default::default()).collect(),
            threads: Mutex::new(vec![None; vcpus as usize]),
            holding: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            poller: AtomicBool::new(false),
            ram: OnceLock::new(),
        }
    }

    /// Count drops in `ram`'s poison counters (the first call wins).
    pub fn attach_ram(&self, ram: Arc<crate::memory::GuestRam>) {
        let _ = self.ram.set(ram);
    }

    fn lock(&self, index: u32) -> Option<std::sync::MutexGuard<'_, Queue>> {
        self.queues
            .get(index as usize)
            .map(|q| q.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Queue `m` on vCPU `index`: Some(false) when its queue is full.
    fn push(&self, index: u32, m: PendingMce) -> Option<bool> {
        let mut q = self.lock(index)?;
        if let PendingMce::Error(McAction::Required, _) = m {
            q.items.push_front((m, false));
        } else if q.items.len() >= QUEUE_LEN {
            return Some(false);
        } else {
            q.items.push_back((m, false));
        }
        q.unseen = true;
        Some(true)
    }

    fn dropped(&self, index: u32, m: PendingMce) {
        let what = match m {
            PendingMce::Error(action, gpa) => format!("{action:?} machine check for gpa {gpa:#x}"),
            PendingMce::Broadcast => "broadcast machine check".to_string(),
        };
        log::warn!(
            "vCPU {index}: {what} dropped: {QUEUE_LEN} checks already wait for the guest to finish handling one"
        );
        if let Some(ram) = self.ram.get() {
            ram.record_mce_dropped();
        }
    }

    /// Queue a machine check for vCPU `index` only (the caller kicks it);
    /// false when it was dropped (full queue) or there is no such vCPU.
    pub fn queue(&self, index: u32, action: McAction, gpa: u64) -> bool {
        let m = PendingMce::Error(action, gpa);
        match self.push(index, m) {
            Some(true) => true,
            Some(false) => {
                self.dropped(index, m);
                false
            }
            None => false,
        }
    }

    /// Whether a machine check must reach every vCPU: Intel-style MCA
    /// (Linux waits for all CPUs in its #MC handler unless the check is
    /// local, LMCE, which this VMM does not offer) with more than one vCPU.
    /// AMD machine checks are local.
    pub fn broadcasts(&self) -> bool {
        self.vendor == McaVendor::Intel && self.queues.len() > 1
    }

    /// Queue the broadcast placeholder on every vCPU but `except` (when
    /// [`MceState::broadcasts`]); returns the vCPUs queued.
    pub fn queue_broadcast(&self, except: u32) -> Vec<u32> {
        if !self.broadcasts() {
            return Vec::new();
        }
        (0..self.queues.len() as u32)
            .filter(|&i| i != except)
            .filter(|&i| match self.push(i, PendingMce::Broadcast) {
                Some(true) => true,
                Some(false) => {
                    self.dropped(i, PendingMce::Broadcast);
                    false
                }
                None => false,
            })
            .collect()
    }

    /// Queue a machine check as the hardware would raise it: the error on
    /// `target`, and for Intel-style MCA with several vCPUs the broadcast
    /// placeholder on all others (QEMU does the same). Returns every vCPU
    /// that got something (none when the error was dropped); kick them with
    /// [`MceState::kick_until_taken`].
    pub fn queue_for(&self, target: u32, action: McAction, gpa: u64) -> Vec<u32> {
        if !self.queue(target, action, gpa) {
            return Vec::new();
        }
        let mut v = vec![target];
        v.extend(self.queue_broadcast(target));
        v
    }

    fn is_unseen(&self, index: u32) -> bool {
        self.lock(index).is_some_and(|q| q.unseen)
    }

    /// Kick `vcpus` out of KVM_RUN until each has looked at its queue (kicks
    /// repeat: one landing just before KVM_RUN is lost), for at most
    /// `timeout` (a paused vCPU looks when it resumes). A vCPU that has to
    /// hold a check (MCIP set) is then kicked by the poller until it is in.
    pub fn kick_until_taken(&self, vcpus: &[u32], timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let waiting = self.kick(|i| vcpus.contains(&i) && self.is_unseen(i));
            if !waiting || std::time::Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Kick every registered vCPU thread `which` selects (unless it sleeps
    /// on a userfaultfd fault, see `control::kick_is_safe`); true if any
    /// was selected.
    fn kick(&self, which: impl Fn(u32) -> bool) -> bool {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        let mut any = false;
        for (i, t) in threads.iter().enumerate() {
            if let Some((t, tid)) = t.filter(|_| which(i as u32)) {
                any = true;
                if super::control::kick_is_safe(tid) {
                    // SAFETY: the thread is inside its run loop: it
                    // unregisters (under this lock) before it ends.
                    unsafe { libc::pthread_kill(t, super::control::kick_signal()) };
                }
            }
        }
        any
    }

    /// Register (Some) or unregister (None) the thread of vCPU `index`; an
    /// unregistered vCPU holds nothing.
    pub fn set_thread(&self, index: u32, t: Option<(libc::pthread_t, i32)>) {
        if let Some(slot) = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(index as usize)
        {
            *slot = t;
        }
        if t.is_none() {
            self.set_holding(index, false);
        }
    }

    /// For vCPU `index`'s thread: the next check to inject (marks the queue
    /// looked at).
    pub fn front(&self, index: u32) -> Option<PendingMce> {
        let mut q = self.lock(index)?;
        q.unseen = false;
        q.items.front().map(|p| p.0)
    }

    /// For vCPU `index`'s thread: remove the check [`MceState::front`] gave.
    pub fn pop_front(&self, index: u32) {
        if let Some(mut q) = self.lock(index) {
            q.items.pop_front();
        }
    }

    /// For vCPU `index`'s thread: the GPA of a queued action-required check.
    pub fn required(&self, index: u32) -> Option<u64> {
        self.lock(index)?.items.iter().find_map(|p| match p.0 {
            PendingMce::Error(McAction::Required, gpa) => Some(gpa),
            _ => None,
        })
    }

    /// For vCPU `index`'s thread: its queued checks cannot go in yet (MCIP
    /// is set). Returns how many of them wait for the first time; starts
    /// the poller that kicks the vCPU until they can.
    pub fn hold(this: &Arc<Self>, index: u32) -> u32 {
        let newly = this.lock(index).map_or(0, |mut q| {
            let mut n = 0;
            for p in q.items.iter_mut().filter(|p| !p.1) {
                p.1 = true;
                n += 1;
            }
            n
        });
        this.set_holding(index, true);
        if !this.poller.swap(true, Ordering::SeqCst) {
            let me = this.clone();
            let spawned = std::thread::Builder::new()
                .name("mce-poll".into())
                .spawn(move || me.poll_holding());
            if let Err(e) = spawned {
                // The vCPU still looks at MCG_STATUS on its next exit.
                this.poller.store(false, Ordering::SeqCst);
                log::warn!("cannot start the machine-check poller: {e}");
            }
        }
        newly
    }

    /// Whether vCPU `index` is held (see [`MceState::hold`]).
    pub fn set_holding(&self, index: u32, on: bool) {
        if let Some(h) = self.holding.get(index as usize) {
            h.store(on, Ordering::SeqCst);
        }
    }

    /// The poller: kick holding vCPUs every [`HOLD_POLL`] until none holds.
    fn poll_holding(&self) {
        loop {
            let held = |i: u32| self.holding[i as usize].load(Ordering::SeqCst);
            if !self.kick(held) {
                // Stop, unless a vCPU started holding after the look above
                // and counted on this thread (then keep it, unless a new
                // poller was started meanwhile).
                self.poller.store(false, Ordering::SeqCst);
                if !self.kick(held) || self.poller.swap(true, Ordering::SeqCst) {
                    return;
                }
            }
            std::thread::sleep(HOLD_POLL);
        }
    }

    /// Forget vCPU `index`'s checks (guest reset).
    pub fn clear(&self, index: u32) {
        if let Some(mut q) = self.lock(index) {
            *q = Queue::default();
        }
        self.set_holding(index, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        let m = encode(McaVendor::Intel, McAction::Required, 0x1234_5000);
        assert_eq!(m.addr, 0x1234_5000);
        assert_eq!(m.status & 0xffff, 0x134);
        assert_ne!(m.status & MCI_STATUS_AR, 0);
        assert_ne!(m.status & MCI_STATUS_S, 0);
        assert_eq!(
            m.mcg_status,
            MCG_STATUS_MCIP | MCG_STATUS_EIPV | MCG_STATUS_RIPV
        );
        assert_eq!(m.misc, 0x8c);
        let m = encode(McaVendor::Intel, McAction::Optional, 0x1000);
        assert_eq!((m.status & 0xffff, m.status & MCI_STATUS_AR), (0xc0, 0));
        assert_eq!(m.mcg_status, MCG_STATUS_MCIP | MCG_STATUS_RIPV);
        let m = encode(McaVendor::Amd, McAction::Required, 0x1000);
        assert_ne!(m.status & MCI_STATUS_UC, 0);
        assert_ne!(m.status & MCI_STATUS_POISON, 0);
        assert_eq!(m.status & MCI_STATUS_DEFERRED, 0);
        let m = encode(McaVendor::Amd, McAction::Optional, 0x1000);
        assert_eq!(m.status & MCI_STATUS_UC, 0);
        assert_ne!(m.status & MCI_STATUS_DEFERRED, 0);
        assert_ne!(m.status & MCI_STATUS_S, 0);
        let b = encode_broadcast();
        assert_eq!(
            (b.bank, b.status, b.mcg_status),
            (1, MCI_STATUS_VAL | MCI_STATUS_UC, 5)
        );
        assert_eq!(
            vendor_of(0x6874_7541, 0x6974_6e65, 0x444d_4163),
            McaVendor::Amd
        );
        assert_eq!(
            vendor_of(0x756e_6547, 0x4965_6e69, 0x6c65_746e),
            McaVendor::Intel
        );
    }

    #[test]
    fn queues_are_bounded_fifo_with_action_required_first() {
        let s = MceState::new(Some(MCE_BANKS), McaVendor::Intel, 2);
        assert_eq!(s.front(0), None);
        // Intel, 2 vCPUs: the error on the target, the placeholder on the other.
        assert_eq!(s.queue_for(0, McAction::Optional, 0x1000), vec![0, 1]);
        assert!(s.is_unseen(0) && s.is_unseen(1));
        assert_eq!(
            s.front(0),
            Some(PendingMce::Error(McAction::Optional, 0x1000))
        );
        assert!(!s.is_unseen(0), "front() marks the queue looked at");
        assert_eq!(s.front(1), Some(PendingMce::Broadcast));
        for i in 1..QUEUE_LEN as u64 {
            assert_eq!(
                s.queue_for(0, McAction::Optional, 0x10_0000 + (i << 12))
                    .len(),
                2
            );
        }
        // Full: a new action-optional check is dropped, with its placeholders.
        assert!(s.queue_for(0, McAction::Optional, 0xdead_0000).is_empty());
        assert_eq!(s.lock(1).unwrap().items.len(), QUEUE_LEN);
        // An action-required one is never dropped and goes first (its
        // placeholder is: vCPU 1's queue is full).
        assert_eq!(s.queue_for(0, McAction::Required, 0x5000), vec![0]);
        assert_eq!(
            s.front(0),
            Some(PendingMce::Error(McAction::Required, 0x5000))
        );
        assert_eq!(s.required(0), Some(0x5000));
        assert_eq!(
            s.required(1),
            None,
            "a placeholder is not the vCPU's own access"
        );
        s.pop_front(0);
        assert_eq!(s.required(0), None);
        assert_eq!(
            s.front(0),
            Some(PendingMce::Error(McAction::Optional, 0x1000))
        );
        s.pop_front(0);
        assert_eq!(
            s.front(0),
            Some(PendingMce::Error(McAction::Optional, 0x10_1000))
        );
        s.clear(0);
        assert_eq!(s.front(0), None);
        // No such vCPU.
        assert!(s.queue_for(7, McAction::Optional, 0x1000).is_empty());
        // AMD (and one vCPU): local, no placeholders.
        let a = MceState::new(Some(MCE_BANKS), McaVendor::Amd, 2);
        assert_eq!(a.queue_for(1, McAction::Optional, 0x1000), vec![1]);
        assert_eq!(a.front(0), None);
    }
}
