//! [`ShadowEpt`] as a subscriber of the primary side's `NotifierList`.

use guestmem::notifier::{GpaRange, Invalidation, MmuNotifier};

use crate::primary::GPA_LIMIT;
use crate::ShadowEpt;

impl MmuNotifier for ShadowEpt {
    /// Under the mmu lock: count the invalidation, widen the tracked range,
    /// and zap every leaf overlapping the range (2 MiB leaves whole). When
    /// this returns no translation into the range is left, and none can be
    /// installed until the matching end.
    fn invalidate_range_start(&self, inv: &Invalidation) {
        let mut g = self.mmu.lock();
        g.invalidate_begin(inv.range);
        g.stats.invalidations += 1;
        self.zap_locked(&mut g, inv.range);
    }

    /// Under the mmu lock: bump the sequence, then drop the count.
    fn invalidate_range_end(&self, _inv: &Invalidation) {
        self.mmu.lock().invalidate_end();
    }

    /// Teardown: drop every translation; later faults fail with
    /// [`FaultError::Released`](crate::FaultError::Released). Table pages are
    /// freed when the last `Arc<ShadowEpt>` goes.
    fn release(&self) {
        let mut g = self.mmu.lock();
        g.released = true;
        self.zap_locked(&mut g, GpaRange::new(0, GPA_LIMIT));
    }
}
