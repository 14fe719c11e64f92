//! Range-based MMU notifiers: the primary side (guestmem) owns the list and
//! calls it; secondary MMUs (the shadow EPT, the KVM mapping, device
//! translation caches) implement [`MmuNotifier`].
//!
//! There is deliberately no per-page callback. Linux removed
//! `invalidate_page` (v4.13) because it ran after the primary PTE was already
//! gone and ignored huge pages; every change to the primary map is bracketed
//! by [`MmuNotifier::invalidate_range_start`] and
//! [`MmuNotifier::invalidate_range_end`], and a huge mapping is always
//! invalidated as a whole (`PAGE_SIZE << order`, aligned).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// A page-aligned guest-physical byte range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GpaRange {
    /// First byte of the range.
    pub start: u64,
    /// One past the last byte of the range.
    pub end: u64,
}

impl GpaRange {
    /// The range `[start, start + len)`.
    pub const fn new(start: u64, len: u64) -> Self {
        Self {
            start,
            end: start + len,
        }
    }

    /// The aligned range covering a whole mapping of `PAGE_SIZE << order`
    /// bytes that contains `gpa`.
    pub const fn for_order(gpa: u64, order: u32) -> Self {
        let len = crate::PAGE_SIZE << order;
        let start = gpa & !(len - 1);
        Self {
            start,
            end: start + len,
        }
    }

    /// Length in bytes.
    pub const fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True when the range covers no byte.
    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// True when the two ranges share at least one byte.
    pub const fn overlaps(&self, other: &GpaRange) -> bool {
        self.start < other.end && other.start < self.end
    }
}

impl std::fmt::Display for GpaRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}..{:#x}", self.start, self.end)
    }
}

/// Why a range is being invalidated (for statistics and tracing only:
/// subscribers must behave the same for every reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidateReason {
    /// The primary mapping is removed (e.g. guest reset, teardown).
    Unmap,
    /// A frame failed (hard poison).
    Poison,
    /// The frame is migrated to a new one (soft offline).
    Migrate,
    /// The guest gave the page to the balloon or reported it free.
    Release,
    /// A huge mapping is split into smaller ones.
    Split,
}

/// One invalidation, as passed to both callbacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Invalidation {
    /// The guest-physical range whose translations must go.
    pub range: GpaRange,
    /// Why.
    pub reason: InvalidateReason,
}

/// A secondary MMU that mirrors guestmem's guest-physical map.
///
/// Contract (the same as Linux's `mmu_notifier_ops`):
/// - Between `invalidate_range_start` and the matching `invalidate_range_end`
///   the subscriber must not create any new translation inside the range.
/// - When `invalidate_range_start` returns, the subscriber holds no translation
///   into the range; so once `invalidate_range_end` has run the old frames may
///   be freed or reused.
/// - Invalidations of disjoint or overlapping ranges may run concurrently.
pub trait MmuNotifier: Send + Sync {
    /// The primary map is about to change inside `inv.range`.
    fn invalidate_range_start(&self, inv: &Invalidation);
    /// Like [`MmuNotifier::invalidate_range_start`] for a change that splits
    /// huge mappings inside `inv.range`: only the pages of `changed` get new
    /// frames (or none); every other page of `inv.range` keeps its frame, now
    /// behind a smaller mapping. A subscriber may keep (or split) its
    /// translations outside `changed`; the default drops the whole range.
    fn invalidate_range_start_split(&self, inv: &Invalidation, changed: GpaRange) {
        let _ = changed;
        self.invalidate_range_start(inv);
    }
    /// The change inside `inv.range` is complete.
    fn invalidate_range_end(&self, inv: &Invalidation);
    /// The address space is being torn down; drop every translation.
    fn release(&self) {}
}

/// Handle returned by [`NotifierList::register`], used to unregister.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifierId(u64);

struct Entry {
    id: NotifierId,
    notifier: Arc<dyn MmuNotifier>,
}

/// An invalidation between its start and its end.
struct OpenInvalidation {
    /// Identifies it for its guard.
    token: u64,
    inv: Invalidation,
    /// `Some(changed)` for a split invalidation.
    changed: Option<GpaRange>,
    /// Subscribers registered while it was open: told about it by
    /// [`NotifierList::register`], ended by its guard.
    late: Vec<Arc<Entry>>,
}

type OpenList = Arc<Mutex<Vec<OpenInvalidation>>>;

fn lock_open(open: &Mutex<Vec<OpenInvalidation>>) -> MutexGuard<'_, Vec<OpenInvalidation>> {
    open.lock().unwrap_or_else(|e| e.into_inner())
}

/// The list of subscribers of one guest address space.
///
/// Registration and unregistration are safe while invalidations run: an
/// invalidation calls `start` and `end` on the same snapshot of the list, and
/// [`NotifierList::unregister`] waits until no invalidation still holds the
/// removed subscriber (like `mmu_notifier_unregister` waiting for SRCU). A
/// subscriber registered while invalidations are open is told about each
/// of them at once (its `invalidate_range_start` runs inside `register`) and
/// gets their `invalidate_range_end` when they end, so it never installs a
/// translation into a range being changed and never sees an end without
/// its start.
#[derive(Default)]
pub struct NotifierList {
    entries: RwLock<Vec<Arc<Entry>>>,
    /// Invalidations between start and end. Lock order: `entries`, then
    /// `open`; a late subscriber's start runs under both.
    open: OpenList,
    next_id: AtomicU64,
    next_token: AtomicU64,
}

