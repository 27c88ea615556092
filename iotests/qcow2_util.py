"""Shared helpers for the qcow2 end-to-end tests (test_qcow2_*.py).

- qemu-img wrappers that return parsed JSON (info, map, check);
- patterned images built with qemu-io, and raw models beside them;
- ``QcowDaemon``: a daemon with a QMP monitor and an NBD server, to which the
  tests add qcow2 nodes and exports over QMP;
- NBD helpers: read a whole export, normalised ``nbdinfo --map`` results and
  the maps they must equal, computed from ``qemu-img map``;
- a libnbd worker run in a python that has the ``nbd`` module (the test's
  interpreter may not): it plays a list of operations on one connection and
  mirrors them onto a raw model file;
- the qcow2 header layout, byte patching, and the hostile-image corpus.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pytest

import harness
from harness import Daemon, Monitor, QmpError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
IMG_SIZE = 64 * MiB

# --------------------------------------------------------------------------
# qemu-img


def img_json(*args: str) -> Any:
    """Run ``qemu-img <args> --output=json`` and parse its output."""
    return json.loads(harness.run(["qemu-img", *args[:1], "--output=json", *args[1:]]).stdout)


def img_info(path: Path, *extra: str) -> dict:
    return img_json("info", "-U", *extra, str(path))


def img_map(path: Path | str, *extra: str) -> list[dict]:
    return img_json("map", "-U", *extra, str(path))


@dataclass
class CheckResult:
    rc: int
    report: dict
    text: str


def img_check(path: Path, *extra: str) -> CheckResult:
    """``qemu-img check``: rc 0 clean, 1 check failed, 2 corruptions, 3 leaks only."""
    proc = harness.run(["qemu-img", "check", "--output=json", *extra, str(path)], check=False)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = {}
    return CheckResult(proc.returncode, report, proc.stdout + proc.stderr)


def assert_check_clean(path: Path, allow_leaks: bool = False) -> CheckResult:
    res = img_check(path)
    ok = res.rc == 0 or (allow_leaks and res.rc == 3)
    assert ok, f"qemu-img check {path}: rc={res.rc}\n{res.text}"
    assert res.report.get("corruptions", 0) == 0, res.text
    assert res.report.get("check-errors", 0) == 0, res.text
    if not allow_leaks:
        assert res.report.get("leaks", 0) == 0, res.text
    return res


def to_raw(src: Path | str, out: Path, fmt: Optional[str] = None) -> Path:
    """``qemu-img convert -O raw`` (sparse), the expected content of an image."""
    argv = ["convert", "-U"]
    if fmt:
        argv += ["-f", fmt]
    harness.qemu_img(*argv, "-O", "raw", str(src), str(out))
    return out


def compare(img: Path, raw: Path) -> None:
    """``qemu-img compare`` of a qcow2 image (with its chain) against a raw model."""
    proc = harness.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw",
                        str(img), str(raw)], check=False)
    assert proc.returncode == 0, f"qemu-img compare {img} {raw}:\n{proc.stdout}{proc.stderr}"


def create_qcow2(path: Path, size: int = IMG_SIZE, opts: str = "",
                 backing: Optional[Path] = None) -> Path:
    argv = ["create", "-q", "-f", "qcow2"]
    if opts:
        argv += ["-o", opts]
    if backing is not None:
        argv += ["-b", str(backing), "-F", "qcow2"]
    harness.qemu_img(*argv, str(path), str(size))
    return path


def random_writes(rng: random.Random, size: int, count: int,
                  max_len: int = 2 * MiB) -> list[str]:
    """qemu-io commands: patterned writes of random (often unaligned) extents."""
    cmds = []
    for _ in range(count):
        length = rng.choice([512, 4 * KiB, 64 * KiB + 512, 300 * KiB, rng.randrange(1, max_len)])
        offset = rng.randrange(0, size - length)
        if rng.random() < 0.5:
            offset &= ~511
        cmds.append(f"write -P {rng.randrange(1, 256)} {offset} {length}")
    return cmds


def fill_pattern(path: Path, fmt: str, seed: int, count: int = 24,
                 zero_count: int = 0, size: int = IMG_SIZE) -> None:
    """Seeded patterned writes with qemu-io (and optional ``write -z`` ranges)."""
    rng = random.Random(seed)
    cmds = random_writes(rng, size, count)
    for _ in range(zero_count):
        length = rng.choice([64 * KiB, 512 * KiB, 2 * MiB])
        offset = rng.randrange(0, size - length) & ~(64 * KiB - 1)
        cmds.append(f"write -z {offset} {length}")
    harness.qemu_io(str(path), *cmds, fmt=fmt)


def patterned_raw(path: Path, seed: int, size: int = IMG_SIZE) -> Path:
    """A sparse raw file with seeded patterned and random-data extents."""
    harness.create_image(path, size)
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for i in range(40):
            length = rng.randrange(1, 1536 * KiB)
            f.seek(rng.randrange(0, size - length))
            # Half compressible patterns, half incompressible bytes.
            f.write(bytes([rng.randrange(1, 256)]) * length if i % 2 else rng.randbytes(length))
    return path


# --------------------------------------------------------------------------
# The daemon


@dataclass
class QcowDaemon:
    """A daemon with a QMP monitor and an NBD server on a UNIX socket."""

    daemon: Daemon
    mon: Monitor
    nbd_sock: Path
    workdir: Path

    def uri(self, export: str) -> str:
        return harness.nbd_uri(self.nbd_sock, export)

    def add_qcow2(self, node: str, path: Path | None, **opts: Any) -> None:
        """blockdev-add driver=qcow2 with an inline file child (unless ``file`` given)."""
        args: dict[str, Any] = {"driver": "qcow2", "node-name": node}
        if path is not None:
            args["file"] = {"driver": "file", "filename": str(path)}
            if opts.get("read-only"):
                args["file"]["read-only"] = True
        args.update(opts)
        self.mon.cmd("blockdev-add", **args)

    def export(self, node: str, name: str, writable: bool = False, **opts: Any) -> str:
        self.mon.cmd("block-export-add", type="nbd", id=name, name=name, writable=writable,
                     **{"node-name": node}, **opts)
        return self.uri(name)

    def unexport(self, name: str) -> None:
        # A client that has just exited may not have been seen to go yet
        # (qemu and qsd both notice disconnects asynchronously): a safe
        # block-export-del refuses with "still in use" until then.
        import time

        deadline = time.monotonic() + 10
        while True:
            try:
                self.mon.cmd("block-export-del", id=name)
                break
            except QmpError as err:
                if "still in use" not in err.desc or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.mon.event("BLOCK_EXPORT_DELETED")

    def delete(self, node: str) -> None:
        self.mon.cmd("blockdev-del", **{"node-name": node})

    def nodes(self) -> dict[str, dict]:
        return {n["node-name"]: n for n in self.mon.cmd("query-named-block-nodes")}


def start_qcow2_daemon(start_daemon: Callable[..., Daemon], workdir: Path,
                       name: Optional[str] = None) -> QcowDaemon:
    """Start a daemon with only a monitor, then nbd-server-start over QMP."""
    qmp_sock = workdir / f"{name or 'qmp'}.sock"
    nbd_sock = workdir / f"{name or 'nbd'}-nbd.sock"
    d = start_daemon(harness.monitor_args(qmp_sock), wait_unix=[qmp_sock], name=name)
    mon = d.qmp(qmp_sock)
    mon.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd_sock)}})
    return QcowDaemon(d, mon, nbd_sock, workdir)


def qmp_error(fn: Callable[[], Any]) -> Optional[QmpError]:
    """Run a QMP call; return its error, or None when it succeeded."""
    try:
        fn()
    except QmpError as err:
        return err
    return None


# --------------------------------------------------------------------------
# NBD reads and maps


def nbd_read_all(uri: str, out: Path) -> Path:
    """Copy a whole export to a file with plain reads (no extent shortcuts)."""
    harness.run(["nbdcopy", "--no-extents", uri, str(out)], timeout=120)
    return out


def _merge(entries: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[list[int]] = []
    for off, length, typ in entries:
        if length == 0:
            continue
        if out and out[-1][2] == typ and out[-1][0] + out[-1][1] == off:
            out[-1][1] += length
        else:
            out.append([off, length, typ])
    return [tuple(e) for e in out]  # type: ignore[misc]


def nbd_map(uri: str, context: str = "base:allocation") -> list[tuple[int, int, int]]:
    """``nbdinfo --map=<context>`` as merged (offset, length, type) tuples."""
    out = harness.run(["nbdinfo", f"--map={context}", "--json", uri]).stdout
    return _merge([(e["offset"], e["length"], e["type"]) for e in json.loads(out)])


def expected_allocation(qmap: list[dict]) -> list[tuple[int, int, int]]:
    """base:allocation from qemu-img map: bit 0 hole (no data), bit 1 zero."""
    return _merge([(e["start"], e["length"],
                    (0 if e["data"] else 1) | (2 if e["zero"] else 0)) for e in qmap])


def expected_depth(qmap: list[dict]) -> list[tuple[int, int, int]]:
    """qemu:allocation-depth from qemu-img map: 0 unallocated, 1 top, 2 backing, ..."""
    return _merge([(e["start"], e["length"], e["depth"] + 1 if e["present"] else 0)
                   for e in qmap])


# --------------------------------------------------------------------------
# libnbd worker: operations on one connection, mirrored onto a raw model

WORKER = r'''
import json, random, sys, time
import nbd

spec = json.load(sys.stdin)
base, length = spec["base"], spec["length"]
model = bytearray(length)
track = length > 0  # without a range the worker only plays the ops
if spec.get("model"):
    with open(spec["model"], "rb") as f:
        f.seek(base)
        model[:] = f.read(length).ljust(length, b"\0")
h = nbd.NBD()
h.connect_uri(spec["uri"])
log = sys.stdout

def data(seed, n):
    return random.Random(seed).randbytes(n)

for i, op in enumerate(spec["ops"]):
    kind, off, n = op[0], op[1], op[2]
    rel = off - base
    try:
        if kind == "w":
            buf = data(op[3], n)
            h.pwrite(buf, off)
            if track:
                model[rel:rel + n] = buf
        elif kind in ("z", "Z"):
            h.zero(n, off, nbd.CMD_FLAG_NO_HOLE if kind == "Z" else 0)
            if track:
                model[rel:rel + n] = bytes(n)
        elif kind == "t":
            h.trim(n, off)
            # Trimmed bytes are undefined by NBD; here each must be old or zero.
            got = h.pread(n, off) if track else None
            old = model[rel:rel + n]
            if track and got != old:
                bad = next((j for j in range(n) if got[j] not in (0, old[j])), None)
                if bad is not None:
                    print(f"MISMATCH trim {off + bad:#x}", file=log, flush=True)
                    sys.exit(3)
                model[rel:rel + n] = got
        elif kind == "r":
            got = h.pread(n, off)
            if got != model[rel:rel + n]:
                bad = next(j for j in range(n) if got[j] != model[rel + j])
                print(f"MISMATCH read op {i} at {off + bad:#x}", file=log, flush=True)
                sys.exit(3)
        elif kind == "f":
            h.flush()
    except nbd.Error as e:
        print(f"ERROR op {i} {op!r}: {e} errno={e.errno}", file=log, flush=True)
        sys.exit(2)
    if spec.get("log"):
        print(f"done {i}", file=log, flush=True)
if spec.get("model"):
    with open(spec["model"], "r+b") as f:
        f.seek(base)
        f.write(model)
h.shutdown()
print("ok", file=log, flush=True)
'''


READER = r'''
import json, sys
import nbd

spec = json.load(sys.stdin)
def connect():
    h = nbd.NBD()
    h.connect_uri(spec["uri"])
    return h

def attempt(fn, off, out):
    global h
    try:
        fn(off)
        out.append([off, 0, ""])
    except nbd.Error as e:
        if h.aio_is_closed() or h.aio_is_dead():
            # The server dropped the connection: note it and go on with a new one.
            out.append([off, "disconnect", e.string])
            h = connect()
        else:
            out.append([off, e.errno or -1, e.string])

h = connect()
size = h.get_size()
chunk = spec["chunk"]
res, writes = [], []
for off in range(0, size, chunk):
    attempt(lambda o: h.pread(min(chunk, size - o), o), off, res)
if spec.get("write"):
    # A small write at the start of every chunk, then a flush.
    for off in range(0, size, chunk):
        attempt(lambda o: h.pwrite(b"\xa5" * min(4096, size - o), o), off, writes)
    attempt(lambda o: h.flush(), 0, writes)
print(json.dumps({"size": size, "chunks": res, "writes": writes}))
'''


def nbd_read_chunks(uri: str, chunk: int = MiB, timeout: float = 60,
                    write: bool = False) -> dict:
    """Read a whole export chunk by chunk; errors are reported, not raised.

    Returns {"size": n, "chunks": [[offset, error, message], ...], "writes": [...]}
    where error is 0 (it worked), an errno name such as "EIO", or "disconnect"
    (the server closed the connection; the reader reconnected). With ``write``
    a 4 KiB write at the start of every chunk and a flush follow the reads.
    """
    proc = subprocess.run([harness.nbd_python(), "-c", READER],
                          input=json.dumps({"uri": uri, "chunk": chunk,
                                            "write": write}).encode(),
                          capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"NBD reader failed on {uri}: rc={proc.returncode}\n"
                    f"{proc.stdout.decode(errors='replace')}{proc.stderr.decode(errors='replace')}",
                    pytrace=False)
    return json.loads(proc.stdout)


def worker_argv() -> list[str]:
    return [harness.nbd_python(), "-c", WORKER]


def run_worker(uri: str, ops: list, base: int = 0, length: int = 0,
               model: Optional[Path] = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Play ``ops`` on one NBD connection; the model file's range is updated in place.

    ops: ("w", off, len, seed) random data, ("z"/"Z", off, len) zeroes without /
    with NO_HOLE, ("t", off, len) trim, ("r", off, len) verified read, ("f", 0, 0) flush.
    """
    spec = {"uri": uri, "ops": ops, "base": base, "length": length,
            "model": str(model) if model else None}
    return subprocess.run(worker_argv(), input=json.dumps(spec).encode(),
                          capture_output=True, timeout=timeout)


