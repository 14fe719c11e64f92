//! 8250 UART (COM1) on vm-superio, interrupting through an irqfd.

use std::io::Write;

use vm_superio::{serial::SerialEvents, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// COM1 base port.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;

/// An EventFd that KVM turns into an interrupt (irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Serial events: signals `0` when the guest emptied the receive FIFO, so
/// buffered host input can be delivered.
pub struct InputDrained(pub EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// The UART, writing guest output to `out`.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, InputDrained, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART raising `irq`, writing to `out` and signalling `drained` when
    /// the guest has read all queued input.
    pub fn new(irq: EventFd, drained: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::with_events(IrqTrigger(irq), InputDrained(drained), out),
        }
    }

    /// Queue host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Free space in the receive FIFO.
    pub fn input_space(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            log::warn!("serial write failed: {e}");
        }
    }
}
