//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2).
//!
//! Register accesses arrive from the vCPU threads through the MMIO bus
//! ([`BusDevice`]); queue notifications normally never get here because an
//! ioeventfd per queue catches the `QueueNotify` write in the kernel and the
//! device's worker processes the queue on the event-loop thread. The rings
//! themselves are read and written by the `virtio-queue` crate.
//!
//! Bad driver behaviour (a queue size that is zero, above `QueueNumMax` or
//! not a power of two, enabling a queue whose rings are misaligned or outside
//! guest RAM, accesses that are not 32 bits wide, writes to read-only
//! registers) is refused and counted in [`TransportCounters`]; the VMM keeps
//! running.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde::Serialize;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::config::*;
use super::regs::*;
use crate::devices::BusDevice;

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) virtio-mmio version.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported in `VendorID` ("VMM\0" is not registered anywhere; 0 is
/// what most VMMs report).
pub const VENDOR_ID: u32 = 0;
/// Offset of `QueueNotify` (an ioeventfd is registered at base + this).
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// A device behind the transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (5 = balloon).
    fn device_type(&self) -> u32;
    /// Features the device offers (VERSION_1 included).
    fn avail_features(&self) -> u64;
    /// Number of virtqueues the device has with the features `acked`.
    fn queue_count(&self, acked: u64) -> usize;
    /// Largest queue size of every queue.
    fn queue_max_size(&self) -> u16;
    /// Read device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write device configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK with these features.
    fn activate(&mut self, acked: u64);
    /// The driver reset the device (status 0).
    fn reset(&mut self);
}

/// Interrupt line of one device: the virtio-mmio `InterruptStatus` bits plus
/// the irqfd that raises the device's GSI in the in-kernel irqchip (edge
/// semantics, like Firecracker).
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt delivered through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Set `bits` (VIRTIO_MMIO_INT_VRING / _CONFIG) and raise the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("virtio: cannot signal the irqfd: {e}");
        }
    }

    /// Current `InterruptStatus`.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }
}

/// Driver mistakes the transport refused (all counters are cumulative).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct TransportCounters {
    /// `QueueNum` writes that were 0, above `QueueNumMax` or not a power of 2.
    pub bad_queue_size: u64,
    /// `QueueReady` = 1 refused (rings misaligned or outside guest RAM, no
    /// such queue, or FEATURES_OK not set).
    pub bad_queue_ready: u64,
    /// Accesses of the wrong width, to read-only registers or to queues that
    /// do not exist.
    pub bad_register_access: u64,
    /// Feature bits the driver acked but the device never offered.
    pub bad_features: u64,
    /// `QueueNotify` writes the ioeventfds did not catch (no such queue).
    pub stray_notify: u64,
}

/// Maximum number of queues any device here has.
pub const MAX_QUEUES: usize = 4;

/// The transport state of one device.
pub struct MmioTransport<D> {
    /// The device.
    pub device: D,
    /// The virtqueues ([`MAX_QUEUES`], the device uses the first
    /// `queue_count(acked)`).
    pub queues: Vec<Queue>,
    /// The interrupt line.
    pub interrupt: Arc<Interrupt>,
    /// Guest memory, to validate queue addresses.
    mem: GuestMemoryMmap<()>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked: u64,
    queue_sel: u32,
    config_generation: u32,
    /// Refused driver requests.
    pub counters: TransportCounters,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device`; `mem` is the guest memory the rings live in.
    pub fn new(device: D, mem: GuestMemoryMmap<()>, interrupt: Arc<Interrupt>) -> Self {
        let max = device.queue_max_size();
        let queues = (0..MAX_QUEUES)
            .map(|_| Queue::new(max).expect("queue_max_size is a power of two"))
            .collect();
        Self {
            device,
            queues,
            interrupt,
            mem,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked: 0,
            queue_sel: 0,
            config_generation: 0,
            counters: TransportCounters::default(),
        }
    }

    /// Features the driver acked.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// True once the driver set DRIVER_OK (and has not reset since).
    pub fn driver_ok(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & VIRTIO_CONFIG_S_FAILED == 0
    }

    /// True once the driver has set FEATURES_OK (features are fixed).
    pub fn features_ok(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
    }

    /// The device's configuration changed: bump the generation and interrupt.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG);
    }

    /// Something is wrong beyond repair until the driver resets the device.
    pub fn needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if self.driver_ok() {
            self.config_changed();
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let n = self.device.queue_count(self.acked);
        let i = self.queue_sel as usize;
        if i < n {
            Some(&mut self.queues[i])
        } else {
            None
        }
    }

    fn reset(&mut self) {
        self.status = 0;
        self.acked = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.ack(!0);
        self.device.reset();
    }

    fn read_reg(&mut self, reg: u32) -> u32 {
        match reg {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => match self.selected_queue() {
                Some(q) => u32::from(q.max_size()),
                None => 0,
            },
            VIRTIO_MMIO_QUEUE_READY => match self.selected_queue() {
                Some(q) => u32::from(q.ready()),
                None => 0,
            },
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // Shared memory regions: none (length ~0 means "no such region").
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => !0,
            _ => {
                self.counters.bad_register_access += 1;
                0
            }
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let newly = v & !self.status;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.acked & !self.device.avail_features() != 0
        {
            // §3.1.1: the device leaves FEATURES_OK clear if it cannot
            // accept the features.
            self.counters.bad_features += 1;
            self.status = v & !VIRTIO_CONFIG_S_FEATURES_OK;
            return;
        }
        self.status = v;
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.features_ok() {
            self.device.activate(self.acked);
        }
    }

    fn write_reg(&mut self, reg: u32, v: u32) {
        let features_open = !self.features_ok();
        match reg {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if features_open => match self.driver_features_sel {
                0 => self.acked = (self.acked & !0xffff_ffff) | u64::from(v),
                1 => self.acked = (self.acked & 0xffff_ffff) | (u64::from(v) << 32),
                _ => self.counters.bad_features += u64::from(v != 0),
            },
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM => {
                let ok = v <= u32::from(u16::MAX)
                    && match self.selected_queue() {
                        Some(q) if !q.ready() => q.try_set_size(v as u16).is_ok(),
                        _ => false,
                    };
                if !ok {
                    self.counters.bad_queue_size += 1;
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                let mem = self.mem.clone();
                let features_ok = self.features_ok();
                let ok = match self.selected_queue() {
                    Some(q) if v == 0 => {
                        q.set_ready(false);
                        true
                    }
                    Some(q) if v == 1 && features_ok => {
                        q.set_ready(true);
                        let valid = q.is_valid(&mem);
                        if !valid {
                            q.set_ready(false);
                        }
                        valid
                    }
                    _ => false,
                };
                if !ok {
                    self.counters.bad_queue_ready += 1;
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => self.counters.stray_notify += 1,
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.write_status(v),
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => {
                let ok = match self.selected_queue() {
                    Some(q) if !q.ready() => {
                        match reg {
                            VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
                            VIRTIO_MMIO_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
                            VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
                            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
                            VIRTIO_MMIO_QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
                            _ => q.set_used_ring_address(None, Some(v)),
                        }
                        true
                    }
                    _ => false,
                };
                if !ok {
                    self.counters.bad_register_access += 1;
                }
            }
            VIRTIO_MMIO_SHM_SEL => {}
            _ => self.counters.bad_register_access += 1,
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.counters.bad_register_access += 1;
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset as u32);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.counters.bad_register_access += 1;
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset as u32, v);
    }
}
