//! The primary guest-physical map, `gfn -> (frame, order)`, like a process
//! page table maps virtual addresses to pages. One slot per 2 MiB of
//! guest-physical space: empty, one order-9 mapping, or a table of 512
//! 4 KiB mappings. It also holds the guest frames marked poisoned.
//!
//! Pure data: `GuestMemory` keeps it under its space lock and updates the
//! frame descriptors (state, reverse map) alongside. Every change is
//! reported to the primary observer, if one is installed (`observe.rs`).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::frame::FrameId;
use crate::notifier::GpaRange;
use crate::observe::{ObserverSlot, PrimaryChange};
use crate::{PAGE_SHIFT, PAGE_SIZE};

/// Frames per 2 MiB slot.
pub const HUGE_ORDER: u32 = 9;
const SLOT_PAGES: u64 = 1 << HUGE_ORDER;
const NONE: FrameId = FrameId::MAX;

pub(crate) enum Slot {
    Empty,
    Huge(FrameId),
    Small(Box<SmallTable>),
}

pub(crate) struct SmallTable {
    frames: [FrameId; SLOT_PAGES as usize],
    count: u16,
}

/// One mapping: `2^order` guest frames from `gfn` backed by frames from
/// `frame`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First guest frame of the mapping (aligned to its order).
    pub gfn: u64,
    /// Head frame of the backing block.
    pub frame: FrameId,
    /// Order of the mapping (0 or [`HUGE_ORDER`]).
    pub order: u32,
}

impl Mapping {
    /// The guest-physical range the mapping covers.
    pub fn range(&self) -> GpaRange {
        GpaRange::new(self.gfn << PAGE_SHIFT, PAGE_SIZE << self.order)
    }
}

pub(crate) struct Space {
    slots: Vec<Slot>,
    /// RAM ranges in guest frame numbers, sorted, disjoint.
    ram: Vec<(u64, u64)>,
    pub(crate) poisoned: BTreeSet<u64>,
    /// Frames currently mapped.
    pub(crate) mapped: u64,
    /// Where changes are reported (shared with `GuestMemory`).
    observer: Arc<ObserverSlot>,
}

impl Space {
    pub(crate) fn new(ram: &[GpaRange], observer: Arc<ObserverSlot>) -> Self {
        let mut r: Vec<(u64, u64)> = ram
            .iter()
            .map(|g| (g.start >> PAGE_SHIFT, g.end >> PAGE_SHIFT))
            .collect();
        r.sort_unstable();
        let end = r.last().map_or(0, |x| x.1);
        let nslots = end.div_ceil(SLOT_PAGES) as usize;
        Self {
            slots: (0..nslots).map(|_| Slot::Empty).collect(),
            ram: r,
            poisoned: BTreeSet::new(),
            mapped: 0,
            observer,
        }
    }

    /// One past the last guest frame number of RAM.
    pub(crate) fn end_gfn(&self) -> u64 {
        self.ram.last().map_or(0, |x| x.1)
    }

    pub(crate) fn is_ram(&self, gfn: u64) -> bool {
        self.ram.iter().any(|&(s, e)| gfn >= s && gfn < e)
    }

    fn all_ram(&self, start: u64, end: u64) -> bool {
        self.ram.iter().any(|&(s, e)| start >= s && end <= e)
    }

    pub(crate) fn lookup(&self, gfn: u64) -> Option<Mapping> {
        let si = (gfn / SLOT_PAGES) as usize;
        match self.slots.get(si)? {
            Slot::Empty => None,
            Slot::Huge(f) => Some(Mapping {
                gfn: gfn & !(SLOT_PAGES - 1),
                frame: *f,
                order: HUGE_ORDER,
            }),
            Slot::Small(t) => {
                let f = t.frames[(gfn % SLOT_PAGES) as usize];
                (f != NONE).then_some(Mapping {
                    gfn,
                    frame: f,
                    order: 0,
                })
            }
        }
    }

    /// True when the 2 MiB slot holding `gfn` may get an order-9 mapping:
    /// all RAM, nothing mapped in it, no poisoned guest frame in it.
    pub(crate) fn huge_eligible(&self, gfn: u64) -> bool {
        let base = gfn & !(SLOT_PAGES - 1);
        matches!(
            self.slots.get((base / SLOT_PAGES) as usize),
            Some(Slot::Empty)
        ) && self.all_ram(base, base + SLOT_PAGES)
            && self
                .poisoned
                .range(base..base + SLOT_PAGES)
                .next()
                .is_none()
    }

