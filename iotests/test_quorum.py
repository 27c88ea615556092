"""The ``quorum`` driver over raw files, read and written over NBD.

Three (or two) raw files are children of a quorum node exported over NBD;
a child is corrupted by writing to its file behind the daemon's back.
Checked: the majority's data is read and the loser is reported with
QUORUM_REPORT_BAD (qemu's members), ``rewrite-corrupted`` repairs the file,
no majority gives EIO and QUORUM_FAILURE while the daemon stays up,
``read-pattern=fifo``, ``blkverify`` mode (a difference stops the daemon, as
qemu does), errors injected below with blkdebug are outvoted, option errors,
and ``x-blockdev-change``.

qemu rate-limits both events to one per second (QUORUM_REPORT_BAD per
node-name), delivering the latest held one when the second ends; the tests
wait for an event with given members rather than count events.
"""

from __future__ import annotations

import filecmp
import time
from pathlib import Path

import pytest

import harness
from harness import Monitor, QmpError

SIZE = 1024 * 1024
FILL = 0x11


def make_children(workdir: Path, n: int, fill: int = FILL) -> list[Path]:
    paths = []
    for i in range(n):
        p = workdir / f"c{i}.raw"
        p.write_bytes(bytes([fill]) * SIZE)
        paths.append(p)
    return paths


