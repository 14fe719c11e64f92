#!/usr/bin/env bash
# The whole test suite (what README and .ci/run call).
# Unit + property tests of every crate, integration tests that drive the real
# `vmm` binary on /dev/kvm, and the loom models (bounded preemptions).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --workspace --bins
cargo test --release --workspace
cargo test --release -p guestmem --features loom --test loom
cargo test --release -p mmu --features loom --test loom
echo "test-all: all tests passed"
