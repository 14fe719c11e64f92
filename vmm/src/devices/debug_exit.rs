//! Debug-exit port for test guests (like QEMU's `isa-debug-exit`, but the
//! status is the byte itself): the guest writes byte `v` to port 0xf4 and
//! `vmm` exits with status `v`.

use std::sync::Arc;

use super::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// The I/O port of the debug-exit device.
pub const DEBUG_EXIT_PORT: u64 = 0xf4;

/// The debug-exit device.
pub struct DebugExit {
    exit: Arc<ExitSignal>,
}

impl DebugExit {
    /// A device that requests the VM exit through `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.exit.request(ExitReason::DebugExit(v));
        }
    }
}
