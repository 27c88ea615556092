"""NBD server and export management over QMP and the command line."""

from __future__ import annotations

import json

import pytest

import harness
from harness import qemu_io

MiB = 1024 * 1024


@pytest.fixture
def node_daemon(workdir, start_daemon):
    """A daemon with a file node f0 (4 MiB) and a read-only file node ro0."""
    img = harness.create_image(workdir / "a.raw", 4 * MiB)
    img_ro = harness.create_image(workdir / "ro.raw", MiB)
    sock = workdir / "qmp.sock"
    d = start_daemon([
        *harness.monitor_args(sock),
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--blockdev", f"driver=file,node-name=ro0,filename={img_ro},read-only=on",
    ], wait_unix=[sock])
    return d.qmp(sock), img


def exports(mon) -> dict:
    return {e["id"]: e for e in mon.cmd("query-block-exports")}


def test_nbd_server_unix_lifecycle(node_daemon, workdir):
    mon, img = node_daemon
    sock = workdir / "nbd.sock"
    assert mon.cmd("nbd-server-start",
                   addr={"type": "unix", "data": {"path": str(sock)}}) == {}
    assert harness.unix_connectable(sock)
    mon.cmd("block-export-add", type="nbd", id="e0", name="disk", writable=True,
            **{"node-name": "f0"})
    assert exports(mon) == {"e0": {"id": "e0", "type": "nbd", "node-name": "f0",
                                   "shutting-down": False}}
    qemu_io(harness.nbd_uri(sock, "disk"), "write -P 0x42 0 4k", "read -P 0x42 0 4k")
    assert mon.cmd("block-export-del", id="e0") == {}
    assert mon.event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e0"}
    assert exports(mon) == {}
    out = qemu_io(harness.nbd_uri(sock, "disk"), "read 0 4k", check=False)
    assert out.returncode != 0
    assert mon.cmd("nbd-server-stop") == {}
    assert not harness.unix_connectable(sock)
    with open(img, "rb") as f:
        assert f.read(4096) == b"\x42" * 4096


def test_nbd_server_inet_ephemeral_port(node_daemon):
    mon, _ = node_daemon
    port = harness.free_tcp_port()
    mon.cmd("nbd-server-start", addr={"type": "inet",
                                      "data": {"host": "127.0.0.1", "port": str(port)}})
    mon.cmd("block-export-add", type="nbd", id="e0", writable=True, **{"node-name": "f0"})
    uri = f"nbd://127.0.0.1:{port}/f0"  # the name defaults to the node name
    qemu_io(uri, "write -P 0x99 64k 64k", "read -P 0x99 64k 64k")
    info = json.loads(harness.run(["nbdinfo", "--json", uri]).stdout)
    assert info["exports"][0]["export-size"] == 4 * MiB
    mon.cmd("nbd-server-stop")
    assert not harness.tcp_connectable("127.0.0.1", port)


def test_nbd_server_errors(node_daemon, workdir):
    mon, _ = node_daemon
    sock = workdir / "nbd.sock"

    def err(cmd, **args):
        e = mon.error(cmd, **args)
        return e.klass, e.desc

    g = "GenericError"
    assert err("nbd-server-stop") == (g, "NBD server not running")
    assert err("block-export-add", type="nbd", id="e0", **{"node-name": "f0"}) == \
        (g, "NBD server not running")
    assert err("nbd-server-add", device="f0") == (g, "NBD server not running")
    mon.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    assert err("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}}) == \
        (g, "NBD server already running")
    mon.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "f0"})
    assert err("block-export-add", type="nbd", id="e0", **{"node-name": "f0"}) == \
        (g, "Block export id 'e0' is already in use")
    assert err("block-export-add", type="nbd", id="e1", name="f0", **{"node-name": "f0"}) == \
        (g, "NBD server already has export named 'f0'")
    assert err("block-export-add", type="nbd", id="e2", writable=True,
               **{"node-name": "ro0"}) == (g, "Cannot export read-only node as writable")
    assert err("block-export-add", type="nbd", id="e3", **{"node-name": "nosuch"}) == \
        (g, "Cannot find device='' nor node-name='nosuch'")
    assert err("block-export-del", id="nosuch") == (g, "Export 'nosuch' is not found")
    assert err("nbd-server-remove", name="nosuch") == (g, "Export 'nosuch' is not found")


def test_nbd_server_add_deprecated_alias(node_daemon, workdir):
    mon, _ = node_daemon
    sock = workdir / "nbd.sock"
    mon.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    assert mon.cmd("nbd-server-add", device="f0", name="legacy", writable=True,
                   description="old style") == {}
    # The export id is the export name.
    assert exports(mon)["legacy"]["node-name"] == "f0"
    uri = harness.nbd_uri(sock, "legacy")
    qemu_io(uri, "write -P 7 0 4k", "read -P 7 0 4k")
    info = json.loads(harness.run(["nbdinfo", "--json", uri]).stdout)["exports"][0]
    assert info["description"] == "old style" and info["is_read_only"] is False
    assert mon.cmd("nbd-server-remove", name="legacy") == {}
    assert mon.event("BLOCK_EXPORT_DELETED")["data"] == {"id": "legacy"}
    assert exports(mon) == {}


def test_nbd_server_stop_removes_exports(node_daemon, workdir):
    mon, _ = node_daemon
    sock = workdir / "nbd.sock"
    mon.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    mon.cmd("block-export-add", type="nbd", id="a", **{"node-name": "f0"})
    mon.cmd("block-export-add", type="nbd", id="b", name="other", **{"node-name": "ro0"})
    mon.cmd("nbd-server-stop")
    deleted = {mon.event("BLOCK_EXPORT_DELETED")["data"]["id"] for _ in range(2)}
    assert deleted == {"a", "b"}
    assert exports(mon) == {}
    # The server can be started again.
    mon.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    assert harness.unix_connectable(sock)


def test_command_line_nbd_server_and_exports(workdir, start_daemon):
    img = harness.create_image(workdir / "a.raw", 2 * MiB)
    port = harness.free_tcp_port()
    qmp_sock = workdir / "qmp.sock"
    d = start_daemon([
        *harness.monitor_args(qmp_sock),
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
        "--export", "type=nbd,id=rw,node-name=f0,name=rw,writable=on",
        "--export", "nbd,id=ro,node-name=f0,name=ro,description=read only view",
    ], wait_unix=[qmp_sock], wait_tcp=[("127.0.0.1", port)])
    mon = d.qmp(qmp_sock)
    assert set(exports(mon)) == {"rw", "ro"}
    qemu_io(f"nbd://127.0.0.1:{port}/rw", "write -P 0x61 0 8k")
    qemu_io(f"nbd://127.0.0.1:{port}/ro", "read -P 0x61 0 8k", extra=["-r"])
    listing = harness.run(["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{port}"]).stdout
    by_name = {e["export-name"]: e for e in json.loads(listing)["exports"]}
    assert set(by_name) == {"rw", "ro"}
    assert by_name["ro"]["description"] == "read only view"
    assert by_name["ro"]["is_read_only"] is True and by_name["rw"]["is_read_only"] is False
