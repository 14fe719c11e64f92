//! Port-I/O and MMIO buses: address ranges mapped to devices.

use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the device's base.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Two devices claim overlapping ranges.
    #[error("device range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

struct Slot {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// An immutable-after-setup set of device ranges, shared by all vCPU threads.
#[derive(Default)]
pub struct Bus {
    slots: Vec<Slot>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Map `dev` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0
            || self
                .slots
                .iter()
                .any(|s| base < s.base + s.len && s.base < base + len)
        {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.slots.partition_point(|s| s.base < base);
        self.slots.insert(at, Slot { base, len, dev });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<&Slot> {
        let i = self.slots.partition_point(|s| s.base <= addr);
        let s = self.slots.get(i.checked_sub(1)?)?;
        (addr < s.base + s.len).then_some(s)
    }

    /// Dispatch a read; returns false (and fills `data` with 0xff, like an
    /// open bus) when no device is mapped at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some(s) => {
                s.dev
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(addr - s.base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatch a write; returns false when no device is mapped at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some(s) => {
                s.dev
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(addr - s.base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u8)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x60, 1, Arc::new(Mutex::new(Echo(vec![]))))
            .unwrap();
        assert!(bus.insert(0x3ff, 2, a.clone()).is_err());
        assert!(bus.insert(0x3f0, 9, a.clone()).is_err());
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d[0], 5);
        assert!(!bus.read(0x400, &mut d));
        assert_eq!(d[0], 0xff);
        assert!(!bus.read(0x3f7, &mut d));
        assert!(bus.write(0x3f8, &[7]));
        assert_eq!(a.lock().unwrap().0, vec![(0, 7)]);
    }
}
