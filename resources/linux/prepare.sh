#!/usr/bin/env bash
# Prepare the Linux guest for vmm's tests: build (or find in the cache) the guest kernel
# and the test initramfs. Progress goes to stderr; the last two lines of stdout are
#   KERNEL=<path to vmlinux>
#   INITRD=<path to initramfs.cpio>
# Usage: resources/linux/prepare.sh [--add DIR]...   (see README.md; VMM_CACHE picks the cache)
#   --add DIR   copy DIR's tree into the initramfs root (DIR/bin/x becomes /bin/x); the
#               same as VMM_INITRAMFS_ADD=DIR[:DIR...]. Your own test programs go here.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
add="${VMM_INITRAMFS_ADD:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --add)
            [ $# -ge 2 ] || { echo "prepare: error: --add needs a directory" >&2; exit 64; }
            [ -d "$2" ] || { echo "prepare: error: --add $2: not a directory" >&2; exit 64; }
            add="${add:+$add:}$2"
            shift 2 ;;
        -h | --help)
            sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0 ;;
        *)
            echo "prepare: error: unknown argument $1 (usage: prepare.sh [--add DIR]...)" >&2
            exit 64 ;;
    esac
done
export VMM_INITRAMFS_ADD="$add"
kdir="$("$here/build-kernel.sh")" || { echo "prepare: error: kernel build failed (see above)" >&2; exit 1; }
initrd="$("$here/build-initramfs.sh")" || { echo "prepare: error: initramfs build failed (see above)" >&2; exit 1; }
[ -f "$kdir/vmlinux" ] || { echo "prepare: error: $kdir/vmlinux missing" >&2; exit 1; }
[ -f "$initrd" ] || { echo "prepare: error: $initrd missing" >&2; exit 1; }
echo "KERNEL=$kdir/vmlinux"
echo "INITRD=$initrd"
