#!/usr/bin/env bash
# The Linux tier on a bare-metal host (hardware-speed KVM), in one command:
# builds (or finds in ~/.cache/vmm) the guest kernel + initramfs, checks the
# host class with `vmm host-info`, then runs the Linux tests: the full
# user-space tier (tests/linux_full.rs: shell prompt with 1 and 2 vCPUs,
# balloon inside/outside, hard and soft poison, poweroff), the kernel-only
# smoke test and the emulation-assist/host-probe tests.
# On a host whose KVM emulates guest ring 0 (nested PVM) the full tier cannot
# run; this script then stops with status 2 (set VMM_LINUX_TIER_ALLOW_SKIP=1
# to run the tests anyway, the full tier then skips with the probe's reason).
# See docs/linux.md.
set -euo pipefail
cd "$(dirname "$0")/.."

out="$(resources/linux/prepare.sh)"
eval "$(tail -2 <<<"$out")"
export VMM_LINUX_KERNEL="$KERNEL" VMM_LINUX_INITRD="$INITRD"
echo "test-linux-tier: kernel $KERNEL, initrd $INITRD"

cargo build --release --bins
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
info="$("$target/release/vmm" host-info)"
echo "$info"
class="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["class"])' "$info")"
if [ "$class" != hardware-ring0 ] && [ "${VMM_LINUX_TIER_ALLOW_SKIP:-0}" != 1 ]; then
  echo "test-linux-tier: this host's KVM is '$class': Linux user space cannot run here." >&2
  echo "test-linux-tier: run this on a bare-metal host (hardware KVM); here, scripts/test-all.sh runs the smoke test." >&2
  exit 2
fi

cargo test --release -p vmm-tests --test linux_full --test linux_smoke --test assist --test mce_broadcast -- --nocapture
echo "test-linux-tier: all Linux-tier tests passed on a $class host"
