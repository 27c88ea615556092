"""Data through an NBD export, checked with qemu-io, qemu-img and a byte model."""

from __future__ import annotations

import json
import random
import threading

import harness
from harness import Model, qemu_img, qemu_io

KiB = 1024
MiB = 1024 * KiB


def holes_cover(path, offset: int, length: int) -> bool:
    """True when [offset, offset+length) has no data extent in the file."""
    return all(o + n <= offset or o >= offset + length for o, n in harness.file_extents(path))


def test_write_read_patterns_match_model(env):
    model = Model(env.size)
    cmds = []
    rng = random.Random(1234)
    for i in range(24):
        length = rng.choice([512, 4 * KiB, 64 * KiB, 300 * KiB, MiB + 512])
        offset = rng.randrange(0, env.size - length) // 512 * 512
        pattern = (i * 37 + 1) & 0xFF
        cmds.append(f"write -P {pattern} {offset} {length}")
        model.write(offset, length, pattern)
    qemu_io(env.uri, *cmds)
    # Read back through the export in 1 MiB pieces and compare to the model.
    with open(env.img, "rb") as f:
        assert f.read() == model.data
    for off in range(0, 8 * MiB, MiB):
        pattern = model.data[off]
        if model.data[off:off + MiB] == bytes([pattern]) * MiB:
            qemu_io(env.uri, f"read -P {pattern} {off} {MiB}")
    model.check_file(env.img)


def test_aio_writes_in_flight(env):
    model = Model(env.size)
    cmds = []
    for i in range(16):
        cmds.append(f"aio_write -P {i + 1} {i * 256 * KiB} {128 * KiB}")
        model.write(i * 256 * KiB, 128 * KiB, i + 1)
    cmds.append("aio_flush")
    for i in range(16):
        cmds.append(f"aio_read -P {i + 1} {i * 256 * KiB} {128 * KiB}")
    cmds.append("aio_flush")
    qemu_io(env.uri, *cmds)
    model.check_file(env.img)


def test_32_concurrent_aio_reads_and_writes(env):
    model = Model(env.size)
    writes = [f"aio_write -P {0x80 + i} {i * 64 * KiB} {64 * KiB}" for i in range(32)]
    for i in range(32):
        model.write(i * 64 * KiB, 64 * KiB, 0x80 + i)
    reads = [f"aio_read -P {0x80 + i} {i * 64 * KiB} {64 * KiB}" for i in range(32)]
    # Interleave new writes elsewhere with reads of settled data.
    more = [f"aio_write -P {i + 1} {4 * MiB + i * 4 * KiB} {4 * KiB}" for i in range(32)]
    for i in range(32):
        model.write(4 * MiB + i * 4 * KiB, 4 * KiB, i + 1)
    mixed = [c for pair in zip(reads, more) for c in pair]
    qemu_io(env.uri, *writes, "aio_flush", *mixed, "aio_flush")
    model.check_file(env.img)


def test_parallel_clients_disjoint_regions(env):
    """Four qemu-io processes write at once; every byte lands."""
    model = Model(env.size)
    errors = []

    def client(k: int) -> None:
        try:
            base = k * 8 * MiB
            qemu_io(env.uri, *[f"write -P {k * 16 + j + 1} {base + j * MiB} {MiB}"
                               for j in range(8)])
        except BaseException as e:  # pytest.fail raises BaseException
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(4):
        for j in range(8):
            model.write(k * 8 * MiB + j * MiB, MiB, k * 16 + j + 1)
    model.check_file(env.img)


def test_write_zeroes_and_discard(env):
    model = Model(env.size)
    qemu_io(env.uri, f"write -P 0xee 0 {8 * MiB}")
    model.write(0, 8 * MiB, 0xEE)
    qemu_io(env.uri, f"write -z {MiB} {MiB}", "write -z -u 4M 1M", "discard 6M 1M",
            f"read -P 0 {MiB} {MiB}", "read -P 0 4M 1M", "read -P 0 6M 1M",
            "read -P 0xee 2M 2M")
    model.zero(MiB, MiB)
    model.zero(4 * MiB, MiB)
    model.zero(6 * MiB, MiB)  # discard=unmap on the nodes: the file is punched
    model.check_file(env.img)
    # An unmapping zero write and a discard leave holes in the file.
    assert holes_cover(env.img, 4 * MiB, MiB)
    assert holes_cover(env.img, 6 * MiB, MiB)


def test_discard_ignored_by_default(make_env):
    """Without discard=unmap the nodes ignore discards; data stays."""
    env = make_env(node_opts="")
    qemu_io(env.uri, "write -P 0x33 0 1M", "discard 0 1M", "read -P 0x33 0 1M")
    with open(env.img, "rb") as f:
        assert f.read(MiB) == b"\x33" * MiB


def test_qemu_img_info_and_compare(env):
    qemu_io(env.uri, "write -P 0x10 0 1M", "write -P 0x20 32M 1M")
    info = json.loads(qemu_img("info", "--output=json", env.uri).stdout)
    assert info["virtual-size"] == env.size
    assert info["format"] == "raw"
    qemu_img("compare", "-f", "raw", "-F", "raw", env.uri, str(env.img))


def test_qemu_img_convert_from_and_to_export(env, workdir):
    qemu_io(env.uri, "write -P 0x44 0 3M", "write -P 0x55 40M 512k")
    out = workdir / "copy.raw"
    qemu_img("convert", "-f", "raw", "-O", "raw", env.uri, str(out))
    qemu_img("compare", "-f", "raw", "-F", "raw", str(out), str(env.img))
    # Now the other way: a new source overwrites the export's content.
    src = harness.create_image(workdir / "src.raw", env.size)
    qemu_io(str(src), "write -P 0x77 1M 5M", "write -P 0x78 60M 4M")
    qemu_img("convert", "-n", "-f", "raw", "-O", "raw", str(src), env.uri)
    qemu_img("compare", "-f", "raw", "-F", "raw", env.uri, str(src))
    qemu_img("compare", "-f", "raw", "-F", "raw", str(env.img), str(src))


def test_read_only_export_refuses_writes(make_env):
    env = make_env(writable=False)
    with open(env.img, "r+b") as f:
        f.write(b"\xab" * 4096)
    out = qemu_io(env.uri, "write -P 1 0 4k", check=False)
    assert out.returncode != 0 or "failed" in out.stdout + out.stderr
    # Read-only clients work and the data is unchanged.
    qemu_io(env.uri, "read -P 0xab 0 4k", extra=["-r"])
    with open(env.img, "rb") as f:
        assert f.read(4096) == b"\xab" * 4096
