//! A flat primary map for tests: BTreeMap of mappings, monotonically
//! allocated fake frames (never reused, so a stale translation is always
//! detectable), every change bracketed by the real `NotifierList`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use guestmem::notifier::{GpaRange, InvalidateReason, NotifierList};
use guestmem::PAGE_SIZE;
use mmu::{Backing, PrimaryMap, HUGE_ORDER, HUGE_SIZE};

/// Fake host addresses start here (never dereferenced).
pub const HOST_BASE: u64 = 0x7000_0000_0000;

#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    /// Not RAM.
    #[error("gpa {0:#x} is not guest RAM")]
    NotRam(u64),
}

struct Inner {
    /// base -> (order, host address of base)
    maps: BTreeMap<u64, (u32, u64)>,
    next_host: u64,
    /// 2 MiB slots populated with huge blocks.
    huge_slots: HashSet<u64>,
}

pub struct FlatPrimary {
    inner: Mutex<Inner>,
    pub list: NotifierList,
    pub limit: u64,
}

impl FlatPrimary {
    /// RAM `[0, limit)`; 2 MiB slots `i` with `huge(i)` populate huge.
    pub fn new(limit: u64, huge: impl Fn(u64) -> bool) -> Self {
        let huge_slots = (0..limit / HUGE_SIZE).filter(|&i| huge(i)).collect();
        Self {
            inner: Mutex::new(Inner {
                maps: BTreeMap::new(),
                next_host: HOST_BASE,
                huge_slots,
            }),
            list: NotifierList::new(),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    fn alloc(inner: &mut Inner, order: u32) -> u64 {
        let len = PAGE_SIZE << order;
        let host = inner.next_host.div_ceil(len) * len;
        inner.next_host = host + len;
        host
    }

    fn find(inner: &Inner, gpa: u64) -> Option<(u64, u32, u64)> {
        let (&base, &(order, host)) = inner.maps.range(..=gpa).next_back()?;
        (gpa < base + (PAGE_SIZE << order)).then_some((base, order, host))
    }

    /// Host address of the page of `gpa`, if populated.
    pub fn host_of(&self, gpa: u64) -> Option<u64> {
        let inner = self.lock();
        Self::find(&inner, gpa).map(|(b, _, h)| h + (gpa & !(PAGE_SIZE - 1)) - b)
    }

    /// The mapping containing `gpa`: (base, order, host).
    pub fn mapping(&self, gpa: u64) -> Option<(u64, u32, u64)> {
        Self::find(&self.lock(), gpa)
    }

    /// Old (gpa page, host page) pairs of every mapping overlapping `range`,
    /// and the range widened to whole mappings.
    fn covering(inner: &Inner, range: GpaRange) -> (GpaRange, Vec<(u64, u32, u64)>) {
        let mut r = range;
        let mut old = Vec::new();
        let first = inner
            .maps
            .range(..range.start)
            .next_back()
            .map(|(b, _)| *b)
            .unwrap_or(0);
        for (&b, &(o, h)) in inner.maps.range(first..range.end) {
            let m = GpaRange::new(b, PAGE_SIZE << o);
            if m.overlaps(&range) {
                r.start = r.start.min(m.start);
                r.end = r.end.max(m.end);
                old.push((b, o, h));
            }
        }
        (r, old)
    }

    /// Remove every mapping overlapping `range` (widened to whole huge
    /// mappings, as guestmem does). Returns the removed (base, order, host).
    pub fn unmap(&self, range: GpaRange, reason: InvalidateReason) -> Vec<(u64, u32, u64)> {
        let (r, _) = Self::covering(&self.lock(), range);
        let guard = self.list.invalidate_range_start(r, reason);
        let old = {
            let mut inner = self.lock();
            let (_, old) = Self::covering(&inner, r);
            for (b, _, _) in &old {
                inner.maps.remove(b);
            }
            old
        };
        guard.end();
        old
    }

    /// Move the mapping containing `gpa` to fresh frames. Returns the old
    /// (base, order, host).
    pub fn migrate(&self, gpa: u64) -> Option<(u64, u32, u64)> {
        let (base, order, _) = self.mapping(gpa)?;
        let guard = self.list.invalidate_range_start(
            GpaRange::new(base, PAGE_SIZE << order),
            InvalidateReason::Migrate,
        );
        let old = {
            let mut inner = self.lock();
            match inner.maps.get(&base).copied() {
                Some((o, h)) if o == order => {
                    let new = Self::alloc(&mut inner, order);
                    inner.maps.insert(base, (order, new));
                    Some((base, order, h))
                }
                _ => None,
            }
        };
        guard.end();
        old
    }

    /// Split the huge mapping containing `gpa` into 512 4 KiB mappings of
    /// the same frames. Returns true when one was split.
    pub fn split(&self, gpa: u64) -> bool {
        let base = gpa & !(HUGE_SIZE - 1);
        let guard = self
            .list
            .invalidate_range_start(GpaRange::new(base, HUGE_SIZE), InvalidateReason::Split);
        let done = {
            let mut inner = self.lock();
            inner.huge_slots.remove(&(base / HUGE_SIZE));
            match inner.maps.get(&base).copied() {
                Some((HUGE_ORDER, h)) => {
                    inner.maps.remove(&base);
                    for i in 0..512 {
                        inner
                            .maps
                            .insert(base + i * PAGE_SIZE, (0, h + i * PAGE_SIZE));
                    }
                    true
                }
                _ => false,
            }
        };
        guard.end();
        done
    }

    /// Let the 2 MiB slot of `gpa` be populated with a huge block again
    /// once it is empty.
    pub fn allow_huge(&self, gpa: u64) {
        self.lock().huge_slots.insert(gpa / HUGE_SIZE);
    }

    /// Change the frames of `changed` only, the way guestmem's memory
    /// failure, soft offline and `release_range` do: one split-aware
    /// invalidation ([`NotifierList::invalidate_range_start_split`]) whose
    /// range covers every mapping overlapping `changed` (huge ones whole);
    /// huge mappings are split into 4 KiB mappings of the same frames, then
    /// every page of `changed` gets a fresh frame (`migrate`) or is
    /// unmapped. Pages of the range outside `changed` keep their frames.
    /// Returns the invalidated range and the old (page, 0, host) of every
    /// changed page that was mapped.
    pub fn change_range(
        &self,
        changed: GpaRange,
        migrate: bool,
    ) -> (GpaRange, Vec<(u64, u32, u64)>) {
        let (cover, _) = Self::covering(&self.lock(), changed);
        let reason = if migrate {
            InvalidateReason::Migrate
        } else {
            InvalidateReason::Poison
        };
        let guard = self
            .list
            .invalidate_range_start_split(cover, changed, reason);
        let old = {
            let mut inner = self.lock();
            let (_, maps) = Self::covering(&inner, changed);
            let mut old = Vec::new();
            for (b, o, h) in maps {
                inner.maps.remove(&b);
                if o == HUGE_ORDER {
                    inner.huge_slots.remove(&(b / HUGE_SIZE));
                }
                for i in 0..1u64 << o {
                    let (g, host) = (b + i * PAGE_SIZE, h + i * PAGE_SIZE);
                    if !changed.overlaps(&GpaRange::new(g, PAGE_SIZE)) {
                        inner.maps.insert(g, (0, host));
                        continue;
                    }
                    old.push((g, 0, host));
                    if migrate {
                        let new = Self::alloc(&mut inner, 0);
                        inner.maps.insert(g, (0, new));
                    }
                }
            }
            old
        };
        guard.end();
        (cover, old)
    }
}

impl PrimaryMap for FlatPrimary {
    type Error = PrimaryError;

    fn resolve(&self, gpa: u64, _cpu: usize) -> Result<Backing, PrimaryError> {
        if gpa >= self.limit {
            return Err(PrimaryError::NotRam(gpa));
        }
        let mut inner = self.lock();
        let (base, order, host) = match Self::find(&inner, gpa) {
            Some(m) => m,
            None => {
                let slot = gpa & !(HUGE_SIZE - 1);
                let slot_empty = inner.maps.range(slot..slot + HUGE_SIZE).next().is_none();
                let (base, order) = if slot_empty && inner.huge_slots.contains(&(slot / HUGE_SIZE))
                {
                    (slot, HUGE_ORDER)
                } else {
                    (gpa & !(PAGE_SIZE - 1), 0)
                };
                let host = Self::alloc(&mut inner, order);
                inner.maps.insert(base, (order, host));
                (base, order, host)
            }
        };
        Ok(Backing {
            gpa_base: base,
            order,
            host_addr: host,
            frame: (host - HOST_BASE) / PAGE_SIZE,
            writable: true,
        })
    }
}

/// Check that every leaf of `ept` in `[0, limit)` agrees with the primary map
/// page by page (EPT ⊆ primary). Call with no invalidation running.
pub fn assert_consistent(ept: &mmu::ShadowEpt, primary: &FlatPrimary) {
    assert_consistent_in(ept, primary, GpaRange::new(0, primary.limit));
}

/// [`assert_consistent`] for the leaves overlapping `range`. Faults may run
/// concurrently (they only install what the primary maps); no other thread
/// may change the primary map meanwhile.
pub fn assert_consistent_in(ept: &mmu::ShadowEpt, primary: &FlatPrimary, range: GpaRange) {
    for t in ept.mappings(range) {
        let mut p = t.gpa_base;
        while p < t.gpa_base + t.len() {
            assert_eq!(
                primary.host_of(p),
                Some(t.host_addr_of(p)),
                "EPT leaf {t:x?} maps {p:#x} to a frame the primary does not map there"
            );
            p += PAGE_SIZE;
        }
    }
}
