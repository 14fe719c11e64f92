//! Emulated devices and the buses the vCPUs dispatch port I/O and MMIO to.

pub mod bus;
pub mod debug_exit;
pub mod legacy;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice};
