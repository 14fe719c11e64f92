//! Synchronisation primitives used by the modules that have loom models
//! (descriptors, buddy, per-vCPU lists, page lock). With the `loom` feature
//! they are loom's, so `tests/loom.rs` explores their interleavings.

#[cfg(feature = "loom")]
pub(crate) use loom::{
    sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    sync::{Arc, Condvar, Mutex, MutexGuard},
};
#[cfg(not(feature = "loom"))]
pub(crate) use std::{
    sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    sync::{Arc, Condvar, Mutex, MutexGuard},
};

/// Lock a mutex, ignoring poisoning (a panicking holder leaves data that the
/// invariant checker can still inspect).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Busy-wait hint. Under loom this yields so the model can make progress.
#[inline]
pub(crate) fn spin_hint(spins: u32) {
    #[cfg(feature = "loom")]
    {
        let _ = spins;
        loom::thread::yield_now();
    }
    #[cfg(not(feature = "loom"))]
    {
        if spins < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}
