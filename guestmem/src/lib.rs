//! Guest RAM owned the way the Linux page allocator owns physical memory.
//!
//! This crate knows nothing about KVM. Layers, bottom up:
//! - [`pool`]: the memfd-backed frame pool (the VMM's direct map);
//! - [`frame`]: one compact descriptor per 4 KiB frame;
//! - [`buddy`] + [`pcp`] + [`alloc`]: the buddy allocator with per-vCPU
//!   lists ([`FrameAllocator`]);
//! - [`page_lock`]: the per-frame lock bit and hashed wait queues;
//! - [`oom`]: the out-of-memory slow path and reclaim callbacks;
//! - [`space`] + [`memory`]: the primary guest-physical map and
//!   [`GuestMemory`], the object the VMM creates;
//! - [`failure`]: memory failure, soft offline, unpoison;
//! - [`check`]: statistics and the invariant checker;
//! - [`notifier`]: the range-based MMU notifiers secondary MMUs implement;
//! - [`observe`]: reports of every primary change (tests, debugging) and the
//!   checker that each lies inside an invalidation covering it.
//!
//! The lock order is documented in [`memory`] and in `DESIGN.md`.

pub mod alloc;
pub mod buddy;
pub mod check;
pub mod failure;
pub mod frame;
mod locked_frames;
pub mod memory;
pub mod notifier;
pub mod observe;
pub mod oom;
pub mod overcommit;
pub mod page_lock;
pub mod pcp;
pub mod pool;
pub mod space;
mod sync;
pub mod zero;

pub use alloc::{AllocCounts, AllocError, FrameAllocator};
pub use buddy::MAX_ORDER;
pub use check::{ChangesHeld, CheckError, FrameUse, HostMemory, Stats};
pub use failure::{FailureError, MfFlags, MfOutcome, SoftOfflineOutcome};
pub use frame::{FrameDesc, FrameId, FrameState};
pub use memory::{
    CreateError, GuestMemory, GuestMemoryConfig, MemAllocError, ReleaseError, ReleaseReport,
    ResolveError, Resolved,
};
pub use notifier::{GpaRange, InvalidateReason, Invalidation, MmuNotifier, NotifierList};
pub use observe::{BracketChecker, PrimaryChange, PrimaryEvent, PrimaryObserver};
pub use oom::{OutOfMemory, ReclaimFn, ReclaimId, ReclaimRequest};
pub use overcommit::{FreeNotifyFn, PoolResizeError};
pub use page_lock::{Acquired, KillSignal, Killed, PageLocks};
pub use pcp::PcpConfig;
pub use pool::{Backing, FramePool, PoolError};
pub use zero::ZeroReclaim;

/// Size of a frame (a base page) in bytes.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
