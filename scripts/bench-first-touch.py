#!/usr/bin/env python3
"""Benchmark: guest first-touch cost (us per 4 KiB page) with guestmem-backed
RAM (demand-paged through the shadow EPT, 2 MiB extents per fault) vs. plain
anonymous memory that KVM faults in itself (the Firecracker/QEMU default),
same guest, same run, interleaved.

Usage: scripts/bench-first-touch.py [--runs N] [--mib M] [--vmm target/release/vmm]
"""
import argparse, re, statistics, subprocess

def run(vmm, backing, mib, pattern):
    mem = mib * 2 + 64
    out = subprocess.run([vmm, "run", "--guest", "touch", "--mem", str(mem), "--mem-backing", backing,
                          "--cmdline", f"pattern={pattern} mib={mib}"], capture_output=True, text=True)
    assert out.returncode == 0, out
    m = re.search(r"first_touch_us_per_page=([0-9.]+)", out.stdout)
    return float(m.group(1))

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--vmm", default="target/release/vmm")
    a = ap.parse_args()
    print(f"| pattern | guestmem us/page (median) | anon us/page (median) | speed-up | runs |")
    print("|---|---|---|---|---|")
    for pattern in ["seq", "random"]:
        g, n = [], []
        for _ in range(a.runs):
            g.append(run(a.vmm, "guestmem", a.mib, pattern))
            n.append(run(a.vmm, "anon", a.mib, pattern))
        mg, mn = statistics.median(g), statistics.median(n)
        print(f"| {pattern} ({a.mib} MiB) | {mg:.2f} | {mn:.2f} | {mn / mg:.1f}x | {a.runs} |")

if __name__ == "__main__":
    main()
