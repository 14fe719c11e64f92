#!/usr/bin/env python3
"""Benchmark: `vmm` exec -> guest exit, median of N runs.

Usage: scripts/bench-boot.py [--runs N] [--vmm target/release/vmm]
Runs each case N times (after one warm-up) and prints median/min/max wall time.
"""
import argparse, statistics, subprocess, time

CASES = [
    ("exitcode (exit=0), 1 vCPU, 128 MiB", ["run", "--guest", "exitcode", "--cmdline", "exit=0"]),
    ("demo without memtest, 1 vCPU, 128 MiB", ["run", "--cmdline", "memtest_mib=0"]),
    ("demo without memtest, 2 vCPUs, 256 MiB", ["run", "--vcpus", "2", "--mem", "256", "--cmdline", "memtest_mib=0"]),
    ("demo (full memtest), 1 vCPU, 128 MiB", ["run"]),
]

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--vmm", default="target/release/vmm")
    a = ap.parse_args()
    print(f"| case | median ms | min ms | max ms | runs |\n|---|---|---|---|---|")
    for name, args in CASES:
        subprocess.run([a.vmm] + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times = []
        for _ in range(a.runs):
            t = time.perf_counter()
            r = subprocess.run([a.vmm] + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times.append((time.perf_counter() - t) * 1000)
            assert r.returncode == 0, f"{name}: exit {r.returncode}"
        print(f"| {name} | {statistics.median(times):.1f} | {min(times):.1f} | {max(times):.1f} | {a.runs} |")

if __name__ == "__main__":
    main()
