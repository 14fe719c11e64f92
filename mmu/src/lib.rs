//! Shadow EPT-like secondary MMU.
