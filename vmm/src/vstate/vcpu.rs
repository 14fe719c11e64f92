//! vCPU setup and the per-vCPU run loop (one thread per vCPU).

use std::sync::Arc;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

use super::assist::{self, Assists};
use super::control::VcpuControl;
use super::mce;
use crate::boot::{cpuid, regs, BootEntry};
use crate::devices::Bus;
use crate::exit::{ExitReason, ExitSignal};

/// Errors creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {index}: KVM {what} failed: {err}")]
    Ioctl {
        /// vCPU index.
        index: u32,
        /// Which operation.
        what: &'static str,
        /// The error.
        err: kvm_ioctls::Error,
    },
    /// Machine-check setup failed.
    #[error("vCPU {index}: {err}")]
    Mce {
        /// vCPU index.
        index: u32,
        /// The error.
        err: mce::MceError,
    },
    /// Register setup failed.
    #[error("vCPU {index}: {err}")]
    Regs {
        /// vCPU index.
        index: u32,
        /// The error.
        err: regs::RegsError,
    },
}

/// What a vCPU thread needs besides its fd.
#[derive(Clone)]
pub struct VcpuShared {
    /// Port-I/O devices.
    pub io: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where to report the end of the VM.
    pub exit: Arc<ExitSignal>,
    /// Run/pause/stop.
    pub control: Arc<VcpuControl>,
    /// Guest RAM (fault accounting, poison addresses).
    pub ram: Arc<crate::memory::GuestRam>,
    /// Machine-check state shared by all vCPUs.
    pub mce: Arc<MceState>,
    /// Emulation assists (hosts that emulate guest ring 0).
    pub assists: Arc<Assists>,
}

/// A queued machine check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PendingMce {
    /// The memory error itself.
    Error(mce::McAction, u64),
    /// The placeholder other vCPUs get when an Intel-style check is broadcast.
    Broadcast,
}

/// Machine-check configuration and per-vCPU queues of pending checks.
///
/// Lock order: `threads` before a `pending` queue (kicks look at both).
pub struct MceState {
    /// MCG_CAP given to every vCPU (None: KVM has no MCE support).
    pub mcg_cap: Option<u64>,
    /// Encoding the guest expects.
    pub vendor: mce::McaVendor,
    pending: Vec<std::sync::Mutex<Vec<PendingMce>>>,
    /// pthread of each vCPU thread while it is in its run loop (None outside).
    threads: std::sync::Mutex<Vec<Option<(libc::pthread_t, i32)>>>,
}

impl MceState {
    /// State for `vcpus` vCPUs.
    pub fn new(mcg_cap: Option<u64>, vendor: mce::McaVendor, vcpus: u32) -> Self {
        Self {
            mcg_cap,
            vendor,
            pending: (0..vcpus).map(|_| Default::default()).collect(),
            threads: std::sync::Mutex::new(vec![None; vcpus as usize]),
        }
    }

    fn push(&self, index: u32, m: PendingMce) -> bool {
        match self.pending.get(index as usize) {
            Some(q) => {
                q.lock().unwrap_or_else(|e| e.into_inner()).push(m);
                true
            }
            None => false,
        }
    }

    /// Queue a machine check for vCPU `index` only (the caller kicks it).
    pub fn queue(&self, index: u32, action: mce::McAction, gpa: u64) -> bool {
        self.push(index, PendingMce::Error(action, gpa))
    }

    /// Whether a machine check must reach every vCPU: Intel-style MCA
    /// (Linux waits for all CPUs in its #MC handler unless the check is
    /// local, LMCE, which this VMM does not offer) with more than one vCPU.
    /// AMD machine checks are local.
    pub fn broadcasts(&self) -> bool {
        self.vendor == mce::McaVendor::Intel && self.pending.len() > 1
    }

    /// Queue the broadcast placeholder on every vCPU but `except` (when
    /// [`MceState::broadcasts`]); returns the vCPUs queued.
    fn queue_broadcast(&self, except: u32) -> Vec<u32> {
        if !self.broadcasts() {
            return Vec::new();
        }
        (0..self.pending.len() as u32)
            .filter(|&i| i != except && self.push(i, PendingMce::Broadcast))
            .collect()
    }