def poke(path: Path, offset: int, data: bytes) -> None:
    """Change a child's file behind the daemon's back."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def start_quorum(start_daemon, workdir: Path, n: int = 3, opts: str = "vote-threshold=2",
                 writable: bool = False, quorum: bool = True):
    """Files c0..c(n-1) as nodes f0..f(n-1); quorum ``q`` over them exported
    as ``q``. Returns (daemon, monitor, uri, paths)."""
    paths = make_children(workdir, n)
    qmp_sock = workdir / "qmp.sock"
    nbd_sock = workdir / "nbd.sock"
    args = [*harness.monitor_args(qmp_sock)]
    for i, p in enumerate(paths):
        args += ["--blockdev", f"driver=file,node-name=f{i},filename={p}"]
    args += ["--nbd-server", f"addr.type=unix,addr.path={nbd_sock}"]
    if quorum:
        kids = ",".join(f"children.{i}=f{i}" for i in range(n))
        args += ["--blockdev", f"driver=quorum,node-name=q,{opts},{kids}",
                 "--export", f"type=nbd,id=e0,node-name=q,name=q,"
                             f"writable={'on' if writable else 'off'}"]
    d = start_daemon(args, wait_unix=[qmp_sock, nbd_sock])
    return d, d.qmp(qmp_sock), harness.nbd_uri(nbd_sock, "q"), paths


def qio(uri: str, *cmds: str, writable: bool = False, check: bool = True):
    extra = [] if writable else ["-r"]
    return harness.qemu_io(uri, *cmds, fmt="raw", extra=extra, check=check)


def wait_event(mon: Monitor, name: str, timeout: float = 5.0, **members) -> dict:
    """The next ``name`` event whose data has ``members`` (others dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no {name} event with {members} within {timeout}s", pytrace=False)
        ev = mon.event(name, timeout=left)
        if all(ev["data"].get(k) == v for k, v in members.items()):
            return ev


def no_events(mon: Monitor, *names: str, wait: float = 0.3) -> None:
    time.sleep(wait)
    got = [e for e in mon.events_now() if e["event"] in names]
    assert not got, f"unexpected events: {got}"


def test_corrupted_child_is_outvoted_and_reported(workdir, start_daemon):
    _d, mon, uri, paths = start_quorum(start_daemon, workdir)
    poke(paths[1], 4096, b"\x22" * 512)
    qio(uri, f"read -P {FILL:#x} 4000 1000")
    ev = wait_event(mon, "QUORUM_REPORT_BAD", **{"node-name": "f1"})
    # A child that lost the vote has no 'error' member.
    assert ev["data"] == {"type": "read", "node-name": "f1",
                          "sector-num": 7, "sectors-count": 3}
    # Without rewrite-corrupted the file keeps its bad data.
    assert paths[1].read_bytes()[4096:4096 + 512] == b"\x22" * 512


def test_rewrite_corrupted_repairs_the_child(workdir, start_daemon):
    d, mon, uri, paths = start_quorum(start_daemon, workdir,
                                      opts="vote-threshold=2,rewrite-corrupted=on")
    poke(paths[2], 65536 + 100, b"\x33" * 1000)
    assert not filecmp.cmp(paths[0], paths[2], shallow=False)
    qio(uri, f"read -P {FILL:#x} 65536 65536")
    ev = wait_event(mon, "QUORUM_REPORT_BAD", **{"node-name": "f2"})
    assert ev["data"] == {"type": "read", "node-name": "f2",
                          "sector-num": 128, "sectors-count": 128}
    d.stop()
    assert filecmp.cmp(paths[0], paths[2], shallow=False)
    assert paths[2].read_bytes() == bytes([FILL]) * SIZE


def test_majority_wins_over_first_child_and_repairs_it(workdir, start_daemon):
    _d, mon, uri, paths = start_quorum(start_daemon, workdir,
                                       opts="vote-threshold=2,rewrite-corrupted=on")
    poke(paths[1], 0, b"\x44" * 512)
    poke(paths[2], 0, b"\x44" * 512)
    qio(uri, "read -P 0x44 0 512")
    wait_event(mon, "QUORUM_REPORT_BAD", **{"node-name": "f0", "sector-num": 0})
    assert paths[0].read_bytes()[:512] == b"\x44" * 512


def test_no_majority_gives_eio_and_quorum_failure(workdir, start_daemon):
    _d, mon, uri, paths = start_quorum(start_daemon, workdir)
    poke(paths[1], 8192, b"\x22" * 512)
    poke(paths[2], 8192, b"\x33" * 512)
    out = qio(uri, "read 8192 512", check=False)
    assert "read failed: Input/output error" in out.stdout + out.stderr
    ev = wait_event(mon, "QUORUM_FAILURE")
    assert ev["data"] == {"reference": "q", "sector-num": 16, "sectors-count": 1}
    # The daemon stays up and other ranges read fine.
    mon.cmd("query-version")
    qio(uri, f"read -P {FILL:#x} 0 8192")


def test_writes_reach_every_child(workdir, start_daemon):
    d, mon, uri, paths = start_quorum(start_daemon, workdir, writable=True)
    qio(uri, "write -P 0x55 1000 3000", "write -z 65536 65536", "flush", writable=True)
    qio(uri, "read -P 0x55 1000 3000", "read -P 0 65536 65536")
    no_events(mon, "QUORUM_REPORT_BAD", "QUORUM_FAILURE")
    d.stop()
    want = bytearray([FILL]) * SIZE
    want[1000:4000] = b"\x55" * 3000
    want[65536:131072] = bytes(65536)
    for p in paths:
        assert p.read_bytes() == want, p


def test_fifo_reads_the_first_child(workdir, start_daemon):
    _d, mon, uri, paths = start_quorum(start_daemon, workdir,
                                       opts="vote-threshold=2,read-pattern=fifo")
    poke(paths[0], 0, b"\x22" * 512)
    # fifo does not vote: the first child's data comes back, unreported.
    qio(uri, "read -P 0x22 0 512", f"read -P {FILL:#x} 512 512")
    no_events(mon, "QUORUM_REPORT_BAD", "QUORUM_FAILURE")


def test_blkverify_mode_mirrors_and_fails_read_on_difference(workdir, start_daemon):
    d, mon, uri, paths = start_quorum(start_daemon, workdir, n=2, writable=True,
                                      opts="vote-threshold=2,blkverify=on")
    qio(uri, "write -P 0x66 0 4096", "read -P 0x66 0 4096", writable=True)
    assert paths[0].read_bytes()[:4096] == paths[1].read_bytes()[:4096] == b"\x66" * 4096
    poke(paths[1], 100, b"\x07")
    if not harness.is_qsd():
        # qemu prints the first difference and exits 1.
        qio(uri, "read 0 4096", check=False)
        assert d.wait() == 1
        return
    # qsd fails the read with EIO, logs qemu's message and keeps serving.
    proc = qio(uri, "read 0 4096", check=False)
    assert "Input/output error" in proc.stdout + proc.stderr
    assert "quorum: offset=0 bytes=4096 contents mismatch at offset 100" in d.stderr()
    qio(uri, f"read -P {FILL:#04x} 8192 4096")
    mon.cmd("query-version")


BAD_OPTIONS = [
    ({"vote-threshold": 4, "children": ["f0", "f1", "f2"]},
     "threshold may not exceed children count"),
    ({"vote-threshold": 0, "children": ["f0", "f1", "f2"]},
     "Parameter 'vote-threshold' expects a value >= 1"),
    ({"vote-threshold": 1, "children": []},
     "Number of provided children must be 1 or more"),
    ({"children": ["f0"]}, "Parameter 'vote-threshold' is missing"),
    ({"vote-threshold": 1}, "Parameter 'children' is missing"),
    ({"vote-threshold": 2, "children": ["f0", "f1", "f2"], "blkverify": True},
     "blkverify=on can only be set if there are exactly two files and vote-threshold is 2"),
    ({"vote-threshold": 1, "children": ["f0", "f1"], "blkverify": True},
     "blkverify=on can only be set if there are exactly two files and vote-threshold is 2"),
    ({"vote-threshold": 2, "children": ["f0", "f1"], "blkverify": True,
      "rewrite-corrupted": True},
     "rewrite-corrupted=on cannot be used with blkverify=on"),
    ({"vote-threshold": 2, "children": ["f0", "f1"], "read-pattern": "bad"},
     "Parameter 'read-pattern' does not accept value 'bad'"),
    ({"vote-threshold": 2, "children": ["f0", "nope"]},
     "Cannot find device='nope' nor node-name='nope'"),
    ({"vote-threshold": "2", "children": ["f0", "f1"]},
     "Invalid parameter type for 'vote-threshold', expected: integer"),
]


def test_bad_options_are_refused_with_qemu_errors(workdir, start_daemon):
    _d, mon, _uri, paths = start_quorum(start_daemon, workdir, quorum=False)
    for opts, desc in BAD_OPTIONS:
        err = mon.error("blockdev-add", driver="quorum", **{"node-name": "q"}, **opts)
        assert (err.klass, err.desc) == ("GenericError", desc), opts
    small = workdir / "small.raw"
    small.write_bytes(bytes(4096))
    err = mon.error("blockdev-add", driver="quorum", **{"node-name": "q"},
                    **{"vote-threshold": 1,
                       "children": ["f0", {"driver": "file", "filename": str(small)}]})
    assert err.desc == "Could not refresh total sector count: Input/output error"
    # fifo ignores blkverify and rewrite-corrupted; a node may appear twice.
    mon.cmd("blockdev-add", driver="quorum", **{"node-name": "q1"},
            **{"vote-threshold": 2, "children": ["f0", "f1", "f2"],
               "read-pattern": "fifo", "blkverify": True, "rewrite-corrupted": True})
    mon.cmd("blockdev-add", driver="quorum", **{"node-name": "q2"},
            **{"vote-threshold": 2, "children": ["f2", "f2"]})


def test_events_are_in_the_schema(workdir, start_daemon):
    _d, mon, _uri, _paths = start_quorum(start_daemon, workdir, quorum=False)
    names = {e["name"] for e in mon.cmd("query-qmp-schema") if e["meta-type"] == "event"}
    assert {"QUORUM_REPORT_BAD", "QUORUM_FAILURE"} <= names


def add_blkdebug_child(mon: Monitor, name: str, path: Path, rules: list[dict]) -> None:
    """raw ``name`` over blkdebug over ``path``: raw fires read_aio/write_aio."""
    mon.cmd("blockdev-add", driver="raw", **{"node-name": name},
            file={"driver": "blkdebug", "inject-error": rules,
                  "image": {"driver": "file", "filename": str(path)}})


def export_quorum(mon: Monitor, children: list[str], threshold: int = 2) -> None:
    mon.cmd("blockdev-add", driver="quorum", **{"node-name": "q"},
            **{"vote-threshold": threshold, "children": children})
    mon.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "q"}, name="q",
            writable=True)


