//! Accessed/dirty tracking: aging (test-and-clear accessed), write
//! protection, and dirty logging into a per-page bitmap.
//!
//! All of it runs under the mmu lock and changes leaves with `fetch_and`, so
//! the accessed/dirty bits that lock-free [`ShadowEpt::translate`] sets with
//! compare-exchange are never lost (a reader's CAS fails and it re-walks).

use std::sync::atomic::Ordering;

use guestmem::notifier::GpaRange;
use guestmem::PAGE_SIZE;

use crate::entry::{EptEntry, EPT_ACCESSED, EPT_DIRTY, EPT_W};
use crate::primary::HUGE_ORDER;
use crate::ShadowEpt;

/// One bit per 4 KiB page of a guest-physical range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageBitmap {
    range: GpaRange,
    bits: Vec<u64>,
}

impl PageBitmap {
    /// All clear, covering `range` rounded out to whole pages.
    pub fn new(range: GpaRange) -> Self {
        let start = range.start & !(PAGE_SIZE - 1);
        let end = range.end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let pages = (end.saturating_sub(start) / PAGE_SIZE) as usize;
        Self {
            range: GpaRange { start, end },
            bits: vec![0; pages.div_ceil(64)],
        }
    }

    /// The range covered.
    pub fn range(&self) -> GpaRange {
        self.range
    }

    /// Set the bits of the pages of `[gpa, gpa + len)` inside the range.
    pub fn set_range(&mut self, gpa: u64, len: u64) {
        let lo = gpa.max(self.range.start);
        let hi = (gpa + len).min(self.range.end);
        let mut p = lo;
        while p < hi {
            let i = ((p - self.range.start) / PAGE_SIZE) as usize;
            self.bits[i / 64] |= 1 << (i % 64);
            p += PAGE_SIZE;
        }
    }

    /// True when the page of `gpa` is set.
    pub fn is_set(&self, gpa: u64) -> bool {
        if gpa < self.range.start || gpa >= self.range.end {
            return false;
        }
        let i = ((gpa - self.range.start) / PAGE_SIZE) as usize;
        self.bits[i / 64] & (1 << (i % 64)) != 0
    }

    /// Number of pages set.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Guest-physical addresses of the pages set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let start = self.range.start;
        self.bits.iter().enumerate().flat_map(move |(w, &word)| {
            (0..64)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| start + (w as u64 * 64 + b) * PAGE_SIZE)
        })
    }

    /// The raw words (bit `i` = page `range.start + i * PAGE_SIZE`).
    pub fn words(&self) -> &[u64] {
        &self.bits
    }
}

impl ShadowEpt {
    /// Aging: test-and-clear the accessed bit of every leaf overlapping
    /// `range`; the bitmap marks the pages that were accessed since the last
    /// call (a 2 MiB leaf marks all its pages inside `range`).
    pub fn age(&self, range: GpaRange) -> PageBitmap {
        let mut out = PageBitmap::new(range);
        let _g = self.mmu.lock();
        self.table.for_each_leaf(range, |gpa, order, slot| {
            let old = EptEntry(slot.fetch_and(!EPT_ACCESSED, Ordering::AcqRel));
            if old.is_present() && old.accessed() {
                out.set_range(gpa, PAGE_SIZE << order);
            }
        });
        out
    }

    /// True when any leaf overlapping `range` has its accessed bit set
    /// (no clearing; like `test_young`).
    pub fn test_young(&self, range: GpaRange) -> bool {
        let mut young = false;
        let _g = self.mmu.lock();
        self.table.for_each_leaf(range, |_, _, slot| {
            young |= EptEntry(slot.load(Ordering::Acquire)).accessed();
        });
        young
    }

    /// Clear the write permission of every leaf overlapping `range`: the next
    /// write through [`ShadowEpt::translate`] fails and must fault. Returns
    /// the number of leaves that were writable.
    pub fn write_protect(&self, range: GpaRange) -> u64 {
        let mut n = 0;
        let _g = self.mmu.lock();
        self.table.for_each_leaf(range, |_, _, slot| {
            let old = EptEntry(slot.fetch_and(!EPT_W, Ordering::AcqRel));
            n += u64::from(old.is_present() && old.writable());
        });
        n
    }

    /// Start dirty logging on `range`: 2 MiB leaves in it are split (eager
    /// split, so the log has 4 KiB granularity), every leaf is write-protected
    /// and its dirty bit cleared, and until [`ShadowEpt::stop_dirty_log`]
    /// faults in the range install 4 KiB leaves, writable only on writes.
    pub fn start_dirty_log(
        &self,
        range: GpaRange,
    ) -> Result<(), crate::FaultError<std::convert::Infallible>> {
        let mut g = self.mmu.lock();
        let st = &mut *g;
        st.dirty_log.push(range);
        let mut huge = Vec::new();
        self.table.for_each_leaf(range, |gpa, order, _| {
            if order == HUGE_ORDER {
                huge.push(gpa);
            }
        });
        for gpa in huge {
            let split = self
                .table
                .split(&mut st.store, gpa)
                .map_err(|addr| crate::FaultError::TableAlloc { addr })?;
            st.stats.splits += u64::from(split);
        }
        st.stats.table_pages = st.store.pages();
        self.table.for_each_leaf(range, |_, _, slot| {
            slot.fetch_and(!(EPT_W | EPT_DIRTY), Ordering::AcqRel);
        });
        Ok(())
    }

    /// Stop dirty logging on a range given to [`ShadowEpt::start_dirty_log`].
    /// Returns false when it was not being logged.
    pub fn stop_dirty_log(&self, range: GpaRange) -> bool {
        let mut g = self.mmu.lock();
        let Some(i) = g.dirty_log.iter().position(|r| *r == range) else {
            return false;
        };
        g.dirty_log.swap_remove(i);
        if g.dirty_log.is_empty() {
            g.zapped_dirty.clear();
        }
        true
    }

    /// Collect and reset the dirty state of `range`: pages written since the
    /// last collection (or since logging started), including leaves zapped
    /// while dirty. Dirty leaves are write-protected again so the next write
    /// faults.
    pub fn collect_dirty(&self, range: GpaRange) -> PageBitmap {
        let mut out = PageBitmap::new(range);
        let mut g = self.mmu.lock();
        self.table.for_each_leaf(range, |gpa, order, slot| {
            let old = EptEntry(slot.fetch_and(!(EPT_DIRTY | EPT_W), Ordering::AcqRel));
            if old.is_present() && old.dirty() {
                out.set_range(gpa, PAGE_SIZE << order);
            }
        });
        g.zapped_dirty.retain(|&(gpa, order)| {
            let r = GpaRange::new(gpa, PAGE_SIZE << order);
            if r.overlaps(&range) {
                out.set_range(gpa, PAGE_SIZE << order);
                false
            } else {
                true
            }
        });
        out
    }
}
