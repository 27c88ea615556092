"""The ``compress`` filter over qcow2, exported writable over NBD.

Every write through the filter is a compressed write: ``qemu-img map``
shows the clusters compressed, ``qemu-img check`` finds no leaks (several
compressed clusters share a host cluster, each holding a reference),
``qemu-img compare`` equals the model, and compressible data makes the
image smaller than the data written. qemu's rules hold: requests are padded
to whole clusters, a compressed write never overwrites an allocated cluster
(EIO), a filter over a driver that cannot compress is refused at open, and
an image whose size is not whole clusters cannot be written through it.
"""

from __future__ import annotations

from pathlib import Path

import harness
import qcow2_util as U
from harness import Model
from qcow2_util import KiB, MiB

SIZE = 16 * MiB
CLUSTER = 64 * KiB


def start(start_daemon, workdir: Path, img: Path) -> tuple[U.QcowDaemon, str]:
    """A daemon with qcow2 node ``q`` under compress node ``c``, exported as ``c``."""
    qd = U.start_qcow2_daemon(start_daemon, workdir)
    qd.add_qcow2("q", img)
    qd.mon.cmd("blockdev-add", driver="compress", **{"node-name": "c"}, file="q")
    return qd, qd.export("c", "c", writable=True)


def stop(qd: U.QcowDaemon) -> None:
    qd.daemon.stop()


def compressed_extents(img: Path) -> tuple[int, int]:
    """(bytes mapped compressed, bytes mapped as data) per ``qemu-img map``."""
    comp = data = 0
    for e in U.img_map(img):
        if e.get("data"):
            data += e["length"]
            if e.get("compressed"):
                comp += e["length"]
    return comp, data


def io_error(out: str) -> list[str]:
    return [line for line in out.splitlines() if "failed:" in line]


def test_compress_filter_writes_compressed_packed_clusters(start_daemon, workdir):
    img = U.create_qcow2(workdir / "img.qcow2", SIZE)
    qd, uri = start(start_daemon, workdir, img)
    model = Model(SIZE)
    writes = [(0, CLUSTER, 0x11), (CLUSTER, 3 * CLUSTER, 0x22), (1 * MiB, 1 * MiB, 0x33),
              (4 * MiB, CLUSTER, 0x44), (SIZE - 2 * CLUSTER, 2 * CLUSTER, 0x55)]
    cmds = []
    for off, length, byte in writes:
        cmds.append(f"write -P {byte:#x} {off} {length}")
        model.write(off, length, byte)
    harness.qemu_io(uri, *cmds)
    harness.qemu_io(uri, *(f"read -P {b:#x} {o} {n}" for o, n, b in writes))
    stop(qd)
    written = sum(n for _, n, _ in writes)
    assert compressed_extents(img) == (written, written)
    U.assert_check_clean(img)
    raw = workdir / "model.raw"
    raw.write_bytes(model.data)
    U.compare(img, raw)
    # About 1.3 MiB of guest data; compressed, a few host clusters at most
    # besides the metadata qemu-img create wrote.
    assert img.stat().st_size < written // 2, img.stat().st_size


def test_compress_filter_overwrite_and_padding_follow_qemu(start_daemon, workdir):
    img = U.create_qcow2(workdir / "img.qcow2", SIZE)
    qd, uri = start(start_daemon, workdir, img)
    model = Model(SIZE)
    harness.qemu_io(uri, f"write -P 0x61 0 {CLUSTER}")
    model.write(0, CLUSTER, 0x61)
    # A compressed write never replaces an allocated cluster: EIO, aligned
    # or not (the misaligned one is padded to the cluster first).
    for cmd in (f"write -P 0x62 0 {CLUSTER}", "write -P 0x62 512 512", "write -P 0x62 100 1"):
        out = harness.qemu_io(uri, cmd, check=False)
        assert io_error(out.stdout + out.stderr) == [
            "write failed: Input/output error"], out.stdout + out.stderr
    # A misaligned write to unallocated clusters is padded with what they
    # read (zeroes) and stored compressed.
    harness.qemu_io(uri, f"write -P 0x63 {3 * CLUSTER + 100} 1000")
    model.write(3 * CLUSTER + 100, 1000, 0x63)
    stop(qd)
    assert compressed_extents(img) == (2 * CLUSTER, 2 * CLUSTER)
    U.assert_check_clean(img)
    raw = workdir / "model.raw"
    raw.write_bytes(model.data)
    U.compare(img, raw)


def test_compress_filter_query_names_node_as_qemu(start_daemon, workdir):
    img = U.create_qcow2(workdir / "img.qcow2", SIZE)
    qd, _ = start(start_daemon, workdir, img)
    node = qd.nodes()["c"]
    want = ('json:{"driver": "compress", "file": {"driver": "qcow2", "file": '
            f'{{"driver": "file", "filename": "{img}"}}}}}}')
    assert (node["drv"], node["file"], node["image"]["filename"]) == ("compress", want, want)
    assert node["image"]["cluster-size"] == CLUSTER


def test_compress_filter_over_non_compressing_driver_is_refused(start_daemon, workdir):
    raw = harness.create_image(workdir / "disk.raw", SIZE)
    qd = U.start_qcow2_daemon(start_daemon, workdir)
    qd.mon.cmd("blockdev-add", driver="file", filename=str(raw), **{"node-name": "f"})
    qd.mon.cmd("blockdev-add", driver="raw", file="f", **{"node-name": "r"})
    for child, name in (("f", "file"), ("r", "raw")):
        err = U.qmp_error(lambda: qd.mon.cmd("blockdev-add", driver="compress",
                                             file=child, **{"node-name": "c"}))
        assert err is not None
        assert (err.klass, err.desc) == (
            "GenericError", f"Compression is not supported for underlying format: {name}")


def test_compress_filter_partial_last_cluster_refuses_write_export(start_daemon, workdir):
    img = U.create_qcow2(workdir / "img.qcow2", 200 * KiB)
    qd = U.start_qcow2_daemon(start_daemon, workdir)
    qd.add_qcow2("q", img)
    qd.mon.cmd("blockdev-add", driver="compress", **{"node-name": "c"}, file="q")
    err = U.qmp_error(lambda: qd.export("c", "c", writable=True))
    assert err is not None
    assert err.desc == ("Cannot get 'write' permission without 'resize': "
                        "Image size is not a multiple of request alignment")
    # Read-only exports are fine.
    qd.export("c", "ro")
