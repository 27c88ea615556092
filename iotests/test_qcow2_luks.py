"""Encrypted qcow2 images (encrypt.format=luks, and the legacy aes) over NBD.

qemu-img and qemu-io make and write the images; the daemon serves them with
a secret object given over QMP; what it reads must be what qemu wrote, what
it writes (partial sectors, copy-on-write from a backing file) must be what
qemu reads afterwards, and ``qemu-img check`` must find the image clean.
Queries show ``encrypted`` and the ``encrypt`` format-specific member as
qemu-img info does; errors (missing key, wrong passphrase, format mismatch)
carry qemu's messages.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import harness
import qcow2_util as U
from harness import Model
from qcow2_util import KiB, MiB

SIZE = 16 * MiB
PASSWORD = "hunter2"
SECRET = f"secret,id=s0,data={PASSWORD}"


def image_opts(path: Path, fmt: str) -> str:
    return f"driver=qcow2,file.filename={path},encrypt.format={fmt},encrypt.key-secret=s0"


def create_encrypted(path: Path, fmt: str, backing: Path | None = None) -> Path:
    opts = f"encrypt.format={fmt},encrypt.key-secret=s0"
    if fmt == "luks":
        opts += ",encrypt.iter-time=10"
    if backing is not None:
        opts += f",backing_file={backing},backing_fmt=qcow2"
    harness.qemu_img("create", "-q", "--object", SECRET, "-f", "qcow2", "-o", opts,
                     str(path), str(SIZE))
    return path


def qemu_io_enc(path: Path, fmt: str, *cmds: str) -> None:
    harness.qemu_io(image_opts(path, fmt), *cmds, fmt=None,
                    extra=["--object", SECRET, "--image-opts"])


def to_raw_enc(path: Path, fmt: str, out: Path) -> Path:
    harness.qemu_img("convert", "--object", SECRET, "--image-opts", image_opts(path, fmt),
                     "-O", "raw", str(out))
    return out


def check_enc(path: Path, fmt: str) -> None:
    res = harness.qemu_img("check", "--object", SECRET, "--image-opts",
                           image_opts(path, fmt), check=False)
    assert res.returncode == 0 and "leaked" not in res.stdout, res.stdout + res.stderr


def compare_enc(path: Path, fmt: str, raw: Path) -> None:
    harness.qemu_img("compare", "--object", SECRET, "--image-opts", image_opts(path, fmt),
                     f"driver=raw,file.filename={raw}")


def encrypted_daemon(start_daemon, workdir: Path) -> U.QcowDaemon:
    qd = U.start_qcow2_daemon(start_daemon, workdir)
    qd.mon.cmd("object-add", **{"qom-type": "secret", "id": "s0", "data": PASSWORD})
    qd.mon.cmd("object-add", **{"qom-type": "secret", "id": "bad", "data": "nope"})
    return qd


def write_cmds(rng: random.Random, model: Model, count: int = 24) -> list[str]:
    """Unaligned writes and zeroes (the daemon pads them to sectors)."""
    cmds = []
    for _ in range(count):
        length = rng.choice([1, 512, 4 * KiB + 7, 64 * KiB, 200 * KiB + 512])
        offset = rng.randrange(0, SIZE - length)
        if rng.random() < 0.8:
            byte = rng.randrange(1, 256)
            cmds.append(f"write -P {byte} {offset} {length}")
            model.write(offset, length, byte)
        else:
            cmds.append(f"write -z {offset} {length}")
            model.zero(offset, length)
    return cmds


@pytest.mark.parametrize("fmt", ["luks", "aes"])
def test_encrypted_image_round_trips_over_nbd(fmt, workdir, start_daemon):
    backing = None
    if fmt == "luks":
        backing = U.create_qcow2(workdir / "base.qcow2", SIZE)
        harness.qemu_io(str(backing), "write -P 0x5a 0 6M", "write -P 0x6b 10M 3M",
                        fmt="qcow2")
    img = create_encrypted(workdir / "enc.qcow2", fmt, backing)
    qemu_io_enc(img, fmt, "write -P 0x11 64k 300k", "write -P 0x22 5M 2M",
                "write -z 11M 64k")
    expected = to_raw_enc(img, fmt, workdir / "expected.raw")

    qd = encrypted_daemon(start_daemon, workdir)
    qd.add_qcow2("q0", img, encrypt={"format": fmt, "key-secret": "s0"})
    uri = qd.export("q0", "q0", writable=True)
    got = U.nbd_read_all(uri, workdir / "read.raw")
    assert got.read_bytes() == expected.read_bytes(), "qsd reads what qemu wrote"

    model = Model(SIZE, expected.read_bytes())
    harness.qemu_io(uri, *write_cmds(random.Random(fmt), model))
    got = U.nbd_read_all(uri, workdir / "reread.raw")
    assert got.read_bytes() == bytes(model.data), "data read back after writes"
    qd.unexport("q0")
    qd.delete("q0")
    qd.daemon.stop()

    (workdir / "model.raw").write_bytes(model.data)
    compare_enc(img, fmt, workdir / "model.raw")
    check_enc(img, fmt)


def test_encrypted_image_query_matches_qemu_img_info(workdir, start_daemon):
    img = create_encrypted(workdir / "enc.qcow2", "luks")
    info = json.loads(harness.qemu_img("info", "--output=json", "--object", SECRET,
                                       "--image-opts", image_opts(img, "luks")).stdout)
    qd = encrypted_daemon(start_daemon, workdir)
    qd.add_qcow2("q0", img, encrypt={"format": "luks", "key-secret": "s0"})
    node = qd.nodes()["q0"]
    assert node["encrypted"] is True
    assert node["image"]["encrypted"] is True
    data = node["image"]["format-specific"]["data"]
    assert data["encrypt"] == info["format-specific"]["data"]["encrypt"]
    assert PASSWORD not in json.dumps(node)


@pytest.mark.parametrize("opts,msg", [
    ({}, "Parameter 'encrypt.key-secret' is required for cipher"),
    ({"encrypt": {"format": "luks", "key-secret": "bad"}},
     "Invalid password, cannot unlock any keyslot"),
    ({"encrypt": {"format": "aes", "key-secret": "s0"}},
     "Header reported 'luks' encryption format but options specify 'aes'"),
    ({"encrypt": {"format": "luks", "key-secret": "nosuch"}}, "No secret with id 'nosuch'"),
])
def test_encrypted_image_errors_as_qemu(opts, msg, workdir, start_daemon):
    img = create_encrypted(workdir / "enc.qcow2", "luks")
    qd = encrypted_daemon(start_daemon, workdir)
    err = U.qmp_error(lambda: qd.add_qcow2("q0", img, **opts))
    assert err is not None
    assert (err.klass, err.desc) == ("GenericError", msg)
    assert "q0" not in qd.nodes()
