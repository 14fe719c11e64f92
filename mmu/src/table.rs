//! The 4-level radix table: 512 atomic EPT entries per 4 KiB page.
//!
//! Readers walk it without any lock (`Acquire` loads); writers hold the mmu
//! lock (proved by `&mut PageStore`, which lives inside it). Page-table pages
//! are never freed while the table is alive (see `DESIGN.md`):
//! - PML4 and PDPT entries, once they point at a child page, never change.
//! - Each 2 MiB slot owns at most one PT page for its whole life ("its" PT).
//!   The PD entry of the slot is empty, a 2 MiB leaf, or a pointer to its PT;
//!   when a 2 MiB leaf replaces the PT, the PT is emptied and kept for the
//!   next split of the same slot. So a reader holding a stale pointer only
//!   ever reads entries for the addresses it asked about.
//! - Invariant: outside the lock every present leaf, linked or not, is a
//!   translation the fault protocol installed and no invalidation has zapped.
//! - Readers only load; every store is a writer's, under the lock.
//!
//! The entries are `crate::sync` atomics: loom's under the `loom` feature,
//! so the loom models see the lock-free walks racing installs, splits and
//! zaps.

use std::collections::HashMap;
use std::ptr::NonNull;

use guestmem::notifier::GpaRange;
use guestmem::PAGE_SIZE;

use crate::entry::{EptEntry, EPT_ADDR_MASK, EPT_LARGE};
use crate::primary::{GPA_LIMIT, HOST_ADDR_LIMIT, HUGE_ORDER, HUGE_SIZE};
use crate::sync::{AtomicU64, Ordering};

/// Entries per table page.
pub const ENTRIES: usize = 512;

/// One page of the table.
#[repr(C, align(4096))]
pub(crate) struct TablePage {
    e: [AtomicU64; ENTRIES],
}

/// Index of `gpa` in a table of `level` (4 = PML4 ... 1 = PT).
const fn index(gpa: u64, level: u32) -> usize {
    ((gpa >> (12 + 9 * (level - 1))) & 511) as usize
}

/// First address of the next `1 << shift` aligned block after `gpa`.
const fn next_block(gpa: u64, shift: u32) -> u64 {
    (gpa | ((1 << shift) - 1)) + 1
}

/// The 4 KiB child `i` of a 2 MiB leaf: same permissions and memory type,
/// address advanced by `i` pages.
fn split_child(huge: EptEntry, i: usize) -> u64 {
    let flags = huge.0 & !(EPT_ADDR_MASK | EPT_LARGE);
    flags | ((huge.addr() + i as u64 * PAGE_SIZE) & EPT_ADDR_MASK)
}

/// Ownership of every page-table page except the root; lives under the mmu
/// lock, so `&mut PageStore` proves the lock is held.
pub(crate) struct PageStore {
    upper: Vec<NonNull<TablePage>>,
    /// The PT page of each 2 MiB slot (key: gpa >> 21), linked or not.
    pts: HashMap<u64, NonNull<TablePage>>,
}

// SAFETY: the pointers are owned page-table pages that contain only atomics;
// moving the store between threads moves that ownership.
unsafe impl Send for PageStore {}

impl PageStore {
    pub(crate) fn new() -> Self {
        Self {
            upper: Vec::new(),
            pts: HashMap::new(),
        }
    }

    fn alloc() -> Result<NonNull<TablePage>, u64> {
        #[cfg(not(feature = "loom"))]
        let page = Box::new(TablePage {
            e: [const { AtomicU64::new(0) }; ENTRIES],
        });
        #[cfg(feature = "loom")]
        let page = Box::new(TablePage {
            e: std::array::from_fn(|_| AtomicU64::new(0)),
        });
        let addr = &*page as *const TablePage as u64;
        if addr >= HOST_ADDR_LIMIT {
            return Err(addr);
        }
        Ok(NonNull::from(Box::leak(page)))
    }

    /// Number of page-table pages (root excluded).
    pub(crate) fn pages(&self) -> usize {
        self.upper.len() + self.pts.len()
    }
}

impl Drop for PageStore {
    fn drop(&mut self) {
        for p in self.upper.drain(..).chain(self.pts.drain().map(|(_, p)| p)) {
            // Every pointer came from `Box::leak` in `alloc` and is held once
            // in the store, which is dropped only with the whole secondary MMU.
            // SAFETY: unique ownership; no reader can hold `&Table` any more.
            drop(unsafe { Box::from_raw(p.as_ptr()) });
        }
    }
}