    /// Queue a machine check as the hardware would raise it: the error on
    /// `target`, and for Intel-style MCA with several vCPUs the broadcast
    /// placeholder on all others (QEMU does the same). Returns every vCPU
    /// that got something; kick them with [`MceState::kick_until_taken`].
    pub fn queue_for(&self, target: u32, action: mce::McAction, gpa: u64) -> Vec<u32> {
        if !self.queue(target, action, gpa) {
            return Vec::new();
        }
        let mut v = vec![target];
        v.extend(self.queue_broadcast(target));
        v
    }

    fn is_pending(&self, index: u32) -> bool {
        self.pending
            .get(index as usize)
            .is_some_and(|q| !q.lock().unwrap_or_else(|e| e.into_inner()).is_empty())
    }

    /// Kick `vcpus` out of KVM_RUN until each has taken its queue (kicks
    /// repeat: one landing just before KVM_RUN is lost), for at most
    /// `timeout` (a paused vCPU takes its queue when it resumes).
    pub fn kick_until_taken(&self, vcpus: &[u32], timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let mut waiting = false;
            {
                let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
                for &i in vcpus {
                    if let (Some(Some((t, tid))), true) =
                        (threads.get(i as usize), self.is_pending(i))
                    {
                        waiting = true;
                        if super::control::kick_is_safe(*tid) {
                            // SAFETY: the thread is inside its run loop: it
                            // unregisters (under this lock) before it ends.
                            unsafe { libc::pthread_kill(*t, super::control::kick_signal()) };
                        }
                    }
                }
            }
            if !waiting || std::time::Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn set_thread(&self, index: u32, t: Option<(libc::pthread_t, i32)>) {
        if let Some(slot) = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(index as usize)
        {
            *slot = t;
        }
    }

    fn take(&self, index: u32) -> Vec<PendingMce> {
        self.pending
            .get(index as usize)
            .map(|q| std::mem::take(&mut *q.lock().unwrap_or_else(|e| e.into_inner())))
            .unwrap_or_default()
    }
}

enum RamAccess<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// An emulated guest access (KVM reports it as MMIO) to guest RAM whose host
/// page was not accessible at that moment (e.g. the guest view was being
/// zapped): complete it through the device translation cache, i.e. through
/// the fault path, like any device access. A poisoned page gets an
/// action-required machine check, as a native access would.
fn ram_access(
    shared: &VcpuShared,
    index: u32,
    gpa: u64,
    access: RamAccess<'_>,
) -> Option<ExitReason> {
    let Some(tlb) = shared.ram.device_tlb() else {
        return Some(ExitReason::Internal(format!(
            "vCPU {index}: emulated access to RAM {gpa:#x} with no memory to serve it"
        )));
    };
    let r = match access {
        RamAccess::Read(data) => tlb.read(gpa, data),
        RamAccess::Write(data) => tlb.write(gpa, data),
    };
    match r {
        Ok(()) => None,
        Err(crate::memory::dma::DmaError::Poisoned(page)) => {
            shared.mce.queue_for(index, mce::McAction::Required, page);
            None
        }
        Err(e) => Some(ExitReason::Internal(format!(
            "vCPU {index}: emulated access to RAM: {e}"
        ))),
    }
}

/// One vCPU.
pub struct Vcpu {
    fd: VcpuFd,
    index: u32,
    shared: VcpuShared,
    /// The local APIC as created (before LINT setup): what a reset restores.
    power_on_lapic: kvm_bindings::kvm_lapic_state,
}

impl Vcpu {
    /// Create vCPU `index` of `count` and give it CPUID, MSRs, FPU and LINT
    /// state. The boot vCPU (index 0) also gets the entry state through
    /// [`Vcpu::setup_boot`]; the others wait for INIT/SIPI from the guest.
    pub fn new(
        vm: &super::vm::Vm,
        supported: &CpuId,
        index: u32,
        count: u32,
        shared: VcpuShared,
    ) -> Result<Self, VcpuError> {
        let io_err = |what| move |err| VcpuError::Ioctl { index, what, err };
        let fd = vm
            .fd
            .create_vcpu(u64::from(index))
            .map_err(io_err("create vCPU"))?;
        let mut c = supported.clone();
        cpuid::fix_for_vcpu(&mut c, index, count);
        cpuid::set_mca_recovery(&mut c);
        if shared.assists.enabled() {
            cpuid::hide_for_emulated_ring0(&mut c);
        }
        fd.set_cpuid2(&c).map_err(io_err("set CPUID"))?;
        let re = |err| VcpuError::Regs { index, err };
        let power_on_lapic = fd.get_lapic().map_err(io_err("read the local APIC"))?;
        regs::setup_msrs(&fd).map_err(re)?;
        regs::setup_fpu(&fd).map_err(re)?;
        regs::setup_lint(&fd).map_err(re)?;
        if let Some(cap) = shared.mce.mcg_cap {
            mce::setup(&fd, cap).map_err(|e| VcpuError::Mce { index, err: e })?;
        }
        Ok(Self {
            fd,
            index,
            shared,
            power_on_lapic,
        })
    }

