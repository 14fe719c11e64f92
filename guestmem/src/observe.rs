//! Observing the primary side, for tests and debugging: every change of
//! the primary map and every free, punch or retirement of a frame that
//! left it is reported to a [`PrimaryObserver`] installed with
//! [`GuestMemory::set_primary_observer`](crate::GuestMemory::set_primary_observer).
//!
//! [`BracketChecker`] uses it to check the notifier contract from the
//! primary's side: each such event must happen strictly between
//! `invalidate_range_start` and `invalidate_range_end` of one invalidation
//! whose range covers the event's range (a secondary MMU may hold a
//! translation to the frame until start returns, and may fault the old
//! mapping back in once end has run). Installing a mapping into an empty
//! slot (demand population) needs no invalidation: no subscriber can hold
//! a translation of a page the primary does not map, so
//! [`PrimaryChange::Install`] is reported but not checked.
//!
//! Without an observer each report costs one atomic load.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::frame::FrameId;
use crate::notifier::{GpaRange, Invalidation, MmuNotifier};

/// What happened to the primary map or to a frame that left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum PrimaryChange {
    /// A mapping was installed into an empty place (population).
    Install,
    /// A mapping was removed (release, poison, zero reclaim, reset).
    Remove,
    /// A huge mapping became 512 4 KiB mappings of the same frames.
    Split,
    /// A 4 KiB mapping got another frame (soft-offline migration).
    Replace,
    /// The host memory of a block that backed `range` was punched.
    Punch,
    /// A block that backed `range` went back to the allocator.
    Free,
    /// A frame that backed `range` was retired (poison, soft offline).
    Retire,
}

impl PrimaryChange {
    /// Every kind, in declaration order.
    pub const ALL: [PrimaryChange; 7] = [
        Self::Install,
        Self::Remove,
        Self::Split,
        Self::Replace,
        Self::Punch,
        Self::Free,
        Self::Retire,
    ];
}

/// One report: `change` for the guest-physical `range`, whose backing block
/// starts at `frame`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrimaryEvent {
    /// What happened.
    pub change: PrimaryChange,
    /// The guest-physical range the change affects (for frees, punches and
    /// retirements: the range the block was mapped at).
    pub range: GpaRange,
    /// The first frame of the block involved.
    pub frame: FrameId,
}

/// Receives [`PrimaryEvent`]s. Called at the moment of the change, possibly
/// with the space lock held: it must not call back into guestmem.
pub trait PrimaryObserver: Send + Sync {
    /// One change happened.
    fn primary_event(&self, event: &PrimaryEvent);
}

/// The observer slot of a [`GuestMemory`](crate::GuestMemory) (set once).
#[derive(Default)]
pub(crate) struct ObserverSlot(std::sync::OnceLock<Arc<dyn PrimaryObserver>>);

impl ObserverSlot {
    /// Install `o`; false when an observer is already installed.
    pub(crate) fn set(&self, o: Arc<dyn PrimaryObserver>) -> bool {
        self.0.set(o).is_ok()
    }

    /// Report `change` of `range` (block at `frame`) if someone observes.
    #[inline]
    pub(crate) fn report(&self, change: PrimaryChange, range: GpaRange, frame: FrameId) {
        if let Some(o) = self.0.get() {
            o.primary_event(&PrimaryEvent {
                change,
                range,
                frame,
            });
        }
    }
}

/// A notifier subscriber and primary observer that checks that every
/// primary change, free, punch and retirement lies inside an open
/// invalidation covering it, and that every `invalidate_range_end` matches
/// a start it saw. Violations are recorded (never panicked on inside
/// guestmem, which may hold locks); read them with
/// [`BracketChecker::violations`] or [`BracketChecker::assert_clean`].
///
/// Register it on the notifier list *and* install it as the observer:
/// ```
/// # use guestmem::{GuestMemory, GuestMemoryConfig, GpaRange, observe::BracketChecker};
/// let gm = GuestMemory::new(GuestMemoryConfig::new(vec![GpaRange::new(0, 4 << 20)], 1)).unwrap();
/// let checker = BracketChecker::install(&gm);
/// gm.resolve(0x1000, 0).unwrap();
/// gm.release_range(GpaRange::new(0, 4096)).unwrap();
/// checker.assert_clean();
/// ```
#[derive(Default)]
pub struct BracketChecker {
    state: Mutex<CheckerState>,
}