/// A leaf found by a walk.
pub(crate) struct Leaf {
    pub entry: EptEntry,
    /// First GPA the leaf maps.
    pub gpa_base: u64,
    pub order: u32,
}

/// The table: the root page, and the walks.
pub(crate) struct Table {
    root: NonNull<TablePage>,
}

// SAFETY: the table is a tree of pages of atomics; shared access only does
// atomic operations and the structural invariants above keep every reachable
// page alive until `Drop`, which needs exclusive access.
unsafe impl Send for Table {}
// SAFETY: as for `Send`.
unsafe impl Sync for Table {}

impl Drop for Table {
    fn drop(&mut self) {
        // SAFETY: the root came from `Box::leak` in `new` and is freed once.
        drop(unsafe { Box::from_raw(self.root.as_ptr()) });
    }
}

impl Table {
    pub(crate) fn new() -> Result<Self, u64> {
        Ok(Self {
            root: PageStore::alloc()?,
        })
    }

    fn root(&self) -> &TablePage {
        // SAFETY: the root lives as long as `self`.
        unsafe { self.root.as_ref() }
    }

    /// The child page a present non-leaf entry points at.
    fn child(&self, e: u64) -> &TablePage {
        // Non-leaf entries only hold addresses of pages owned by this table's
        // `PageStore`, never freed before the table is dropped.
        // SAFETY: see above; the returned borrow is bounded by `&self`.
        unsafe { &*(EptEntry(e).addr() as *const TablePage) }
    }

