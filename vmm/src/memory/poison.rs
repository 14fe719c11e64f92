//! `POST /memory/poison`: hard (memory failure) and soft (offline) poison
//! of a guest page, with an event log and counters.

use std::collections::VecDeque;
use std::sync::Mutex;

use guestmem::{FailureError, MfFlags, MfOutcome, ResolveError, SoftOfflineOutcome};
use serde::{Deserialize, Serialize};

use super::GuestRam;
use crate::vstate::mce::McAction;

/// Hard: the frame failed. Soft: migrate away from a frame that reports
/// correctable errors, before it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoisonKind {
    /// memory_failure(): the guest gets a machine check.
    Hard,
    /// soft_offline(): the guest never notices.
    Soft,
}

/// Which frame to poison when the request names a frame instead of a GPA
/// (like Linux's hwpoison-inject `corrupt-pfn`): an index into the pool, or
/// the first frame currently free in the buddy lists / on a per-vCPU list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum FrameSelector {
    /// A frame index.
    Index(u32),
    /// `"free"` or `"pcp"`.
    State(FrameClass),
}

/// Frame classes a request can pick from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrameClass {
    /// Free in the buddy allocator.
    Free,
    /// Cached on a per-vCPU list.
    Pcp,
}

/// Body of `POST /memory/poison`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoisonRequest {
    /// Guest-physical address of the page (4 KiB aligned); or give `frame`.
    #[serde(default)]
    pub gpa: Option<u64>,
    /// A host frame of the pool instead of a guest page.
    #[serde(default)]
    pub frame: Option<FrameSelector>,
    /// Hard or soft.
    pub kind: PoisonKind,
    /// For hard poison: report at the next access (required) or at once (optional).
    #[serde(default = "default_action")]
    pub action: McAction,
}

fn default_action() -> McAction {
    McAction::Required
}

/// What a poison request did.
#[derive(Clone, Debug, Serialize)]
pub struct PoisonReport {
    /// The guest page (absent when a free frame was poisoned).
    pub gpa: Option<u64>,
    /// Hard or soft.
    pub kind: PoisonKind,
    /// The action requested.
    pub action: McAction,
    /// What guestmem did (e.g. "mapped", "free", "migrated", "already_poisoned").
    pub outcome: String,
    /// The frame that backed the page.
    pub frame: u32,
    /// True when the caller must inject an action-optional machine check now.
    #[serde(skip)]
    pub inject_now: bool,
}

