//! `vmm`: a minimal KVM-based virtual machine monitor whose guest RAM is owned
//! by `guestmem` and mapped through the `mmu` crate's shadow EPT.
//!
//! See `docs/ARCHITECTURE.md` for the code map.

pub mod api;
pub mod api_glue;
pub mod boot;
pub mod config;
pub mod devices;
pub mod exit;
pub mod guests;
pub mod layout;
pub mod logger;
pub mod memory;
pub mod preboot;
pub mod runner;
pub mod stdin;
pub mod terminal;
pub mod vstate;
