"""Block nodes: blockdev-add/del, query-named-block-nodes, block_resize, stats."""

from __future__ import annotations

import json
import os

import pytest

import harness
from harness import Model, qemu_io

MiB = 1024 * 1024


def nodes_by_name(mon, flat: bool | None = None) -> dict:
    args = {} if flat is None else {"flat": flat}
    return {n["node-name"]: n for n in mon.cmd("query-named-block-nodes", **args)}


def start_nbd(mon, sock) -> None:
    mon.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})


def test_blockdev_add_file_and_raw_over_qmp(qmp_only, workdir):
    d, sock = qmp_only
    mon = d.qmp(sock)
    img = harness.create_image(workdir / "a.raw", 8 * MiB)
    assert mon.cmd("blockdev-add", driver="file", **{"node-name": "f0"},
                   filename=str(img)) == {}
    mon.cmd("blockdev-add", driver="raw", **{"node-name": "r0"}, file="f0")
    for flat in (None, True, False):
        nodes = nodes_by_name(mon, flat)
        f0, r0 = nodes["f0"], nodes["r0"]
        assert (f0["drv"], r0["drv"]) == ("file", "raw")
        assert f0["file"] == str(img) and r0["file"] == str(img)
        assert f0["ro"] is False and r0["ro"] is False
        assert f0["image"]["virtual-size"] == 8 * MiB
        assert r0["image"]["virtual-size"] == 8 * MiB
        assert r0["image"]["format"] == "raw"
        assert f0["detect_zeroes"] == "off"
        assert f0["cache"] == {"writeback": True, "direct": False, "no-flush": False}
        assert f0["backing_file_depth"] == 0 and f0["encrypted"] is False


def test_blockdev_options_show_in_query(qmp_only, workdir):
    d, sock = qmp_only
    mon = d.qmp(sock)
    img = harness.create_image(workdir / "a.raw", MiB)
    mon.cmd("blockdev-add", driver="file", filename=str(img), discard="unmap",
            **{"node-name": "f0", "read-only": True, "cache": {"direct": True},
               "detect-zeroes": "unmap"})
    f0 = nodes_by_name(mon)["f0"]
    assert f0["ro"] is True
    assert f0["detect_zeroes"] == "unmap"
    assert f0["cache"] == {"writeback": True, "direct": True, "no-flush": False}


def test_blockdev_add_on_command_line(workdir, start_daemon):
    img = harness.create_image(workdir / "a.raw", 4 * MiB)
    sock = workdir / "qmp.sock"
    d = start_daemon([
        *harness.monitor_args(sock),
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--blockdev", "raw,node-name=r0,file=f0,offset=1048576,size=2097152",
        "--blockdev", "null-co,node-name=n0,size=1048576",
    ], wait_unix=[sock])
    nodes = nodes_by_name(d.qmp(sock))
    assert nodes["f0"]["image"]["virtual-size"] == 4 * MiB
    assert nodes["r0"]["image"]["virtual-size"] == 2 * MiB
    assert nodes["n0"]["drv"] == "null-co"
    assert nodes["n0"]["image"]["virtual-size"] == MiB


