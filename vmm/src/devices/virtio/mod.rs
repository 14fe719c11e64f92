//! Virtio devices on the virtio-mmio (version 2) transport.
//!
//! - [`mmio`]: the transport (virtio 1.2 §4.2): register file, feature
//!   negotiation, virtqueue setup (rings handled by the rust-vmm
//!   `virtio-queue` crate), interrupt status + irqfd.
//! - [`balloon`]: the memory balloon (virtio 1.2 §5.5) wired to guestmem.
//!
//! Lock order: the transport mutex (`Arc<Mutex<MmioTransport<_>>>`, shared
//! by the MMIO bus on vCPU threads and the queue worker on the event-loop
//! thread) is taken first; guestmem's locks are taken inside it (by
//! `release_range`), never the other way round.

pub mod balloon;
pub mod mmio;

pub use mmio::{Interrupt, MmioTransport, VirtioDevice};

/// virtio-mmio register offsets and status bits (from `virtio-bindings`).
pub use virtio_bindings::virtio_config as config;
pub use virtio_bindings::virtio_mmio as regs;
