//! [`ShadowEpt`]: the secondary MMU proper (fault path, lock-free
//! translation, zap). The notifier side is in `notify.rs`.

use guestmem::notifier::GpaRange;
use guestmem::PAGE_SIZE;

use crate::entry::{EptEntry, MemType, EPT_R, EPT_W, EPT_X};
use crate::fault::{MmuGuard, MmuLock};
use crate::primary::{check_backing, FaultError, PrimaryMap, Translation, GPA_LIMIT, HUGE_ORDER};
use crate::sync::{yield_now, Ordering};
use crate::table::{PageStore, Table};

/// Default number of attempts before a fault gives up with
/// [`FaultError::Retry`].
pub const DEFAULT_FAULT_ATTEMPTS: u32 = 1000;

/// Counters kept under the mmu lock (no cost on the lock-free paths).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EptStats {
    /// Faults that reached the lock (fast-path hits are not counted).
    pub faults: u64,
    /// 4 KiB leaves installed.
    pub installs_4k: u64,
    /// 2 MiB leaves installed.
    pub installs_2m: u64,
    /// Faults dropped because an invalidation raced them.
    pub retries: u64,
    /// `invalidate_range_start` calls.
    pub invalidations: u64,
    /// Leaves removed by invalidations and release.
    pub zapped_leaves: u64,
    /// 2 MiB leaves split into 512 children.
    pub splits: u64,
    /// Page-table pages allocated (root excluded).
    pub table_pages: usize,
}

/// Errors creating a [`ShadowEpt`].
#[derive(Debug, thiserror::Error)]
pub enum EptError {
    /// The root page's host address does not fit an entry.
    #[error(
        "page-table root at host address {addr:#x} does not fit the 52-bit entry address field"
    )]
    TableAlloc {
        /// Host address of the page.
        addr: u64,
    },
}

/// State protected by the mmu lock.
pub(crate) struct EptState {
    pub(crate) store: PageStore,
    pub(crate) stats: EptStats,
    pub(crate) released: bool,
}

/// The shadow EPT: a 4-level radix table of EPT entries mapping guest-physical
/// pages to host addresses, kept in sync with the primary map through
/// [`MmuNotifier`](guestmem::notifier::MmuNotifier) (register an
/// `Arc<ShadowEpt>` on the primary's `NotifierList`).
///
/// Lock order: the primary map's locks are never held while calling
/// [`ShadowEpt::fault`]'s lock; notifier callbacks take the mmu lock inside
/// whatever the primary holds. `PrimaryMap::resolve` runs with no mmu lock.
pub struct ShadowEpt {
    pub(crate) table: Table,
    pub(crate) mmu: MmuLock<EptState>,
    max_attempts: u32,
}

impl ShadowEpt {
    /// An empty table.
    pub fn new() -> Result<Self, EptError> {
        Ok(Self {
            table: Table::new().map_err(|addr| EptError::TableAlloc { addr })?,
            mmu: MmuLock::new(EptState {
                store: PageStore::new(),
                stats: EptStats::default(),
                released: false,
            }),
            max_attempts: DEFAULT_FAULT_ATTEMPTS,
        })
    }