/// Why a poison request was refused.
#[derive(Debug, thiserror::Error)]
pub enum PoisonError {
    /// Not page aligned.
    #[error("gpa {0:#x} is not 4 KiB aligned; poison whole pages (gpa & ~0xfff)")]
    NotAligned(u64),
    /// Not RAM.
    #[error("gpa {gpa:#x} is not guest RAM (RAM: {ranges})")]
    NotRam {
        /// The address.
        gpa: u64,
        /// The RAM ranges, for the message.
        ranges: String,
    },
    /// Neither or both of `gpa` and `frame`.
    #[error("give exactly one of \"gpa\" (a guest page) or \"frame\" (a frame index, \"free\" or \"pcp\")")]
    Target,
    /// No frame of the asked class exists right now.
    #[error("no frame is {0} right now")]
    NoSuchFrame(&'static str),
    /// Anonymous backing: no frame management.
    #[error("poison needs the guestmem backing (this VM runs with --mem-backing anon)")]
    Unsupported,
    /// The view is close to `vm.max_map_count` (see `maplimit`).
    #[error("{0}")]
    MapLimit(String),
    /// Populating the page failed.
    #[error("cannot populate {gpa:#x} before poisoning it: {err}")]
    Populate {
        /// The address.
        gpa: u64,
        /// Why.
        err: ResolveError,
    },
    /// guestmem refused.
    #[error(transparent)]
    Failure(#[from] FailureError),
}

/// One handled request.
#[derive(Clone, Debug, Serialize)]
pub struct PoisonEvent {
    /// Sequence number.
    pub seq: u64,
    /// The report.
    #[serde(flatten)]
    pub report: PoisonReport,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Counters {
    hard: u64,
    soft: u64,
    already_poisoned: u64,
    mce_required_injected: u64,
    mce_optional_injected: u64,
    /// Machine checks that had to wait for the guest to clear MCG_STATUS.MCIP.
    mce_deferred: u64,
    /// Machine checks dropped because their vCPU's queue was full.
    mce_dropped: u64,
}

const LOG_LEN: usize = 64;

/// Recent poison events and counters.
#[derive(Default)]
pub struct PoisonLog {
    inner: Mutex<(VecDeque<PoisonEvent>, Counters, u64)>,
}

impl PoisonLog {
    fn record(&self, report: &PoisonReport) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.2 += 1;
        let seq = g.2;
        match report.kind {
            PoisonKind::Hard => g.1.hard += 1,
            PoisonKind::Soft => g.1.soft += 1,
        }
        if report.outcome == "already_poisoned" {
            g.1.already_poisoned += 1;
        }
        if g.0.len() == LOG_LEN {
            g.0.pop_front();
        }
        g.0.push_back(PoisonEvent {
            seq,
            report: report.clone(),
        });
    }

    /// Count an injected machine check.
    pub fn injected(&self, action: McAction) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match action {
            McAction::Required => g.1.mce_required_injected += 1,
            McAction::Optional => g.1.mce_optional_injected += 1,
        }
    }

    /// Count a machine check held until the guest clears MCIP.
    pub fn deferred(&self) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .mce_deferred += 1;
    }

    /// Count a machine check dropped (full queue).
    pub fn dropped(&self) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .mce_dropped += 1;
    }

    /// JSON for `GET /memory`.
    pub fn snapshot(&self) -> serde_json::Value {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::json!({ "counters": g.1, "events": g.0 })
    }
}

impl GuestRam {
    /// Handle `POST /memory/poison`.
    pub fn poison(&self, req: PoisonRequest) -> Result<PoisonReport, PoisonError> {
        let m = self.managed.as_ref().ok_or(PoisonError::Unsupported)?;
        self.check_map_budget().map_err(PoisonError::MapLimit)?;
        let (frame, gpa) = match (req.gpa, req.frame) {
            (Some(gpa), None) => match self.frame_for_gpa(m, gpa)? {
                Some(frame) => (frame, Some(gpa)),
                None => {
                    let report = PoisonReport {
                        gpa: Some(gpa),
                        kind: req.kind,
                        action: req.action,
                        outcome: "already_poisoned".into(),
                        frame: u32::MAX,
                        inject_now: false,
                    };
                    m.poison.record(&report);
                    return Ok(report);
                }
            },
            (None, Some(sel)) => (Self::select_frame(m, sel)?, None),
            _ => return Err(PoisonError::Target),
        };
        let (outcome, mapped_gpa, inject_now) = match req.kind {
            PoisonKind::Hard => {
                let flags = MfFlags {
                    action_required: req.action == McAction::Required,
                };
                let o = m.gm.memory_failure(frame, flags)?;
                log::warn!("memory failure: frame {frame} (gpa {gpa:x?}): {o:?}");
                let (name, mapped) = match o {
                    MfOutcome::AlreadyPoisoned => ("already_poisoned", None),
                    MfOutcome::Free => ("free", None),
                    MfOutcome::PerCpuList => ("per_cpu_list", None),
                    MfOutcome::Mapped { gpa, .. } => ("mapped", Some(gpa)),
                    MfOutcome::InUse => ("in_use", None),
                    MfOutcome::Reserved => ("reserved", None),
                };
                (
                    name,
                    mapped,
                    mapped.is_some() && req.action == McAction::Optional,
                )
            }
            PoisonKind::Soft => {
                let o = m.gm.soft_offline(frame)?;
                log::warn!("soft offline: frame {frame} (gpa {gpa:x?}): {o:?}");
                let (name, migrated) = match o {
                    SoftOfflineOutcome::AlreadyOffline => ("already_offline", None),
                    SoftOfflineOutcome::Free => ("free", None),
                    SoftOfflineOutcome::Migrated { gpa, .. } => ("migrated", Some(gpa)),
                };
                (name, migrated, false)
            }
        };
        let report = PoisonReport {
            gpa: gpa.or(mapped_gpa),
            kind: req.kind,
            action: req.action,
            outcome: outcome.into(),
            frame,
            inject_now,
        };
        m.poison.record(&report);
        if let Some(page) = mapped_gpa {
            // The invalidation zapped the whole (huge) mapping around the
            // page; map the surviving pages back right away so the guest's
            // next accesses, and events KVM delivers through its IDT and
            // stacks (e.g. the machine check itself), find them present.
            self.prefault(guestmem::GpaRange::for_order(page, mmu::HUGE_ORDER));
        }
        Ok(report)
    }

