"""LUKS1 images (``driver=luks``) made by qemu-img, opened by the daemon.

For a representative set of cipher/mode/IV/hash settings: qemu-io writes
a pattern, the daemon reads it back over NBD, writes another pattern over
NBD, and after it stops ``qemu-img compare`` (with the secret) equals a raw
model. Then: wrong/missing/encoded secrets, a secret in use, cryptsetup on
the image the daemon wrote, query output free of key material, resize,
write-zeroes and discard.

qsd_only tests (qemu-storage-daemon differs):
- a secret used by a node cannot be deleted: qemu reads the secret at open
  and lets ``object-del`` remove it while the node lives;
- ciphers qemu has and qsd has not (twofish) are refused with a message.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import harness
from harness import QmpError

MiB = 1024 * 1024
SIZE = 8 * MiB
PASS = "s3cret pass phrase"
SECRET_ARGS = f"secret,id=sec0,data={PASS}"

# (cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg, hash-alg). qemu-img
# cannot make aes-192-cbc volumes (its key material is not whole sectors
# and qemu asserts), so aes-192 is covered with xts.
MATRIX = [
    ("aes-256", "xts", "plain64", None, "sha256"),
    ("aes-128", "xts", "plain64", None, "sha1"),
    ("aes-128", "xts", "plain", None, "sha512"),
    ("aes-256", "cbc", "essiv", "sha256", "sha512"),
    ("aes-128", "cbc", "essiv", "sha256", "sha1"),
    ("aes-192", "xts", "plain64", None, "sha256"),
    ("aes-256", "cbc", "plain", None, "sha1"),
]


def make_luks(path: Path, size: int = SIZE, alg: str = "aes-256", mode: str = "xts",
              ivgen: str = "plain64", ivhash: str | None = None, hash_alg: str = "sha256",
              passphrase: str = PASS) -> Path:
    opts = (f"key-secret=sec0,cipher-alg={alg},cipher-mode={mode},ivgen-alg={ivgen},"
            f"hash-alg={hash_alg},iter-time=10")
    if ivhash:
        opts += f",ivgen-hash-alg={ivhash}"
    harness.qemu_img("create", "-q", "--object", f"secret,id=sec0,data={passphrase}",
                     "-f", "luks", "-o", opts, str(path), str(size))
    return path


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory) -> dict:
    """Images by settings, made once (PBKDF2 makes qemu-img create slow)."""
    return {"dir": tmp_path_factory.mktemp("luks-images")}


def cached_image(cache: dict, dest: Path, *settings) -> Path:
    key = settings or ("default",)
    if key not in cache:
        name = "-".join(str(s) for s in key) + ".luks"
        cache[key] = make_luks(cache["dir"] / name, SIZE, *settings) if settings \
            else make_luks(cache["dir"] / name)
    shutil.copyfile(cache[key], dest)
    return dest


def luks_opts(img: Path) -> str:
    return f"driver=luks,key-secret=sec0,file.filename={img}"


def qemu_io_luks(img: Path, *cmds: str, check: bool = True):
    return harness.qemu_io(luks_opts(img), *cmds, fmt=None,
                           extra=["--object", SECRET_ARGS, "--image-opts"], check=check)


def start(start_daemon, workdir: Path, img: Path, extra_objects=(), secret="sec0",
          writable: bool = True):
    qmp_sock = workdir / "qmp.sock"
    nbd_sock = workdir / "nbd.sock"
    objs = []
    for o in (SECRET_ARGS, *extra_objects):
        objs += ["--object", o]
    args = [
        *objs,
        *harness.monitor_args(qmp_sock),
        "--blockdev", f"driver=file,node-name=file0,filename={img}",
        "--blockdev", f"driver=luks,node-name=fmt0,file=file0,key-secret={secret}",
        "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
        "--export", f"type=nbd,id=exp0,node-name=fmt0,name=exp,"
                    f"writable={'on' if writable else 'off'}",
    ]
    d = start_daemon(args, wait_unix=[qmp_sock, nbd_sock])
    return d, d.qmp(qmp_sock), harness.nbd_uri(nbd_sock, "exp")


def compare_with_model(img: Path, model: Path) -> None:
    harness.run(["qemu-img", "compare", "--object", SECRET_ARGS, "--image-opts",
                 luks_opts(img), f"driver=raw,file.filename={model}"])


def plaintext(img: Path, out: Path) -> Path:
    """The decrypted payload of ``img`` as a raw file (the model to compare)."""
    harness.run(["qemu-img", "convert", "--object", SECRET_ARGS, "--image-opts",
                 luks_opts(img), "-O", "raw", str(out)])
    return out


def sha(path: Path) -> str:
    return harness.run(["sha256sum", str(path)]).stdout.split()[0]


# ---------------------------------------------------------------------------
# Data both ways, across cipher settings


@pytest.mark.parametrize("settings", MATRIX, ids=["-".join(filter(None, m)) for m in MATRIX])
def test_luks_data_interoperates(settings, workdir, start_daemon, image_cache):
    img = cached_image(image_cache, workdir / "img.luks", *settings)
    qemu_io_luks(img, "write -P 0x5a 0 64k", "write -P 0x33 3M 4k",
                 "write -P 0x77 8323072 65536")
    model = plaintext(img, workdir / "model.raw")

    d, _, uri = start(start_daemon, workdir, img)
    harness.qemu_io(uri, "read -P 0x5a 0 64k", "read -P 0x33 3M 4k",
                    "read -P 0x77 8323072 65536")
    # Never-written sectors decrypt to noise; both daemons must agree on it.
    harness.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(model)])
    # Unaligned (the daemon pads to 512-byte sectors) and large writes.
    second = ["write -P 0xc1 1000 3000", "write -P 0xd2 5M 1M", "write -P 0xe3 3M 100"]
    harness.qemu_io(uri, *second)
    harness.qemu_io(str(model), *second)
    harness.qemu_io(uri, "read -P 0xc1 1000 3000", "read -P 0xd2 5M 1M")
    d.stop()

    compare_with_model(img, model)
    qemu_io_luks(img, "read -P 0xe3 3M 100", "read -P 0x33 3145828 3996")


def test_luks_write_zeroes_and_discard(workdir, start_daemon, image_cache):
    img = cached_image(image_cache, workdir / "img.luks")
    model = plaintext(img, workdir / "model.raw")
    d, _, uri = start(start_daemon, workdir, img)
    harness.qemu_io(uri, "write -P 0x11 0 2M", "write -z 512k 256k", "discard 1M 64k",
                    "read -P 0 512k 256k", "read -P 0x11 0 512k")
    d.stop()
    harness.qemu_io(str(model), "write -P 0x11 0 2M", "write -z 512k 256k")
    # Discard on luks is a no-op (as in qemu): the data stays.
    compare_with_model(img, model)
    # Zeroes are written encrypted, not as plain zeroes on disk.
    off = json.loads(harness.qemu_img("info", "--output=json", "--object", SECRET_ARGS,
                                      "--image-opts", luks_opts(img)).stdout)
    payload = off["format-specific"]["data"]["payload-offset"]
    with open(img, "rb") as f:
        f.seek(payload + 512 * 1024)
        assert f.read(4096) != bytes(4096)


# ---------------------------------------------------------------------------
# Secrets and errors


def blockdev_luks(mon, img: Path, name: str, secret: str | None, **extra):
    args = {"driver": "luks", "node-name": name,
            "file": {"driver": "file", "filename": str(img)}, **extra}
    if secret is not None:
        args["key-secret"] = secret
    return mon.cmd("blockdev-add", **args)


def test_luks_open_errors(workdir, qmp_only, image_cache):
    img = cached_image(image_cache, workdir / "img.luks")
    plain = harness.create_image(workdir / "plain.raw", SIZE)
    before = sha(img)
    d, sock = qmp_only
    mon = d.qmp(sock)
    mon.cmd("object-add", **{"qom-type": "secret", "id": "bad", "data": "not it"})
    mon.cmd("object-add", **{"qom-type": "secret", "id": "sec0", "data": PASS})
    mon.cmd("object-add", **{"qom-type": "secret", "id": "nonutf",
                             "format": "base64", "data": "aGVsbG8Ad29ybGQ="})
    cases = [
        (img, "bad", "Invalid password, cannot unlock any keyslot"),
        (img, "nosuch", "No secret with id 'nosuch'"),
        (img, None, "Parameter 'key-secret' is required for cipher"),
        (img, "nonutf", "Data from secret nonutf is not valid UTF-8"),
        (plain, "sec0", "Volume is not in LUKS format"),
    ]
    for i, (path, secret, desc) in enumerate(cases):
        try:
            blockdev_luks(mon, path, f"n{i}", secret)
        except QmpError as err:
            assert err.klass == "GenericError"
            assert err.desc == desc
        else:
            pytest.fail(f"blockdev-add with secret {secret} succeeded")
    assert mon.cmd("query-named-block-nodes", flat=True) == []
    assert sha(img) == before, "a failed open must write nothing"


def test_luks_missing_secret_on_command_line(workdir, image_cache):
    img = cached_image(image_cache, workdir / "img.luks")
    proc = harness.run([harness.require_daemon_binary(), "--blockdev",
                        f"driver=file,node-name=f0,filename={img}", "--blockdev",
                        "driver=luks,node-name=l0,file=f0,key-secret=nosuch"], check=False)
    assert proc.returncode == 1
    assert "No secret with id 'nosuch'" in proc.stderr


def encrypt_secret(master: bytes, iv: bytes, plain: bytes) -> str:
    """AES-256-CBC with PKCS#7 padding, base64, as qemu's keyid secrets."""
    out = subprocess.run(["openssl", "enc", "-aes-256-cbc", "-K", master.hex(),
                          "-iv", iv.hex(), "-a", "-A"], input=plain,
                         capture_output=True, check=True)
    return out.stdout.decode().strip()


