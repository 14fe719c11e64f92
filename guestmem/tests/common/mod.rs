//! Pieces shared by guestmem's integration tests (each test file uses only
//! some of them).
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;

use guestmem::{Invalidation, MmuNotifier};

/// `GUESTMEM_STRESS_OPS` (a count, `_` separators allowed), else `default`.
pub fn stress_ops(default: u64) -> u64 {
    match std::env::var("GUESTMEM_STRESS_OPS") {
        Ok(v) => v
            .replace('_', "")
            .parse()
            .unwrap_or_else(|e| panic!("GUESTMEM_STRESS_OPS={v:?}: {e}")),
        Err(_) => default,
    }
}

/// A subscriber that blocks the first `invalidate_range_start` it sees:
/// the invalidating thread meets the test at `entered`, then waits at
/// `leave` until the test lets it go on.
pub struct Gate {
    pub entered: Barrier,
    pub leave: Barrier,
    armed: AtomicBool,
}

impl Gate {
    /// An armed gate for one invalidating thread and the test.
    pub fn new() -> Self {
        Gate {
            entered: Barrier::new(2),
            leave: Barrier::new(2),
            armed: AtomicBool::new(true),
        }
    }
}

impl MmuNotifier for Gate {
    fn invalidate_range_start(&self, _inv: &Invalidation) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.wait();
            self.leave.wait();
        }
    }
    fn invalidate_range_end(&self, _inv: &Invalidation) {}
}