    /// The frame backing guest page `gpa`, populating it if the guest never
    /// touched it (the memory exists, as on real hardware, and its frame is
    /// what fails). None when the page is already poisoned.
    fn frame_for_gpa(
        &self,
        m: &super::Managed,
        gpa: u64,
    ) -> Result<Option<guestmem::FrameId>, PoisonError> {
        if !gpa.is_multiple_of(guestmem::PAGE_SIZE) {
            return Err(PoisonError::NotAligned(gpa));
        }
        match m.gm.resolve(gpa, 0) {
            Ok(_) => Ok(Some(
                m.gm.frame_of_gpa(gpa)
                    .ok_or(FailureError::NotMapped { gpa })?,
            )),
            Err(ResolveError::Poisoned { .. }) => Ok(None),
            Err(ResolveError::OutOfRange { gpa }) => Err(PoisonError::NotRam {
                gpa,
                ranges: crate::layout::e820_map(self.bytes)
                    .iter()
                    .filter(|e| e.2 == crate::layout::E820_RAM)
                    .map(|e| format!("{:#x}-{:#x}", e.0, e.0 + e.1))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
            Err(err) => Err(PoisonError::Populate { gpa, err }),
        }
    }

    fn select_frame(
        m: &super::Managed,
        sel: FrameSelector,
    ) -> Result<guestmem::FrameId, PoisonError> {
        let alloc = m.gm.allocator();
        let (want, name) = match sel {
            FrameSelector::Index(i) => {
                if i >= alloc.frames() {
                    return Err(FailureError::NoSuchFrame {
                        frame: i,
                        frames: alloc.frames(),
                    }
                    .into());
                }
                return Ok(i);
            }
            FrameSelector::State(FrameClass::Free) => {
                (guestmem::FrameState::Buddy, "free in the buddy allocator")
            }
            FrameSelector::State(FrameClass::Pcp) => {
                (guestmem::FrameState::Pcp, "on a per-vCPU list")
            }
        };
        // Scan from the top: guest RAM is populated from low frames first,
        // so free frames are found quickly there.
        (0..alloc.frames())
            .rev()
            .find(|&f| alloc.desc(f).state() == want)
            .ok_or(PoisonError::NoSuchFrame(name))
    }

    /// Count a machine check injected into the guest.
    pub fn record_mce(&self, action: McAction) {
        if let Some(m) = &self.managed {
            m.poison.injected(action);
        }
    }

    /// Count a machine check held until the guest clears MCG_STATUS.MCIP.
    pub fn record_mce_deferred(&self) {
        if let Some(m) = &self.managed {
            m.poison.deferred();
        }
    }

    /// Count a machine check dropped because its vCPU's queue was full.
    pub fn record_mce_dropped(&self) {
        if let Some(m) = &self.managed {
            m.poison.dropped();
        }
    }
}
