"""Image locking: the daemon takes qemu's OFD byte-range locks on its images.

qemu-storage-daemon's NBD exports share every permission with other users,
so another qemu process may still write the image; what the daemon refuses
to share is 'resize' (raw holds its file child at a fixed size).
"""

from __future__ import annotations

import os
from pathlib import Path

import harness
from harness import qemu_io

# qemu's lock layout: byte 100 + perm bit while holding a permission,
# byte 200 + perm bit while refusing to share it.
PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE = 0, 1, 3
LOCK_BASE_PERM, LOCK_BASE_SHARED = 100, 200


def ofd_lock_bytes(path: Path) -> set[int]:
    """Single-byte OFD locks held on the file's inode (from /proc/locks)."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    held = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[1] == "OFDLCK" and fields[5] == dev:
            start, end = int(fields[6]), fields[7]
            if end != "EOF":
                held.update(range(start, int(end) + 1))
    return held


def test_lock_bytes_of_writable_export(env):
    held = ofd_lock_bytes(env.img)
    assert LOCK_BASE_PERM + PERM_CONSISTENT_READ in held, held
    assert LOCK_BASE_PERM + PERM_WRITE in held, held
    assert LOCK_BASE_SHARED + PERM_RESIZE in held, held
    assert LOCK_BASE_SHARED + PERM_WRITE not in held, held


def test_lock_bytes_of_read_only_export(make_env):
    env = make_env(writable=False, node_opts=",read-only=on")
    held = ofd_lock_bytes(env.img)
    assert LOCK_BASE_PERM + PERM_CONSISTENT_READ in held, held
    assert LOCK_BASE_PERM + PERM_WRITE not in held, held


def test_resize_by_other_process_refused(env):
    out = harness.run(["qemu-img", "resize", "-f", "raw", str(env.img), "128M"], check=False)
    assert out.returncode != 0
    assert 'Failed to get "resize" lock' in out.stderr, out.stderr
    assert os.path.getsize(env.img) == env.size


def test_force_share_reader_succeeds(env):
    qemu_io(env.uri, "write -P 0x6b 0 64k")
    qemu_io(str(env.img), "read -P 0x6b 0 64k", extra=["-r", "-U"])
    out = harness.run(["qemu-img", "info", "-U", "--output=json", str(env.img)])
    assert '"virtual-size": %d' % env.size in out.stdout


def test_locks_released_after_blockdev_del(env):
    env.qmp.cmd("block-export-del", id="exp0")
    env.qmp.event("BLOCK_EXPORT_DELETED")
    env.qmp.cmd("blockdev-del", **{"node-name": "fmt0"})
    env.qmp.cmd("blockdev-del", **{"node-name": "file0"})
    assert ofd_lock_bytes(env.img) == set()
    harness.run(["qemu-img", "resize", "-f", "raw", str(env.img), "128M"])