def spawn_worker(uri: str, ops: list) -> subprocess.Popen:
    """Start a worker that prints "done <i>" after each completed op; no model."""
    spec = {"uri": uri, "ops": ops, "base": 0, "length": 0, "model": None, "log": True}
    proc = subprocess.Popen(worker_argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    proc.stdin = None  # so that communicate() does not flush it again
    return proc


def op_data(seed: int, n: int) -> bytes:
    """The bytes the worker writes for ("w", off, n, seed)."""
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------
# qcow2 header

HEADER_FIELDS = {
    "magic": (0, ">I"), "version": (4, ">I"), "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"), "cluster_bits": (20, ">I"), "size": (24, ">Q"),
    "crypt_method": (32, ">I"), "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"), "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"),
    "header_length": (100, ">I"), "compression_type": (104, ">B"),
}
INCOMPAT_CORRUPT = 1 << 1
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
FEATURE_TABLE_MAGIC = 0x6803F857


def read_at(path: Path, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def patch(path: Path, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def header(path: Path) -> dict[str, int]:
    raw = read_at(path, 0, 112)
    return {k: struct.unpack_from(fmt, raw, off)[0] for k, (off, fmt) in HEADER_FIELDS.items()}


def set_field(path: Path, name: str, value: int) -> None:
    off, fmt = HEADER_FIELDS[name]
    patch(path, off, struct.pack(fmt, value))


def read_u64(path: Path, off: int) -> int:
    return struct.unpack(">Q", read_at(path, off, 8))[0]


def write_u64(path: Path, off: int, value: int) -> None:
    patch(path, off, struct.pack(">Q", value))


def extensions(path: Path) -> list[tuple[int, int, int]]:
    """Header extensions of a v3 image: (offset of the type field, type, length)."""
    hdr = header(path)
    off, out = hdr["header_length"], []
    end = 1 << hdr["cluster_bits"]
    while off + 8 <= end:
        typ, length = struct.unpack(">II", read_at(path, off, 8))
        if typ == 0:
            break
        out.append((off, typ, length))
        off += 8 + (length + 7) // 8 * 8
    return out


def first_l2(path: Path) -> int:
    """Offset of the L2 table of L1 entry 0 (the image must have data there)."""
    l1 = header(path)["l1_table_offset"]
    l2 = read_u64(path, l1) & L2E_OFFSET_MASK
    assert l2, "L1 entry 0 is unallocated"
    return l2


# --------------------------------------------------------------------------
# Hostile corpus

CORPUS_SIZE = 8 * MiB


def corpus_base(path: Path) -> Path:
    """A valid 8 MiB v3 image with data in the first clusters and at 5 MiB."""
    create_qcow2(path, CORPUS_SIZE)
    harness.qemu_io(str(path), "write -P 0x11 0 192k", "write -P 0x22 5M 64k",
                    "write -z 6M 64k", fmt="qcow2")
    return path


def _copy(base: Path, out: Path) -> Path:
    shutil.copyfile(base, out)
    return out


def _set(name: str, value: int) -> Callable[[Path], None]:
    return lambda p: set_field(p, name, value)


def _truncate(size: int | None = None, fraction: float | None = None) -> Callable[[Path], None]:
    def apply(p: Path) -> None:
        n = size if size is not None else int(os.path.getsize(p) * (fraction or 0))
        os.truncate(p, n)
    return apply


def _l1_past_eof(p: Path) -> None:
    set_field(p, "l1_table_offset", (os.path.getsize(p) + GiB) & ~0xFFFF)


def _misaligned_l2(p: Path) -> None:
    l1 = header(p)["l1_table_offset"]
    write_u64(p, l1, read_u64(p, l1) + 512)


def _l1_entry_past_eof(p: Path) -> None:
    l1 = header(p)["l1_table_offset"]
    write_u64(p, l1, (read_u64(p, l1) & ~L2E_OFFSET_MASK) | 64 * GiB)


def _l2_entry_past_eof(p: Path) -> None:
    l2 = first_l2(p)
    write_u64(p, l2, (read_u64(p, l2) & ~L2E_OFFSET_MASK) | 64 * GiB)


def _l2_entries_shared(p: Path) -> None:
    l2 = first_l2(p)
    write_u64(p, l2 + 8, read_u64(p, l2))


def _l2_garbage_compressed(p: Path) -> None:
    l2 = first_l2(p)
    write_u64(p, l2, (1 << 62) | 0x3FFFFFFFFFFFFFFF)


def _refcount_block_at_header(p: Path) -> None:
    """The refcount table (so its first block entry) placed on the header cluster."""
    set_field(p, "refcount_table_offset", 0)


def _refcount_entry_past_eof(p: Path) -> None:
    rt = header(p)["refcount_table_offset"]
    write_u64(p, rt, 64 * GiB)


def _ext_past_cluster(p: Path) -> None:
    exts = extensions(p)
    assert exts, "no header extension to patch"
    off = exts[0][0]
    patch(p, off + 4, struct.pack(">I", 0xFFF0))


def _snapshots_huge(p: Path) -> None:
    set_field(p, "nb_snapshots", 0xFFFFFFFF)
    set_field(p, "snapshots_offset", 0x10000)


HOSTILE: dict[str, Callable[[Path], None]] = {
    "truncated_header": _truncate(size=64),
    "truncated_half": _truncate(fraction=0.5),
    "l1_offset_past_eof": _l1_past_eof,
    "l1_size_huge": _set("l1_size", 0x7FFFFFFF),
    "l1_size_max": _set("l1_size", 0xFFFFFFFF),
    "refcount_table_clusters_huge": _set("refcount_table_clusters", 0xFFFFFFFF),
    "misaligned_l2_offset": _misaligned_l2,
    "l1_entry_past_eof": _l1_entry_past_eof,
    "l2_entry_past_eof": _l2_entry_past_eof,
    "l2_entries_same_cluster": _l2_entries_shared,
    "l2_garbage_compressed": _l2_garbage_compressed,
    "refcount_table_at_header": _refcount_block_at_header,
    "refcount_table_entry_past_eof": _refcount_entry_past_eof,
    "l1_table_at_header": _set("l1_table_offset", 0),
    "header_length_huge": _set("header_length", 0xFFFFFFF0),
    "extension_past_cluster": _ext_past_cluster,
    "cluster_bits_8": _set("cluster_bits", 8),
    "cluster_bits_22": _set("cluster_bits", 22),
    "snapshot_count_huge": _snapshots_huge,
    "version_4": _set("version", 4),
    "refcount_order_7": _set("refcount_order", 7),
    "bad_magic": _set("magic", 0x51464900),
    "size_huge": _set("size", 1 << 62),
}


def hostile_corpus(workdir: Path) -> list[tuple[str, Path]]:
    """Build every hostile image from one valid qemu-img image."""
    base = corpus_base(workdir / "corpus-base.qcow2")
    out = []
    for name, mutate in HOSTILE.items():
        path = _copy(base, workdir / f"hostile-{name}.qcow2")
        mutate(path)
        out.append((name, path))
    return out


def seed_from_env(default: int) -> int:
    value = os.environ.get("QSD_TEST_SEED")
    return int(value, 0) if value else default


def fail_with_seed(seed: int, msg: str) -> None:
    pytest.fail(f"{msg}\n(seed {seed}; rerun with QSD_TEST_SEED={seed})", pytrace=False)


def wait_unlocked(path: Path, timeout: float = 20.0) -> None:
    """Wait until no other process holds a lock on ``path``.

    A daemon killed with SIGKILL can keep its image locked for a moment after
    it has been reaped: files used by io_uring requests are closed by the
    kernel asynchronously, when the ring is torn down. qemu-img and a new
    daemon would then fail with 'Failed to get "write" lock'.
    """
    import fcntl
    import time

    deadline = time.monotonic() + timeout
    with open(path, "rb+") as f:
        while True:
            try:
                # A whole-file POSIX lock conflicts with any OFD or POSIX
                # lock another process holds on the file.
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.lockf(f, fcntl.LOCK_UN)
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{path} still locked {timeout}s after its daemon exited",
                                pytrace=False)
                time.sleep(0.02)