/// An invalidation in progress: `start` has been called on every subscriber
/// of the snapshot; dropping the guard (or calling [`InvalidateGuard::end`])
/// calls `end` on the same subscribers and on those registered meanwhile.
#[must_use = "the invalidation ends when the guard is dropped"]
pub struct InvalidateGuard {
    snapshot: Vec<Arc<Entry>>,
    inv: Invalidation,
    token: u64,
    open: OpenList,
}

impl InvalidateGuard {
    /// The invalidation this guard brackets.
    pub fn invalidation(&self) -> &Invalidation {
        &self.inv
    }

    /// End the invalidation now.
    pub fn end(self) {}
}

impl Drop for InvalidateGuard {
    fn drop(&mut self) {
        // Closed first: a subscriber registering from now on is not told
        // about this invalidation, and one registered before is in `late`.
        let late = {
            let mut open = lock_open(&self.open);
            let i = open
                .iter()
                .position(|o| o.token == self.token)
                .expect("an open invalidation is listed until its guard drops");
            open.swap_remove(i).late
        };
        for e in self.snapshot.iter().chain(&late) {
            e.notifier.invalidate_range_end(&self.inv);
        }
    }
}

impl NotifierList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a subscriber. It sees every invalidation that starts after this
    /// call returns, and every one open now: for those its
    /// `invalidate_range_start` (or `_split`) is called here, before this
    /// returns, and their ends reach it like everyone else's.
    pub fn register(&self, notifier: Arc<dyn MmuNotifier>) -> NotifierId {
        let id = NotifierId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let entry = Arc::new(Entry { id, notifier });
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.push(entry.clone());
        // Under `entries` no invalidation can take a snapshot (that happens
        // under the read lock), so each open one either has its snapshot
        // (without us) already or starts after this returns (with us).
        let mut open = lock_open(&self.open);
        for o in open.iter_mut() {
            match o.changed {
                Some(changed) => entry.notifier.invalidate_range_start_split(&o.inv, changed),
                None => entry.notifier.invalidate_range_start(&o.inv),
            }
            o.late.push(entry.clone());
        }
        id
    }

    /// Remove a subscriber and wait until no invalidation in flight still
    /// calls it. Returns false when `id` was not registered.
    pub fn unregister(&self, id: NotifierId) -> bool {
        let removed = {
            let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
            match entries.iter().position(|e| e.id == id) {
                Some(i) => entries.remove(i),
                None => return false,
            }
        };
        // Invalidations in flight hold clones of the entry; wait them out so
        // the caller may free whatever the subscriber points at.
        while Arc::strong_count(&removed) > 1 {
            std::thread::yield_now();
        }
        true
    }

    /// Number of registered subscribers.
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when nobody is subscribed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Begin an invalidation of `range`: calls `invalidate_range_start` on
    /// every subscriber and returns the guard that ends it.
    pub fn invalidate_range_start(
        &self,
        range: GpaRange,
        reason: InvalidateReason,
    ) -> InvalidateGuard {
        self.start_with(Invalidation { range, reason }, None, |n, inv| {
            n.invalidate_range_start(inv)
        })
    }

    /// Begin an invalidation of `range` that splits its huge mappings and
    /// changes the frames of `changed` only (see
    /// [`MmuNotifier::invalidate_range_start_split`]).
    pub fn invalidate_range_start_split(
        &self,
        range: GpaRange,
        changed: GpaRange,
        reason: InvalidateReason,
    ) -> InvalidateGuard {
        debug_assert!(range.start <= changed.start && changed.end <= range.end);
        self.start_with(Invalidation { range, reason }, Some(changed), |n, inv| {
            n.invalidate_range_start_split(inv, changed)
        })
    }

    /// List the invalidation as open and snapshot the subscribers (both
    /// under the read lock, so a registration is either in the snapshot or
    /// sees the invalidation open), then call `start` on the snapshot; the
    /// guard calls `end` on the snapshot and on late subscribers.
    fn start_with(
        &self,
        inv: Invalidation,
        changed: Option<GpaRange>,
        start: impl Fn(&dyn MmuNotifier, &Invalidation),
    ) -> InvalidateGuard {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let snapshot = {
            let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
            lock_open(&self.open).push(OpenInvalidation {
                token,
                inv,
                changed,
                late: Vec::new(),
            });
            entries.clone()
        };
        for e in &snapshot {
            start(&*e.notifier, &inv);
        }
        InvalidateGuard {
            snapshot,
            inv,
            token,
            open: self.open.clone(),
        }
    }

    /// Teardown: call `release` on every subscriber and empty the list.
    pub fn release_all(&self) {
        let entries = std::mem::take(&mut *self.entries.write().unwrap_or_else(|e| e.into_inner()));
        for e in entries {
            e.notifier.release();
        }
    }
}
