"""NBD protocol details checked with libnbd's tools (nbdinfo, nbdcopy, nbdsh)."""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest

import harness
from harness import qemu_img, qemu_io

KiB = 1024
MiB = 1024 * KiB


def nbdinfo_json(uri: str, *extra: str) -> dict:
    return json.loads(harness.run(["nbdinfo", "--json", *extra, uri]).stdout)


def test_nbdinfo_json_flags(make_env):
    env = make_env(export_opts=",description=test disk")
    info = nbdinfo_json(env.uri)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    exp = info["exports"][0]
    assert exp["export-name"] == "exp"
    assert exp["export-size"] == env.size
    assert exp["description"] == "test disk"
    assert exp["is_read_only"] is False
    assert "base:allocation" in exp["contexts"]
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_cache",
                 "can_multi_conn", "can_df"):
        assert exp[flag] is True, flag
    assert exp["block_size_minimum"] >= 1
    assert exp["block_size_maximum"] >= 32 * MiB


def test_nbdinfo_read_only_export(make_env):
    env = make_env(writable=False)
    exp = nbdinfo_json(env.uri)["exports"][0]
    assert exp["is_read_only"] is True
    assert exp["can_trim"] is False and exp["can_zero"] is False


def test_nbdinfo_list(make_env, workdir):
    env = make_env()
    env.qmp.cmd("block-export-add", type="nbd", id="second", name="two",
                description="the second", **{"node-name": "fmt0"})
    out = harness.run(["nbdinfo", "--list", harness.nbd_uri(env.nbd_sock)]).stdout
    assert 'export="exp"' in out and 'export="two"' in out
    assert "description: the second" in out
    listed = json.loads(harness.run(["nbdinfo", "--list", "--json",
                                     harness.nbd_uri(env.nbd_sock)]).stdout)
    assert sorted(e["export-name"] for e in listed["exports"]) == ["exp", "two"]


def expected_map(extents: list[tuple[int, int]], size: int) -> list[tuple[int, int, int]]:
    """Turn data extents into nbdinfo --map entries: (offset, length, type)."""
    out, pos = [], 0
    for off, length in extents:
        if off > pos:
            out.append((pos, off - pos, 3))
        out.append((off, length, 0))
        pos = off + length
    if pos < size:
        out.append((pos, size - pos, 3))
    return out


def test_nbdinfo_map_matches_sparse_layout(workdir, make_env):
    size = 16 * MiB
    img = harness.create_image(workdir / "sparse.raw", size)
    with open(img, "r+b") as f:
        for off, length in [(MiB, 64 * KiB), (5 * MiB, 512 * KiB), (15 * MiB, MiB)]:
            f.seek(off)
            f.write(b"\xd7" * length)
    env = make_env(img=img, size=size)
    got = json.loads(harness.run(["nbdinfo", "--map", "--json", env.uri]).stdout)
    got = [(e["offset"], e["length"], e["type"]) for e in got]
    assert got == expected_map(harness.file_extents(img), size)
    assert (MiB, 64 * KiB, 0) in got and (5 * MiB, 512 * KiB, 0) in got


def test_nbdcopy_out_and_in(env, workdir):
    qemu_io(env.uri, "write -P 0x1f 0 2M", "write -P 0x2f 50M 3M")
    out = workdir / "out.raw"
    harness.run(["nbdcopy", env.uri, str(out)])
    qemu_img("compare", "-f", "raw", "-F", "raw", str(out), str(env.img))
    src = harness.create_image(workdir / "src.raw", env.size)
    qemu_io(str(src), "write -P 0x3f 7M 9M")
    harness.run(["nbdcopy", str(src), env.uri])
    qemu_img("compare", "-f", "raw", "-F", "raw", str(src), str(env.img))


# nbdsh scripts run in libnbd's python with `h` connected and `nbd` imported.

STRUCTURED_READ = """
assert h.get_structured_replies_negotiated()
chunks = []
def chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status, bytes(buf) == bytes(len(buf))))
    return 0
# 64k of data at 1 MiB followed by 64k of hole.
buf = h.pread_structured(128 * 1024, 1024 * 1024, chunk)
assert bytes(buf[:65536]) == b"\\xd7" * 65536, "data"
assert bytes(buf[65536:]) == bytes(65536), "hole reads as zero"
kinds = [c[2] for c in chunks]
assert nbd.READ_HOLE in kinds, chunks
assert all(c[3] for c in chunks if c[2] == nbd.READ_HOLE)
print("chunks", chunks)
"""