    /// Supported CPUID of this host's KVM.
    pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, VcpuError> {
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|err| VcpuError::Ioctl {
                index: 0,
                what: "get supported CPUID",
                err,
            })
    }

    /// Put the boot vCPU at the guest's entry point.
    pub fn setup_boot<M: vm_memory::GuestMemoryBackend>(
        &self,
        mem: &M,
        entry: BootEntry,
    ) -> Result<(), VcpuError> {
        let re = |err| VcpuError::Regs {
            index: self.index,
            err,
        };
        regs::setup_sregs(mem, &self.fd, entry.mode).map_err(re)?;
        regs::setup_regs(&self.fd, entry.mode, entry.entry).map_err(re)
    }

    /// The run loop; returns (the vCPU, for a reset) when the VM ends or the
    /// controller stops it.
    pub fn run(mut self) -> Self {
        mce::mark_vcpu_thread();
        self.shared.ram.register_vcpu_thread(self.index);
        // SAFETY: pthread_self and gettid have no preconditions.
        let me = unsafe { (libc::pthread_self(), libc::gettid()) };
        self.shared.mce.set_thread(self.index, Some(me));
        self.shared.control.register_current_thread();
        while self.shared.control.wait_runnable() {
            if let Some(reason) = self.run_once().or_else(|| self.deliver_machine_checks()) {
                self.shared.exit.request(reason);
                break;
            }
            // Another vCPU or a device (debug-exit, i8042 reset) ended the VM:
            // do not re-enter the guest.
            if self.shared.exit.reason().is_some() {
                break;
            }
        }
        self.shared.mce.set_thread(self.index, None);
        self
    }

    /// Put the vCPU back in its power-on state for a reset: the boot vCPU at
    /// `entry`, the others waiting for INIT/SIPI. Clears pending events and
    /// machine-check banks.
    pub fn reset<M: vm_memory::GuestMemoryBackend>(
        &mut self,
        mem: &M,
        entry: Option<BootEntry>,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let io_err = |what| move |err| VcpuError::Ioctl { index, what, err };
        let re = |err| VcpuError::Regs { index, err };
        self.fd
            .set_vcpu_events(&Default::default())
            .map_err(io_err("clear vCPU events"))?;
        self.fd
            .set_lapic(&self.power_on_lapic)
            .map_err(io_err("reset the local APIC"))?;
        regs::setup_msrs(&self.fd).map_err(re)?;
        regs::setup_fpu(&self.fd).map_err(re)?;
        regs::setup_lint(&self.fd).map_err(re)?;
        if let Some(cap) = self.shared.mce.mcg_cap {
            const MSR_MCG_STATUS: u32 = 0x17a;
            const MSR_MC0_STATUS: u32 = 0x401;
            let mut list = vec![kvm_bindings::kvm_msr_entry {
                index: MSR_MCG_STATUS,
                ..Default::default()
            }];
            for bank in 0..(cap & 0xff) as u32 {
                list.push(kvm_bindings::kvm_msr_entry {
                    index: MSR_MC0_STATUS + 4 * bank,
                    ..Default::default()
                });
            }
            let msrs = kvm_bindings::Msrs::from_entries(&list).map_err(|_| VcpuError::Ioctl {
                index,
                what: "build MCE MSR list",
                err: kvm_ioctls::Error::new(libc::EINVAL),
            })?;
            self.fd
                .set_msrs(&msrs)
                .map_err(io_err("clear machine-check banks"))?;
        }
        let state = match entry {
            Some(e) => {
                self.setup_boot(mem, e)?;
                kvm_bindings::KVM_MP_STATE_RUNNABLE
            }
            None => kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
        };
        self.fd
            .set_mp_state(kvm_bindings::kvm_mp_state { mp_state: state })
            .map_err(io_err("set MP state"))
    }