    /// Lock-free walk to the leaf mapping `gpa`.
    pub(crate) fn leaf(&self, gpa: u64) -> Option<Leaf> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        let l4 = self.root().e[index(gpa, 4)].load(Ordering::Acquire);
        if !EptEntry(l4).is_present() {
            return None;
        }
        let l3 = self.child(l4).e[index(gpa, 3)].load(Ordering::Acquire);
        if !EptEntry(l3).is_present() {
            return None;
        }
        let l2 = EptEntry(self.child(l3).e[index(gpa, 2)].load(Ordering::Acquire));
        if !l2.is_present() {
            return None;
        }
        if l2.is_large() {
            return Some(Leaf {
                entry: l2,
                gpa_base: gpa & !(HUGE_SIZE - 1),
                order: HUGE_ORDER,
            });
        }
        let l1 = EptEntry(self.child(l2.0).e[index(gpa, 1)].load(Ordering::Acquire));
        l1.is_present().then_some(Leaf {
            entry: l1,
            gpa_base: gpa & !(PAGE_SIZE - 1),
            order: 0,
        })
    }

    /// The PD entry for `gpa`, allocating the PDPT and PD pages on the way.
    fn pd_slot(&self, store: &mut PageStore, gpa: u64) -> Result<&AtomicU64, u64> {
        let mut table = self.root();
        for level in [4, 3] {
            let slot = &table.e[index(gpa, level)];
            let mut e = slot.load(Ordering::Acquire);
            if !EptEntry(e).is_present() {
                let page = PageStore::alloc()?;
                store.upper.push(page);
                e = EptEntry::table(page.as_ptr() as u64).0;
                // Release: the zeroed page is visible before the link.
                slot.store(e, Ordering::Release);
            }
            table = self.child(e);
        }
        Ok(&table.e[index(gpa, 2)])
    }

    /// The PT page of the 2 MiB slot of `gpa` (all empty when not linked).
    fn pt_page(&self, store: &mut PageStore, gpa: u64) -> Result<NonNull<TablePage>, u64> {
        let key = gpa >> 21;
        if let Some(p) = store.pts.get(&key) {
            return Ok(*p);
        }
        let p = PageStore::alloc()?;
        store.pts.insert(key, p);
        Ok(p)
    }

    /// Install a 2 MiB leaf at the slot of `gpa` (aligned). A linked PT is
    /// replaced and emptied.
    pub(crate) fn install_huge(
        &self,
        store: &mut PageStore,
        gpa: u64,
        leaf: EptEntry,
    ) -> Result<(), u64> {
        let slot = self.pd_slot(store, gpa)?;
        let cur = EptEntry(slot.load(Ordering::Acquire));
        slot.store(leaf.0, Ordering::Release);
        if cur.is_present() && !cur.is_large() {
            // Collapse: the leaf is linked, now empty the PT (its entries
            // stay valid translations until cleared, see the module
            // invariant).
            for e in &self.child(cur.0).e {
                if e.load(Ordering::Relaxed) != 0 {
                    e.store(0, Ordering::Release);
                }
            }
        }
        Ok(())
    }

    /// Install a 4 KiB leaf for `gpa`, splitting a 2 MiB leaf around it.
    pub(crate) fn install_small(
        &self,
        store: &mut PageStore,
        gpa: u64,
        leaf: EptEntry,
    ) -> Result<(), u64> {
        let slot = self.pd_slot(store, gpa)?;
        let cur = EptEntry(slot.load(Ordering::Acquire));
        let pt = if cur.is_present() && !cur.is_large() {
            self.child(cur.0)
        } else if cur.is_large() {
            self.split_slot(store, slot, gpa)?
        } else {
            let p = self.pt_page(store, gpa)?;
            // SAFETY: owned by `store`, alive while the table lives.
            let pt = unsafe { p.as_ref() };
            slot.store(EptEntry::table(p.as_ptr() as u64).0, Ordering::Release);
            pt
        };
        pt.e[index(gpa, 1)].store(leaf.0, Ordering::Release);
        Ok(())
    }

    /// Split the 2 MiB leaf in `slot` into its PT: all 512 children are
    /// written before the PT is linked (one `Release` store, so a reader
    /// that loads the link sees every child).
    fn split_slot(
        &self,
        store: &mut PageStore,
        slot: &AtomicU64,
        gpa: u64,
    ) -> Result<&TablePage, u64> {
        let p = self.pt_page(store, gpa)?;
        // SAFETY: owned by `store`, alive while the table lives.
        let pt: &TablePage = unsafe { p.as_ref() };
        let huge = EptEntry(slot.load(Ordering::Relaxed));
        for (i, e) in pt.e.iter().enumerate() {
            e.store(split_child(huge, i), Ordering::Relaxed);
        }
        slot.store(EptEntry::table(p.as_ptr() as u64).0, Ordering::Release);
        Ok(pt)
    }

    /// Split the 2 MiB leaf mapping `gpa`, if there is one. Returns whether
    /// a split happened.
    pub(crate) fn split(&self, store: &mut PageStore, gpa: u64) -> Result<bool, u64> {
        let slot = self.pd_slot(store, gpa)?;
        if EptEntry(slot.load(Ordering::Acquire)).is_large() {
            self.split_slot(store, slot, gpa)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Call `f(gpa_base, order, slot)` for every present leaf overlapping
    /// `range`; a 2 MiB leaf is passed whole even when `range` covers part of
    /// it. Used under the lock (zap, checkers).
    pub(crate) fn for_each_leaf(&self, range: GpaRange, mut f: impl FnMut(u64, u32, &AtomicU64)) {
        let end = range.end.min(GPA_LIMIT);
        let mut gpa = range.start & !(HUGE_SIZE - 1);
        while gpa < end {
            let l4 = self.root().e[index(gpa, 4)].load(Ordering::Acquire);
            if !EptEntry(l4).is_present() {
                gpa = next_block(gpa, 39);
                continue;
            }
            let l3 = self.child(l4).e[index(gpa, 3)].load(Ordering::Acquire);
            if !EptEntry(l3).is_present() {
                gpa = next_block(gpa, 30);
                continue;
            }
            let pd = self.child(l3);
            let pd_end = end.min(next_block(gpa, 30));
            while gpa < pd_end {
                let slot = &pd.e[index(gpa, 2)];
                let e = EptEntry(slot.load(Ordering::Acquire));
                if e.is_large() {
                    f(gpa, HUGE_ORDER, slot);
                } else if e.is_present() {
                    let pt = self.child(e.0);
                    let lo = index(range.start.max(gpa), 1);
                    let hi = index(pd_end.min(gpa + HUGE_SIZE) - 1, 1);
                    for (i, s) in pt.e.iter().enumerate().take(hi + 1).skip(lo) {
                        if EptEntry(s.load(Ordering::Acquire)).is_present() {
                            f(gpa + i as u64 * PAGE_SIZE, 0, s);
                        }
                    }
                }
                gpa += HUGE_SIZE;
            }
        }
    }
}
