#!/usr/bin/env python3
"""Write an uncompressed newc cpio archive (a Linux initramfs) from a file list.

Same list format as the kernel's usr/gen_init_cpio, subset:
    dir   <name> <mode> <uid> <gid>
    file  <name> <source path> <mode> <uid> <gid>
    slink <name> <target> <mode> <uid> <gid>
    nod   <name> <mode> <uid> <gid> <c|b> <major> <minor>
Blank lines and lines starting with # are ignored. Needs no root (device nodes are
written into the archive, not created on disk) and the output is reproducible: every
mtime is SOURCE_DATE_EPOCH (default 0).

usage: mkcpio.py LIST OUTPUT
"""
import os
import stat
import sys

MTIME = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))


def fail(msg):
    sys.exit(f"mkcpio: error: {msg}")


class Writer:
    def __init__(self, out):
        self.out = out
        self.ino = 721
        self.pos = 0

    def _write(self, data):
        self.out.write(data)
        self.pos += len(data)

    def _pad(self):
        if self.pos % 4:
            self._write(b"\0" * (4 - self.pos % 4))

    def entry(self, name, mode, uid=0, gid=0, data=b"", rdev=(0, 0)):
        name = name.lstrip("/").encode() or b"."
        fields = [
            self.ino, mode, uid, gid, 1, MTIME, len(data),
            0, 0, rdev[0], rdev[1], len(name) + 1, 0,
        ]
        self.ino += 1
        self._write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self._write(name + b"\0")
        self._pad()
        self._write(data)
        self._pad()

    def trailer(self):
        self.ino = 0
        self.entry("TRAILER!!!", 0)


def main():
    if len(sys.argv) != 3:
        fail("usage: mkcpio.py LIST OUTPUT")
    list_path, out_path = sys.argv[1], sys.argv[2]
    seen = set()
    tmp = out_path + ".part"
    with open(list_path) as spec, open(tmp, "wb") as out:
        w = Writer(out)
        for lineno, raw in enumerate(spec, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            f = line.split()
            where = f"{list_path}:{lineno}"
            try:
                kind, name = f[0], f[1]
                if name in seen:
                    fail(f"{where}: duplicate entry {name}")
                seen.add(name)
                if kind == "dir":
                    w.entry(name, stat.S_IFDIR | int(f[2], 8), int(f[3]), int(f[4]))
                elif kind == "file":
                    try:
                        with open(f[2], "rb") as src:
                            data = src.read()
                    except OSError as e:
                        fail(f"{where}: cannot read {f[2]}: {e.strerror}")
                    w.entry(name, stat.S_IFREG | int(f[3], 8), int(f[4]), int(f[5]), data)
                elif kind == "slink":
                    w.entry(name, stat.S_IFLNK | int(f[3], 8), int(f[4]), int(f[5]),
                            f[2].encode())
                elif kind == "nod":
                    typ = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}.get(f[5])
                    if typ is None:
                        fail(f"{where}: device type must be c or b, not {f[5]!r}")
                    w.entry(name, typ | int(f[2], 8), int(f[3]), int(f[4]),
                            rdev=(int(f[6]), int(f[7])))
                else:
                    fail(f"{where}: unknown entry type {kind!r}")
            except (IndexError, ValueError):
                fail(f"{where}: malformed line: {line}")
        w.trailer()
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main()