def test_injected_read_error_is_outvoted(workdir, start_daemon):
    _d, mon, uri, paths = start_quorum(start_daemon, workdir, quorum=False)
    add_blkdebug_child(mon, "r1", paths[1], [{"event": "read_aio", "errno": 5}])
    export_quorum(mon, ["f0", "r1", "f2"])
    qio(uri, f"read -P {FILL:#x} 1000 1000")
    ev = wait_event(mon, "QUORUM_REPORT_BAD", **{"node-name": "r1"})
    assert ev["data"] == {"type": "read", "error": "Input/output error", "node-name": "r1",
                          "sector-num": 1, "sectors-count": 3}


def test_injected_write_error_is_reported_and_write_succeeds(workdir, start_daemon):
    d, mon, uri, paths = start_quorum(start_daemon, workdir, quorum=False)
    add_blkdebug_child(mon, "r1", paths[1], [{"event": "write_aio", "errno": 28}])
    export_quorum(mon, ["f0", "r1", "f2"])
    qio(uri, "write -P 0x77 1000 1000", writable=True)
    ev = wait_event(mon, "QUORUM_REPORT_BAD", **{"node-name": "r1"})
    assert ev["data"] == {"type": "write", "error": "No space left on device",
                          "node-name": "r1", "sector-num": 1, "sectors-count": 3}
    d.stop()
    assert paths[0].read_bytes()[1000:2000] == paths[2].read_bytes()[1000:2000] == b"\x77" * 1000
    assert paths[1].read_bytes()[1000:2000] == bytes([FILL]) * 1000


