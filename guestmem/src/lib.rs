//! Guest RAM owned the way the Linux page allocator owns physical memory.
//!
//! This crate knows nothing about KVM.

pub mod notifier;

/// Size of a frame (a base page) in bytes.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
