//! Synchronization primitives of the fault protocol: std normally, loom's
//! under the `loom` feature so the loom model explores the real protocol.
//!
//! Only the protocol state (the invalidation sequence and the mmu lock) is
//! switched; the page-table entries stay `std` atomics (loom's atomics are
//! too heavy for 512-entry pages). With `--features loom` the crate only
//! works inside `loom::model`, so only `tests/loom.rs` runs then.

#[cfg(feature = "loom")]
pub(crate) use loom::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex, MutexGuard,
};
#[cfg(not(feature = "loom"))]
pub(crate) use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex, MutexGuard,
};

/// Give up the CPU while an invalidation blocks a fault (a loom yield under
/// the model, so spinning faults do not explode the state space).
pub(crate) fn yield_now() {
    #[cfg(feature = "loom")]
    loom::thread::yield_now();
    #[cfg(not(feature = "loom"))]
    std::thread::yield_now();
}
