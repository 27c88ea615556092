"""kill -9 during a qcow2 write workload: no corruption, flushed data survives.

Each round exports a fresh qcow2 image, plays allocating writes, write
zeroes, trims and flushes on one NBD connection (one op at a time, each
logged when acknowledged), and kills the daemon with SIGKILL at a random
moment. Then:
- ``qemu-img check`` finds no corruption (exit 0, or 3 = leaked clusters
  only, which qemu allows after a crash);
- every byte whose last operation was acknowledged before the last
  completed flush reads back as written; bytes touched by trims, or by
  operations after that flush, may hold either state.
Rounds with lazy-refcounts=on reopen the image in the daemon first (the
dirty-bit repair runs at open), after which the check must be fully clean.

QSD_CRASH_ROUNDS sets the number of rounds (default 12), QSD_TEST_SEED the seed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import harness
import qcow2_util as U
from qcow2_util import IMG_SIZE, KiB

ROUNDS = int(os.environ.get("QSD_CRASH_ROUNDS", "12"))
DEFAULT_SEED = 4242


def gen_ops(rng: random.Random, count: int = 3000) -> list:
    ops = []
    for _ in range(count):
        r = rng.random()
        length = rng.choice([512, 4 * KiB, 64 * KiB, rng.randrange(1, 300 * KiB)])
        off = rng.randrange(0, IMG_SIZE - length)
        if rng.random() < 0.5:
            off &= ~4095
        if r < 0.65:
            ops.append(("w", off, length, rng.randrange(1 << 30)))
        elif r < 0.75:
            ops.append(("z" if r < 0.7 else "Z", off, length))
        elif r < 0.85:
            ops.append(("t", off, length))
        else:
            ops.append(("f", 0, 0))
    return ops


def expected_after_crash(ops: list, last_done: int) -> tuple[bytearray, bytearray]:
    """The model and a mask (1 = byte must match) after a crash.

    Ops up to the last completed flush are durable; trims leave undefined
    bytes; ops after that flush (and the one in flight) may or may not have
    landed.
    """
    flushed = max((i for i in range(last_done + 1) if ops[i][0] == "f"), default=-1)
    model = bytearray(IMG_SIZE)
    known = bytearray(b"\x01") * IMG_SIZE
    for i, op in enumerate(ops[:min(last_done + 2, len(ops))]):
        kind, off, n = op[0], op[1], op[2]
        if kind == "f":
            continue
        if i > flushed or kind == "t":
            known[off:off + n] = bytes(n)
            continue
        model[off:off + n] = U.op_data(op[3], n) if kind == "w" else bytes(n)
        known[off:off + n] = b"\x01" * n
    return model, known


def first_mismatch(actual: bytes, model: bytearray, known: bytearray) -> int | None:
    """Offset of the first known byte that differs, or None."""
    pos, size = 0, len(model)
    while pos < size:
        start = known.find(b"\x01", pos)
        if start < 0:
            return None
        end = known.find(b"\x00", start)
        end = size if end < 0 else end
        if actual[start:end] != model[start:end]:
            return next(i for i in range(start, end) if actual[i] != model[i])
        pos = end
    return None


def collect_progress(worker: subprocess.Popen, done: list[int], other: list[str]) -> None:
    """Collect the worker's "done <i>" lines as they come (in a thread)."""
    assert worker.stdout is not None
    for raw in worker.stdout:
        line = raw.decode(errors="replace")
        if line.startswith("done "):
            done.append(int(line.split()[1]))
        else:
            other.append(line)


def daemon_args(img: Path, wd: Path) -> tuple[list[str], Path, Path]:
    qmp, nbd = wd / "qmp.sock", wd / "nbd.sock"
    return [
        *harness.monitor_args(qmp),
        "--blockdev", f"driver=file,node-name=file0,filename={img}",
        "--blockdev", "driver=qcow2,node-name=fmt0,file=file0,discard=unmap",
        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
        "--export", "type=nbd,id=exp0,node-name=fmt0,name=exp,writable=on",
    ], qmp, nbd


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_kill_during_writes_keeps_image_consistent(round_, workdir, start_daemon):
    seed = U.seed_from_env(DEFAULT_SEED) + round_
    rng = random.Random(seed)
    lazy = round_ % 3 == 2
    img = U.create_qcow2(workdir / "crash.qcow2", IMG_SIZE,
                         "lazy_refcounts=on" if lazy else "")
    args, qmp, nbd = daemon_args(img, workdir)
    d = start_daemon(args, wait_unix=[qmp, nbd], name="victim")
    ops = gen_ops(rng)
    worker = U.spawn_worker(harness.nbd_uri(nbd, "exp"), ops)
    done: list[int] = []
    out_tail: list[str] = []
    reader = threading.Thread(target=collect_progress, args=(worker, done, out_tail))
    reader.start()
    # Kill after a random number of acknowledged ops, plus a random delay
    # so that the signal lands anywhere inside an op.
    target = rng.randrange(20, len(ops) - 100)
    deadline = time.monotonic() + 60
    while len(done) < target and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(rng.uniform(0, 0.01))
    d.signal(signal.SIGKILL)
    d.wait()
    U.wait_unlocked(img)
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
        U.fail_with_seed(seed, "the NBD client hung after the daemon was killed")
    reader.join(10)
    if len(done) < target:
        U.fail_with_seed(seed, f"round {round_}: the workload stopped after {len(done)} "
                               f"ops, before the kill:\n" + "".join(out_tail[-5:]))
    last_done = max(done, default=-1)

    if lazy:
        dirty = U.header(img)["incompatible_features"] & 1
        print(f"round {round_}: dirty bit after the kill: {dirty}")
        # Opening read-write repairs the refcounts of a dirty image.
        args, qmp, nbd = daemon_args(img, workdir)
        d2 = start_daemon(args, wait_unix=[qmp, nbd], name="repair")
        d2.stop()
        U.wait_unlocked(img)
        res = U.img_check(img)
        if res.rc != 0 or res.report.get("leaks", 0):
            U.fail_with_seed(seed, f"round {round_} (lazy refcounts, {last_done + 1} ops "
                                   f"done): check after repair rc={res.rc}\n{res.text}")
    else:
        res = U.img_check(img)
        if res.rc not in (0, 3) or res.report.get("corruptions", 0):
            U.fail_with_seed(seed, f"round {round_} ({last_done + 1} ops done): qemu-img "
                                   f"check rc={res.rc}\n{res.text}")

    actual = U.to_raw(img, workdir / "after.raw").read_bytes()
    model, known = expected_after_crash(ops, last_done)
    bad = first_mismatch(actual, model, known)
    if bad is not None:
        U.fail_with_seed(seed, f"round {round_}: byte {bad:#x} lost after the crash "
                               f"({last_done + 1} ops acknowledged)")
    print(f"round {round_}: {last_done + 1} ops acknowledged, check rc {res.rc}")
