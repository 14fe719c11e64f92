//! Balloon device state: configuration space, features, queue roles,
//! the ballooned-PFN bitmap, guest statistics and counters.

use serde::Serialize;

use super::{BalloonConfig, BALLOON_DEVICE_ID, F_REPORTING, F_STATS_VQ, PAGES_PER_MIB, QUEUE_SIZE};
use crate::devices::virtio::VirtioDevice;

/// What a virtqueue of the balloon is for (virtio 1.2 §5.5.2: inflateq,
/// deflateq, then statsq and reporting_vq only when negotiated; the indices
/// are dense, as Linux assigns them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRole {
    /// Guest gives pages to the host.
    Inflate,
    /// Guest takes pages back.
    Deflate,
    /// Guest memory statistics.
    Stats,
    /// Free page reporting.
    Reporting,
}

/// The roles of the queues for the features `acked`, in index order.
pub fn queue_roles(acked: u64) -> Vec<QueueRole> {
    let mut r = vec![QueueRole::Inflate, QueueRole::Deflate];
    if acked & (1 << F_STATS_VQ) != 0 {
        r.push(QueueRole::Stats);
    }
    if acked & (1 << F_REPORTING) != 0 {
        r.push(QueueRole::Reporting);
    }
    r
}

/// Guest statistics (virtio 1.2 §5.5.6.3 tags 0..=9), with Firecracker's
/// field names. Values are as the guest reported them (bytes for memory
/// amounts, counts for the others).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct GuestStats {
    /// VIRTIO_BALLOON_S_SWAP_IN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    /// VIRTIO_BALLOON_S_SWAP_OUT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    /// VIRTIO_BALLOON_S_MAJFLT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// VIRTIO_BALLOON_S_MINFLT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// VIRTIO_BALLOON_S_MEMFREE.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    /// VIRTIO_BALLOON_S_MEMTOT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    /// VIRTIO_BALLOON_S_AVAIL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    /// VIRTIO_BALLOON_S_CACHES.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    /// VIRTIO_BALLOON_S_HTLB_PGALLOC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// VIRTIO_BALLOON_S_HTLB_PGFAIL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
}

impl GuestStats {
    /// Store one tagged value; false for an unknown tag.
    pub fn set(&mut self, tag: u16, val: u64) -> bool {
        let slot = match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory,
            5 => &mut self.total_memory,
            6 => &mut self.available_memory,
            7 => &mut self.disk_caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            _ => return false,
        };
        *slot = Some(val);
        true
    }
}

/// Balloon activity and refused guest input (cumulative).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct BalloonCounters {
    /// Pages inflated (accepted into the balloon).
    pub inflated_pages: u64,
    /// Pages deflated (taken out of the balloon).
    pub deflated_pages: u64,
    /// Frames guestmem freed and punched for inflates and reports.
    pub released_frames: u64,
    /// Pages released that had never been populated (nothing to free).
    pub unpopulated_pages: u64,
    /// 2 MiB mappings split because a page inside was released.
    pub split_huge: u64,
    /// `release_range` calls.
    pub release_calls: u64,
    /// Nanoseconds spent in `release_range`.
    pub release_ns: u64,
    /// Free page reporting: ranges released.
    pub reported_ranges: u64,
    /// Free page reporting: pages in those ranges.
    pub reported_pages: u64,
    /// Statistics buffers received from the guest.
    pub stats_updates: u64,
    /// PFNs outside guest RAM (skipped).
    pub bad_pfns: u64,
    /// Inflates of a page already in the balloon, or listed twice (skipped).
    pub duplicate_pfns: u64,
    /// Deflates of pages that were never inflated (skipped).
    pub deflate_not_inflated: u64,
    /// Descriptors refused: buffer outside guest RAM, wrong direction,
    /// length not a multiple of the element size or too large, reported
    /// range not page aligned.
    pub bad_descriptors: u64,
    /// Chains refused whole: loops, next index past the queue, empty.
    pub rejected_chains: u64,
    /// Available-ring index moved by more than the queue size (the device
    /// then needs a reset).
    pub bad_avail_index: u64,
    /// Statistics entries with an unknown tag.
    pub bad_stats_tags: u64,
    /// Queues found with a ring page that is poisoned (hardware memory
    /// failure) or not RAM: not processed, the device then needs a reset.
    pub bad_ring_pages: u64,
    /// `release_range` refusals (should stay 0: ranges are validated first).
    pub release_errors: u64,
    /// Driver writes to read-only configuration fields.
    pub bad_config_writes: u64,
}

/// A bitmap of ballooned guest page frames.
pub struct PfnBitmap {
    words: Vec<u64>,
    limit: u64,
}

impl PfnBitmap {
    /// Room for PFNs `0..pfns`.
    pub fn new(pfns: u64) -> Self {
        Self {
            words: vec![0; pfns.div_ceil(64) as usize],
            limit: pfns,
        }
    }

    /// Set bit `pfn`; returns false if it was set already or is out of range.
    pub fn set(&mut self, pfn: u64) -> bool {
        if pfn >= self.limit {
            return false;
        }
        let (w, b) = ((pfn / 64) as usize, pfn % 64);
        match self.words.get_mut(w) {
            Some(x) if *x & (1 << b) == 0 => {
                *x |= 1 << b;
                true
            }
            _ => false,
        }
    }