BLOCK_STATUS = """
seen = []
def extents(meta, offset, entries, err):
    assert meta == nbd.CONTEXT_BASE_ALLOCATION
    seen.append((offset, list(entries)))
    return 0
h.block_status(4 * 1024 * 1024, 0, extents)
offset, entries = seen[0]
assert offset == 0
runs = []
pos = 0
for i in range(0, len(entries), 2):
    runs.append((pos, entries[i], entries[i + 1]))
    pos += entries[i]
print("runs", runs)
def flags_at(off):
    for start, length, flags in runs:
        if start <= off < start + length:
            return flags
    raise AssertionError("offset %d not covered: %r" % (off, runs))
assert flags_at(1024 * 1024) & nbd.STATE_HOLE == 0, "data at 1M"
assert flags_at(2 * 1024 * 1024) == nbd.STATE_HOLE | nbd.STATE_ZERO, "hole at 2M"
"""

COMMANDS = """
import errno
size = h.get_size()
assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_cache()
h.pwrite(b"\\x5e" * 65536, 0, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 0) == b"\\x5e" * 65536
h.flush()
h.pwrite(b"\\x6e" * 4096, 8 * 1024 * 1024)
h.flush()
h.cache(1024 * 1024, 0)
h.trim(1024 * 1024, 4 * 1024 * 1024)
h.zero(65536, 65536, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, 65536) == bytes(65536)
if h.can_fast_zero():
    before = h.pread(4096, 12 * 1024 * 1024)
    try:
        h.zero(1024 * 1024, 12 * 1024 * 1024, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(4096, 12 * 1024 * 1024) == bytes(4096)
        print("fast zero done")
    except nbd.Error as e:
        assert e.errno == "ENOTSUP", e
        assert h.pread(4096, 12 * 1024 * 1024) == before
        print("fast zero refused")
# Beyond the end is an error, the connection stays usable.
try:
    h.pread(4096, size)
    raise AssertionError("read past end succeeded")
except nbd.Error as e:
    assert e.errno in ("EINVAL", "ENOSPC"), e
assert h.pread(4096, 0) == b"\\x5e" * 4096
"""


@pytest.fixture
def sparse_env(workdir, make_env):
    size = 16 * MiB
    img = harness.create_image(workdir / "sparse.raw", size)
    with open(img, "r+b") as f:
        f.seek(MiB)
        f.write(b"\xd7" * (64 * KiB))
    return make_env(img=img, size=size)


def test_nbdsh_structured_read_over_hole(sparse_env):
    harness.nbdsh(sparse_env.uri, STRUCTURED_READ)


def test_nbdsh_block_status_base_allocation(sparse_env):
    harness.nbdsh(sparse_env.uri, BLOCK_STATUS, base_allocation=True)


def test_nbdsh_fua_flush_trim_cache_zero(sparse_env):
    harness.nbdsh(sparse_env.uri, COMMANDS)
    with open(sparse_env.img, "rb") as f:
        assert f.read(65536) == b"\x5e" * 65536
        assert f.read(65536) == bytes(65536)
        f.seek(8 * MiB)
        assert f.read(4096) == b"\x6e" * 4096


def test_max_connections_refuses_second_client(make_env):
    env = make_env(nbd_opts=",max-connections=1")
    first = harness.connect_unix(env.nbd_sock)
    harness.nbd_handshake(first, "exp")
    second = harness.connect_unix(env.nbd_sock, timeout=1.5)
    # The second client gets no greeting: either nothing or a closed socket.
    try:
        data = second.recv(18)
        assert data == b"", f"second client was served: {data!r}"
    except (socket.timeout, ConnectionResetError):
        pass
    finally:
        second.close()
    # The first client still works.
    assert harness.nbd_simple_read(first, 0, 512) == bytes(512)
    first.close()
    # Once it is gone, a new client is served (the daemon may need a moment).
    deadline = time.monotonic() + 5
    while True:
        out = qemu_io(env.uri, "read 0 4k", check=False)
        if out.returncode == 0 and "failed" not in out.stdout:
            break
        assert time.monotonic() < deadline, out.stderr
        time.sleep(0.1)


def test_garbage_client_is_dropped_others_continue(env):
    qemu_io(env.uri, "write -P 0x71 0 4k")
    good = harness.connect_unix(env.nbd_sock)
    harness.nbd_handshake(good, "exp")
    bad = harness.connect_unix(env.nbd_sock)
    harness.nbd_handshake(bad, "exp")
    bad.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512) + b"\xff" * 64)
    # The server may send an error reply first; then it must hang up.
    try:
        while bad.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        pytest.fail("bad client not disconnected", pytrace=False)
    finally:
        bad.close()
    assert harness.nbd_simple_read(good, 0, 4096) == b"\x71" * 4096
    good.close()
    qemu_io(env.uri, "read -P 0x71 0 4k")


def test_garbage_during_handshake_is_dropped(env):
    s = harness.connect_unix(env.nbd_sock)
    harness.nbd_greeting(s)
    s.sendall(b"\x00\x00\x00\x03" + b"this is not an option header" * 4)
    try:
        while s.recv(4096):
            pass  # the server may send an error reply before closing
    except ConnectionResetError:
        pass
    except socket.timeout:
        pytest.fail("client not disconnected after a bad option", pytrace=False)
    s.close()
    qemu_io(env.uri, "read 0 4k")
