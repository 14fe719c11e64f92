//! i8042 keyboard controller (only for its CPU-reset command, as Linux uses
//! with `reboot=k`).

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// Port of the i8042 data register; the command register is at +4 (0x64).
pub const I8042_PORT: u64 = 0x60;

/// Trigger that turns the i8042 reset line into a VM exit.
pub struct ResetTrigger(Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.request(ExitReason::Reset);
        Ok(())
    }
}

/// The i8042 on the port bus (`0x60..=0x64`).
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    /// A controller whose reset command ends the VM through `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self(I8042Device::new(ResetTrigger(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.0.read(offset as u8);
        data.fill(0);
        data[0] = v;
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Err(e) = self.0.write(offset as u8, data[0]) {
            log::warn!("i8042 write failed: {e}");
        }
    }
}
