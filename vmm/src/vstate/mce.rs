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
//! get [`encode_broadcast`] (see `vcpu::MceState::queue_for`).

use std::cell::Cell;
use std::os::fd::AsRawFd;

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
}
