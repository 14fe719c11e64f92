#!/usr/bin/env bash
# The whole test suite (what README and .ci/run call).
# Unit + property tests of every crate, integration tests that drive the real
# `vmm` binary on /dev/kvm, the doctests, and the loom models (bounded
# preemptions).
#
# With cargo-nextest (https://nexte.st) the unit, property and integration
# tests run under `cargo nextest run --profile ci` (.config/nextest.toml:
# every test reported, no retries, JUnit report in
# target/nextest/ci/junit.xml); nextest does not run doctests, so they run
# with `cargo test --doc`. Without cargo-nextest everything runs under
# `cargo test` (no JUnit report). The loom models run with `cargo test`
# either way.
#
# Sharding across N machines (needs cargo-nextest): on machine M (1..=N) run
#     ./scripts/test-all.sh --partition hash:M/N      (or count:M/N)
# or set VMM_TEST_PARTITION=hash:M/N. Each shard runs its share of the
# nextest tests; shard 1 also runs the doctests and the loom models, so the
# N shards together run the whole suite once.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  echo "usage: $0 [--partition hash:M/N|count:M/N]   (or VMM_TEST_PARTITION=hash:M/N)"
}

partition="${VMM_TEST_PARTITION:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --partition)
      [ $# -ge 2 ] || { usage >&2; exit 64; }
      partition="$2"
      shift 2
      ;;
    --partition=*)
      partition="${1#--partition=}"
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      echo "test-all: unknown argument '$1'" >&2
      usage >&2
      exit 64
      ;;
  esac
done

shard=1
if [ -n "$partition" ]; then
  if [[ ! "$partition" =~ ^(hash|count):([1-9][0-9]*)/([1-9][0-9]*)$ ]] ||
    [ "${BASH_REMATCH[2]}" -gt "${BASH_REMATCH[3]}" ]; then
    echo "test-all: bad partition '$partition': want hash:M/N or count:M/N with 1 <= M <= N" >&2
    exit 64
  fi
  shard="${BASH_REMATCH[2]}"
fi

nextest=false
if cargo nextest --version >/dev/null 2>&1; then
  nextest=true
elif [ -n "$partition" ]; then
  echo "test-all: --partition $partition needs cargo-nextest, which is not installed" >&2
  echo "test-all: (cargo install cargo-nextest --locked, or see https://nexte.st)" >&2
  exit 1
else
  echo "test-all: cargo-nextest not found: running the tests with cargo test (no JUnit report)" >&2
fi

# Integration tests run the built `vmm` binary (tests/src/lib.rs: vmm_bin).
cargo build --release --workspace --bins

# Run every step even if one fails, so a run reports every failure; the
# status says whether all passed.
failed=()
step() {
  echo "test-all: $*"
  if ! "$@"; then
    failed+=("$*")
  fi
}

junit=""
if $nextest; then
  # nextest writes to <store dir>/ci/junit.xml; the store dir is target/nextest.
  target_dir="$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
  candidates=("$target_dir/nextest/ci/junit.xml" "target/nextest/ci/junit.xml")
  rm -f "${candidates[@]}"
  step cargo nextest run --release --workspace --profile ci ${partition:+--partition "$partition"}
  for f in "${candidates[@]}"; do
    if [ -f "$f" ]; then
      junit="$f"
      break
    fi
  done
  if [ "$shard" = 1 ]; then
    step cargo test --release --workspace --doc
  fi
else
  step cargo test --release --workspace
fi

if [ "$shard" = 1 ]; then
  step cargo test --release -p guestmem --features loom --test loom
  step cargo test --release -p mmu --features loom --test loom
else
  echo "test-all: shard $partition: doctests and loom models run on shard 1 only"
fi

if $nextest; then
  if [ -n "$junit" ]; then
    echo "test-all: JUnit report: $junit"
    # A test that cannot run on this host returns early after printing
    # "SKIP <test>: <why>" (nextest counts it as passed): list those here.
    python3 - "$junit" <<'PY'
import sys
import xml.etree.ElementTree as ET
skips = []
for case in ET.parse(sys.argv[1]).iter("testcase"):
    for tag in ("system-err", "system-out"):
        for el in case.iter(tag):
            for line in (el.text or "").splitlines():
                if line.startswith("SKIP "):
                    why = line[5:].split(": ", 1)[-1]
                    skips.append(f"{case.get('classname')} {case.get('name')}: {why}")
print(f"test-all: {len(skips)} test(s) skipped at run time" + (":" if skips else ""))
for s in skips:
    print(f"test-all:   SKIPPED {s}")
PY
  else
    echo "test-all: no JUnit report found (looked for ${candidates[*]})" >&2
    failed+=("JUnit report missing")
  fi
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "test-all: FAILED:" >&2
  printf 'test-all:   %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "test-all: all tests passed${partition:+ (shard $partition)}"
