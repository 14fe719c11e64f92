//! Initial vCPU state for the boot protocols: GDT, identity page tables,
//! segment and control registers, general registers, FPU, MSRs, LAPIC.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::*;

/// Errors setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing boot structures (GDT, page tables) into guest memory failed.
    #[error("cannot write boot structures to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// A KVM register ioctl failed.
    #[error("KVM rejected the initial vCPU state ({what}): {err}")]
    Kvm {
        /// Which state.
        what: &'static str,
        /// The error.
        err: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |err| RegsError::Kvm { what, err }
}

/// How the boot vCPU is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit Linux boot protocol: long mode, identity paging, RSI = boot_params.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, RBX = hvm_start_info.
    Pvh,
}

const GDT_NULL: u64 = 0;
const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
const GDT_TSS: u64 = 0x0080_8b00_0000_ffff;
const GDT_CODE32: u64 = 0x00cf_9b00_0000_ffff;

fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let limit = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            ((limit as u32) << 12) | 0xfff
        } else {
            limit as u32
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
        padding: 0,
    }
}

/// Write the GDT and (for the 64-bit protocol) the identity page tables, and
/// set the special registers of the boot vCPU.
pub fn setup_sregs<M: GuestMemoryBackend>(
    mem: &M,
    vcpu: &VcpuFd,
    mode: EntryMode,
) -> Result<(), RegsError> {
    let code = if mode == EntryMode::Linux64 {
        GDT_CODE64
    } else {
        GDT_CODE32
    };
    let gdt = [GDT_NULL, code, GDT_DATA, GDT_TSS];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("get sregs"))?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 0;
    let code_seg = segment_from_gdt(code, 1);
    let data_seg = segment_from_gdt(GDT_DATA, 2);
    let tss_seg = segment_from_gdt(GDT_TSS, 3);
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.tr = tss_seg;

    const X86_CR0_PE: u64 = 1 << 0;
    const X86_CR0_ET: u64 = 1 << 4;
    const X86_CR0_PG: u64 = 1 << 31;
    const X86_CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    match mode {
        EntryMode::Linux64 => {
            setup_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))
}

/// Identity-map the first 4 GiB with 2 MiB pages (PML4 -> one PDPT -> 4 PDs).
fn setup_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    mem.write_obj(PDPTE_START | PRESENT_RW, GuestAddress(PML4_START))?;
    for pd in 0..4u64 {
        let pd_addr = PDE_START + pd * 0x1000;
        mem.write_obj(pd_addr | PRESENT_RW, GuestAddress(PDPTE_START + pd * 8))?;
        let mut entries = [0u8; 4096];
        for i in 0..512u64 {
            let phys = ((pd << 9) + i) << 21;
            entries[(i * 8) as usize..(i * 8 + 8) as usize]
                .copy_from_slice(&(phys | PRESENT_RW | PAGE_SIZE_2M).to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd_addr))?;
    }
    Ok(())
}

/// General registers of the boot vCPU.
pub fn setup_regs(vcpu: &VcpuFd, mode: EntryMode, entry: u64) -> Result<(), RegsError> {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        EntryMode::Pvh => {
            regs.rbx = PVH_INFO_START;
        }
    }
    vcpu.set_regs(&regs).map_err(kvm("set regs"))
}

/// FPU control word and MXCSR defaults (as after FNINIT / reset).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set fpu"))
}

/// Boot MSRs (every vCPU): SYSENTER/SYSCALL state cleared, fast strings on,
/// MTRRs enabled with write-back default.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ];
    let list: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&list).map_err(|_| RegsError::Kvm {
        what: "build msr list",
        err: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("set msrs"))?;
    if set != list.len() {
        // Not fatal: report which one KVM refused.
        log::warn!(
            "KVM accepted only {set} of {} boot MSRs (first refused: {:#x})",
            list.len(),
            list[set].index
        );
    }
    Ok(())
}

/// LAPIC LINT0 = ExtINT (the PIC), LINT1 = NMI, on every vCPU.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu.get_lapic().map_err(kvm("get lapic"))?;
    let mut set = |off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = u32::from_le_bytes(b);
        let v = (v & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    };
    set(APIC_LVT0, APIC_MODE_EXTINT);
    set(APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("set lapic"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let cs = segment_from_gdt(GDT_CODE64, 1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.type_, cs.present),
            (8, 1, 0, 0xb, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(GDT_DATA, 2);
        assert_eq!((ds.selector, ds.db, ds.type_, ds.s), (0x10, 1, 3, 1));
        let tss = segment_from_gdt(GDT_TSS, 3);
        assert_eq!((tss.s, tss.type_), (0, 0xb));
    }
}