    /// Give up a fault with [`FaultError::Retry`] after `attempts` (at
    /// least 1) raced invalidations.
    pub fn with_max_fault_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The fault path (KVM's protocol): snapshot the invalidation sequence,
    /// resolve `gpa` through `primary` with no lock held, take the mmu lock,
    /// and install unless an overlapping invalidation is in progress or one
    /// ended meanwhile (then start over). Returns the installed (or already
    /// present) translation.
    pub fn fault<P: PrimaryMap + ?Sized>(
        &self,
        gpa: u64,
        write: bool,
        cpu: usize,
        primary: &P,
    ) -> Result<Translation, FaultError<P::Error>> {
        if gpa >= GPA_LIMIT {
            return Err(FaultError::OutOfRange { gpa });
        }
        let mut attempts = 0;
        loop {
            if let Some(t) = self.translate(gpa, write) {
                return Ok(t);
            }
            let snap = self.mmu.fault_begin();
            let b = primary
                .resolve(gpa, cpu)
                .map_err(|source| FaultError::Primary { gpa, source })?;
            let huge_ok = check_backing(gpa, &b)?;
            if write && !b.writable {
                return Err(FaultError::ReadOnly { gpa });
            }
            let mut g = self.mmu.lock();
            if g.released {
                return Err(FaultError::Released);
            }
            g.stats.faults += 1;
            let (base, order, host) = if huge_ok {
                (b.gpa_base, HUGE_ORDER, b.host_addr)
            } else {
                let base = gpa & !(PAGE_SIZE - 1);
                (base, 0, b.host_addr + (base - b.gpa_base))
            };
            let range = GpaRange::new(base, PAGE_SIZE << order);
            if g.retry_needed(snap, range) {
                g.stats.retries += 1;
                drop(g);
                attempts += 1;
                if attempts >= self.max_attempts {
                    return Err(FaultError::Retry { gpa, attempts });
                }
                yield_now();
                continue;
            }
            let perms = EPT_R | EPT_X | if b.writable { EPT_W } else { 0 };
            let leaf = EptEntry::leaf(host, perms, MemType::WriteBack, order == HUGE_ORDER);
            self.install_locked(&mut g, base, order, leaf)
                .map_err(|addr| FaultError::TableAlloc { addr })?;
            return Ok(Translation {
                gpa_base: base,
                order,
                host_addr: host,
                writable: b.writable,
            });
        }
    }

    fn install_locked(
        &self,
        g: &mut MmuGuard<'_, EptState>,
        base: u64,
        order: u32,
        leaf: EptEntry,
    ) -> Result<(), u64> {
        let st = &mut **g;
        if order == HUGE_ORDER {
            self.table.install_huge(&mut st.store, base, leaf)?;
            st.stats.installs_2m += 1;
        } else {
            let was_huge = self.table.leaf(base).is_some_and(|l| l.order == HUGE_ORDER);
            self.table.install_small(&mut st.store, base, leaf)?;
            st.stats.installs_4k += 1;
            st.stats.splits += u64::from(was_huge);
        }
        st.stats.table_pages = st.store.pages();
        Ok(())
    }

    /// Lock-free translation of `gpa` (the fault fast path). `None` when
    /// nothing is mapped, or for a write through a read-only leaf (the
    /// primary maps the page read-only): use [`ShadowEpt::fault`] then.
    /// Only loads: the walk never writes an entry.
    ///
    /// The result is a snapshot: a caller that keeps using the host address
    /// after an invalidation of the page could have ended must be a notifier
    /// subscriber itself or re-check with the fault protocol ([`MmuLock`]).
    pub fn translate(&self, gpa: u64, write: bool) -> Option<Translation> {
        let leaf = self.table.leaf(gpa)?;
        let e = leaf.entry;
        if write && !e.writable() {
            return None;
        }
        Some(Translation {
            gpa_base: leaf.gpa_base,
            order: leaf.order,
            host_addr: e.addr(),
            writable: e.writable(),
        })
    }

    /// Lock-free look at the leaf mapping `gpa` with its raw entry (for
    /// checkers and statistics).
    pub fn peek(&self, gpa: u64) -> Option<(Translation, EptEntry)> {
        let leaf = self.table.leaf(gpa)?;
        let t = Translation {
            gpa_base: leaf.gpa_base,
            order: leaf.order,
            host_addr: leaf.entry.addr(),
            writable: leaf.entry.writable(),
        };
        Some((t, leaf.entry))
    }

    /// Remove every leaf overlapping `range` (a 2 MiB leaf goes whole). The
    /// caller holds the lock. Returns the number of leaves removed.
    pub(crate) fn zap_locked(&self, st: &mut EptState, range: GpaRange) -> u64 {
        let mut n = 0;
        self.table.for_each_leaf(range, |_, _, slot| {
            slot.store(0, Ordering::Release);
            n += 1;
        });
        st.stats.zapped_leaves += n;
        n
    }

    /// Counters.
    pub fn stats(&self) -> EptStats {
        self.mmu.lock().stats
    }

    /// The invalidation sequence (bumped by every `invalidate_range_end`).
    pub fn invalidate_seq(&self) -> u64 {
        self.mmu.seq()
    }

    /// Invalidations between start and end right now.
    pub fn invalidations_in_progress(&self) -> u32 {
        self.mmu.lock().tracker().in_progress()
    }

    /// Every present leaf overlapping `range`, as translations (under the
    /// lock, for checkers and debugging).
    pub fn mappings(&self, range: GpaRange) -> Vec<Translation> {
        let _g = self.mmu.lock();
        let mut out = Vec::new();
        self.table.for_each_leaf(range, |gpa, order, slot| {
            let e = EptEntry(slot.load(Ordering::Acquire));
            if e.is_present() {
                out.push(Translation {
                    gpa_base: gpa,
                    order,
                    host_addr: e.addr(),
                    writable: e.writable(),
                });
            }
        });
        out
    }
}
