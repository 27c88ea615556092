"""A seeded random workload on qcow2 images over several NBD connections.

Each image gets ~10000 operations (unaligned writes of random size, write
zeroes with and without NO_HOLE, trims, flushes, verified reads) from four
libnbd connections at once, each on its own quarter of the disk, mirrored
onto a raw model file. Afterwards ``qemu-img check`` must find nothing and
``qemu-img compare`` must equal the model.

QSD_TEST_SEED=<n> replays a run; a failure prints the seed it used.
"""

from __future__ import annotations

import random
import threading
import zlib
from pathlib import Path

import pytest

import harness
import qcow2_util as U
from qcow2_util import IMG_SIZE, KiB, MiB

DEFAULT_SEED = 20261121
OPS_PER_IMAGE = 10000
CONNECTIONS = 4


def image_plain(opts: str):
    def build(wd: Path) -> Path:
        return U.create_qcow2(wd / "img.qcow2", IMG_SIZE, opts)
    return build


def image_with_backing(wd: Path) -> Path:
    base = U.create_qcow2(wd / "base.qcow2")
    U.fill_pattern(base, "qcow2", seed=3, count=30, zero_count=2)
    return U.create_qcow2(wd / "img.qcow2", backing=base)


# name -> (builder, discard mode of the qcow2 node)
IMAGES = {
    "v3_64k": (image_plain(""), "unmap"),
    "v3_backing": (image_with_backing, "unmap"),
    "v2": (image_plain("compat=0.10"), "unmap"),
    "extended_l2": (image_plain("extended_l2=on"), "unmap"),
    "cluster_4k": (image_plain("cluster_size=4096"), "ignore"),
    "refcount_bits_1": (image_plain("refcount_bits=1"), "unmap"),
}


def random_extent(rng: random.Random, base: int, span: int) -> tuple[int, int]:
    r = rng.random()
    if r < 0.3:
        length = rng.randrange(1, 8 * KiB)
    elif r < 0.6:
        length = rng.choice([512, 4 * KiB, 64 * KiB, 128 * KiB])
    elif r < 0.95:
        length = rng.randrange(1, 256 * KiB)
    else:
        length = rng.randrange(256 * KiB, 2 * MiB)
    offset = rng.randrange(0, span - length)
    if rng.random() < 0.4:
        offset &= ~4095
    return base + offset, length


def gen_ops(rng: random.Random, base: int, span: int, count: int) -> list:
    ops = []
    for _ in range(count):
        r = rng.random()
        off, length = random_extent(rng, base, span)
        if r < 0.40:
            ops.append(("w", off, length, rng.randrange(1 << 30)))
        elif r < 0.50:
            ops.append(("z", off, length))   # may unmap
        elif r < 0.60:
            ops.append(("Z", off, length))   # NBD_CMD_FLAG_NO_HOLE
        elif r < 0.70:
            ops.append(("t", off, length))
        elif r < 0.75:
            ops.append(("f", 0, 0))
        else:
            ops.append(("r", off, min(length, 512 * KiB)))
    ops.append(("f", 0, 0))
    return ops


@pytest.mark.parametrize("name", list(IMAGES))
def test_random_workload_matches_model(name, workdir, start_daemon):
    seed = U.seed_from_env(DEFAULT_SEED) + zlib.crc32(name.encode())
    build, discard = IMAGES[name]
    img = build(workdir)
    model = U.to_raw(img, workdir / "model.raw")
    qd = U.start_qcow2_daemon(start_daemon, workdir)
    qd.add_qcow2("q0", img, discard=discard)
    uri = qd.export("q0", "q0", writable=True)

    span = IMG_SIZE // CONNECTIONS
    rng = random.Random(seed)
    plans = [gen_ops(rng, k * span, span, OPS_PER_IMAGE // CONNECTIONS)
             for k in range(CONNECTIONS)]
    failures: list[str] = []

    def client(k: int) -> None:
        try:
            proc = U.run_worker(uri, plans[k], k * span, span, model, timeout=180)
        except Exception as e:  # noqa: BLE001 (a timeout or spawn failure)
            failures.append(f"connection {k}: {e!r}")
            return
        if proc.returncode != 0:
            failures.append(f"connection {k}: rc={proc.returncode}\n"
                            + proc.stdout.decode(errors="replace")
                            + proc.stderr.decode(errors="replace"))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        U.fail_with_seed(seed, f"{name}: workload failed\n" + "\n".join(failures))

    qd.unexport("q0")
    qd.delete("q0")
    qd.daemon.stop()
    res = U.img_check(img)
    if res.rc != 0 or res.report.get("leaks", 0) or res.report.get("corruptions", 0):
        U.fail_with_seed(seed, f"{name}: qemu-img check rc={res.rc}\n{res.text}")
    cmp = harness.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(img),
                       str(model)], check=False)
    if cmp.returncode != 0:
        U.fail_with_seed(seed, f"{name}: image differs from the model\n{cmp.stdout}"
                               f"{cmp.stderr}")
