#!/usr/bin/env python3
"""Linux boot timeline under vmm: exec -> kernel version line -> "Run /init" ->
"VMM-GUEST ready" -> shell answers a command -> poweroff -> vmm exits.

usage: scripts/bench-linux-boot.py [--vcpus N] [--mem MIB] [--runs R] [--cmdline S]
                                   [--vmm PATH] [--kernel K --initrd I] [--log FILE]

Kernel and initramfs default to resources/linux/prepare.sh's output. Prints one line
per run and the median of each mark; exits 1 if a run does not reach the shell.
Not part of the test suite (docs/benchmarks.md records its results)."""
import argparse
import os
import selectors
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MARKS = [
    ("linux", "Linux version"),
    ("run_init", "Run /init as init process"),
    ("ready", "VMM-GUEST ready"),
]


def prepared():
    out = subprocess.run([os.path.join(HERE, "../resources/linux/prepare.sh")],
                         check=True, capture_output=True, text=True).stdout
    kv = dict(l.split("=", 1) for l in out.splitlines()[-2:])
    return kv["KERNEL"], kv["INITRD"]


def one_run(a, kernel, initrd, log):
    cmd = [a.vmm, "run", "--kernel", kernel, "--initrd", initrd, "--vcpus", str(a.vcpus),
           "--mem", str(a.mem)]
    if a.cmdline:
        cmd += ["--cmdline", a.cmdline]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    got, buf, sent = {}, b"", None
    deadline = t0 + a.timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=0.5):
            if p.poll() is not None:
                break
            continue
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
        now = time.monotonic() - t0
        if log:
            log.write(chunk.decode(errors="replace"))
        text = buf.decode(errors="replace")
        for name, needle in MARKS:
            if name not in got and needle in text:
                got[name] = now
        if "ready" in got and sent is None and "vmm-guest# " in text:
            p.stdin.write(b"echo BENCH-$((40+2))\n")
            p.stdin.flush()
            sent = now
        if sent is not None and "shell" not in got and "BENCH-42" in text:
            got["shell"] = now
            p.stdin.write(b"poweroff\n")
            p.stdin.flush()
            break
        buf = buf[-4096:]
    if "shell" not in got:
        p.kill()
        p.wait()
        return got, None
    try:
        code = p.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return got, None
    got["exit"] = time.monotonic() - t0
    return got, code


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--mem", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cmdline")
    ap.add_argument("--vmm", default=os.path.join(HERE, "../target/release/vmm"))
    ap.add_argument("--kernel")
    ap.add_argument("--initrd")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--log", help="append the serial output of every run here")
    a = ap.parse_args()
    kernel, initrd = (a.kernel, a.initrd) if a.kernel else prepared()
    log = open(a.log, "a") if a.log else None
    names = [m[0] for m in MARKS] + ["shell", "exit"]
    rows = []
    for i in range(a.runs):
        got, code = one_run(a, kernel, initrd, log)
        line = " ".join(f"{n}={got[n]:.1f}s" for n in names if n in got)
        print(f"run {i + 1}: {line} status={code}", flush=True)
        if code != 0:
            print("bench-linux-boot: the guest did not reach the shell and power off", file=sys.stderr)
            return 1
        rows.append(got)
    med = " ".join(f"{n}={statistics.median(r[n] for r in rows):.1f}s" for n in names)
    print(f"median of {len(rows)} ({a.vcpus} vCPU, {a.mem} MiB): {med}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