def test_luks_base64_and_keyid_secrets(workdir, start_daemon, image_cache):
    img = cached_image(image_cache, workdir / "img.luks")
    qemu_io_luks(img, "write -P 0x42 0 4k")
    master = bytes(range(32))
    iv = bytes(range(100, 116))
    b64 = base64.b64encode(PASS.encode()).decode()
    enc = encrypt_secret(master, iv, PASS.encode())
    objs = [
        f"secret,id=b64,format=base64,data={b64}",
        f"secret,id=mk,format=base64,data={base64.b64encode(master).decode()}",
        f"secret,id=enc,format=base64,keyid=mk,iv={base64.b64encode(iv).decode()},"
        f"data={enc}",
    ]
    for secret in ("b64", "enc"):
        d, mon, uri = start(start_daemon, workdir, img, objs, secret=secret, writable=False)
        harness.qemu_io(uri, "read -P 0x42 0 4k", extra=["-r"])
        d.stop()


def add_session_key(payload: bytes) -> int:
    """Put a `user` key into this process's session keyring (the daemon
    inherits it, so it possesses the key) and return its serial."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    sys_add_key = 248  # x86_64
    serial = libc.syscall(sys_add_key, b"user", f"qsd-test-{os.getpid()}".encode(),
                          payload, len(payload), ctypes.c_int(-3))
    assert serial > 0, f"add_key failed: {os.strerror(ctypes.get_errno())}"
    return serial


def test_luks_secret_keyring(workdir, start_daemon, image_cache):
    img = cached_image(image_cache, workdir / "img.luks")
    qemu_io_luks(img, "write -P 0x37 0 4k")
    serial = add_session_key(PASS.encode())
    d, mon, uri = start(start_daemon, workdir, img,
                        [f"secret_keyring,id=kr,serial={serial}"], secret="kr",
                        writable=False)
    harness.qemu_io(uri, "read -P 0x37 0 4k", extra=["-r"])
    with pytest.raises(QmpError) as e:
        mon.cmd("object-add", **{"qom-type": "secret_keyring", "id": "missing",
                                 "serial": 0x3039})
    assert "Unable to read serial key 00003039" in str(e.value)
    d.stop()


@pytest.mark.qsd_only
def test_luks_secret_in_use_cannot_be_deleted(workdir, qmp_only, image_cache):
    img = cached_image(image_cache, workdir / "img.luks")
    d, sock = qmp_only
    mon = d.qmp(sock)
    mon.cmd("object-add", **{"qom-type": "secret", "id": "sec0", "data": PASS})
    blockdev_luks(mon, img, "l0", "sec0")
    err = mon.error("object-del", id="sec0")
    assert err.desc == "object 'sec0' is in use, can not be deleted"
    mon.cmd("blockdev-del", **{"node-name": "l0"})
    mon.cmd("object-del", id="sec0")


def test_luks_secret_deletable_after_blockdev_del(workdir, qmp_only, image_cache):
    img = cached_image(image_cache, workdir / "img.luks")
    d, sock = qmp_only
    mon = d.qmp(sock)
    mon.cmd("object-add", **{"qom-type": "secret", "id": "sec0", "data": PASS})
    blockdev_luks(mon, img, "l0", "sec0")
    mon.cmd("blockdev-del", **{"node-name": "l0"})
    mon.cmd("object-del", id="sec0")
    err = mon.error("object-del", id="sec0")
    assert err.desc == "object 'sec0' not found"


@pytest.mark.qsd_only
def test_luks_unsupported_cipher_refused(workdir, qmp_only):
    img = make_luks(workdir / "tf.luks", MiB, alg="twofish-256")
    before = sha(img)
    d, sock = qmp_only
    mon = d.qmp(sock)
    mon.cmd("object-add", **{"qom-type": "secret", "id": "sec0", "data": PASS})
    try:
        blockdev_luks(mon, img, "l0", "sec0")
    except QmpError as err:
        assert "twofish" in err.desc
    else:
        pytest.fail("twofish image opened")
    assert sha(img) == before


# ---------------------------------------------------------------------------
# cryptsetup and queries


def test_luks_written_image_opens_with_cryptsetup(workdir, start_daemon, image_cache):
    harness.require_tool("cryptsetup")
    img = cached_image(image_cache, workdir / "img.luks")
    d, _, uri = start(start_daemon, workdir, img)
    harness.qemu_io(uri, "write -P 0x9c 0 1M", "write -P 0x9d 7M 1M")
    d.stop()
    harness.run(["cryptsetup", "isLuks", str(img)])
    dump = harness.run(["cryptsetup", "luksDump", str(img)]).stdout
    assert "Version:       \t1" in dump and "xts-plain64" in dump
    qemu_io_luks(img, "read -P 0x9c 0 1M", "read -P 0x9d 7M 1M")
    keyfile = workdir / "pass"
    keyfile.write_text(PASS)
    name = f"qsdluks{os.getpid()}"
    opened = subprocess.run(["cryptsetup", "open", "--readonly", "--type", "luks1",
                             "--key-file", str(keyfile), str(img), name],
                            capture_output=True, timeout=60)
    if opened.returncode != 0:
        pytest.skip("dm-crypt unavailable: " + opened.stderr.decode(errors="replace"))
    try:
        with open(f"/dev/mapper/{name}", "rb") as dev:
            assert dev.read(MiB) == b"\x9c" * MiB
    finally:
        subprocess.run(["cryptsetup", "close", name], capture_output=True, timeout=60)


@pytest.mark.parametrize("cipher,bits,hash_alg", [("aes-xts-plain64", 512, "sha256"),
                                                  ("aes-cbc-essiv:sha256", 256, "sha1")])
def test_luks_cryptsetup_made_image(cipher, bits, hash_alg, workdir, start_daemon):
    """A volume made by cryptsetup (not qemu-img) opens, reads and writes."""
    harness.require_tool("cryptsetup")
    img = workdir / "cs.luks"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    harness.run(["cryptsetup", "luksFormat", "--type", "luks1", "--cipher", cipher,
                 "--key-size", str(bits), "--hash", hash_alg, "--pbkdf-force-iterations",
                 "1000", "--batch-mode", "--key-file=-", str(img)], input=PASS.encode())
    qemu_io_luks(img, "write -P 0x21 0 128k")
    model = plaintext(img, workdir / "model.raw")
    d, _, uri = start(start_daemon, workdir, img)
    harness.qemu_io(uri, "read -P 0x21 0 128k", "write -P 0x22 1M 64k")
    d.stop()
    harness.qemu_io(str(model), "write -P 0x22 1M 64k")
    compare_with_model(img, model)


def master_key_forms(img: Path, workdir: Path) -> list[str]:
    """The volume key of ``img`` as hex and base64 (via cryptsetup)."""
    harness.require_tool("cryptsetup")
    keyfile = workdir / "pass"
    keyfile.write_text(PASS)
    out = harness.run(["cryptsetup", "luksDump", "--dump-master-key", "-q",
                       "--key-file", str(keyfile), str(img)]).stdout
    lines = out.split("MK dump:")[1].splitlines()
    hexes = []
    for line in lines:
        parts = line.split()
        if not parts or not all(len(p) == 2 for p in parts):
            break
        hexes += parts
    key = bytes.fromhex("".join(hexes))
    assert len(key) == 64
    return [key.hex(), " ".join(hexes[:8]), base64.b64encode(key).decode(), key.hex()[:16]]


def test_luks_query_shows_header_not_keys(workdir, start_daemon, image_cache):
    img = cached_image(image_cache, workdir / "img.luks")
    info = json.loads(harness.qemu_img("info", "--output=json", "--object", SECRET_ARGS,
                                       "--image-opts", luks_opts(img)).stdout)
    keys = master_key_forms(img, workdir)
    d, mon, uri = start(start_daemon, workdir, img)
    harness.qemu_io(uri, "write -P 1 0 4k")
    nodes = mon.cmd("query-named-block-nodes")
    node = next(n for n in nodes if n["node-name"] == "fmt0")
    assert node["encrypted"] is True and node["drv"] == "luks"
    assert node["image"]["encrypted"] is True
    assert node["image"]["virtual-size"] == SIZE
    assert node["image"]["format-specific"] == info["format-specific"]
    assert node["image"]["filename"] == (
        f'json:{{"driver": "luks", "file": {{"driver": "file", "filename": "{img}"}}, '
        f'"key-secret": "sec0"}}')
    everything = json.dumps([nodes, mon.cmd("query-block"),
                             mon.cmd("query-named-block-nodes", flat=True)])
    d.stop()
    for text in (everything, d.stderr()):
        assert PASS not in text
        for k in keys:
            assert k not in text


def test_luks_resize(workdir, qmp_only, image_cache):
    img = cached_image(image_cache, workdir / "img.luks")
    d, sock = qmp_only
    mon = d.qmp(sock)
    mon.cmd("object-add", **{"qom-type": "secret", "id": "sec0", "data": PASS})
    blockdev_luks(mon, img, "l0", "sec0")
    mon.cmd("block_resize", **{"node-name": "l0", "size": 2 * SIZE})
    node = next(n for n in mon.cmd("query-named-block-nodes") if n["node-name"] == "l0")
    assert node["image"]["virtual-size"] == 2 * SIZE
    mon.cmd("blockdev-del", **{"node-name": "l0"})
    d.stop()
    qemu_io_luks(img, "write -P 0x61 15M 1M")
    info = json.loads(harness.qemu_img("info", "--output=json", "--object", SECRET_ARGS,
                                       "--image-opts", luks_opts(img)).stdout)
    assert info["virtual-size"] == 2 * SIZE
    qemu_io_luks(img, "read -P 0x61 15M 1M")
