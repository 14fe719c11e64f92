//! The consumer-side view of the primary map (guestmem's gfn -> frame map),
//! what a fault returns, and the fault errors.

use guestmem::notifier::GpaRange;
use guestmem::PAGE_SIZE;

/// Order of a 2 MiB mapping (512 base pages).
pub const HUGE_ORDER: u32 = 9;
/// Bytes in a 2 MiB mapping.
pub const HUGE_SIZE: u64 = PAGE_SIZE << HUGE_ORDER;
/// Guest-physical addresses are 48 bits wide (4-level EPT).
pub const GPA_LIMIT: u64 = 1 << 48;
/// Host addresses must fit the 40-bit address field of an entry.
pub const HOST_ADDR_LIMIT: u64 = 1 << 52;

/// What the primary map holds for one guest-physical page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backing {
    /// First guest-physical byte of the primary mapping that contains the
    /// faulting address (aligned to `PAGE_SIZE << order`).
    pub gpa_base: u64,
    /// 0 for a 4 KiB frame, 9 for a contiguous, aligned 2 MiB block.
    pub order: u32,
    /// Host address of the first byte of the mapping (aligned like
    /// `gpa_base`; only then can a 2 MiB leaf be installed).
    pub host_addr: u64,
    /// The primary side's frame index of the first frame (for the caller's
    /// bookkeeping; the table stores `host_addr`).
    pub frame: u64,
    /// False when the primary maps the page read-only (a write fault fails).
    pub writable: bool,
}

/// Resolves a guest-physical address through the primary map. The VMM
/// implements it for guestmem's map; tests implement it with a flat map.
pub trait PrimaryMap {
    /// Why a GPA cannot be resolved (not RAM, out of memory, poisoned...).
    type Error: std::error::Error + Send + Sync + 'static;

    /// The mapping containing `gpa`, populating it if needed; `cpu` selects
    /// the allocator's per-vCPU list. Must not call back into the secondary
    /// MMU's lock (it runs with no mmu lock held, like `gfn_to_pfn`).
    fn resolve(&self, gpa: u64, cpu: usize) -> Result<Backing, Self::Error>;
}

impl<P: PrimaryMap + ?Sized> PrimaryMap for &P {
    type Error = P::Error;
    fn resolve(&self, gpa: u64, cpu: usize) -> Result<Backing, Self::Error> {
        (**self).resolve(gpa, cpu)
    }
}

/// One translation installed in (or found in) the secondary MMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// First guest-physical byte the leaf maps.
    pub gpa_base: u64,
    /// 0 (4 KiB leaf) or 9 (2 MiB leaf).
    pub order: u32,
    /// Host address of `gpa_base`.
    pub host_addr: u64,
    /// Writes may go through this translation without a fault.
    pub writable: bool,
}

impl Translation {
    /// Bytes covered.
    pub const fn len(&self) -> u64 {
        PAGE_SIZE << self.order
    }

    /// Never empty; present for clippy's `len_without_is_empty`.
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// The guest-physical range covered.
    pub const fn range(&self) -> GpaRange {
        GpaRange::new(self.gpa_base, self.len())
    }

    /// Host address of `gpa`, which must lie in [`Translation::range`].
    pub const fn host_addr_of(&self, gpa: u64) -> u64 {
        self.host_addr + (gpa - self.gpa_base)
    }
}

/// Why a fault could not install a translation.
#[derive(Debug, thiserror::Error)]
pub enum FaultError<E: std::error::Error + 'static> {
    /// The primary map could not resolve the address.
    #[error("primary map cannot resolve guest-physical address {gpa:#x}")]
    Primary {
        /// The faulting address.
        gpa: u64,
        /// The primary map's error.
        #[source]
        source: E,
    },
    /// The address is beyond the 48-bit guest-physical space.
    #[error("guest-physical address {gpa:#x} is beyond the 48-bit EPT limit")]
    OutOfRange {
        /// The faulting address.
        gpa: u64,
    },
    /// The primary map returned a mapping that does not contain the address
    /// or is misaligned (a bug in the `PrimaryMap` implementation).
    #[error("primary map returned an invalid backing for {gpa:#x}: {why} ({backing:?})")]
    BadBacking {
        /// The faulting address.
        gpa: u64,
        /// What the primary returned.
        backing: Backing,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A write fault on a page the primary maps read-only.
    #[error("write fault at {gpa:#x} on a page the primary map holds read-only")]
    ReadOnly {
        /// The faulting address.
        gpa: u64,
    },
    /// Invalidations kept racing the fault; re-enter the guest and refault
    /// (KVM's `RET_PF_RETRY`).
    #[error("fault at {gpa:#x} raced invalidations {attempts} times; retry later")]
    Retry {
        /// The faulting address.
        gpa: u64,
        /// Attempts made.
        attempts: u32,
    },
    /// The address space was torn down ([`MmuNotifier::release`](guestmem::notifier::MmuNotifier::release)).
    #[error("the secondary MMU was released (address space torn down)")]
    Released,
    /// A page-table page could not be placed (its host address does not fit
    /// an entry).
    #[error(
        "page-table page at host address {addr:#x} does not fit the 52-bit entry address field"
    )]
    TableAlloc {
        /// Host address of the page.
        addr: u64,
    },
}

/// Check what the primary returned for `gpa`; `Ok(true)` when a 2 MiB leaf
/// may be installed, `Ok(false)` for a 4 KiB leaf.
pub(crate) fn check_backing<E: std::error::Error>(
    gpa: u64,
    b: &Backing,
) -> Result<bool, FaultError<E>> {
    let bad = |why| {
        Err(FaultError::BadBacking {
            gpa,
            backing: *b,
            why,
        })
    };
    if b.order != 0 && b.order != HUGE_ORDER {
        return bad("order is neither 0 nor 9");
    }
    let len = PAGE_SIZE << b.order;
    if b.gpa_base & (len - 1) != 0 {
        return bad("gpa_base is not aligned to the mapping size");
    }
    if gpa < b.gpa_base || gpa - b.gpa_base >= len {
        return bad("mapping does not contain the faulting address");
    }
    if b.host_addr & (PAGE_SIZE - 1) != 0 {
        return bad("host_addr is not page aligned");
    }
    match b.host_addr.checked_add(len) {
        Some(end) if end <= HOST_ADDR_LIMIT => {}
        _ => return bad("host_addr is beyond the 52-bit entry address field"),
    }
    // A huge leaf needs the host block aligned too; otherwise map 4 KiB.
    Ok(b.order == HUGE_ORDER && b.host_addr & (HUGE_SIZE - 1) == 0)
}