def test_errors_beyond_threshold_reach_the_nbd_client(workdir, start_daemon):
    _d, mon, uri, paths = start_quorum(start_daemon, workdir, quorum=False)
    for i in (1, 2):
        add_blkdebug_child(mon, f"r{i}", paths[i], [{"event": "read_aio", "errno": 5}])
    export_quorum(mon, ["f0", "r1", "r2"])
    out = qio(uri, "read 0 512", check=False)
    assert "read failed: Input/output error" in out.stdout + out.stderr
    ev = wait_event(mon, "QUORUM_FAILURE")
    assert ev["data"] == {"reference": "q", "sector-num": 0, "sectors-count": 1}
    mon.cmd("query-version")


def blockdev_change(mon: Monitor, **args):
    return mon.cmd("x-blockdev-change", **args)


def test_x_blockdev_change_adds_and_removes_children(workdir, start_daemon):
    d, mon, uri, paths = start_quorum(start_daemon, workdir, n=3, writable=True)
    extra = workdir / "c3.raw"
    extra.write_bytes(bytes([FILL]) * SIZE)
    mon.cmd("blockdev-add", driver="file", **{"node-name": "f3"}, filename=str(extra))
    blockdev_change(mon, parent="q", child="children.1")
    err = mon.error("x-blockdev-change", parent="q", child="children.1")
    assert err.desc == "Node 'q' does not have child 'children.1'"
    blockdev_change(mon, parent="q", node="f3")
    err = mon.error("x-blockdev-change", parent="q", node="f3")
    assert err.desc == "The node f3 already has a parent"
    blockdev_change(mon, parent="q", child="children.0")
    err = mon.error("x-blockdev-change", parent="q", child="children.2")
    assert err.desc == "The number of children cannot be lower than the vote threshold 2"
    err = mon.error("x-blockdev-change", parent="f0", node="f1")
    assert err.desc == "The node f0 does not support adding a child"
    # Children now: f2 (children.2) and f3 (children.3); writes reach both.
    qio(uri, "write -P 0x88 0 4096", writable=True)
    d.stop()
    assert paths[2].read_bytes()[:4096] == extra.read_bytes()[:4096] == b"\x88" * 4096
    assert paths[0].read_bytes()[:4096] == paths[1].read_bytes()[:4096] == bytes([FILL]) * 4096
