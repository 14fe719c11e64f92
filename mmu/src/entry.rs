//! EPT entry format (Intel SDM vol. 3, "EPT Translation Mechanism").
//!
//! | bits   | meaning                                                    |
//! |--------|------------------------------------------------------------|
//! | 0      | R: read access                                             |
//! | 1      | W: write access                                            |
//! | 2      | X: execute access                                          |
//! | 3..=5  | memory type (leaf only)                                    |
//! | 6      | ignore PAT (leaf only)                                     |
//! | 7      | large page: the PDE/PDPTE maps 2 MiB/1 GiB itself          |
//! | 8, 9   | accessed, dirty: always 0 (see below)                      |
//! | 12..=51| address: next table (non-leaf) or backing (leaf)           |
//!
//! This is a software MMU, so "address" is a host *virtual* address: for a
//! non-leaf entry the child table page, for a leaf the host address of the
//! backing frame(s) (what real EPT calls the host-physical address).
//!
//! No accessed/dirty tracking: the guest's accesses go through KVM and the
//! guest view, never through this table, so nothing would set those bits
//! (and the VMM neither ages nor dirty-logs guest memory).

/// Read access.
pub const EPT_R: u64 = 1 << 0;
/// Write access.
pub const EPT_W: u64 = 1 << 1;
/// Execute access.
pub const EPT_X: u64 = 1 << 2;
/// All three permissions, used for non-leaf entries.
pub const EPT_RWX: u64 = EPT_R | EPT_W | EPT_X;
/// Shift of the memory-type field.
pub const EPT_MEMTYPE_SHIFT: u32 = 3;
/// Mask of the memory-type field.
pub const EPT_MEMTYPE_MASK: u64 = 0b111 << EPT_MEMTYPE_SHIFT;
/// Ignore-PAT bit.
pub const EPT_IGNORE_PAT: u64 = 1 << 6;
/// Large-page bit: a level-2 (or level-3) entry that is a leaf.
pub const EPT_LARGE: u64 = 1 << 7;
/// Address field, bits 12..=51.
pub const EPT_ADDR_MASK: u64 = ((1 << 52) - 1) & !0xfff;

/// EPT memory types (the values of bits 3..=5 of a leaf).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemType {
    /// Uncacheable (0).
    Uncacheable,
    /// Write combining (1).
    WriteCombining,
    /// Write through (4).
    WriteThrough,
    /// Write protected (5).
    WriteProtected,
    /// Write back (6), the type of all guest RAM.
    WriteBack,
}

impl MemType {
    /// The encoding in bits 3..=5.
    pub const fn bits(self) -> u64 {
        let v = match self {
            MemType::Uncacheable => 0,
            MemType::WriteCombining => 1,
            MemType::WriteThrough => 4,
            MemType::WriteProtected => 5,
            MemType::WriteBack => 6,
        };
        v << EPT_MEMTYPE_SHIFT
    }

    /// Decode bits 3..=5 of `entry`; `None` for a reserved encoding.
    pub const fn from_entry(entry: u64) -> Option<Self> {
        match (entry & EPT_MEMTYPE_MASK) >> EPT_MEMTYPE_SHIFT {
            0 => Some(MemType::Uncacheable),
            1 => Some(MemType::WriteCombining),
            4 => Some(MemType::WriteThrough),
            5 => Some(MemType::WriteProtected),
            6 => Some(MemType::WriteBack),
            _ => None,
        }
    }
}

/// One 64-bit EPT entry (a copy; the table holds them in atomics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EptEntry(pub u64);

impl EptEntry {
    /// The non-present entry.
    pub const EMPTY: EptEntry = EptEntry(0);

    /// A leaf mapping `addr` (aligned to the leaf size, below 2^52).
    /// `large` is set for 2 MiB leaves at level 2.
    pub const fn leaf(addr: u64, perms: u64, mem: MemType, large: bool) -> Self {
        let mut v = (addr & EPT_ADDR_MASK) | (perms & EPT_RWX) | mem.bits() | EPT_IGNORE_PAT;
        if large {
            v |= EPT_LARGE;
        }
        EptEntry(v)
    }

    /// A non-leaf entry pointing at a child table page at `addr`.
    pub const fn table(addr: u64) -> Self {
        EptEntry((addr & EPT_ADDR_MASK) | EPT_RWX)
    }

    /// Present: any of R/W/X is set (EPT has no separate present bit).
    pub const fn is_present(self) -> bool {
        self.0 & EPT_RWX != 0
    }

    /// True for a large (2 MiB / 1 GiB) leaf.
    pub const fn is_large(self) -> bool {
        self.0 & EPT_LARGE != 0
    }

    /// Readable.
    pub const fn readable(self) -> bool {
        self.0 & EPT_R != 0
    }

    /// Writable.
    pub const fn writable(self) -> bool {
        self.0 & EPT_W != 0
    }

    /// Executable.
    pub const fn executable(self) -> bool {
        self.0 & EPT_X != 0
    }

    /// The address field.
    pub const fn addr(self) -> u64 {
        self.0 & EPT_ADDR_MASK
    }

    /// Memory type of a leaf.
    pub const fn mem_type(self) -> Option<MemType> {
        MemType::from_entry(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_round_trips_fields() {
        let e = EptEntry::leaf(0x7f12_3460_0000, EPT_R | EPT_W, MemType::WriteBack, true);
        assert!(e.is_present() && e.is_large() && e.readable() && e.writable());
        assert!(!e.executable());
        assert_eq!(e.addr(), 0x7f12_3460_0000);
        assert_eq!(e.mem_type(), Some(MemType::WriteBack));
        assert_eq!(e.0 & EPT_IGNORE_PAT, EPT_IGNORE_PAT);
        let e = EptEntry::leaf(0x7f12_3460_1000, EPT_R | EPT_X, MemType::WriteBack, false);
        assert!(e.readable() && !e.writable() && e.executable() && !e.is_large());
        assert_eq!(
            e.0 & !(EPT_ADDR_MASK | EPT_RWX | EPT_MEMTYPE_MASK | EPT_IGNORE_PAT),
            0
        );
    }

    #[test]
    fn table_entry_is_present_non_leaf() {
        let e = EptEntry::table(0x5555_0000_1000);
        assert!(e.is_present() && !e.is_large());
        assert_eq!(e.addr(), 0x5555_0000_1000);
        assert!(!EptEntry::EMPTY.is_present());
    }

    #[test]
    fn memtype_encodings_match_the_sdm() {
        for (t, v) in [
            (MemType::Uncacheable, 0),
            (MemType::WriteCombining, 1),
            (MemType::WriteThrough, 4),
            (MemType::WriteProtected, 5),
            (MemType::WriteBack, 6),
        ] {
            assert_eq!(t.bits(), v << 3);
            assert_eq!(MemType::from_entry(t.bits()), Some(t));
        }
        assert_eq!(MemType::from_entry(2 << 3), None);
        assert_eq!(MemType::from_entry(7 << 3), None);
    }

    #[test]
    fn address_outside_field_is_masked() {
        let e = EptEntry::leaf(u64::MAX, EPT_R, MemType::WriteBack, false);
        assert_eq!(e.addr(), EPT_ADDR_MASK);
    }
}
