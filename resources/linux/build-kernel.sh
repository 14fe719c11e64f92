#!/usr/bin/env bash
# Build the minimal guest kernel (vmlinux ELF + bzImage) from Debian's linux-source-6.1
# with guest.config applied on top of tinyconfig.
#
# Result: ${VMM_CACHE:-$HOME/.cache/vmm}/linux-<hash>/ where <hash> covers the pinned
# Debian source version, guest.config, patches/*.patch and this script. A second run with
# the same inputs does nothing.
# The source is unpacked and patched once per (version, patch set) into
# $VMM_CACHE/linux-source-<version>-<patch hash>/ and built out of tree (O=), so a
# changed fragment does not unpack again.
#
# stdout: exactly one line, the result directory (vmlinux, bzImage, config, build-info, ...).
# stderr: progress and errors.
#
# Environment:
#   VMM_CACHE        cache root (default $HOME/.cache/vmm)
#   VMM_JOBS         parallel make jobs (default 2); make runs under `nice -n 10`
#   VMM_KEEP_BUILD=1 keep the object tree (build/) in the result directory
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fragment="$here/guest.config"
patches=("$here"/patches/*.patch)
src_pkg=linux-source-6.1
src_tar=/usr/src/linux-source-6.1.tar.xz
# The exact Debian source version CI builds and tests (the archive keeps older versions
# of bookworm-security; a newer one being served does not change what is built).
# Override with VMM_LINUX_SOURCE_VERSION=<version> to try another one.
src_pin="${VMM_LINUX_SOURCE_VERSION:-6.1.172-1}"

log() { echo "build-kernel: $*" >&2; }
die() { echo "build-kernel: error: $*" >&2; exit 1; }

[ -f "$fragment" ] || die "missing config fragment $fragment"

[ -f "${patches[0]}" ] || die "no kernel patches in $here/patches"

cache_root="${VMM_CACHE:-${HOME:-/root}/.cache/vmm}"
# The key covers everything that decides the kernel: the pinned source version, the
# config fragment, the patches (in order) and this script.
patch_key="$(cat "${patches[@]}" | sha256sum | cut -c1-16)"
key="$( { echo "$src_pkg=$src_pin"; cat "$fragment" "${patches[@]}" "${BASH_SOURCE[0]}"; } \
    | sha256sum | cut -c1-16)"
out="$cache_root/linux-$key"

is_cached() { [ -f "$out/.complete" ] && [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; }
if is_cached; then
    log "cached: $out"
    echo "$out"
    exit 0
fi
mkdir -p "$cache_root"
# One build per key at a time; a second caller waits and then finds the result.
exec 9>"$out.lock"
flock 9
if is_cached; then
    log "cached (built by a concurrent run): $out"
    echo "$out"
    exit 0
fi

# ---- dependencies -----------------------------------------------------------------------
need_pkgs=()
dpkg_has() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
dpkg_ver() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
if [ "$(dpkg_ver "$src_pkg")" != "$src_pin" ]; then
    need_pkgs+=("$src_pkg=$src_pin")
fi
for p in gcc make patch libc6-dev bc flex bison libelf-dev libssl-dev cpio xz-utils \
         lz4 python3 file binutils; do
    dpkg_has "$p" || need_pkgs+=("$p")
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null || die "need Debian packages ${need_pkgs[*]} but apt-get is missing"
    [ "$(id -u)" -eq 0 ] || die "need Debian packages ${need_pkgs[*]}; run as root or: apt-get install ${need_pkgs[*]}"
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt_opts=(-y -q --no-install-recommends --allow-downgrades)
    if ! apt-get install "${apt_opts[@]}" "${need_pkgs[@]}" >&2; then
        log "apt-get install failed; retrying after apt-get update"
        apt-get update -q >&2
        apt-get install "${apt_opts[@]}" "${need_pkgs[@]}" >&2 \
            || die "apt-get install ${need_pkgs[*]} failed (is $src_pkg $src_pin still in the" \
                "archive? apt-cache madison $src_pkg lists what is; VMM_LINUX_SOURCE_VERSION picks one)"
    fi
fi
[ -f "$src_tar" ] || die "$src_tar not found although $src_pkg is installed"
src_ver="$(dpkg_ver "$src_pkg")"
[ "$src_ver" = "$src_pin" ] || die "$src_pkg $src_ver is installed, but $src_pin is pinned"

# ---- unpack and patch (once per source version and patch set, shared by config keys) ----
src="$cache_root/linux-source-$src_ver-$patch_key"
t0=$(date +%s)
exec 8>"$src.lock"
flock 8
if [ ! -f "$src/.complete" ]; then
    rm -rf "$src"
    mkdir -p "$src"
    log "unpacking $src_tar into $src"
    tar -xf "$src_tar" -C "$src" --strip-components=1
    for p in "${patches[@]}"; do
        log "applying $(basename "$p")"
        patch -d "$src" -p1 --fuzz=0 --no-backup-if-mismatch <"$p" >&2 \
            || die "patch $p does not apply to $src_pkg $src_ver"
    done
    touch "$src/.complete"
fi
flock -u 8
t1=$(date +%s)

# A failed run leaves its work directory for inspection; the next run removes it.
rm -rf "$out".tmp.*
work="$out.tmp.$$"
build="$work/build"
mkdir -p "$build"
cd "$src"

# ---- configure (out of tree: the shared source stays pristine) --------------------------
jobs="${VMM_JOBS:-2}"
kmake() { nice -n 10 make ARCH=x86_64 O="$build" "$@"; }
log "configuring: tinyconfig + $(basename "$fragment")"
kmake -s tinyconfig >"$work/config.log" 2>&1 \
    || { tail -30 "$work/config.log" >&2; die "make tinyconfig failed"; }
# -n: allnoconfig semantics (symbols named nowhere stay off instead of taking defaults)
ARCH=x86_64 scripts/kconfig/merge_config.sh -n -O "$build" "$build/.config" "$fragment" \
    >>"$work/config.log" 2>&1 || { tail -30 "$work/config.log" >&2; die "merge_config.sh failed"; }
kmake -s olddefconfig >>"$work/config.log" 2>&1 \
    || { tail -30 "$work/config.log" >&2; die "make olddefconfig failed"; }

# ---- verify: every line of the fragment must be in the final .config --------------------
# Prints the Kconfig lines that say what a symbol needs, as a hint for a dropped option.
kconfig_deps() {
    grep -rlE --include='Kconfig*' "^[[:space:]]*(menu)?config $1\$" . 2>/dev/null | head -1 |
        xargs -r awk -v s="$1" '
            $0 ~ "^[[:space:]]*(menu)?config " s "$" { on = 1; print "        (" FILENAME ")"; next }
            on && /^[[:space:]]*((menu)?config|endmenu|endif|menu|choice|if|source) / { exit }
            on && /^[[:space:]]*(depends on|select|bool|tristate)/ { sub(/^[[:space:]]+/, ""); print "        " $0 }'
}
final="$build/.config"
dropped=0
checked=()
while IFS= read -r line; do
    if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        sym="${BASH_REMATCH[1]}"; want="${BASH_REMATCH[2]}"
        got="$(grep -E "^$sym=" "$final" | head -1 | cut -d= -f2- || true)"
        if [ "$got" != "$want" ]; then
            echo "build-kernel: error: $sym=$want was requested but the final .config has" \
                "${got:+$sym=$got}${got:-it unset} (Kconfig dropped it: unmet dependencies?)" >&2
            kconfig_deps "${sym#CONFIG_}" >&2 || true
            dropped=$((dropped + 1))
        fi
        checked+=("$sym=$want")
    elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        sym="${BASH_REMATCH[1]}"
        if grep -qE "^$sym=" "$final"; then
            echo "build-kernel: error: $sym was requested off but the final .config has" \
                "$(grep -E "^$sym=" "$final") (selected by another option?)" >&2
            dropped=$((dropped + 1))
        fi
        checked+=("$sym=n")
    fi
done <"$fragment"
if [ "$dropped" -gt 0 ]; then
    die "$dropped option(s) of $fragment did not survive make olddefconfig (see above); the config is in $final"
fi
log "verified ${#checked[@]} options: ${checked[*]}"

# ---- build ----------------------------------------------------------------------------
t2=$(date +%s)
log "building vmlinux + bzImage with nice -n 10 make -j$jobs (log: $out/build.log)"
if ! kmake -j"$jobs" vmlinux bzImage >"$work/build.log" 2>&1; then
    tail -40 "$work/build.log" >&2
    die "kernel build failed (full log: $work/build.log)"
fi
t3=$(date +%s)
file -L "$build/vmlinux" | grep -q 'ELF 64-bit LSB executable, x86-64' \
    || die "vmlinux is not an x86-64 ELF executable: $(file -L "$build/vmlinux")"

# ---- install into the cache ------------------------------------------------------------
cp "$build/vmlinux" "$build/arch/x86/boot/bzImage" "$build/System.map" "$work/"
cp "$final" "$work/config"
cp "$fragment" "$work/guest.config"
entry="$(readelf -h "$work/vmlinux" | awk '/Entry point/ {print $4}')"
cat >"$work/build-info" <<INFO
source: $src_pkg $src_ver ($(make -s kernelversion)) unpacked in $src
patches: $(for p in "${patches[@]}"; do basename "$p"; done | tr '\n' ' ')
fragment: $fragment
key: $key
built: $(date -u +%Y-%m-%dT%H:%M:%SZ); unpack $((t1 - t0)) s, configure $((t2 - t1)) s, make -j$jobs $((t3 - t2)) s
compiler: $(gcc --version | head -1)
vmlinux: $(stat -c %s "$work/vmlinux") bytes, ELF entry $entry
bzImage: $(stat -c %s "$work/bzImage") bytes
verified: ${checked[*]}
INFO
if [ "${VMM_KEEP_BUILD:-0}" != 1 ]; then
    rm -rf "$build"
fi
touch "$work/.complete"
rm -rf "$out"
mv "$work" "$out"
log "built in $((t3 - t0)) s (unpack $((t1 - t0)) s, configure $((t2 - t1)) s, make $((t3 - t2)) s):" \
    "vmlinux $(stat -c %s "$out/vmlinux") bytes, bzImage $(stat -c %s "$out/bzImage") bytes"
echo "$out"
