#!/usr/bin/env bash
# Prepare the Linux guest for vmm's tests: build (or find in the cache) the guest kernel
# and the test initramfs. Progress goes to stderr; the last two lines of stdout are
#   KERNEL=<path to vmlinux>
#   INITRD=<path to initramfs.cpio>
# Usage: resources/linux/prepare.sh            (see README.md; VMM_CACHE picks the cache)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
kdir="$("$here/build-kernel.sh")" || { echo "prepare: error: kernel build failed (see above)" >&2; exit 1; }
initrd="$("$here/build-initramfs.sh")" || { echo "prepare: error: initramfs build failed (see above)" >&2; exit 1; }
[ -f "$kdir/vmlinux" ] || { echo "prepare: error: $kdir/vmlinux missing" >&2; exit 1; }
[ -f "$initrd" ] || { echo "prepare: error: $initrd missing" >&2; exit 1; }
echo "KERNEL=$kdir/vmlinux"
echo "INITRD=$initrd"