    /// Clear bit `pfn`; returns false if it was not set.
    pub fn clear(&mut self, pfn: u64) -> bool {
        let (w, b) = ((pfn / 64) as usize, pfn % 64);
        match self.words.get_mut(w) {
            Some(x) if *x & (1 << b) != 0 => {
                *x &= !(1 << b);
                true
            }
            _ => false,
        }
    }

    /// Number of bits set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Forget everything (device reset).
    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }
}

/// The balloon device.
pub struct Balloon {
    /// Current configuration (`amount_mib` is the target).
    pub cfg: BalloonConfig,
    /// Features offered (fixed when the device is created or re-PUT before
    /// the driver negotiated).
    features: u64,
    /// `actual` as last written by the driver.
    pub actual_pages: u32,
    /// Negotiated features once the driver set DRIVER_OK.
    pub active: Option<u64>,
    /// Ballooned PFNs.
    pub ballooned: PfnBitmap,
    /// Counters.
    pub counters: BalloonCounters,
    /// Latest guest statistics.
    pub stats: GuestStats,
    /// The statistics buffer the device holds until the next poll.
    pub stats_desc: Option<u16>,
    /// Cached guest-physical translations for reading buffers (None: read
    /// through the guest view, e.g. with anonymous RAM or in unit tests).
    pub dma: Option<std::sync::Arc<crate::memory::dma::DeviceTlb>>,
}

impl Balloon {
    /// A balloon for a guest whose highest RAM PFN is below `pfn_limit`.
    pub fn new(cfg: BalloonConfig, pfn_limit: u64) -> Self {
        Self {
            features: cfg.features(),
            cfg,
            actual_pages: 0,
            active: None,
            ballooned: PfnBitmap::new(pfn_limit),
            counters: BalloonCounters::default(),
            stats: GuestStats::default(),
            stats_desc: None,
            dma: None,
        }
    }

    /// Replace the configuration before the driver negotiated features.
    pub fn reconfigure(&mut self, cfg: BalloonConfig) {
        self.features = cfg.features();
        self.cfg = cfg;
    }

    /// Target in pages (config `num_pages`).
    pub fn target_pages(&self) -> u32 {
        (u64::from(self.cfg.amount_mib) * PAGES_PER_MIB) as u32
    }

    /// The queue role of queue `idx` for the negotiated features.
    pub fn role(&self, idx: usize, acked: u64) -> Option<QueueRole> {
        queue_roles(acked).get(idx).copied()
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        BALLOON_DEVICE_ID
    }
    fn avail_features(&self) -> u64 {
        self.features
    }
    fn queue_count(&self, acked: u64) -> usize {
        queue_roles(acked).len()
    }
    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_balloon_config { le32 num_pages; le32 actual;
        // le32 free_page_hint_cmd_id; le32 poison_val; }
        let mut space = [0u8; 16];
        space[0..4].copy_from_slice(&self.target_pages().to_le_bytes());
        space[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| space.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is driver-writable.
        if offset == 4 && data.len() == 4 {
            self.actual_pages = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        } else {
            self.counters.bad_config_writes += 1;
            log::debug!(
                "balloon: ignored config write at {offset:#x} ({} bytes)",
                data.len()
            );
        }
    }
    fn activate(&mut self, acked: u64) {
        self.active = Some(acked);
    }
    fn reset(&mut self) {
        // The guest starts over: pages it had ballooned are its own again
        // (they fault in zeroed on next use).
        self.active = None;
        self.actual_pages = 0;
        self.ballooned.clear_all();
        self.stats_desc = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_catches_duplicates() {
        let mut b = PfnBitmap::new(100);
        assert!(b.set(5));
        assert!(!b.set(5));
        assert!(!b.set(100));
        assert_eq!(b.count(), 1);
        assert!(b.clear(5));
        assert!(!b.clear(5));
        assert!(!b.clear(7));
    }

    #[test]
    fn roles_are_dense() {
        assert_eq!(queue_roles(0).len(), 2);
        assert_eq!(queue_roles(1 << F_REPORTING)[2], QueueRole::Reporting);
        let both = (1 << F_REPORTING) | (1 << F_STATS_VQ);
        assert_eq!(
            queue_roles(both),
            [
                QueueRole::Inflate,
                QueueRole::Deflate,
                QueueRole::Stats,
                QueueRole::Reporting
            ]
        );
    }

    #[test]
    fn config_space_layout() {
        let cfg = BalloonConfig::parse_cli("amount_mib=2").unwrap();
        let mut b = Balloon::new(cfg, 1 << 16);
        b.write_config(4, &7u32.to_le_bytes());
        let mut d = [0u8; 8];
        b.read_config(0, &mut d);
        assert_eq!(u32::from_le_bytes(d[0..4].try_into().unwrap()), 512);
        assert_eq!(u32::from_le_bytes(d[4..8].try_into().unwrap()), 7);
        let mut e = [0xffu8; 4];
        b.read_config(64, &mut e);
        assert_eq!(e, [0; 4]);
    }
}
