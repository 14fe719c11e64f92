#!/usr/bin/env bash
# The Linux tests in one command, on any host class: builds (or finds in
# ~/.cache/vmm) the guest kernel + initramfs, prints `vmm host-info`, then runs
# the user-space tier (tests/linux_full.rs: shell with 1 and 2 vCPUs, syscall
# completion safety, balloon inside/outside, free page reporting,
# deflate-on-OOM, memory failure and soft offline, reset/restart, poweroff),
# the smoke test and the emulation-assist/host-probe tests. On hosts whose KVM
# emulates guest ring 0 user space runs through the guest kernel's ring-3
# syscall completion (docs/linux.md).
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
cargo test --release -p vmm-tests --test linux_full --test linux_smoke --test assist --test mce_broadcast -- --nocapture
class="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["class"])' "$info")"
echo "test-linux-tier: all Linux-tier tests passed on a $class host"
