"""A corrupted L2 entry seen over NBD: the read fails with EIO, the daemon
emits BLOCK_IMAGE_CORRUPTED with qemu's members, and the node's other
ranges and the daemon's other exports keep serving.
"""

from __future__ import annotations

import pytest

import harness
import qcow2_util as U
from qcow2_util import MiB


def corrupt_first_l2_entry(img) -> int:
    """Make guest cluster 0's data offset unaligned; returns the bad offset."""
    l2 = U.first_l2(img)
    entry = U.read_u64(img, l2)
    assert entry & 0x00FF_FFFF_FFFF_FE00, "cluster 0 must be allocated"
    U.write_u64(img, l2, entry + 512)
    return (entry + 512) & 0x00FF_FFFF_FFFF_FE00


def nbd_read_errno(uri: str, offset: int, length: int) -> str:
    """"0" when a read succeeds, else the errno (name) libnbd reports."""
    script = (f"try:\n    h.pread({length}, {offset})\n    print(0)\n"
              f"except nbd.Error as e:\n    print(e.errno)\n")
    out = harness.nbdsh(uri, script).stdout.strip().splitlines()
    return out[-1]


def test_corrupt_l2_entry_read_only_is_not_fatal(workdir, start_daemon):
    img = U.create_qcow2(workdir / "bad.qcow2", 8 * MiB)
    harness.qemu_io(str(img), "write -P 0x42 0 1M", fmt="qcow2")
    corrupt_first_l2_entry(img)
    qd = U.start_qcow2_daemon(start_daemon, workdir)
    qd.add_qcow2("bad", img, **{"read-only": True})
    uri = qd.export("bad", "bad")
    assert nbd_read_errno(uri, 0, 4096) in ("EIO", "5")
    ev = qd.mon.event("BLOCK_IMAGE_CORRUPTED")
    assert ev["data"]["fatal"] is False
    assert qd.nodes()["bad"]["image"]["format-specific"]["data"]["corrupt"] is False


def test_corrupt_l2_entry_gives_eio_and_event(workdir, start_daemon):
    img = U.create_qcow2(workdir / "bad.qcow2", 8 * MiB)
    harness.qemu_io(str(img), "write -P 0x42 0 1M", "write -P 0x43 4M 1M", fmt="qcow2")
    l2 = U.first_l2(img)
    bad_offset = corrupt_first_l2_entry(img)
    good = U.create_qcow2(workdir / "good.qcow2", 8 * MiB)
    harness.qemu_io(str(good), "write -P 0x44 0 2M", fmt="qcow2")

    qd = U.start_qcow2_daemon(start_daemon, workdir)
    qd.add_qcow2("bad", img)
    qd.add_qcow2("good", good, **{"read-only": True})
    bad_uri = qd.export("bad", "bad")
    good_uri = qd.export("good", "good")

    assert nbd_read_errno(bad_uri, 0, 4096) in ("EIO", "5")
    ev = qd.mon.event("BLOCK_IMAGE_CORRUPTED")
    data = ev["data"]
    assert data["device"] == "" and data["node-name"] == "bad"
    # qemu's members: no offset or size for a bad L2 entry (only overlap
    # checks name a range), and fatal because the node is writable.
    assert data == {"device": "", "node-name": "bad", "fatal": True,
                    "msg": f"Cluster allocation offset {bad_offset:#x} unaligned "
                           f"(L2 offset: {l2:#x}, L2 index: 0)"}

    # The daemon's other export still serves. (qemu drops the driver of a
    # fatally corrupt node, so its query fails with "Block device bad is
    # ejected"; qsd keeps reads of intact ranges working.)
    got = U.nbd_read_all(good_uri, workdir / "good.raw").read_bytes()
    assert got[:2 * MiB] == b"\x44" * (2 * MiB)