def test_null_co_over_qmp(qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    mon.cmd("blockdev-add", driver="null-co", size=2 * MiB,
            **{"node-name": "n1", "read-zeroes": True})
    n1 = nodes_by_name(mon)["n1"]
    assert n1["drv"] == "null-co" and n1["image"]["virtual-size"] == 2 * MiB
    mon.cmd("blockdev-del", **{"node-name": "n1"})
    assert "n1" not in nodes_by_name(mon)


def test_raw_offset_size_maps_into_file(qmp_only, workdir):
    """Writes through a raw node with offset/size land at offset in the file."""
    d, sock = qmp_only
    mon = d.qmp(sock)
    img = harness.create_image(workdir / "a.raw", 8 * MiB)
    nbd_sock = workdir / "nbd.sock"
    mon.cmd("blockdev-add", driver="file", filename=str(img), **{"node-name": "f0"})
    mon.cmd("blockdev-add", driver="raw", file="f0", offset=MiB, size=2 * MiB,
            **{"node-name": "r0"})
    start_nbd(mon, nbd_sock)
    mon.cmd("block-export-add", type="nbd", id="e0", name="win", writable=True,
            **{"node-name": "r0"})
    uri = harness.nbd_uri(nbd_sock, "win")
    qemu_io(uri, "write -P 0x5a 0 64k", "write -P 0xa5 2032k 16k")
    # Past the end of the window is refused.
    out = qemu_io(uri, "write -P 0x11 2048k 4k", check=False)
    assert "failed" in out.stdout + out.stderr
    model = Model(8 * MiB)
    model.write(MiB, 64 * 1024, 0x5A)
    model.write(MiB + 2032 * 1024, 16 * 1024, 0xA5)
    model.check_file(img)
    info = json.loads(harness.run(["qemu-img", "info", "--output=json", uri]).stdout)
    assert info["virtual-size"] == 2 * MiB


def test_duplicate_node_name_refused(qmp_only, workdir):
    d, sock = qmp_only
    mon = d.qmp(sock)
    img = harness.create_image(workdir / "a.raw", MiB)
    mon.cmd("blockdev-add", driver="file", filename=str(img), **{"node-name": "f0"})
    err = mon.error("blockdev-add", driver="file", filename=str(img), **{"node-name": "f0"})
    assert (err.klass, err.desc) == ("GenericError", "Duplicate nodes with node-name='f0'")


@pytest.mark.parametrize("args, desc", [
    ({"driver": "nosuch", "node-name": "x"}, "Parameter 'driver' does not accept value 'nosuch'"),
    ({"driver": "file", "node-name": "x", "filename": "/nonexistent/x.img"},
     "Could not open '/nonexistent/x.img': No such file or directory"),
])
def test_blockdev_add_errors(qmp_only, args, desc):
    d, sock = qmp_only
    err = d.qmp(sock).error("blockdev-add", **args)
    assert (err.klass, err.desc) == ("GenericError", desc)


def test_blockdev_del_errors(env):
    mon = env.qmp
    err = mon.error("blockdev-del", **{"node-name": "nosuch"})
    assert (err.klass, err.desc) == ("GenericError", "Failed to find node with node-name='nosuch'")
    # fmt0 is exported, file0 is fmt0's child.
    err = mon.error("blockdev-del", **{"node-name": "fmt0"})
    assert (err.klass, err.desc) == ("GenericError", "Node fmt0 is in use")
    err = mon.error("blockdev-del", **{"node-name": "file0"})
    assert (err.klass, err.desc) == ("GenericError", "Block device file0 is in use")
    # Once the export is gone the nodes can go, top first.
    mon.cmd("block-export-del", id="exp0")
    mon.event("BLOCK_EXPORT_DELETED")
    mon.cmd("blockdev-del", **{"node-name": "fmt0"})
    mon.cmd("blockdev-del", **{"node-name": "file0"})
    assert nodes_by_name(mon) == {}


def test_block_resize_file_node(qmp_only, workdir):
    d, sock = qmp_only
    mon = d.qmp(sock)
    img = harness.create_image(workdir / "a.raw", 4 * MiB)
    mon.cmd("blockdev-add", driver="file", filename=str(img), **{"node-name": "f0"})
    assert mon.cmd("block_resize", size=12 * MiB, **{"node-name": "f0"}) == {}
    assert os.path.getsize(img) == 12 * MiB
    assert nodes_by_name(mon)["f0"]["image"]["virtual-size"] == 12 * MiB
    mon.cmd("block_resize", size=2 * MiB, **{"node-name": "f0"})
    assert os.path.getsize(img) == 2 * MiB


def test_block_resize_errors(qmp_only, workdir):
    d, sock = qmp_only
    mon = d.qmp(sock)
    img = harness.create_image(workdir / "a.raw", 4 * MiB)
    mon.cmd("blockdev-add", driver="file", filename=str(img),
            **{"node-name": "ro0", "read-only": True})
    err = mon.error("block_resize", size=8 * MiB, **{"node-name": "ro0"})
    assert (err.klass, err.desc) == ("GenericError", "Image is read-only")
    err = mon.error("block_resize", size=8 * MiB, **{"node-name": "nosuch"})
    assert (err.klass, err.desc) == ("GenericError", "Cannot find device='' nor node-name='nosuch'")
    mon.cmd("blockdev-add", driver="file", filename=str(img), **{"node-name": "f1"})
    mon.cmd("blockdev-add", driver="raw", file="f1", offset=0, size=MiB,
            **{"node-name": "r1"})
    err = mon.error("block_resize", size=8 * MiB, **{"node-name": "r1"})
    assert (err.klass, err.desc) == ("GenericError", "Cannot resize fixed-size raw disks")
    # raw does not share 'resize' on its file child.
    err = mon.error("block_resize", size=8 * MiB, **{"node-name": "f1"})
    assert err.klass == "GenericError"
    assert err.desc.startswith("Permission conflict on node 'f1'")
    assert os.path.getsize(img) == 4 * MiB


def test_query_block_shape(env):
    blocks = env.qmp.cmd("query-block")
    assert isinstance(blocks, list)
    for b in blocks:
        assert {"device", "locked", "removable", "type"} <= set(b)


def test_blockstats_wr_highest_offset_per_node(env):
    qemu_io(env.uri, "write -P 1 1M 64k")
    stats = {s["node-name"]: s for s in
             env.qmp.cmd("query-blockstats", **{"query-nodes": True}) if "node-name" in s}
    assert stats["fmt0"]["stats"]["wr_highest_offset"] == MiB + 64 * 1024
    assert stats["file0"]["stats"]["wr_highest_offset"] == MiB + 64 * 1024
    assert stats["fmt0"]["parent"]["node-name"] == "file0"


@pytest.mark.qsd_only
def test_blockstats_count_export_bytes(env):
    """qsd counts an export's I/O (qemu-storage-daemon's exports are anonymous)."""
    qemu_io(env.uri, "write -P 1 0 64k", "write -P 2 64k 64k", "read 0 128k", "read 0 4k")

    def totals(entries):
        rd = sum(e["stats"]["rd_bytes"] for e in entries)
        wr = sum(e["stats"]["wr_bytes"] for e in entries)
        return rd, wr

    plain = env.qmp.cmd("query-blockstats")
    per_node = [e for e in env.qmp.cmd("query-blockstats", **{"query-nodes": True})
                if e.get("node-name") == "fmt0"]
    candidates = [totals(plain), totals(per_node)]
    assert (132 * 1024, 128 * 1024) in candidates, candidates
