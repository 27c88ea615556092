"""The ``blkdebug`` and ``blkverify`` drivers seen from outside.

blkdebug sits between a format node and its file: ``raw`` fires
``read_aio``/``write_aio`` at it, qcow2 its metadata events, every flush
``flush_to_os`` and, when something was written since the last flush,
``flush_to_disk``. Injected errors must surface with their
errno through NBD (qemu-io prints the text), as EIO through FUSE, and leave
the daemon and its other exports serving. With qcow2, a metadata write that
fails at ``l2_update``, ``refblock_alloc`` or ``cluster_alloc`` must never
corrupt the image: ``qemu-img check`` after the run finds at most leaks.

blkverify reads both children and compares. qemu-storage-daemon exits on a
mismatch; qsd fails the read with EIO and keeps running (qsd_only part).
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

import harness
from harness import QmpError

MiB = 1024 * 1024
SIZE = 16 * MiB


def qemu_io_out(uri: str, *cmds: str, readonly: bool = False) -> str:
    """qemu-io output with timing lines dropped (commands may fail)."""
    extra = ["-r"] if readonly else []
    proc = harness.qemu_io(uri, *cmds, extra=extra, check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    return "\n".join(line for line in lines if "ops/sec" not in line)


def failed_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "failed:" in line]


class Setup:
    """A daemon with ``file -> blkdebug(dbg0) -> FORMAT(fmt0)`` exported as
    ``exp`` and an unrelated raw image exported as ``other``."""

    def __init__(self, workdir: Path, start_daemon, dbg_opts: str, fmt: str = "raw",
                 img: Path | None = None, extra_args=(), size: int = SIZE):
        self.workdir = workdir
        self.img = img or harness.create_image(workdir / f"disk.{fmt}", size, fmt)
        self.other_img = harness.create_image(workdir / "other.raw", MiB)
        harness.qemu_io(str(self.other_img), "write -P 0x0b 0 1M")
        self.qmp_sock = workdir / "qmp.sock"
        self.nbd_sock = workdir / "nbd.sock"
        dbg = f"driver=blkdebug,node-name=dbg0,image=file0{dbg_opts}"
        args = [
            *harness.monitor_args(self.qmp_sock),
            "--blockdev", f"driver=file,node-name=file0,filename={self.img}",
            "--blockdev", dbg,
            "--blockdev", f"driver={fmt},node-name=fmt0,file=dbg0",
            "--blockdev", f"driver=file,node-name=ofile,filename={self.other_img}",
            "--blockdev", "driver=raw,node-name=other0,file=ofile",
            "--nbd-server", f"addr.type=unix,addr.path={self.nbd_sock}",
            "--export", "type=nbd,id=exp0,node-name=fmt0,name=exp,writable=on",
            "--export", "type=nbd,id=exp1,node-name=other0,name=other",
            *extra_args,
        ]
        self.daemon = start_daemon(args, wait_unix=[self.qmp_sock, self.nbd_sock])
        self.qmp = self.daemon.qmp(self.qmp_sock)
        self.uri = harness.nbd_uri(self.nbd_sock, "exp")
        self.other_uri = harness.nbd_uri(self.nbd_sock, "other")

    def assert_alive(self) -> None:
        """The daemon answers QMP and the other export still serves."""
        names = {n["node-name"] for n in self.qmp.cmd("query-named-block-nodes")}
        assert {"dbg0", "fmt0", "other0"} <= names
        harness.qemu_io(self.other_uri, "read -P 0x0b 0 1M", extra=["-r"])


# --------------------------------------------------------------------------
# Errors through NBD

NTH_WRITE = (",inject-error.0.event=write_aio,inject-error.0.state=3,inject-error.0.once=on"
             ",set-state.0.event=write_aio,set-state.0.state=1,set-state.0.new_state=2"
             ",set-state.1.event=write_aio,set-state.1.state=2,set-state.1.new_state=3")


def test_blkdebug_third_write_fails_through_nbd(workdir, start_daemon):
    s = Setup(workdir, start_daemon, NTH_WRITE)
    out = qemu_io_out(s.uri, "write -P 1 0 4k", "write -P 2 4k 4k", "write -P 3 8k 4k",
                      "write -P 4 12k 4k")
    assert failed_lines(out) == ["write failed: Input/output error"], out
    assert "wrote 4096/4096 bytes at offset 12288" in out
    s.assert_alive()
    # The rule was used up: the data of the other three writes is there and
    # the failed one never reached the file.
    harness.qemu_io(s.uri, "read -P 1 0 4k", "read -P 2 4k 4k", "read -P 0 8k 4k",
                    "read -P 4 12k 4k", "write -P 5 8k 4k", "read -P 5 8k 4k")
    s.daemon.stop()
    harness.qemu_io(str(s.img), "read -P 1 0 4k", "read -P 5 8k 4k", "read -P 4 12k 4k")


@pytest.mark.parametrize("err,text", [(28, "No space left on device"),
                                      (5, "Input/output error"),
                                      (1, "Operation not permitted"),
                                      (22, "Invalid argument")],
                         ids=["ENOSPC", "EIO", "EPERM", "EINVAL"])
def test_blkdebug_errno_reaches_nbd_client(workdir, start_daemon, err, text):
    s = Setup(workdir, start_daemon,
              f",inject-error.0.event=write_aio,inject-error.0.errno={err}"
              ",inject-error.0.iotype=write")
    out = qemu_io_out(s.uri, "read 0 4k", "write 0 4k", "write 1M 64k", "read 0 4k")
    # Once armed, every write fails with the errno; reads are not affected.
    assert failed_lines(out) == [f"write failed: {text}"] * 2, out
    assert out.count("read 4096/4096 bytes at offset 0") == 2, out
    s.assert_alive()


def test_blkdebug_sector_rule_fails_only_that_sector(workdir, start_daemon):
    s = Setup(workdir, start_daemon,
              ",inject-error.0.event=read_aio,inject-error.0.sector=2048"
              ",inject-error.0.iotype=read")
    # Data first: NBD servers answer reads of holes without reading.
    harness.qemu_io(s.uri, "write -P 9 1032192 32k")
    # qemu-storage-daemon drops the connection after a failed read: one
    # qemu-io per read.
    for cmd, ok in [("read -P 0 0 64k", True), ("read 1M 512", False),
                    ("read -P 9 1040384 8192", True), ("read -P 9 1049088 512", True),
                    ("read 1044480 8192", False), ("write -P 8 1M 4k", True)]:
        out = qemu_io_out(s.uri, cmd)
        assert failed_lines(out) == ([] if ok else ["read failed: Input/output error"]), \
            (cmd, out)
    s.assert_alive()


def test_blkdebug_config_file_rules(workdir, start_daemon):
    cfg = workdir / "blkdebug.conf"
    cfg.write_text(
        "# fail the second write, once\n"
        "[set-state]\n"
        "event = \"write_aio\"\n"
        "state = \"1\"\n"
        "new_state = \"2\"\n"
        "\n"
        "[inject-error]\n"
        "event = \"write_aio\"\n"
        "state = \"2\"\n"
        "errno = \"28\"\n"
        "once = \"on\"\n")
    s = Setup(workdir, start_daemon, f",config={cfg}")
    out = qemu_io_out(s.uri, "write -P 1 0 4k", "write -P 2 4k 4k", "write -P 3 8k 4k")
    assert failed_lines(out) == ["write failed: No space left on device"], out
    nodes = {n["node-name"]: n for n in s.qmp.cmd("query-named-block-nodes")}
    assert nodes["dbg0"]["image"]["filename"] == f"blkdebug:{cfg}:{s.img}"
    assert nodes["dbg0"]["drv"] == "blkdebug"
    s.assert_alive()


def test_blkdebug_flush_event_arms_rule(workdir, start_daemon):
    """A flush after a write fires flush_to_os/flush_to_disk at blkdebug."""
    s = Setup(workdir, start_daemon,
              ",inject-error.0.event=flush_to_disk,inject-error.0.iotype=write"
              ",inject-error.0.errno=28")
    out = qemu_io_out(s.uri, "write -P 1 0 4k", "flush", "read -P 1 0 4k",
                      "write -P 2 0 4k")
    assert failed_lines(out) == ["write failed: No space left on device"], out
    s.assert_alive()


def test_blkdebug_flush_to_disk_only_after_a_write(workdir, start_daemon):
    """As qemu: a flush with nothing written since the last one (or since
    open) fires flush_to_os but not flush_to_disk."""
    s = Setup(workdir, start_daemon,
              ",set-state.0.event=flush_to_disk,set-state.0.state=1,set-state.0.new_state=2"
              ",inject-error.0.event=write_aio,inject-error.0.state=2,inject-error.0.errno=28")
    out = qemu_io_out(s.uri, "flush", "write -P 1 0 4k", "flush", "flush",
                      "write -P 2 0 4k")
    assert failed_lines(out) == ["write failed: No space left on device"], out
    s.assert_alive()


def test_blkdebug_pwritev_event_arms_rule(workdir, start_daemon):
    """Every write fires pwritev at the node written (passed down to
    blkdebug), zero writes pwritev_zero: a once-rule on it fails just the
    next write."""
    s = Setup(workdir, start_daemon,
              ",inject-error.0.event=pwritev,inject-error.0.iotype=write"
              ",inject-error.0.errno=28,inject-error.0.once=on")
    out = qemu_io_out(s.uri, "read -P 0 0 4k", "write -P 1 0 4k", "write -P 2 0 4k",
                      "read -P 2 0 4k")
    assert failed_lines(out) == ["write failed: No space left on device"], out
    s.assert_alive()


def test_blkdebug_limits_keep_data_intact(workdir, start_daemon):
    """align and max-transfer make the layers above split and pad."""
    s = Setup(workdir, start_daemon, ",align=4096,max-transfer=65536"
              ",opt-write-zero=8192,max-write-zero=65536")
    harness.qemu_io(s.uri, "write -P 0x11 1000 300000", "write -z 70000 200000",
                    "write -P 0x22 1M 1M")
    harness.qemu_io(s.uri, "read -P 0x11 1000 69000", "read -P 0 70000 200000",
                    "read -P 0x11 270000 31000", "read -P 0x22 1M 1M")
    nodes = {n["node-name"]: n for n in s.qmp.cmd("query-named-block-nodes")}
    name = nodes["dbg0"]["image"]["filename"]
    assert name.startswith("json:"), name
    assert json.loads(name[5:]) == {
        "driver": "blkdebug", "image": {"driver": "file", "filename": str(s.img)},
        "align": 4096, "max-transfer": 65536, "opt-write-zero": 8192,
        "max-write-zero": 65536}, name
    s.daemon.stop()
    harness.qemu_io(str(s.img), "read -P 0x11 1000 69000", "read -P 0 70000 200000",
                    "read -P 0x22 1M 1M")


def test_blkdebug_blockdev_add_errors(workdir, start_daemon):
    qmp_sock = workdir / "qmp.sock"
    img = harness.create_image(workdir / "disk.raw", MiB)
    d = start_daemon(harness.monitor_args(qmp_sock), wait_unix=[qmp_sock])
    mon = d.qmp(qmp_sock)
    image = {"driver": "file", "filename": str(img)}
    cases = [
        ({"align": 3}, "Cannot meet constraints with align 3"),
        ({"align": 4096, "max-transfer": 1000},
         "Cannot meet constraints with max-transfer 1000"),
        ({"opt-write-zero": 1024, "max-write-zero": 1536},
         "Cannot meet constraints with max-write-zero 1536"),
        ({"config": str(workdir / "missing.conf")},
         "Could not read blkdebug config file: No such file or directory"),
        ({"inject-error": [{"event": "bogus"}]},
         "Parameter 'event' does not accept value 'bogus'"),
    ]
    for extra, desc in cases:
        err = mon.error("blockdev-add", driver="blkdebug", **{"node-name": "d"},
                        image=image, **extra)
        assert err.desc == desc, (extra, err.desc)
    bad = workdir / "bad.conf"
    for text, desc in [("[inject-error]\nevent = \"nope\"\n", "invalid parameter value: nope"),
                       ("[inject-error]\n", "Missing event name for rule"),
                       ("[oops]\n", "There is no option group 'oops'"),
                       ("[inject-error]\nerrno = \"x\"\n",
                        "Parameter 'errno' expects a number")]:
        bad.write_text(text)
        err = mon.error("blockdev-add", driver="blkdebug", **{"node-name": "d"},
                        image=image, config=str(bad))
        assert err.desc == desc, (text, err.desc)
    # nothing half-opened was left behind
    mon.cmd("blockdev-add", driver="blkdebug", **{"node-name": "d"}, image=image)
    assert [n["node-name"] for n in mon.cmd("query-named-block-nodes")].count("d") == 1


# --------------------------------------------------------------------------
# qcow2 metadata failures

QCOW2_EVENTS = ["l2_update", "refblock_alloc", "cluster_alloc"]


@pytest.mark.parametrize("once", [True, False], ids=["once", "sticky"])
@pytest.mark.parametrize("event", QCOW2_EVENTS)
def test_qcow2_metadata_failure_never_corrupts(workdir, start_daemon, event, once):
    """Small clusters so that 256 KiB of writes need new refcount blocks."""
    img = workdir / "disk.qcow2"
    harness.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(img),
                     str(64 * MiB))
    errno_ = 5 if once else 28
    s = Setup(workdir, start_daemon,
              f",inject-error.0.event={event},inject-error.0.errno={errno_}"
              f",inject-error.0.once={'on' if once else 'off'}", fmt="qcow2", img=img)
    out = qemu_io_out(s.uri, "write -P 0x5a 0 256k", "write -P 0x6b 1M 64k")
    text = os.strerror(errno_)
    failed = failed_lines(out)
    assert failed and failed[0] == f"write failed: {text}", out
    if once:
        # one failure, and the next allocating write works
        assert failed == [f"write failed: {text}"], out
        harness.qemu_io(s.uri, "read -P 0x6b 1M 64k")
    s.assert_alive()
    s.daemon.stop()
    check = harness.qemu_img("check", str(img), check=False)
    # 0: clean, 3: leaked clusters only; 2 would be corruption.
    assert check.returncode in (0, 3), check.stdout + check.stderr
    assert "ERROR" not in check.stdout, check.stdout
    if once:
        harness.qemu_io(str(img), "read -P 0x6b 1M 64k", fmt="qcow2")


# --------------------------------------------------------------------------
# blkverify


def make_pair(workdir: Path) -> tuple[Path, Path]:
    test = harness.create_image(workdir / "test.raw", MiB)
    ref = harness.create_image(workdir / "ref.raw", MiB)
    harness.qemu_io(str(test), "write -P 1 0 64k")
    harness.qemu_io(str(ref), "write -P 1 0 64k", "write -P 2 4096 1")
    return test, ref


def start_verify(workdir: Path, start_daemon, test: Path, ref: Path):
    nbd_sock = workdir / "nbd.sock"
    qmp_sock = workdir / "qmp.sock"
    opts = {"driver": "blkverify", "node-name": "v",
            "test": {"driver": "file", "filename": str(test)},
            "raw": {"driver": "file", "filename": str(ref)}}
    d = start_daemon([*harness.monitor_args(qmp_sock), "--blockdev", json.dumps(opts),
                      "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
                      "--export", "type=nbd,id=e,node-name=v,name=exp,writable=on"],
                     wait_unix=[qmp_sock, nbd_sock])
    return d, d.qmp(qmp_sock), harness.nbd_uri(nbd_sock, "exp")


def test_blkverify_writes_both_children(workdir, start_daemon):
    test, ref = make_pair(workdir)
    d, mon, uri = start_verify(workdir, start_daemon, test, ref)
    node = {n["node-name"]: n for n in mon.cmd("query-named-block-nodes")}["v"]
    assert node["image"]["filename"] == f"blkverify:{ref}:{test}"
    harness.qemu_io(uri, "write -P 7 128k 64k", "read -P 7 128k 64k", "read -P 1 8k 4k")
    d.stop()
    for img in (test, ref):
        harness.qemu_io(str(img), "read -P 7 128k 64k")


def test_blkverify_mismatch_detected(workdir, start_daemon):
    test, ref = make_pair(workdir)
    d, mon, uri = start_verify(workdir, start_daemon, test, ref)
    out = qemu_io_out(uri, "read -P 1 0 4k", "read 0 64k", readonly=True)
    assert "read 4096/4096 bytes at offset 0" in out
    assert failed_lines(out) == ["read failed: Input/output error"], out
    msg = "blkverify: read offset=0 bytes=65536 contents mismatch at offset 4096"
    deadline = time.monotonic() + 5
    while msg not in d.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert msg in d.stderr()
    if not harness.is_qsd():
        # qemu-storage-daemon exits on a mismatch
        assert d.wait() == 1
        return
    # qsd keeps serving
    harness.qemu_io(uri, "read -P 1 8k 4k", extra=["-r"])
    assert mon.cmd("query-named-block-nodes")


# --------------------------------------------------------------------------
# FUSE


def fuse_mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                    reason="FUSE exports need root and /dev/fuse")
def test_fuse_read_error_is_eio(workdir, start_daemon):
    img = harness.create_image(workdir / "disk.raw", 4 * MiB)
    harness.qemu_io(str(img), "write -P 0x3c 0 4M")
    mnt = workdir / "mnt"
    mnt.write_bytes(b"")
    qmp_sock = workdir / "qmp.sock"
    d = start_daemon([
        *harness.monitor_args(qmp_sock),
        "--blockdev", f"driver=file,node-name=file0,filename={img}",
        "--blockdev", "driver=blkdebug,node-name=dbg0,image=file0"
                      ",inject-error.0.event=read_aio,inject-error.0.sector=4096"
                      ",inject-error.0.iotype=read",
        "--blockdev", "driver=raw,node-name=fmt0,file=dbg0",
        "--export", f"type=fuse,id=f0,node-name=fmt0,mountpoint={mnt}",
    ], wait_unix=[qmp_sock])
    try:
        deadline = time.monotonic() + 5
        while not fuse_mounted(mnt):
            assert time.monotonic() < deadline, "FUSE export not mounted"
            time.sleep(0.02)
        fd = os.open(mnt, os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == b"\x3c" * 4096
            with pytest.raises(OSError) as exc:
                os.pread(fd, 4096, 2 * MiB)
            assert exc.value.errno == errno.EIO
            # the daemon is still there and other ranges read fine
            assert os.pread(fd, 4096, 3 * MiB) == b"\x3c" * 4096
        finally:
            os.close(fd)
    finally:
        d.stop()
    assert not fuse_mounted(mnt)
