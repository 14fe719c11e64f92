//! Guest-physical address map of the x86-64 machine `vmm` builds.
//!
//! The fixed addresses are those of the boot contract in
//! `docs/ARCHITECTURE.md` (the same ones Firecracker uses, so guests are
//! portable between the two).

/// GDT of the boot vCPU.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT of the boot vCPU.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map (follows the start info).
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4.
pub const PML4_START: u64 = 0x9000;
/// Identity page tables: PDPT.
pub const PDPTE_START: u64 = 0xa000;
/// Identity page tables: four page directories (4 GiB of 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted (Linux's COMMAND_LINE_SIZE on x86 is 2048).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Intel MP table (floating pointer + configuration table).
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of conventional memory below 1 MiB (start of the EBDA / VGA hole).
pub const EBDA_END: u64 = 0xa0000;
/// Start of high memory: kernels are loaded here or above.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (devices, IOAPIC, LAPIC live in it).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// IOAPIC base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// First address for virtio-mmio devices.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// KVM's TSS (three pages) for real-mode emulation on Intel.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page (one page, just below the TSS).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One range of guest-physical RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl RamRange {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The guest's RAM ranges for `mem_bytes` of RAM: everything below the
/// 32-bit MMIO hole, the rest from 4 GiB up. (KVM memslots; the legacy
/// 640 KiB..1 MiB hole is expressed in the e820 map, not in the slots.)
pub fn ram_ranges(mem_bytes: u64) -> Vec<RamRange> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![RamRange {
            start: 0,
            len: mem_bytes,
        }]
    } else {
        vec![
            RamRange {
                start: 0,
                len: MMIO_HOLE_START,
            },
            RamRange {
                start: MMIO_HOLE_END,
                len: mem_bytes - MMIO_HOLE_START,
            },
        ]
    }
}

/// An e820 entry: `(addr, size, type)`.
pub type E820Entry = (u64, u64, u32);

/// The e820 map the guest sees for `mem_bytes` of RAM.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        (0, MPTABLE_START, E820_RAM),
        (MPTABLE_START, EBDA_END - MPTABLE_START, E820_RESERVED),
    ];
    for r in ram_ranges(mem_bytes) {
        let start = r.start.max(HIMEM_START);
        if r.end() > start {
            map.push((start, r.end() - start, E820_RAM));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_range() {
        assert_eq!(
            ram_ranges(128 << 20),
            vec![RamRange {
                start: 0,
                len: 128 << 20
            }]
        );
        let e = e820_map(128 << 20);
        assert_eq!(e[0], (0, MPTABLE_START, E820_RAM));
        assert_eq!(e[2], (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM));
    }

    #[test]
    fn large_ram_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].start, MMIO_HOLE_END);
        assert_eq!(r[0].len + r[1].len, 4 << 30);
        let e = e820_map(4 << 30);
        assert!(e
            .iter()
            .all(|&(a, l, _)| a + l <= MMIO_HOLE_START || a >= MMIO_HOLE_END));
    }
}
