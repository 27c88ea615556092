"""FUSE exports (`--export type=fuse`) through the kernel's FUSE: the node is
mounted over a regular file and used with ordinary tools (dd, qemu-img, fio,
lseek, fallocate), compared with what NBD sees of the same node.

Needs root (mount(2) on /dev/fuse) and the kernel's FUSE; skipped otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

import harness

SIZE = 64 * 1024 * 1024
MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="FUSE exports need root and /dev/fuse")


def mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def wait_mounted(path: Path, want: bool = True, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while mounted(path) != want:
        if time.monotonic() > deadline:
            pytest.fail(f"{path} {'not ' if want else 'still '}mounted after {timeout}s",
                        pytrace=False)
        time.sleep(0.02)


@pytest.fixture
def fuse_dir(workdir: Path):
    """The work directory; afterwards daemons are stopped and any mount a
    failed test left behind is lazily unmounted (what a user does after a
    crash)."""
    yield workdir
    while harness.ACTIVE:
        harness.ACTIVE.pop().stop()
    with open("/proc/self/mounts") as f:
        stale = [line.split()[1] for line in f if line.split()[1].startswith(str(workdir))]
    for m in stale:
        subprocess.run(["umount", "-l", m], check=False)


def connect_monitor(daemon: harness.Daemon, sock: Path) -> harness.Monitor:
    """qemu's chardev socket serves one client and re-listens only after it
    has noticed that the readiness probe hung up: retry a refused connect."""
    deadline = time.monotonic() + 5.0
    while True:
        try:
            return daemon.qmp(sock)
        except Exception:  # qemu.qmp's ConnectError, whatever its cause
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Fuse:
    """A daemon with one node (file + format) and a FUSE export of it."""

    def __init__(self, workdir: Path, start_daemon, fmt: str = "raw", export_opts: str = "",
                 img: Path | None = None, extra_args=(), export: bool = True,
                 size: int = SIZE):
        self.workdir = workdir
        self.img = img or harness.create_image(workdir / f"disk.{fmt}", size, fmt)
        self.mnt = workdir / "mnt"
        self.mnt.write_bytes(b"")
        self.qmp_sock = workdir / "qmp.sock"
        self.nbd_sock = workdir / "nbd.sock"
        args = [
            "--blockdev", f"driver=file,node-name=file0,filename={self.img}",
            "--blockdev", f"driver={fmt},node-name=fmt0,file=file0",
            *extra_args,
        ]
        if export:
            args += ["--export", f"type=fuse,id=fuse0,node-name=fmt0,"
                                 f"mountpoint={self.mnt}{export_opts}"]
        args += harness.monitor_args(self.qmp_sock)
        self.daemon = start_daemon(args, wait_unix=[self.qmp_sock])
        self.qmp = connect_monitor(self.daemon, self.qmp_sock)
        if export:
            wait_mounted(self.mnt)


@pytest.fixture
def make_fuse(fuse_dir: Path, start_daemon):
    def _make(**kw) -> Fuse:
        return Fuse(fuse_dir, start_daemon, **kw)
    return _make


def dd(*args: str) -> None:
    harness.run(["dd", "status=none", *args])


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


# --------------------------------------------------------------------------
# Set-up, attributes, errors


def test_fuse_file_has_node_size_and_mode(make_fuse):
    f = make_fuse(export_opts=",writable=on")
    st = f.mnt.stat()
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == SIZE
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    exports = f.qmp.cmd("query-block-exports")
    assert exports == [{"node-name": "fmt0", "shutting-down": False,
                        "type": "fuse", "id": "fuse0"}]


def test_fuse_read_only_mode_and_refusals(make_fuse):
    f = make_fuse()
    assert stat.S_IMODE(f.mnt.stat().st_mode) == 0o400
    # Root passes the mode check at open; the export refuses the write.
    fd = os.open(f.mnt, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x" * 512, 0)
        assert e.value.errno == errno.EACCES
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, MiB)
        assert e.value.errno == errno.EACCES
    finally:
        os.close(fd)
    with pytest.raises(OSError) as e:
        os.chmod(f.mnt, 0o600)
    assert e.value.errno == errno.EROFS


def test_fuse_mountpoint_errors(make_fuse):
    f = make_fuse(export=False)
    missing = f.workdir / "nope"
    err = f.qmp.error("block-export-add", type="fuse", id="e1", **{"node-name": "fmt0"},
                      mountpoint=str(missing))
    assert err.desc == f"Failed to stat '{missing}': No such file or directory"
    err = f.qmp.error("block-export-add", type="fuse", id="e1", **{"node-name": "fmt0"},
                      mountpoint=str(f.workdir))
    assert err.desc == f"'{f.workdir}' is not a regular file"
    f.qmp.cmd("block-export-add", type="fuse", id="e1", **{"node-name": "fmt0"},
              mountpoint=str(f.mnt))
    err = f.qmp.error("block-export-add", type="fuse", id="e2", **{"node-name": "fmt0"},
                      mountpoint=str(f.mnt))
    assert err.desc == f"There already is a FUSE export on '{f.mnt}'"


def test_fuse_writable_conflicts_with_nbd_resize(make_fuse, fuse_dir):
    f = make_fuse(export_opts=",writable=on",
                  extra_args=["--nbd-server",
                              f"addr.type=unix,addr.path={fuse_dir / 'nbd.sock'}"])
    err = f.qmp.error("block-export-add", type="nbd", id="n0", **{"node-name": "fmt0"})
    assert err.desc.startswith("Permission conflict on node 'fmt0': permissions 'resize'")


def test_fuse_chmod_chown_kept_in_memory(make_fuse):
    f = make_fuse(export_opts=",writable=on,allow-other=on")
    os.chmod(f.mnt, 0o644)
    assert stat.S_IMODE(f.mnt.stat().st_mode) == 0o644
    os.chown(f.mnt, 1000, 1001)
    st = f.mnt.stat()
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    os.chown(f.mnt, 0, 0)
    with pytest.raises(OSError) as e:
        os.utime(f.mnt)
    assert e.value.errno == errno.EOPNOTSUPP


def test_fuse_allow_other_off_limits_mode_and_owner(make_fuse):
    f = make_fuse(export_opts=",writable=on,allow-other=off")
    with pytest.raises(OSError) as e:
        os.chmod(f.mnt, 0o640)
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        os.chown(f.mnt, 1, 1)
    assert e.value.errno == errno.EOPNOTSUPP


def test_fuse_statfs_answers(make_fuse):
    f = make_fuse()
    st = os.statvfs(f.mnt)
    assert st.f_namemax == 255 and st.f_bsize > 0


# --------------------------------------------------------------------------
# Data


def test_fuse_dd_patterns_in_and_out(make_fuse):
    f = make_fuse(export_opts=",writable=on")
    src = f.workdir / "pattern"
    data = os.urandom(3 * MiB)
    src.write_bytes(data)
    dd(f"if={src}", f"of={f.mnt}", "bs=1M", "seek=5", "conv=notrunc,fsync")
    dd(f"if={src}", f"of={f.mnt}", "bs=4k", "seek=3", "count=5", "conv=notrunc",
       "oflag=direct")
    out = f.workdir / "out"
    dd(f"if={f.mnt}", f"of={out}", "bs=1M", "skip=5", "count=3", "iflag=direct")
    assert out.read_bytes() == data
    with open(f.mnt, "rb") as fh:
        fh.seek(3 * 4096)
        assert fh.read(5 * 4096) == data[:5 * 4096]
        assert fh.read(4096) == bytes(4096)
    # The raw image holds the same bytes.
    with open(f.img, "rb") as fh:
        fh.seek(5 * MiB)
        assert fh.read(3 * MiB) == data


def test_fuse_reads_short_at_end_and_writes_stop_there(make_fuse):
    f = make_fuse(export_opts=",writable=on")
    fd = os.open(f.mnt, os.O_RDWR)
    try:
        assert len(os.pread(fd, 8192, SIZE - 4096)) == 4096
        assert os.pread(fd, 4096, SIZE) == b""
        assert os.pwrite(fd, b"z" * 8192, SIZE - 4096) == 4096
        with pytest.raises(OSError):
            os.pwrite(fd, b"z" * 512, SIZE)
    finally:
        os.close(fd)
    assert f.mnt.stat().st_size == SIZE


def test_fuse_growable_write_past_end_grows(make_fuse):
    f = make_fuse(export_opts=",writable=on,growable=on")
    fd = os.open(f.mnt, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"g" * 4096, SIZE + MiB) == 4096
        assert os.fstat(fd).st_size == SIZE + MiB + 4096
        assert os.pread(fd, 4096, SIZE + MiB) == b"g" * 4096
        assert os.pread(fd, 4096, SIZE) == bytes(4096)
    finally:
        os.close(fd)
    assert f.img.stat().st_size == SIZE + MiB + 4096


def test_fuse_truncate_resizes_qcow2(make_fuse):
    f = make_fuse(fmt="qcow2", export_opts=",writable=on")
    os.truncate(f.mnt, 2 * SIZE)
    assert f.mnt.stat().st_size == 2 * SIZE
    os.truncate(f.mnt, SIZE)
    assert f.mnt.stat().st_size == SIZE


def test_fuse_qemu_img_info_and_compare_against_nbd(make_fuse, fuse_dir):
    nbd_sock = fuse_dir / "nbd.sock"
    f = make_fuse(fmt="qcow2",
                  extra_args=["--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
                              "--export", "type=nbd,id=n0,node-name=fmt0,name=exp,"
                                          "writable=on"])
    uri = harness.nbd_uri(nbd_sock, "exp")
    harness.qemu_io(uri, "write -P 0x5a 0 1M", "write -P 0xa5 10M 64k",
                    "write -P 0x11 60M 4k", fmt=None)
    info = json.loads(harness.qemu_img("info", "-f", "raw", "--output=json",
                                       str(f.mnt)).stdout)
    assert info["virtual-size"] == SIZE
    harness.qemu_img("compare", "-f", "raw", "-F", "raw", str(f.mnt), uri)
    # A later write through NBD is seen through the file at once.
    harness.qemu_io(uri, "write -P 0x77 10M 4k", fmt=None)
    with open(f.mnt, "rb") as fh:
        fh.seek(10 * MiB)
        assert fh.read(4096) == b"\x77" * 4096


def test_fuse_writes_seen_by_nbd_after_export_swap(make_fuse, fuse_dir):
    nbd_sock = fuse_dir / "nbd.sock"
    f = make_fuse(fmt="qcow2", export_opts=",writable=on",
                  extra_args=["--nbd-server", f"addr.type=unix,addr.path={nbd_sock}"])
    model = harness.Model(SIZE)
    with open(f.mnt, "r+b") as fh:
        for off, n, byte in [(0, 65536, 1), (5 * MiB + 512, 3000, 2), (40 * MiB, MiB, 3)]:
            fh.seek(off)
            fh.write(bytes([byte]) * n)
            model.write(off, n, byte)
    f.qmp.cmd("block-export-del", id="fuse0")
    f.qmp.event("BLOCK_EXPORT_DELETED")
    f.qmp.cmd("block-export-add", type="nbd", id="n0", **{"node-name": "fmt0"}, name="exp")
    ref = fuse_dir / "model.raw"
    ref.write_bytes(bytes(model.data))
    harness.qemu_img("compare", "-f", "raw", "-F", "raw", str(ref),
                     harness.nbd_uri(nbd_sock, "exp"))


def test_fuse_seek_data_hole_on_sparse_qcow2(make_fuse, fuse_dir):
    img = harness.create_image(fuse_dir / "sparse.qcow2", SIZE, "qcow2")
    harness.qemu_io(str(img), "write -P 1 1M 64k", "write -P 2 10M 128k", fmt="qcow2")
    f = make_fuse(fmt="qcow2", img=img)
    fd = os.open(f.mnt, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == MiB
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, MiB, os.SEEK_HOLE) == MiB + 65536
        assert os.lseek(fd, MiB + 65536, os.SEEK_DATA) == 10 * MiB
        assert os.lseek(fd, 10 * MiB, os.SEEK_HOLE) == 10 * MiB + 131072
        with pytest.raises(OSError) as e:
            os.lseek(fd, 11 * MiB, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
        assert os.lseek(fd, SIZE, os.SEEK_HOLE) == SIZE
        with pytest.raises(OSError) as e:
            os.lseek(fd, SIZE + 1, os.SEEK_HOLE)
        assert e.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    assert harness.file_extents(f.mnt) == [(MiB, 65536), (10 * MiB, 131072)]


def test_fuse_punch_hole_and_zero_range_read_zeroes(make_fuse):
    f = make_fuse(fmt="qcow2", export_opts=",writable=on")
    dd("if=/dev/urandom", f"of={f.mnt}", "bs=1M", "count=4", "conv=notrunc,fsync")
    harness.run(["fallocate", "--punch-hole", "--keep-size", "--offset", str(MiB),
                 "--length", str(MiB), str(f.mnt)])
    harness.run(["fallocate", "--zero-range", "--keep-size", "--offset", str(3 * MiB),
                 "--length", "65536", str(f.mnt)])
    with open(f.mnt, "rb") as fh:
        fh.seek(MiB)
        assert fh.read(MiB) == bytes(MiB)
        fh.seek(3 * MiB)
        assert fh.read(65536) == bytes(65536)
        fh.seek(0)
        assert fh.read(4096) != bytes(4096)
    # The punched range is a hole again.
    fd = os.open(f.mnt, os.O_RDONLY)
    try:
        assert os.lseek(fd, MiB, os.SEEK_HOLE) == MiB
    finally:
        os.close(fd)


def test_fuse_loop_device_on_mounted_file(make_fuse):
    f = make_fuse(export_opts=",writable=on")
    proc = harness.run(["losetup", "--find", "--show", str(f.mnt)], check=False)
    if proc.returncode != 0:
        pytest.skip(f"no loop device: {proc.stderr.strip()}")
    loop = proc.stdout.strip()
    try:
        data = os.urandom(MiB)
        with open(loop, "r+b", buffering=0) as dev:
            dev.seek(2 * MiB)
            dev.write(data)
            os.fsync(dev.fileno())
        harness.run(["blockdev", "--flushbufs", loop], check=False)
        with open(f.mnt, "rb") as fh:
            fh.seek(2 * MiB)
            assert fh.read(MiB) == data
        assert int(harness.run(["blockdev", "--getsize64", loop]).stdout) == SIZE
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


@pytest.mark.parametrize("iodepth", [
    1,
    # qemu-storage-daemon 10.0's FUSE export writes at wrong offsets once
    # more than one request is in flight (one shared request buffer).
    pytest.param(16, marks=pytest.mark.qsd_only),
])
def test_fuse_fio_randwrite_verify(make_fuse, iodepth):
    harness.require_tool("fio")
    f = make_fuse(fmt="qcow2", export_opts=",writable=on")
    proc = harness.run([
        "fio", "--name=verify", f"--filename={f.mnt}", "--ioengine=libaio", "--direct=1",
        "--rw=randwrite", "--bs=4k", f"--iodepth={iodepth}", "--size=16M",
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
        "--output-format=json",
    ], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 16 * MiB


def test_fuse_export_on_iothread(make_fuse):
    f = make_fuse(export=False, extra_args=["--object", "iothread,id=io0"])
    f.qmp.cmd("block-export-add", type="fuse", id="e1", **{"node-name": "fmt0"},
              mountpoint=str(f.mnt), writable=True, iothread="io0")
    data = os.urandom(MiB)
    with open(f.mnt, "r+b") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
        fh.seek(0)
        assert fh.read(MiB) == data


@pytest.mark.qsd_only
def test_fuse_daemon_can_open_its_own_mounted_file(make_fuse, fuse_dir):
    """A FUSE export without an iothread runs on a thread of its own, so the
    daemon may open the mounted file as a node (or stat it) on its main loop
    without waiting on itself. qemu-storage-daemon 10.0 serves FUSE on its
    main loop and hangs in blockdev-add here."""
    nbd_sock = fuse_dir / "nbd.sock"
    f = make_fuse(export_opts=",writable=on",
                  extra_args=["--nbd-server", f"addr.type=unix,addr.path={nbd_sock}"])
    data = pattern(MiB, 3)
    with open(f.mnt, "r+b") as fh:
        fh.write(data)
    f.qmp.cmd("blockdev-add", driver="file", **{"node-name": "self"}, filename=str(f.mnt))
    f.qmp.cmd("nbd-server-add", device="self", name="self")
    uri = harness.nbd_uri(nbd_sock, "self")
    # The node on the mount reads what was written, as the image holds it.
    harness.qemu_img("compare", "-f", "raw", "-F", "raw", str(f.img), uri)
    harness.qemu_io(uri, "read -P 0x03 0 1", "read -P 0x0a 1 1", fmt=None, extra=["-r"])
    # Another spelling of the same mount point is recognised (a stat of it).
    err = f.qmp.error("block-export-add", type="fuse", id="e1", **{"node-name": "fmt0"},
                      mountpoint=f"{f.mnt.parent}/./{f.mnt.name}")
    assert err.desc.startswith("There already is a FUSE export on")


# --------------------------------------------------------------------------
# Removal


def test_fuse_export_del_unmounts_and_announces(make_fuse):
    f = make_fuse(export_opts=",writable=on")
    f.qmp.cmd("block-export-del", id="fuse0")
    ev = f.qmp.event("BLOCK_EXPORT_DELETED")
    assert ev["data"] == {"id": "fuse0"}
    wait_mounted(f.mnt, want=False)
    assert f.mnt.stat().st_size == 0
    assert f.qmp.cmd("query-block-exports") == []
    # The node is free again: it can be deleted.
    f.qmp.cmd("blockdev-del", **{"node-name": "fmt0"})


def test_fuse_export_del_with_open_file_cuts_it_off(make_fuse):
    f = make_fuse(export_opts=",writable=on")
    fd = os.open(f.mnt, os.O_RDWR)
    try:
        assert len(os.pread(fd, 4096, 0)) == 4096
        f.qmp.cmd("block-export-del", id="fuse0", mode="safe")
        f.qmp.event("BLOCK_EXPORT_DELETED")
        # (An offset never read: qemu 10.0 serves cached pages.)
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, 32 * MiB)
        assert e.value.errno == errno.ENOTCONN
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    wait_mounted(f.mnt, want=False)


def test_fuse_sigterm_unmounts(make_fuse):
    f = make_fuse(export_opts=",writable=on")
    assert f.daemon.stop() == 0
    assert not mounted(f.mnt)
    assert f.mnt.stat().st_size == 0


def test_fuse_unknown_iothread_is_refused(make_fuse):
    f = make_fuse(export=False)
    err = f.qmp.error("block-export-add", type="fuse", id="e1", **{"node-name": "fmt0"},
                      mountpoint=str(f.mnt), iothread="nope")
    assert err.desc == 'iothread "nope" not found'
