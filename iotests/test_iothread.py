"""I/O threads: object-add/object-del, --object, query-iothreads, exports on them."""

from __future__ import annotations

import os

import pytest

import harness
from harness import qemu_io


def test_object_add_del_iothread(qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    assert mon.cmd("object-add", **{"qom-type": "iothread", "id": "io0"}) == {}
    err = mon.error("object-add", **{"qom-type": "iothread", "id": "io0"})
    assert (err.klass, err.desc) == (
        "GenericError", "attempt to add duplicate property 'io0' to object (type 'container')")
    assert mon.cmd("object-del", id="io0") == {}
    err = mon.error("object-del", id="io0")
    assert (err.klass, err.desc) == ("GenericError", "object 'io0' not found")


def test_object_add_unknown_type(qmp_only):
    d, sock = qmp_only
    err = d.qmp(sock).error("object-add", **{"qom-type": "no-such-type", "id": "x"})
    assert (err.klass, err.desc) == (
        "GenericError", "Parameter 'qom-type' does not accept value 'no-such-type'")


def test_export_on_iothread_serves_data(workdir, start_daemon):
    img = harness.create_image(workdir / "a.raw", 4 << 20)
    qmp_sock, nbd_sock = workdir / "qmp.sock", workdir / "nbd.sock"
    d = start_daemon([
        *harness.monitor_args(qmp_sock),
        "--object", "iothread,id=io1",
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
    ], wait_unix=[qmp_sock, nbd_sock])
    mon = d.qmp(qmp_sock)
    mon.cmd("block-export-add", type="nbd", id="e0", iothread="io1", writable=True,
            **{"node-name": "f0"})
    uri = harness.nbd_uri(nbd_sock, "f0")
    qemu_io(uri, "write -P 0x3c 0 1M", "read -P 0x3c 0 1M")
    with open(img, "rb") as f:
        assert f.read(1 << 20) == b"\x3c" * (1 << 20)


@pytest.mark.qsd_only
def test_query_iothreads_lists_thread_ids(qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    mon.cmd("object-add", **{"qom-type": "iothread", "id": "io0"})
    mon.cmd("object-add", **{"qom-type": "iothread", "id": "io1"})
    threads = {t["id"]: t for t in mon.cmd("query-iothreads")}
    assert {"io0", "io1"} <= set(threads)
    tids = {threads[i]["thread-id"] for i in ("io0", "io1")}
    assert len(tids) == 2
    # The thread ids are real threads of the daemon.
    task_ids = {int(t) for t in os.listdir(f"/proc/{d.pid}/task")}
    assert tids <= task_ids
    mon.cmd("object-del", id="io0")
    assert [t["id"] for t in mon.cmd("query-iothreads")] == ["io1"]
