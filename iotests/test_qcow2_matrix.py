"""qcow2 images of every shape qemu-img makes, read and written over NBD.

For each image: the daemon opens it (blockdev-add driver=qcow2), exports it,
and then
- every byte read over NBD equals ``qemu-img convert -O raw`` of the image
  (made before the daemon opened it);
- ``nbdinfo --map`` (base:allocation) and ``--map=qemu:allocation-depth``
  agree with ``qemu-img map``;
- query-named-block-nodes shows the qcow2 format-specific fields that
  ``qemu-img info`` shows;
- writes over NBD land: after the daemon stops, ``qemu-img check`` is clean
  and ``qemu-img compare`` equals a raw model updated alongside.
Then backing options, refused images, snapshots, encryption and resize.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Callable

import pytest

import harness
import qcow2_util as U
from harness import Model
from qcow2_util import IMG_SIZE, KiB, MiB

# Fields of format-specific.data compared with qemu-img info.
FORMAT_FIELDS = ("compat", "refcount-bits", "compression-type", "extended-l2",
                 "lazy-refcounts", "corrupt", "data-file", "data-file-raw")


def build_plain(opts: str) -> Callable[[Path], Path]:
    def build(wd: Path) -> Path:
        img = U.create_qcow2(wd / "img.qcow2", IMG_SIZE, opts)
        U.fill_pattern(img, "qcow2", seed=len(opts) + 11, count=24, zero_count=3)
        return img
    return build


def build_compressed(kind: str) -> Callable[[Path], Path]:
    def build(wd: Path) -> Path:
        raw = U.patterned_raw(wd / "src.raw", seed=5)
        img = wd / "img.qcow2"
        harness.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                         f"compression_type={kind}", str(raw), str(img))
        return img
    return build


def build_data_file(raw_flag: bool) -> Callable[[Path], Path]:
    def build(wd: Path) -> Path:
        opts = f"data_file={wd / 'img.data'}" + (",data_file_raw=on" if raw_flag else "")
        img = U.create_qcow2(wd / "img.qcow2", IMG_SIZE, opts)
        U.fill_pattern(img, "qcow2", seed=21, count=20, zero_count=2)
        return img
    return build


def build_chain(wd: Path) -> Path:
    """base <- mid <- top, each with its own writes; mid also has zero clusters."""
    base = U.create_qcow2(wd / "base.qcow2")
    U.fill_pattern(base, "qcow2", seed=31, count=20)
    mid = U.create_qcow2(wd / "mid.qcow2", backing=base)
    U.fill_pattern(mid, "qcow2", seed=32, count=12, zero_count=6)
    top = U.create_qcow2(wd / "img.qcow2", backing=mid)
    U.fill_pattern(top, "qcow2", seed=33, count=12)
    return top


CASES: dict[str, Callable[[Path], Path]] = {
    "v2": build_plain("compat=0.10"),
    "v3_cluster_512": build_plain("cluster_size=512"),
    "v3_cluster_4k": build_plain("cluster_size=4096"),
    "v3_cluster_64k": build_plain("cluster_size=65536"),
    "v3_cluster_2m": build_plain("cluster_size=2097152"),
    "refcount_bits_1": build_plain("refcount_bits=1"),
    "refcount_bits_16": build_plain("refcount_bits=16,lazy_refcounts=on"),
    "refcount_bits_64": build_plain("refcount_bits=64"),
    "extended_l2_64k": build_plain("extended_l2=on,cluster_size=65536"),
    "extended_l2_2m": build_plain("extended_l2=on,cluster_size=2097152"),
    "compressed_zlib": build_compressed("zlib"),
    "compressed_zstd": build_compressed("zstd"),
    "data_file": build_data_file(False),
    "data_file_raw": build_data_file(True),
    "backing_chain_3": build_chain,
}


def write_cmds(rng: random.Random, model: Model, count: int = 30) -> list[str]:
    """qemu-io commands over NBD (raw view), mirrored in ``model``."""
    size = len(model.data)
    cmds = []
    for _ in range(count):
        length = rng.choice([1, 512, 4 * KiB + 7, 64 * KiB, 200 * KiB + 512, 3 * MiB])
        offset = rng.randrange(0, size - length)
        kind = rng.random()
        if kind < 0.7:
            byte = rng.randrange(1, 256)
            cmds.append(f"write -P {byte} {offset} {length}")
            model.write(offset, length, byte)
        else:
            unmap = "-u " if kind < 0.85 else ""
            cmds.append(f"write -z {unmap}{offset} {length}")
            model.zero(offset, length)
    return cmds


def file_bytes(path: Path) -> bytes:
    return path.read_bytes()


def assert_same_bytes(actual: bytes, expected: bytes, what: str) -> None:
    if actual == expected:
        return
    n = min(len(actual), len(expected))
    first = next((i for i in range(n) if actual[i] != expected[i]), n)
    pytest.fail(f"{what}: differs at offset {first:#x} (len {len(actual)} vs "
                f"{len(expected)})", pytrace=False)


def check_reads_and_maps(uri: str, expected: Path, qmap: list, wd: Path) -> None:
    got = U.nbd_read_all(uri, wd / "read.raw")
    assert_same_bytes(file_bytes(got), file_bytes(expected), "data read over NBD")
    assert U.nbd_map(uri) == U.expected_allocation(qmap), "base:allocation"
    assert U.nbd_map(uri, "qemu:allocation-depth") == U.expected_depth(qmap), \
        "qemu:allocation-depth"


def format_data(d: dict) -> dict:
    return {k: d[k] for k in FORMAT_FIELDS if k in d}


@pytest.mark.parametrize("case", list(CASES))
def test_qcow2_image_reads_and_writes(case, workdir, start_daemon):
    img = CASES[case](workdir)
    info = U.img_info(img)
    qmap = U.img_map(img)
    expected = U.to_raw(img, workdir / "expected.raw")

    qd = U.start_qcow2_daemon(start_daemon, workdir)
    qd.add_qcow2("q0", img)
    uri = qd.export("q0", "q0", writable=True, **{"allocation-depth": True})
    check_reads_and_maps(uri, expected, qmap, workdir)

    node = qd.nodes()["q0"]
    assert node["drv"] == "qcow2"
    image = node["image"]
    assert image["virtual-size"] == info["virtual-size"]
    assert image["cluster-size"] == info["cluster-size"]
    assert image["format-specific"]["type"] == "qcow2"
    assert format_data(image["format-specific"]["data"]) == \
        format_data(info["format-specific"]["data"])
    assert node["backing_file_depth"] == (2 if case == "backing_chain_3" else 0)

    model = Model(IMG_SIZE, file_bytes(expected))
    harness.qemu_io(uri, *write_cmds(random.Random(case), model))
    got = U.nbd_read_all(uri, workdir / "reread.raw")
    assert_same_bytes(file_bytes(got), bytes(model.data), "data read back after writes")
    qd.unexport("q0")
    qd.delete("q0")
    qd.daemon.stop()

    U.assert_check_clean(img)
    (workdir / "model.raw").write_bytes(model.data)
    U.compare(img, workdir / "model.raw")


# --------------------------------------------------------------------------
# Backing files given in different ways


def chain_and_top_only(wd: Path) -> tuple[Path, Path, Path]:
    top = build_chain(wd)
    return wd / "base.qcow2", wd / "mid.qcow2", top


def file_ref(path: Path) -> dict:
    return {"driver": "file", "filename": str(path)}


def backing_roundtrip(qd: U.QcowDaemon, top: Path, expected: Path, wd: Path) -> Model:
    """Read all, write some, stop the daemon, check; returns the model (also in
    model.raw)."""
    uri = qd.export("top", "top", writable=True)
    got = U.nbd_read_all(uri, wd / "read.raw")
    assert_same_bytes(file_bytes(got), file_bytes(expected), "data read over NBD")
    model = Model(IMG_SIZE, file_bytes(expected))
    harness.qemu_io(uri, *write_cmds(random.Random(7), model, 12))
    qd.unexport("top")
    qd.daemon.stop()
    U.assert_check_clean(top)
    (wd / "model.raw").write_bytes(model.data)
    return model


def test_backing_inline(workdir, start_daemon):
    base, mid, top = chain_and_top_only(workdir)
    expected = U.to_raw(top, workdir / "expected.raw")
    qd = U.start_qcow2_daemon(start_daemon, workdir)
    qd.add_qcow2("top", top, backing={
        "driver": "qcow2", "node-name": "mid", "file": file_ref(mid),
        "backing": {"driver": "qcow2", "node-name": "base", "file": file_ref(base)}})
    nodes = qd.nodes()
    assert nodes["top"]["backing_file_depth"] == 2
    assert {"mid", "base"} <= set(nodes)
    backing_roundtrip(qd, top, expected, workdir)
    U.compare(top, workdir / "model.raw")


def test_backing_by_node_name(workdir, start_daemon):
    base, mid, top = chain_and_top_only(workdir)
    expected = U.to_raw(top, workdir / "expected.raw")
    qd = U.start_qcow2_daemon(start_daemon, workdir)
    qd.add_qcow2("base", base, **{"read-only": True})
    qd.add_qcow2("mid", mid, backing="base", **{"read-only": True})
    qd.add_qcow2("top", top, backing="mid")
    assert qd.nodes()["top"]["backing_file_depth"] == 2
    backing_roundtrip(qd, top, expected, workdir)
    U.compare(top, workdir / "model.raw")


def test_backing_null_reads_zero_where_unallocated(workdir, start_daemon):
    base, mid, top = chain_and_top_only(workdir)
    alone = json.dumps({"driver": "qcow2", "backing": None, "file": file_ref(top)})
    expected = U.to_raw("json:" + alone, workdir / "expected.raw")
    assert file_bytes(expected) != U.to_raw(top, workdir / "chain.raw").read_bytes()
    qmap = U.img_map("json:" + alone)
    qd = U.start_qcow2_daemon(start_daemon, workdir)
    qd.add_qcow2("top", top, backing=None)
    assert qd.nodes()["top"]["backing_file_depth"] == 0
    uri = qd.export("top", "ro", **{"allocation-depth": True})
    check_reads_and_maps(uri, expected, qmap, workdir)
    qd.unexport("ro")
    model = backing_roundtrip(qd, top, expected, workdir)
    # Without its backing file the top image alone holds the model.
    got = U.to_raw("json:" + alone, workdir / "after.raw")
    assert_same_bytes(file_bytes(got), bytes(model.data), "top image without backing")


def test_backing_from_header(workdir, start_daemon):
    base, mid, top = chain_and_top_only(workdir)
    expected = U.to_raw(top, workdir / "expected.raw")
    qd = U.start_qcow2_daemon(start_daemon, workdir)
    qd.add_qcow2("top", top)
    node = qd.nodes()["top"]
    assert node["backing_file_depth"] == 2
    assert node["backing_file"] == str(mid)
    assert node["image"]["backing-filename"] == str(mid)
    backing_roundtrip(qd, top, expected, workdir)
    U.compare(top, workdir / "model.raw")


# --------------------------------------------------------------------------
# Images the daemon must refuse, or open read-only only


def set_incompat_bit(img: Path, bit: int) -> None:
    U.set_field(img, "incompatible_features",
                U.header(img)["incompatible_features"] | (1 << bit))


def test_unknown_incompatible_feature_refused(workdir, qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    img = U.create_qcow2(workdir / "a.qcow2", 8 * MiB)
    set_incompat_bit(img, 20)
    for ro in (False, True):
        err = mon.error("blockdev-add", driver="qcow2", **{"node-name": "q", "read-only": ro},
                        file={"driver": "file", "filename": str(img), "read-only": ro})
        assert (err.klass, err.desc) == (
            "GenericError", "Unsupported qcow2 feature(s): Unknown incompatible feature: 100000")


def rename_feature(img: Path, old_bit: int, new_bit: int, name: bytes) -> None:
    """Rewrite one incompatible-feature entry of the feature name table."""
    for off, typ, length in U.extensions(img):
        if typ != U.FEATURE_TABLE_MAGIC:
            continue
        for entry in range(off + 8, off + 8 + length, 48):
            ftype, fbit = U.read_at(img, entry, 2)
            if ftype == 0 and fbit == old_bit:
                U.patch(img, entry, struct.pack(">BB46s", 0, new_bit, name))
                return
    raise AssertionError("feature name table entry not found")


def test_named_unknown_incompatible_feature_refused(workdir, qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    img = U.create_qcow2(workdir / "a.qcow2", 8 * MiB)
    rename_feature(img, 4, 21, b"frobnicated clusters")
    set_incompat_bit(img, 21)
    err = mon.error("blockdev-add", driver="qcow2", **{"node-name": "q"},
                    file={"driver": "file", "filename": str(img)})
    assert (err.klass, err.desc) == (
        "GenericError", "Unsupported qcow2 feature(s): frobnicated clusters")


def test_corrupt_image_opens_read_only_only(workdir, start_daemon):
    img = U.create_qcow2(workdir / "a.qcow2", 8 * MiB)
    harness.qemu_io(str(img), "write -P 0x42 64k 1M", fmt="qcow2")
    U.set_field(img, "incompatible_features",
                U.header(img)["incompatible_features"] | U.INCOMPAT_CORRUPT)
    expected = U.to_raw(img, workdir / "expected.raw")
    qd = U.start_qcow2_daemon(start_daemon, workdir)
    err = U.qmp_error(lambda: qd.add_qcow2("rw", img))
    assert err is not None, "a corrupt image opened read-write"
    assert (err.klass, err.desc) == (
        "GenericError", "qcow2: Image is corrupt; cannot be opened read/write")
    qd.add_qcow2("ro", img, **{"read-only": True})
    node = qd.nodes()["ro"]
    assert node["ro"] is True
    assert node["image"]["format-specific"]["data"]["corrupt"] is True
    got = U.nbd_read_all(qd.export("ro", "ro"), workdir / "read.raw")
    assert_same_bytes(file_bytes(got), file_bytes(expected), "corrupt image read-only")


def test_encrypted_image_without_key(workdir, qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    img = workdir / "enc.qcow2"
    harness.qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=hunter2",
                     "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                     str(img), str(8 * MiB))
    err = mon.error("blockdev-add", driver="qcow2", **{"node-name": "q"},
                    file={"driver": "file", "filename": str(img)})
    assert (err.klass, err.desc) == (
        "GenericError", "Parameter 'encrypt.key-secret' is required for cipher")
    assert "q" not in {n["node-name"] for n in mon.cmd("query-named-block-nodes")}


def test_internal_snapshots_listed(workdir, qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    img = U.create_qcow2(workdir / "a.qcow2", 8 * MiB)
    harness.qemu_io(str(img), "write -P 1 0 64k", fmt="qcow2")
    harness.qemu_img("snapshot", "-c", "first", str(img))
    harness.qemu_io(str(img), "write -P 2 0 64k", fmt="qcow2")
    harness.qemu_img("snapshot", "-c", "second", str(img))
    want = U.img_info(img)["snapshots"]
    assert [s["name"] for s in want] == ["first", "second"]
    mon.cmd("blockdev-add", driver="qcow2", **{"node-name": "q"},
            file={"driver": "file", "filename": str(img)})
    node = next(n for n in mon.cmd("query-named-block-nodes") if n["node-name"] == "q")
    assert node["image"]["snapshots"] == want


def test_block_resize_grows_with_zeroes(workdir, start_daemon):
    img = U.create_qcow2(workdir / "a.qcow2", IMG_SIZE)
    harness.qemu_io(str(img), f"write -P 0x5c {IMG_SIZE - MiB} {MiB}", fmt="qcow2")
    qd = U.start_qcow2_daemon(start_daemon, workdir)
    qd.add_qcow2("q0", img)
    new_size = IMG_SIZE + 40 * MiB + 512
    assert qd.mon.cmd("block_resize", size=new_size, **{"node-name": "q0"}) == {}
    assert qd.nodes()["q0"]["image"]["virtual-size"] == new_size
    uri = qd.export("q0", "q0", writable=True)
    harness.qemu_io(uri, f"read -P 0x5c {IMG_SIZE - MiB} {MiB}",
                    f"read -P 0 {IMG_SIZE} {new_size - IMG_SIZE}")
    got = U.nbd_read_all(uri, workdir / "read.raw")
    model = Model(new_size)
    model.write(IMG_SIZE - MiB, MiB, 0x5C)
    assert_same_bytes(file_bytes(got), bytes(model.data), "resized image")
    harness.qemu_io(uri, f"write -P 0x77 {new_size - 4096} 4096")
    model.write(new_size - 4096, 4096, 0x77)
    qd.unexport("q0")
    qd.daemon.stop()
    U.assert_check_clean(img)
    assert U.img_info(img)["virtual-size"] == new_size
    (workdir / "model.raw").write_bytes(model.data)
    U.compare(img, workdir / "model.raw")
