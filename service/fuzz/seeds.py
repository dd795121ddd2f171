#!/usr/bin/env python3
"""Writes seed inputs for one fuzz target into a directory: `seeds.py TARGET DIR`.

Seeds are made here rather than committed: page map images as CRIU writes them (the framing is
the `pagemap` target's), tar layers and a docker-save archive with whiteouts, symlinks, hard links
and a gzip layer for `unpack` (raw mode, first byte 0), environ and mountinfo text.
"""
import gzip
import io
import json
import struct
import sys
import tarfile
from pathlib import Path

IMG_COMMON_MAGIC, PAGEMAP_MAGIC = 0x54564319, 0x56084025
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pagemap(pages_id, entries):
    """A pagemap image: head, then (vaddr, nr_pages, flags) entries."""
    msgs = [b"\x08" + varint(pages_id)]
    for vaddr, nr, flags in entries:
        m = b"\x08" + varint(vaddr) + b"\x10" + varint(nr)
        if flags is not None:
            m += b"\x20" + varint(flags)
        msgs.append(m)
    out = struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC)
    for m in msgs:
        out += struct.pack("<I", len(m)) + m
    return out


def pagemap_input(has_task, child, cspec, parent, pspec, ctail=b"", ptail=b""):
    out = bytes([1 if has_task else 0, *cspec, *pspec])
    for s in (child, parent, ctail):
        out += struct.pack("<H", len(s)) + s
    return out + ptail


def pagemap_seeds():
    a, b = 0x400000, 0x7F0000000000
    present = PE_PRESENT | PE_LAZY
    yield pagemap_input(True, pagemap(1, [(a, 2, present)]), (1, 2, 7),
                        pagemap(1, [(a, 2, present)]), (1, 2, 7))
    yield pagemap_input(True, pagemap(1, [(a, 2, present), (b, 1, present)]), (1, 3, 1),
                        pagemap(1, [(a, 1, present), (b, 2, present)]), (1, 3, 1), b"\x09" * 10)
    yield pagemap_input(True, pagemap(1, [(a, 1, None), (a + 8192, 1, PE_PARENT)]), (1, 1, 0),
                        pagemap(2, [(a, 4, present)]), (2, 4, 0))
    yield pagemap_input(False, pagemap(1, [(a, 1, present)]), (1, 1, 3), b"", (0, 0, 0))
    yield pagemap_input(True, pagemap(1, [(a, 3, 0)]), (1, 0, 0), b"junk", (1, 0, 0))


def tar_bytes(members, fmt=tarfile.GNU_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, kind, extra in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1
            data = None
            if kind == "file":
                data = extra
                ti.size = len(data)
                ti.mode = 0o644
            elif kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, extra
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, extra
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            elif kind == "suid":
                data = extra
                ti.size, ti.mode = len(data), 0o4755
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def unpack_seeds():
    base = [("etc", "dir", None), ("etc/passwd", "file", b"root:x:0:0::/root:/bin/sh\n"),
            ("bin", "dir", None), ("bin/sh", "file", b"\x7fELF"), ("bin/ls", "hard", "bin/sh"),
            ("lib", "sym", "/usr/lib"), ("p", "fifo", None)]
    yield b"\x00" + tar_bytes(base)
    yield b"\x00" + tar_bytes(base, tarfile.PAX_FORMAT)
    yield b"\x00" + gzip.compress(tar_bytes(base), mtime=0)
    yield b"\x02" + tar_bytes([("bin", "dir", None), ("bin/su", "suid", b"x")])
    # A docker-save archive whose first layer plants links out and whose second writes and
    # whites out through them.
    l1 = tar_bytes([("x", "sym", "/"), ("y", "sym", "../../.."), ("z", "dir", None),
                    ("z/f", "file", b"1"), ("a", "file", b"a")])
    l2 = tar_bytes([("x/file", "file", b"2"), ("y/.wh.keepme", "file", b""),
                    ("z/.wh..wh..opq", "file", b""), (".wh.a", "file", b""),
                    ("h", "hard", "x/etc/passwd")])
    cfg = json.dumps({"config": {"Env": ["PATH=/bin"], "WorkingDir": "/z", "User": "root"}})
    manifest = json.dumps([{"Config": "c.json", "Layers": ["1/layer.tar", "2/layer.tar"]}])
    yield b"\x00" + tar_bytes([("manifest.json", "file", manifest.encode()),
                               ("c.json", "file", cfg.encode()),
                               ("1/layer.tar", "file", l1), ("2/layer.tar", "file", l2)])


def environ_seeds():
    yield b"PWD=/x\0B=2\0A=1=1\0SHLVL=1\0"
    yield b"PATH=/usr/bin:/bin\0HOME=/root\0__st_turn=3\0_=/bin/env\0EMPTY=\0=novar\0noeq\0"
    yield b"A=\xff\xfe\0B=\xe2\x82\xac\0"


def mountinfo_seeds():
    text = (
        "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro\n"
        "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - btrfs /dev/loop0 rw,space_cache\n"
        "40 22 0:40 / /var/lib/zfs rw - fuse.zfs pool/ds rw,user_id=0\n"
        "41 22 0:41 / /tab\\011and\\134back rw - tmpfs tmp\\040fs rw\n"
        "garbage\n"
    )
    yield b"\x00" + text.encode()
    yield b"\x01" + b"/mnt/a b\0rw,noatime\0btrfs\0/dev/loop0\0"


SEEDS = {"pagemap": pagemap_seeds, "unpack": unpack_seeds, "environ": environ_seeds,
         "mountinfo": mountinfo_seeds}

if __name__ == "__main__":
    target, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(SEEDS[target]()):
        (out / f"seed-{i}").write_bytes(s)
