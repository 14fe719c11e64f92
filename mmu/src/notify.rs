//! [`ShadowEpt`] as a subscriber of the primary side's `NotifierList`.

use guestmem::notifier::{GpaRange, Invalidation, MmuNotifier};

use crate::primary::{GPA_LIMIT, HUGE_ORDER, HUGE_SIZE};
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

    /// Like `invalidate_range_start`, but 2 MiB leaves overlapping the range
    /// are split (all 512 children installed before the leaf is replaced)
    /// instead of zapped, and only the leaves inside `changed` are zapped:
    /// the other pages keep their frames in the primary map, so their
    /// translations stay valid and the guest keeps reaching them.
    fn invalidate_range_start_split(&self, inv: &Invalidation, changed: GpaRange) {
        let mut g = self.mmu.lock();
        g.invalidate_begin(inv.range);
        g.stats.invalidations += 1;
        let mut gpa = inv.range.start & !(HUGE_SIZE - 1);
        while gpa < inv.range.end {
            if self.table.leaf(gpa).is_some_and(|l| l.order == HUGE_ORDER) {
                let st = &mut *g;
                match self.table.split(&mut st.store, gpa) {
                    Ok(split) => {
                        st.stats.splits += u64::from(split);
                        st.stats.table_pages = st.store.pages();
                    }
                    // No table page for the split (only if the heap
                    // handed out an address at or above HOST_ADDR_LIMIT,
                    // 2^52: not possible for x86-64 user space, which ends
                    // at 2^47, or 2^56 with LA57 and a high mmap hint):
                    // zap the leaf whole so no translation to a changed
                    // frame survives. Subscribers that keep the unchanged
                    // pages (the VMM's KVM view) then map pages this table
                    // lacks, which the VMM's checker reports.
                    Err(_) => {
                        self.zap_locked(st, GpaRange::new(gpa, HUGE_SIZE));
                    }
                }
            }
            gpa += HUGE_SIZE;
        }
        self.zap_locked(&mut g, changed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backing, PrimaryMap};
    use guestmem::notifier::InvalidateReason;

    /// A primary that maps everything as 2 MiB blocks at host = gpa + 1 GiB.
    struct Huge;
    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    struct Never;
    impl PrimaryMap for Huge {
        type Error = Never;
        fn resolve(&self, gpa: u64, _cpu: usize) -> Result<Backing, Never> {
            let base = gpa & !(HUGE_SIZE - 1);
            Ok(Backing {
                gpa_base: base,
                order: HUGE_ORDER,
                host_addr: base + (1 << 30),
                frame: 0,
                writable: true,
            })
        }
    }

    #[test]
    fn split_invalidation_keeps_unchanged_pages_and_zaps_the_changed_one() {
        let ept = ShadowEpt::new().unwrap();
        let t = ept.fault(0x20_5000, false, 0, &Huge).unwrap();
        assert_eq!(t.order, HUGE_ORDER);
        let seq = ept.invalidate_seq();
        let range = GpaRange::new(0x20_0000, HUGE_SIZE);
        let changed = GpaRange::new(0x20_3000, 0x1000);
        let inv = Invalidation {
            range,
            reason: InvalidateReason::Poison,
        };
        ept.invalidate_range_start_split(&inv, changed);
        // Every page but the changed one is still reachable, as a 4 KiB leaf
        // to the same host page; the changed one is gone.
        for i in 0..512u64 {
            let gpa = 0x20_0000 + i * 0x1000;
            match ept.translate(gpa, false) {
                Some(t) => {
                    assert_ne!(gpa, changed.start);
                    assert_eq!((t.order, t.host_addr_of(gpa)), (0, gpa + (1 << 30)));
                }
                None => assert_eq!(gpa, changed.start),
            }
        }
        assert_eq!(ept.invalidations_in_progress(), 1);
        ept.invalidate_range_end(&inv);
        assert_eq!(ept.invalidations_in_progress(), 0);
        assert!(ept.invalidate_seq() > seq);
    }
}
