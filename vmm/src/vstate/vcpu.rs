//! vCPU setup and the per-vCPU run loop (one thread per vCPU).

use std::sync::Arc;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

use super::assist::{self, Assists};
use super::control::VcpuControl;
pub use super::mce::MceState;
use super::mce::{self, PendingMce};
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
            let queued = shared.mce.queue_for(index, mce::McAction::Required, page);
            let others = queued.get(1..).unwrap_or_default();
            shared
                .mce
                .kick_until_taken(others, std::time::Duration::from_millis(100));
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
    /// Machine-check gate of this vCPU (see [`mce::Gate`]).
    gate: mce::Gate,
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
        shared.mce.attach_ram(shared.ram.clone());
        Ok(Self {
            fd,
            index,
            shared,
            power_on_lapic,
            gate: mce::Gate::default(),
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
            // Machine checks go in before each entry: what was queued while
            // the vCPU was paused, and what the last exit brought (SIGBUS).
            if let Some(reason) = self.deliver_machine_checks().or_else(|| self.run_once()) {
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
        // Checks for the old boot are not for the new one (MCG_STATUS is
        // cleared below too).
        self.shared.mce.clear(index);
        self.gate = mce::Gate::default();
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

    /// Deliver pending machine checks, before every entry: the
    /// action-required one KVM signalled at the last exit (SIGBUS on this
    /// thread when the guest touched a poisoned page), those queued by the
    /// API or by emulated accesses, and broadcast placeholders. At most one
    /// goes in per entry and only through [`mce::Gate`] (never while
    /// MCG_STATUS.MCIP is set: that is a shutdown, see `mce`'s module
    /// documentation); the rest wait, kicked by the poller.
    fn deliver_machine_checks(&mut self) -> Option<ExitReason> {
        let index = self.index;
        let mce = self.shared.mce.clone();
        if let Some(hva) = mce::take_poison() {
            let Some(gpa) = self.shared.ram.gpa_of_host(hva) else {
                return Some(ExitReason::Internal(format!(
                    "vCPU {index}: hardware-poison SIGBUS at host address {hva:#x} outside guest RAM"
                )));
            };
            let page = gpa & !(guestmem::PAGE_SIZE - 1);
            let others = mce.queue_for(index, mce::McAction::Required, page);
            mce.kick_until_taken(
                others.get(1..).unwrap_or_default(),
                std::time::Duration::from_millis(100),
            );
        }
        loop {
            let Some(next) = mce.front(index) else {
                mce.set_holding(index, false);
                return None;
            };
            let required = matches!(next, PendingMce::Error(mce::McAction::Required, _));
            if mce.mcg_cap.is_some() {
                match self.gate.check(&self.fd, required) {
                    Ok(mce::GateState::Open) => {}
                    Ok(mce::GateState::Mcip) => return self.hold_machine_checks(true),
                    Ok(mce::GateState::Grace) => return self.hold_machine_checks(false),
                    Err(e) => return Some(ExitReason::Internal(format!("vCPU {index}: {e}"))),
                }
            }
            mce.pop_front(index);
            let injected = match next {
                PendingMce::Broadcast => self.inject_broadcast(),
                PendingMce::Error(action, gpa) => self.inject_error(action, gpa),
            };
            match injected {
                // One uncorrected check per entry: KVM has just set MCIP, so
                // whatever is left waits for the guest's handler to end.
                Ok(true) => {
                    self.gate.injected();
                    if mce.front(index).is_some() {
                        return self.hold_machine_checks(false);
                    }
                    mce.set_holding(index, false);
                    return None;
                }
                Ok(false) => continue,
                Err(reason) => return Some(reason),
            }
        }
    }

    /// The queued checks cannot go in yet (`mcip`: MCIP is set; else the
    /// last handler has only just cleared it): action-optional checks and
    /// placeholders wait (the poller kicks this vCPU until they can go in);
    /// an action-required one during MCIP is what the architecture makes a
    /// shutdown.
    fn hold_machine_checks(&mut self, mcip: bool) -> Option<ExitReason> {
        let index = self.index;
        if let Some(gpa) = self.shared.mce.required(index).filter(|_| mcip) {
            // The guest touched poisoned memory while still handling a
            // machine check (its #MC handler, or a guest that never clears
            // MCIP). Hardware enters shutdown (Intel SDM vol. 3 §15.10); so
            // does KVM if asked to inject. Holding the vCPU cannot help: only
            // its own handler clears MCIP, and that is the code that faulted.
            return Some(ExitReason::Crash(format!(
                "vCPU {index}: action-required machine check for gpa {gpa:#x} while MCG_STATUS.MCIP \
                 is set (the guest touched poisoned memory before it finished handling the previous \
                 machine check): the processor enters shutdown (Intel SDM vol. 3 §15.10); {}",
                self.describe_state()
            )));
        }
        let newly = MceState::hold(&self.shared.mce, index);
        for _ in 0..newly {
            self.shared.ram.record_mce_deferred();
        }
        if newly > 0 {
            log::info!(
                "vCPU {index}: {newly} machine check(s) held: the guest is still handling the previous one"
            );
        }
        None
    }

    /// Inject the Intel-style broadcast placeholder; Ok(false) when the vCPU
    /// cannot take it.
    fn inject_broadcast(&mut self) -> Result<bool, ExitReason> {
        // A vCPU without CR4.MCE (not started yet, or MCE not enabled)
        // cannot take it (KVM would shut the VM down) and does not take part
        // in the guest's rendezvous.
        const CR4_MCE: u64 = 1 << 6;
        if self.fd.get_sregs().is_ok_and(|s| s.cr4 & CR4_MCE == 0) {
            log::debug!(
                "vCPU {}: broadcast machine check skipped (CR4.MCE clear)",
                self.index
            );
            return Ok(false);
        }
        mce::inject(&self.fd, &mce::encode_broadcast())
            .map_err(|e| ExitReason::Internal(format!("vCPU {}: {e}", self.index)))?;
        log::debug!("vCPU {}: broadcast machine check injected", self.index);
        Ok(true)
    }

    /// Inject the memory error at `gpa`.
    fn inject_error(&mut self, action: mce::McAction, gpa: u64) -> Result<bool, ExitReason> {
        let index = self.index;
        if self.shared.mce.mcg_cap.is_none() {
            return Err(ExitReason::Crash(format!(
                "vCPU {index}: guest touched poisoned memory at {gpa:#x} and KVM cannot inject machine checks"
            )));
        }
        let m = mce::encode(self.shared.mce.vendor, action, gpa);
        mce::inject(&self.fd, &m)
            .map_err(|e| ExitReason::Internal(format!("vCPU {index}: {e}")))?;
        self.shared.ram.record_mce(action);
        log::warn!(
            "vCPU {index}: machine check ({action:?}) injected for gpa {gpa:#x}, status {:#x}",
            m.status
        );
        Ok(true)
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