#[derive(Default)]
struct CheckerState {
    /// Ranges of the invalidations open now (started, not ended).
    open: Vec<GpaRange>,
    /// Invalidations started.
    starts: u64,
    /// Events seen, per [`PrimaryChange`] (installs are not checked).
    seen: [u64; PrimaryChange::ALL.len()],
    /// At most [`MAX_VIOLATIONS`] descriptions.
    violations: Vec<String>,
    /// All violations, also those not described.
    violation_count: u64,
}

const MAX_VIOLATIONS: usize = 32;

/// `[a..b, c..d]` in hex.
fn show(ranges: &[GpaRange]) -> String {
    let v: Vec<String> = ranges.iter().map(|r| r.to_string()).collect();
    format!("[{}]", v.join(", "))
}

impl CheckerState {
    fn violation(&mut self, what: String) {
        self.violation_count += 1;
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(what);
        }
    }
}

impl BracketChecker {
    /// A checker with nothing recorded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Create a checker, register it on `gm`'s notifier list and install
    /// it as `gm`'s primary observer. Panics if `gm` already has an
    /// observer.
    pub fn install(gm: &crate::GuestMemory) -> Arc<Self> {
        let c = Arc::new(Self::new());
        gm.notifiers().register(c.clone());
        assert!(
            gm.set_primary_observer(c.clone()),
            "this GuestMemory already has a primary observer"
        );
        c
    }

    fn state(&self) -> MutexGuard<'_, CheckerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The violations recorded so far (at most 32 described, then a count).
    pub fn violations(&self) -> Vec<String> {
        let s = self.state();
        let mut v = s.violations.clone();
        if s.violation_count > v.len() as u64 {
            v.push(format!("... {} violations in all", s.violation_count));
        }
        v
    }

    /// Events of kind `change` seen so far (installs are counted but not
    /// checked).
    pub fn seen(&self, change: PrimaryChange) -> u64 {
        self.state().seen[change as usize]
    }

    /// Events checked so far (every change but installs).
    pub fn checked(&self) -> u64 {
        let s = self.state();
        s.seen.iter().sum::<u64>() - s.seen[PrimaryChange::Install as usize]
    }

    /// Invalidations started so far.
    pub fn starts(&self) -> u64 {
        self.state().starts
    }

    /// Panic with every violation, and with the invalidations still open,
    /// unless there are none.
    #[track_caller]
    pub fn assert_clean(&self) {
        let v = self.violations();
        let open = show(&self.state().open);
        assert!(
            v.is_empty() && open == "[]",
            "notifier bracket violations: {v:#?}; invalidations still open: {open}"
        );
    }
}

impl MmuNotifier for BracketChecker {
    fn invalidate_range_start(&self, inv: &Invalidation) {
        let mut s = self.state();
        s.starts += 1;
        s.open.push(inv.range);
    }

    fn invalidate_range_start_split(&self, inv: &Invalidation, changed: GpaRange) {
        if changed.start < inv.range.start || changed.end > inv.range.end {
            self.state().violation(format!(
                "split invalidation of {} changes {changed}, outside its range",
                inv.range
            ));
        }
        self.invalidate_range_start(inv);
    }

    fn invalidate_range_end(&self, inv: &Invalidation) {
        let mut s = self.state();
        match s.open.iter().position(|r| *r == inv.range) {
            Some(i) => {
                s.open.swap_remove(i);
            }
            None => s.violation(format!(
                "invalidate_range_end({}, {:?}) without a matching start",
                inv.range, inv.reason
            )),
        }
    }
}

impl PrimaryObserver for BracketChecker {
    fn primary_event(&self, ev: &PrimaryEvent) {
        let mut s = self.state();
        s.seen[ev.change as usize] += 1;
        if ev.change == PrimaryChange::Install {
            return;
        }
        let covered = s
            .open
            .iter()
            .any(|r| r.start <= ev.range.start && ev.range.end <= r.end);
        if !covered {
            let open = show(&s.open);
            s.violation(format!(
                "{:?} of {} (frame {}) outside any open invalidation covering it; open: {open}",
                ev.change, ev.range, ev.frame
            ));
        }
    }
}
