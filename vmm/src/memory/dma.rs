//! Device translation cache (like vhost's IOTLB): devices that read or
//! write guest buffers cache guest-physical → host (direct map)
//! translations taken from the shadow EPT, and stay coherent with the
//! primary map as an MMU-notifier subscriber.
//!
//! Protocol (KVM's, a third time): a miss snapshots the cache's invalidate
//! sequence, faults the page through the shadow EPT (which resolves it from
//! guestmem), then inserts the translation under the cache lock unless an
//! overlapping invalidation ran meanwhile. Every copy to or from guest
//! memory happens under that lock, and `invalidate_range_start` takes it
//! too: once start returns, no device access to the old frames is in flight
//! and none can start until the translation is re-established. A poisoned
//! page is an error for the device (never a SIGBUS in the VMM).

use std::collections::HashMap;
use std::sync::Arc;

use guestmem::notifier::{GpaRange, Invalidation, MmuNotifier};
use guestmem::{GuestMemory, ResolveError, PAGE_SIZE};
use mmu::{FaultError, MmuLock, ShadowEpt, Translation};

use super::pager::Primary;

/// Why a device access failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DmaError {
    /// The page is poisoned (hardware memory failure).
    #[error("guest page {0:#x} is poisoned")]
    Poisoned(u64),
    /// The address is not guest RAM.
    #[error("guest address {0:#x} is not RAM")]
    NotRam(u64),
    /// Invalidations kept racing the access, or guestmem is out of memory.
    #[error("guest address {gpa:#x} cannot be translated: {why}")]
    Unavailable {
        /// The address.
        gpa: u64,
        /// Why.
        why: String,
    },
}

/// Counters of a [`DeviceTlb`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TlbStats {
    /// Lookups served from the cache.
    pub hits: u64,
    /// Lookups that faulted through the shadow EPT.
    pub misses: u64,
    /// Entries dropped by invalidations.
    pub invalidated: u64,
}

#[derive(Default)]
struct Entries {
    /// Keyed by the translation's base GPA (4 KiB or 2 MiB aligned).
    map: HashMap<u64, Translation>,
    stats: TlbStats,
}

impl Entries {
    fn lookup(&self, gpa: u64) -> Option<Translation> {
        let small = gpa & !(PAGE_SIZE - 1);
        let huge = gpa & !(mmu::HUGE_SIZE - 1);
        self.map
            .get(&small)
            .filter(|t| t.order == 0)
            .or_else(|| self.map.get(&huge).filter(|t| t.order > 0))
            .copied()
    }
}

/// Guest memory access for device emulation through cached translations.
pub struct DeviceTlb {
    gm: Arc<GuestMemory>,
    ept: Arc<ShadowEpt>,
    lock: MmuLock<Entries>,
}

/// Most attempts before giving up on a page that keeps being invalidated.
const MAX_ATTEMPTS: u32 = 1000;

impl DeviceTlb {
    /// A cache over `ept`, resolving misses from `gm`.
    pub fn new(gm: Arc<GuestMemory>, ept: Arc<ShadowEpt>) -> Self {
        Self {
            gm,
            ept,
            lock: MmuLock::new(Entries::default()),
        }
    }

    /// Counters.
    pub fn stats(&self) -> TlbStats {
        self.lock.lock().stats
    }

