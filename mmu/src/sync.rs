//! Synchronization primitives of the fault protocol: std normally, loom's
//! under the `loom` feature so the loom models explore the real protocol.
//!
//! Everything shared between threads is switched: the invalidation sequence,
//! the mmu lock and the page-table entries (so loom sees the lock-free
//! walks too). With `--features loom` the crate only works inside
//! `loom::model`, so only `tests/loom.rs` runs then.

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
