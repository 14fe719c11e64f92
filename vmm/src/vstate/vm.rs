//! The KVM VM: /dev/kvm, in-kernel irqchip + PIT, memory slots.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm does not exist.
    #[error("/dev/kvm does not exist: KVM is not available on this host. Enable virtualization in the firmware (or nested virtualization for a VM) and load the module: `modprobe kvm_intel` or `modprobe kvm_amd`")]
    NoKvm,
    /// /dev/kvm exists but cannot be opened.
    #[error("cannot open /dev/kvm: permission denied. Add yourself to its group (`sudo usermod -aG kvm $USER`, then log in again) or grant access (`sudo setfacl -m u:$USER:rw /dev/kvm`)")]
    KvmPermission,
    /// Opening /dev/kvm failed otherwise.
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(kvm_ioctls::Error),
    /// The KVM API version or a required capability is missing.
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// More vCPUs than KVM supports.
    #[error("--vcpus {asked} is more than this host's KVM supports ({max})")]
    TooManyVcpus {
        /// Requested.
        asked: u32,
        /// KVM's maximum.
        max: u32,
    },
    /// A KVM VM ioctl failed.
    #[error("KVM {what} failed: {err}")]
    Ioctl {
        /// Which operation.
        what: &'static str,
        /// The error.
        err: kvm_ioctls::Error,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Ioctl { what, err }
}

/// A KVM VM with an in-kernel irqchip and PIT.
pub struct Vm {
    /// The /dev/kvm handle.
    pub kvm: Kvm,
    /// The VM file descriptor.
    pub fd: VmFd,
    /// PIC master/slave, IOAPIC and PIT as created: what a reset restores.
    power_on: (Vec<kvm_bindings::kvm_irqchip>, kvm_bindings::kvm_pit_state2),
}

/// Open /dev/kvm with an error that says how to fix the common failures.
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => VmError::NoKvm,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        _ => VmError::KvmOpen(e),
    })
}

impl Vm {
    /// Create the VM and check that `vcpus` fit.
    pub fn new(vcpus: u32) -> Result<Self, VmError> {
        let kvm = open_kvm()?;
        if kvm.get_api_version() != 12 {
            return Err(VmError::MissingCap("KVM API version 12"));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let max = kvm.get_max_vcpus() as u32;
        if vcpus > max {
            return Err(VmError::TooManyVcpus { asked: vcpus, max });
        }
        let fd = kvm.create_vm().map_err(ioctl("create VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(ioctl("set TSS address"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(ioctl("set identity map address"))?;
        fd.create_irq_chip().map_err(ioctl("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("create PIT"))?;
        // KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE, _IOAPIC.
        let mut chips = Vec::new();
        for chip_id in 0..3 {
            let mut c = kvm_bindings::kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            fd.get_irqchip(&mut c).map_err(ioctl("read the irqchip"))?;
            chips.push(c);
        }
        let pit = fd.get_pit2().map_err(ioctl("read the PIT"))?;
        Ok(Self {
            kvm,
            fd,
            power_on: (chips, pit),
        })
    }

    /// Guest reset: PICs, IOAPIC and PIT back to their power-on state (what
    /// a guest programmed, e.g. masks and redirections, must not survive).
    pub fn reset_platform(&self) -> Result<(), VmError> {
        for c in &self.power_on.0 {
            self.fd.set_irqchip(c).map_err(ioctl("reset the irqchip"))?;
        }
        self.fd
            .set_pit2(&self.power_on.1)
            .map_err(ioctl("reset the PIT"))
    }

    /// Map `[gpa, gpa + len)` to host memory at `host_addr` as memslot `slot`.
    ///
    /// # Safety
    ///
    /// `host_addr..host_addr + len` must be a mapping that stays valid (or is
    /// replaced by another valid mapping of the same range) until the slot is
    /// deleted or the VM is dropped.
    pub unsafe fn set_memslot(
        &self,
        slot: u32,
        gpa: u64,
        len: u64,
        host_addr: u64,
    ) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host_addr,
            flags: 0,
        };
        // SAFETY: the caller guarantees the host range stays mapped for the
        // lifetime of the slot.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(ioctl("set memory slot"))
    }
}
