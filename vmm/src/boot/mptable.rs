//! Intel MultiProcessor Specification 1.4 table, so guests (Linux with
//! `X86_MPPARSE`, and the test guests) find every vCPU and the IOAPIC without
//! ACPI.

use crate::layout::{IOAPIC_START, LAPIC_START, MPTABLE_START};

/// Legacy ISA interrupts routed 1:1 to IOAPIC pins.
const IRQ_COUNT: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 signature and the FPU+APIC feature flags, as Firecracker writes.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Bytes available for the table: `[MPTABLE_START, 640 KiB)`.
pub const MPTABLE_MAX_SIZE: usize = (crate::layout::EBDA_END - MPTABLE_START) as usize;

/// Most vCPUs whose entries fit in the reserved area.
pub const MAX_VCPUS: u32 =
    ((MPTABLE_MAX_SIZE - 16 - 44 - 8 - 8 - (IRQ_COUNT as usize + 2) * 8) / 20) as u32;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// The MP table for this many vCPUs does not fit below 640 KiB.
    #[error("{0} vCPUs do not fit in the MP table (at most {MAX_VCPUS})")]
    TooManyVcpus(u32),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Build the MP floating pointer and configuration table for `vcpus` vCPUs
/// (APIC ids `0..vcpus`); the result is to be written at [`MPTABLE_START`].
pub fn build(vcpus: u32) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::TooManyVcpus(vcpus));
    }
    let ioapic_id = vcpus as u8;
    let table_addr = MPTABLE_START as u32 + 16;

    // Configuration table entries.
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(id as u8);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..IRQ_COUNT {
        // type, irq type, flags (conforming polarity/trigger), source bus,
        // source irq, destination IOAPIC, destination pin.
        entries.extend_from_slice(&[ENTRY_INTSRC, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 = ExtINT and LINT1 = NMI on every local APIC.
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    let length = (44 + entries.len()) as u16;
    header.extend_from_slice(&length.to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, filled below
    header.extend_from_slice(b"RUSTVMM ");
    header.extend_from_slice(b"VMM-KVM-x86 ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    debug_assert_eq!(header.len(), 44);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision
    fp.push(0); // checksum
    fp.extend_from_slice(&[0; 5]); // no default configuration, no IMCR
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    debug_assert!(out.len() <= MPTABLE_MAX_SIZE);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for n in [1, 2, MAX_VCPUS] {
            let t = build(n).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0);
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(&t[16..20], b"PCMP");
            assert_eq!(sum(&t[16..16 + len]), 0);
            let procs = t[16 + 44..]
                .chunks(20)
                .take(n as usize)
                .filter(|e| e[0] == 0)
                .count();
            assert_eq!(procs, n as usize);
            assert!(t.len() <= MPTABLE_MAX_SIZE);
        }
    }

    #[test]
    fn too_many_vcpus_is_an_error() {
        assert!(build(MAX_VCPUS + 1).is_err());
        assert!(build(0).is_err());
    }
}