    /// Enter the guest once and handle the exit. Returns a reason when the
    /// VM must end.
    fn run_once(&mut self) -> Option<ExitReason> {
        let index = self.index;
        let window = self.shared.ram.zap_window();
        // EFAULT (or a memory-fault exit) on guest RAM while the guest view
        // was being zapped: the page was briefly inaccessible; enter again.
        let transient = |shared: &VcpuShared| {
            let now = shared.ram.zap_window();
            let retry = now % 2 == 1 || now != window;
            if retry {
                std::thread::yield_now();
            }
            retry
        };
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => {
                    if !self.shared.io.write(u64::from(port), data) {
                        log::debug!("vCPU {index}: write to unclaimed port {port:#x}");
                    }
                    None
                }
                VcpuExit::IoIn(port, data) => {
                    if !self.shared.io.read(u64::from(port), data) {
                        log::debug!("vCPU {index}: read from unclaimed port {port:#x}");
                    }
                    None
                }
                VcpuExit::MmioRead(addr, data) => {
                    if self.shared.mmio.read(addr, data) {
                        None
                    } else if self.shared.ram.is_ram(addr) {
                        ram_access(&self.shared, index, addr, RamAccess::Read(data))
                    } else {
                        log::debug!("vCPU {index}: MMIO read at unclaimed {addr:#x}");
                        None
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if self.shared.mmio.write(addr, data) {
                        None
                    } else if self.shared.ram.is_ram(addr) {
                        ram_access(&self.shared, index, addr, RamAccess::Write(data))
                    } else {
                        log::debug!("vCPU {index}: MMIO write at unclaimed {addr:#x}");
                        None
                    }
                }
                VcpuExit::MemoryFault { gpa, .. } if self.shared.ram.is_ram(gpa) && transient(&self.shared) => None,
                VcpuExit::Hlt => None,
                VcpuExit::Shutdown => Some(ExitReason::Crash(format!(
                    "vCPU {index}: triple fault (KVM_EXIT_SHUTDOWN); {}",
                    self.describe_state()
                ))),
                VcpuExit::SystemEvent(kind, _) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitReason::Shutdown),
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(ExitReason::Reset),
                    other => Some(ExitReason::Crash(format!("vCPU {index}: system event {other} (guest crash)"))),
                },
                VcpuExit::InternalError => self.handle_internal_error(),
                VcpuExit::FailEntry(reason, cpu) => Some(ExitReason::Crash(format!(
                    "vCPU {index}: VM entry failed (hardware reason {reason:#x} on host CPU {cpu}); {}",
                    self.describe_state()
                ))),
                other => {
                    let what = format!("{other:?}");
                    Some(ExitReason::Crash(format!("vCPU {index}: unhandled KVM exit {what}; {}", self.describe_state())))
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) if e.errno() == libc::EFAULT && transient(&self.shared) => None,
            Err(e) => Some(ExitReason::Internal(format!("vCPU {index}: KVM_RUN failed: {e}"))),
        }
    }

    /// Inject pending machine checks: the action-required one KVM signalled
    /// (SIGBUS on this thread when the guest touched a poisoned page) and any
    /// action-optional ones queued by the API.
    fn deliver_machine_checks(&mut self) -> Option<ExitReason> {
        let mut todo = self.shared.mce.take(self.index);
        if let Some(hva) = mce::take_poison() {
            match self.shared.ram.gpa_of_host(hva) {
                Some(gpa) => {
                    todo.push(PendingMce::Error(
                        mce::McAction::Required,
                        gpa & !(guestmem::PAGE_SIZE - 1),
                    ));
                    let others = self.shared.mce.queue_broadcast(self.index);
                    self.shared
                        .mce
                        .kick_until_taken(&others, std::time::Duration::from_millis(100));
                }
                None => {
                    return Some(ExitReason::Internal(format!(
                    "vCPU {}: hardware-poison SIGBUS at host address {hva:#x} outside guest RAM",
                    self.index
                )))
                }
            }
        }
        for p in todo {
            let (action, gpa) = match p {
                PendingMce::Error(action, gpa) => (action, gpa),
                PendingMce::Broadcast => {
                    // A vCPU without CR4.MCE (not started yet, or MCE not
                    // enabled) cannot take it (KVM would shut the VM down)
                    // and does not take part in the guest's rendezvous.
                    const CR4_MCE: u64 = 1 << 6;
                    if self.fd.get_sregs().is_ok_and(|s| s.cr4 & CR4_MCE == 0) {
                        log::debug!(
                            "vCPU {}: broadcast machine check skipped (CR4.MCE clear)",
                            self.index
                        );
                        continue;
                    }
                    if let Err(e) = mce::inject(&self.fd, &mce::encode_broadcast()) {
                        return Some(ExitReason::Internal(format!("vCPU {}: {e}", self.index)));
                    }
                    log::debug!("vCPU {}: broadcast machine check injected", self.index);
                    continue;
                }
            };
            if self.shared.mce.mcg_cap.is_none() {
                return Some(ExitReason::Crash(format!(
                    "vCPU {}: guest touched poisoned memory at {gpa:#x} and KVM cannot inject machine checks",
                    self.index
                )));
            }
            let m = mce::encode(self.shared.mce.vendor, action, gpa);
            if let Err(e) = mce::inject(&self.fd, &m) {
                return Some(ExitReason::Internal(format!("vCPU {}: {e}", self.index)));
            }
            self.shared.ram.record_mce(action);
            log::warn!(
                "vCPU {}: machine check ({action:?}) injected for gpa {gpa:#x}, status {:#x}",
                self.index,
                m.status
            );
        }
        None
    }

    /// KVM_EXIT_INTERNAL_ERROR: complete the instruction with an emulation
    /// assist if one applies and assists are on, else report a crash.
    fn handle_internal_error(&mut self) -> Option<ExitReason> {
        let run = self.fd.get_kvm_run();
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
        // active member of the exit union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let nd = (internal.ndata as usize).min(internal.data.len());
        let insn = assist::failed_instruction(internal.suberror, &internal.data[..nd]);
        if let Some(insn) = &insn {
            match self.shared.assists.complete(&self.fd, insn) {
                Ok(Some(_)) => return None,
                Ok(None) => {}
                Err(e) => return Some(ExitReason::Internal(format!("vCPU {}: {e}", self.index))),
            }
        }
        let mut s = self.describe_internal_error();
        if let Some(kind) = insn.as_deref().and_then(assist::classify) {
            s.push_str(&format!(
                "; an emulation assist exists for this instruction ({kind:?}): run with --emulation-assists on"
            ));
        }
        Some(ExitReason::Crash(s))
    }

    fn describe_internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
        // active member of the exit union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let nd = (internal.ndata as usize).min(internal.data.len());
        let what = match internal.suberror {
            1 => "emulation failure",
            2 => "simultaneous exceptions",
            3 => "delivery event failure",
            _ => "internal error",
        };
        let mut s = format!(
            "vCPU {}: KVM internal error, suberror {} ({what}), data {:x?}",
            self.index,
            internal.suberror,
            &internal.data[..nd]
        );
        if internal.suberror == 1 && nd >= 1 && internal.data[0] & 1 != 0 {
            // Flag 1: instruction bytes follow (length byte, then bytes).
            let bytes: Vec<u8> = internal.data[1..nd]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            if let Some((&len, rest)) = bytes.split_first() {
                let n = (len as usize).min(rest.len());
                s.push_str(&format!(", instruction bytes {:02x?}", &rest[..n]));
            }
        }
        s.push_str("; ");
        s.push_str(&self.describe_state());
        s
    }

    /// Registers worth reporting when a guest crashes.
    fn describe_state(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip, r.rsp, r.rflags, r.rax, s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            ),
            _ => "registers unavailable".to_string(),
        }
    }
}
