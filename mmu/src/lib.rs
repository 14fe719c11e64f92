//! The VMM's secondary MMU: a shadow EPT kept in sync with guestmem's primary
//! map through range-based MMU notifiers, following KVM's protocols.
//!
//! - [`entry`]: the EPT entry format.
//! - [`fault`]: the fault/invalidate protocol ([`MmuLock`],
//!   [`InvalidateTracker`]), reusable by the VMM's other subscribers.
//! - [`ShadowEpt`]: 4-level radix table with lock-free lookups, the fault
//!   path, invalidation (as [`MmuNotifier`](guestmem::notifier::MmuNotifier))
//!   including the split of 2 MiB leaves when a primary change splits a huge
//!   mapping.
//! - [`PrimaryMap`]: what the fault path needs from the primary map.
//!
//! This crate knows nothing about KVM. See `DESIGN.md` for the layers, the
//! lock order and the memory-ordering arguments.

pub mod entry;
mod ept;
pub mod fault;
mod notify;
mod primary;
mod sync;
mod table;

pub use entry::{EptEntry, MemType};
pub use ept::{EptError, EptStats, ShadowEpt, DEFAULT_FAULT_ATTEMPTS};
pub use fault::{FaultSeq, InvalidateTracker, MmuGuard, MmuLock};
pub use primary::{
    Backing, FaultError, PrimaryMap, Translation, GPA_LIMIT, HOST_ADDR_LIMIT, HUGE_ORDER, HUGE_SIZE,
};