    pub(crate) fn install(&mut self, m: Mapping) {
        self.observer
            .report(PrimaryChange::Install, m.range(), m.frame);
        let si = (m.gfn / SLOT_PAGES) as usize;
        if m.order == HUGE_ORDER {
            debug_assert!(matches!(self.slots[si], Slot::Empty));
            self.slots[si] = Slot::Huge(m.frame);
        } else {
            if matches!(self.slots[si], Slot::Empty) {
                self.slots[si] = Slot::Small(Box::new(SmallTable {
                    frames: [NONE; SLOT_PAGES as usize],
                    count: 0,
                }));
            }
            let Slot::Small(t) = &mut self.slots[si] else {
                unreachable!("install of a 4 KiB mapping into a huge slot");
            };
            let e = &mut t.frames[(m.gfn % SLOT_PAGES) as usize];
            debug_assert_eq!(*e, NONE);
            *e = m.frame;
            t.count += 1;
        }
        self.mapped += 1 << m.order;
    }

    /// Turn the huge mapping at `gfn`'s slot into 512 4 KiB mappings of the
    /// same frames. Returns the old mapping.
    pub(crate) fn split(&mut self, gfn: u64) -> Option<Mapping> {
        let si = (gfn / SLOT_PAGES) as usize;
        let Slot::Huge(f) = self.slots[si] else {
            return None;
        };
        let old = Mapping {
            gfn: si as u64 * SLOT_PAGES,
            frame: f,
            order: HUGE_ORDER,
        };
        self.observer.report(PrimaryChange::Split, old.range(), f);
        let mut t = Box::new(SmallTable {
            frames: [NONE; SLOT_PAGES as usize],
            count: SLOT_PAGES as u16,
        });
        for (i, e) in t.frames.iter_mut().enumerate() {
            *e = f + i as u32;
        }
        self.slots[si] = Slot::Small(t);
        Some(old)
    }

    /// Remove the mapping that covers `gfn` (the whole huge mapping if it
    /// is one).
    pub(crate) fn remove(&mut self, gfn: u64) -> Option<Mapping> {
        let m = self.lookup(gfn)?;
        self.observer
            .report(PrimaryChange::Remove, m.range(), m.frame);
        let si = (gfn / SLOT_PAGES) as usize;
        if m.order == HUGE_ORDER {
            self.slots[si] = Slot::Empty;
        } else if let Slot::Small(t) = &mut self.slots[si] {
            t.frames[(gfn % SLOT_PAGES) as usize] = NONE;
            t.count -= 1;
            if t.count == 0 {
                self.slots[si] = Slot::Empty;
            }
        }
        self.mapped -= 1 << m.order;
        Some(m)
    }

    /// Replace the frame of the 4 KiB mapping at `gfn`.
    pub(crate) fn replace(&mut self, gfn: u64, frame: FrameId) {
        if let Slot::Small(t) = &mut self.slots[(gfn / SLOT_PAGES) as usize] {
            self.observer.report(
                PrimaryChange::Replace,
                GpaRange::new(gfn << PAGE_SHIFT, PAGE_SIZE),
                frame,
            );
            t.frames[(gfn % SLOT_PAGES) as usize] = frame;
        }
    }

    /// True when the slot of `gfn` holds a huge mapping.
    pub(crate) fn is_huge(&self, gfn: u64) -> bool {
        matches!(
            self.slots.get((gfn / SLOT_PAGES) as usize),
            Some(Slot::Huge(_))
        )
    }

    /// Every mapping, in guest-physical order.
    pub(crate) fn mappings(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.slots.iter().enumerate().flat_map(|(si, s)| {
            let base = si as u64 * SLOT_PAGES;
            let v: Vec<Mapping> = match s {
                Slot::Empty => Vec::new(),
                Slot::Huge(f) => vec![Mapping {
                    gfn: base,
                    frame: *f,
                    order: HUGE_ORDER,
                }],
                Slot::Small(t) => t
                    .frames
                    .iter()
                    .enumerate()
                    .filter(|(_, &f)| f != NONE)
                    .map(|(i, &f)| Mapping {
                        gfn: base + i as u64,
                        frame: f,
                        order: 0,
                    })
                    .collect(),
            };
            v
        })
    }

    /// Remove every mapping; returns them.
    pub(crate) fn clear(&mut self) -> Vec<Mapping> {
        let all: Vec<Mapping> = self.mappings().collect();
        for m in &all {
            self.observer
                .report(PrimaryChange::Remove, m.range(), m.frame);
        }
        for s in &mut self.slots {
            *s = Slot::Empty;
        }
        self.mapped = 0;
        all
    }
}