    /// Copy between guest memory at `gpa` and a device buffer, one page (or
    /// huge page) at a time, each under the cache lock.
    fn access(
        &self,
        gpa: u64,
        len: usize,
        write: bool,
        mut copy: impl FnMut(*mut u8, usize, usize),
    ) -> Result<(), DmaError> {
        let mut done = 0usize;
        while done < len {
            let at = gpa + done as u64;
            let mut attempts = 0;
            loop {
                let seq = self.lock.fault_begin();
                {
                    let mut g = self.lock.lock();
                    if let Some(t) = g.lookup(at).filter(|t| t.writable || !write) {
                        g.stats.hits += 1;
                        let chunk = ((t.gpa_base + t.len() - at) as usize).min(len - done);
                        copy(t.host_addr_of(at) as *mut u8, done, chunk);
                        done += chunk;
                        break;
                    }
                }
                attempts += 1;
                let t = match self.ept.fault(at, write, 0, &Primary(self.gm.clone())) {
                    Ok(t) => t,
                    Err(FaultError::Primary {
                        source: ResolveError::Poisoned { .. },
                        ..
                    }) => return Err(DmaError::Poisoned(at & !(PAGE_SIZE - 1))),
                    Err(FaultError::Primary {
                        source: ResolveError::OutOfRange { .. },
                        ..
                    }) => return Err(DmaError::NotRam(at)),
                    Err(FaultError::Retry { .. }) if attempts < MAX_ATTEMPTS => continue,
                    Err(e) => {
                        return Err(DmaError::Unavailable {
                            gpa: at,
                            why: e.to_string(),
                        })
                    }
                };
                let mut g = self.lock.lock();
                if !g.retry_needed(seq, t.range()) {
                    g.stats.misses += 1;
                    g.map.insert(t.gpa_base, t);
                } else if attempts >= MAX_ATTEMPTS {
                    return Err(DmaError::Unavailable {
                        gpa: at,
                        why: "invalidations kept racing the access".into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Read guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let dst = buf.as_mut_ptr();
        self.access(gpa, buf.len(), false, |host, off, n| {
            // `host..host + n` is inside a frame of the pool's direct map that
            // the shadow EPT maps at this GPA; the cache lock is held, so no
            // invalidation of it can complete meanwhile.
            // SAFETY: see above; `dst + off .. + n` is inside `buf`.
            unsafe { std::ptr::copy_nonoverlapping(host, dst.add(off), n) }
        })
    }

    /// Write `data` to guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DmaError> {
        let src = data.as_ptr();
        self.access(gpa, data.len(), true, |host, off, n| {
            // SAFETY: as in `read`, with a writable translation.
            unsafe { std::ptr::copy_nonoverlapping(src.add(off), host, n) }
        })
    }
}

impl MmuNotifier for DeviceTlb {
    fn invalidate_range_start(&self, inv: &Invalidation) {
        let mut g = self.lock.lock();
        g.invalidate_begin(inv.range);
        let r: GpaRange = inv.range;
        let before = g.map.len();
        g.map.retain(|_, t| !t.range().overlaps(&r));
        let dropped = (before - g.map.len()) as u64;
        g.stats.invalidated += dropped;
    }

    fn invalidate_range_end(&self, _inv: &Invalidation) {
        self.lock.lock().invalidate_end();
    }

    fn release(&self) {
        self.lock.lock().map.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guestmem::{GuestMemoryConfig, InvalidateReason, MfFlags};

    fn setup() -> (Arc<GuestMemory>, Arc<ShadowEpt>, Arc<DeviceTlb>) {
        let gm = Arc::new(GuestMemory::new(GuestMemoryConfig::x86(16 << 20, 1)).unwrap());
        let ept = Arc::new(ShadowEpt::new().unwrap());
        let tlb = Arc::new(DeviceTlb::new(gm.clone(), ept.clone()));
        gm.notifiers().register(ept.clone());
        gm.notifiers().register(tlb.clone());
        (gm, ept, tlb)
    }

    #[test]
    fn reads_what_was_written_and_caches_it() {
        let (_gm, _ept, tlb) = setup();
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        // Crosses page boundaries (and the 2 MiB boundary at 4 MiB).
        tlb.write((4 << 20) - 5000, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        tlb.read((4 << 20) - 5000, &mut back).unwrap();
        assert_eq!(back, data);
        let s = tlb.stats();
        assert!(s.hits > 0 && s.misses > 0, "{s:?}");
    }

    #[test]
    fn invalidation_drops_translations_and_released_pages_read_zero() {
        let (gm, _ept, tlb) = setup();
        tlb.write(0x30_0000, &[0xab; 64]).unwrap();
        gm.release_range(GpaRange::new(0x30_0000, PAGE_SIZE))
            .unwrap();
        assert!(tlb.stats().invalidated > 0);
        let mut b = [0xffu8; 64];
        tlb.read(0x30_0000, &mut b).unwrap();
        assert_eq!(
            b, [0u8; 64],
            "a released page comes back as a fresh zero frame"
        );
        // The other pages of the split 2 MiB mapping kept their frames.
        tlb.write(0x30_1000, &[7; 8]).unwrap();
        let _g = gm
            .notifiers()
            .invalidate_range_start(GpaRange::new(0x40_0000, PAGE_SIZE), InvalidateReason::Unmap);
    }

    #[test]
    fn poisoned_page_is_an_error_not_a_crash() {
        let (gm, _ept, tlb) = setup();
        tlb.write(0x50_0000, &[1; 16]).unwrap();
        let frame = gm.frame_of_gpa(0x50_0000).unwrap();
        gm.memory_failure(
            frame,
            MfFlags {
                action_required: true,
            },
        )
        .unwrap();
        let mut b = [0u8; 16];
        assert_eq!(
            tlb.read(0x50_0000, &mut b),
            Err(DmaError::Poisoned(0x50_0000))
        );
        assert_eq!(
            tlb.read(0x1_0000_0000, &mut b),
            Err(DmaError::NotRam(0x1_0000_0000))
        );
    }

    #[test]
    fn accesses_racing_invalidations_never_see_a_freed_frame() {
        // A writer keeps stamping a page through the TLB while another thread
        // soft-offlines it over and over; every soft offline copies the data,
        // so a stamp is never lost and never lands in a retired frame.
        let (gm, _ept, tlb) = setup();
        let gpa = 0x60_0000;
        tlb.write(gpa, &0u64.to_le_bytes()).unwrap();
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let (t2, s2, p2) = (tlb.clone(), stop.clone(), progress.clone());
        let writer = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s2.load(Ordering::Relaxed) {
                n += 1;
                t2.write(gpa, &n.to_le_bytes()).unwrap();
                let mut b = [0u8; 8];
                t2.read(gpa, &mut b).unwrap();
                assert_eq!(u64::from_le_bytes(b), n, "stamp lost");
                p2.store(n, Ordering::Relaxed);
            }
            n
        });
        // Every wait for the writer is bounded: a writer that died (its
        // assertion failed) or stopped making progress fails the test with
        // its message instead of hanging it.
        let wait_past = |min: u64, writer: &std::thread::JoinHandle<u64>| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while progress.load(Ordering::Relaxed) <= min {
                assert!(
                    !writer.is_finished(),
                    "the writer stopped (see its panic above) at stamp {}",
                    progress.load(Ordering::Relaxed)
                );
                assert!(
                    std::time::Instant::now() < deadline,
                    "the writer made no progress for 10 s past stamp {min}"
                );
                std::thread::yield_now();
            }
        };
        // Interleave: each soft offline waits until the writer stamped again.
        for _ in 0..300 {
            wait_past(progress.load(Ordering::Relaxed), &writer);
            if let Some(f) = gm.frame_of_gpa(gpa) {
                let _ = gm.soft_offline(f);
            }
        }
        wait_past(progress.load(Ordering::Relaxed) + 99, &writer);
        stop.store(true, Ordering::Relaxed);
        let n = writer.join().unwrap();
        let mut b = [0u8; 8];
        tlb.read(gpa, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), n);
        // The primary map's current frame holds the last stamp: no write went
        // to a migrated-away (retired) frame through a stale translation.
        let r = gm.lookup(gpa).unwrap();
        // SAFETY: reading 8 bytes of a mapped frame of the pool's direct map.
        let now = unsafe { std::ptr::read_volatile((r.host_addr + (gpa - r.gpa)) as *const u64) };
        assert_eq!(now, n, "the device wrote through a stale translation");
        gm.check().unwrap();
    }
}
