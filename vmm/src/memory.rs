//! Guest RAM as the VM sees it.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::ram_ranges;
use crate::vstate::vm::Vm;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused the mapping.
    #[error("cannot map {mib} MiB of guest RAM: {err}")]
    Map {
        /// Size.
        mib: u64,
        /// Error.
        err: String,
    },
    /// KVM refused a memory slot.
    #[error(transparent)]
    Slot(#[from] crate::vstate::vm::VmError),
}

/// Guest RAM.
pub struct GuestRam {
    mem: GuestMemoryMmap<()>,
}

impl GuestRam {
    /// Reserve `bytes` of guest RAM.
    pub fn new(bytes: u64) -> Result<Self, MemoryError> {
        let ranges: Vec<(GuestAddress, usize)> = ram_ranges(bytes)
            .iter()
            .map(|r| (GuestAddress(r.start), r.len as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Map {
            mib: bytes >> 20,
            err: e.to_string(),
        })?;
        Ok(Self { mem })
    }

    /// The memory as a vm-memory backend (loader, devices).
    pub fn mem(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// What `GET /memory` reports.
    pub fn info(&self) -> serde_json::Value {
        use vm_memory::GuestMemoryBackend;
        serde_json::json!({ "backing": "anonymous", "size_mib": self.mem.iter().map(|r| vm_memory::GuestMemoryRegion::len(r)).sum::<u64>() >> 20 })
    }

    /// Register every region as a KVM memory slot.
    pub fn register_memslots(&self, vm: &Vm) -> Result<(), MemoryError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        for (slot, r) in self.mem.iter().enumerate() {
            // SAFETY: the region's mapping lives as long as `self`, which the
            // runner keeps alive until after the VM is dropped.
            unsafe { vm.set_memslot(slot as u32, r.start_addr().0, r.len(), r.as_ptr() as u64) }?;
        }
        Ok(())
    }
}
