"""The command line: options, errors, --pidfile, --daemonize, signals, keyval."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

import harness
from harness import qemu_io

MiB = 1024 * 1024


def run_daemon(*args: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
    """Run the daemon to completion (for options that make it exit)."""
    return harness.run([harness.require_daemon_binary(), *args], check=False,
                       timeout=timeout)


def test_bad_option_names_it():
    out = run_daemon("--no-such-option")
    assert out.returncode != 0
    assert "no-such-option" in out.stderr


def test_unexpected_argument_rejected():
    out = run_daemon("stray-argument")
    assert out.returncode != 0
    assert "stray-argument" in out.stderr


def test_missing_option_argument():
    out = run_daemon("--blockdev")
    assert out.returncode != 0
    assert "blockdev" in out.stderr


def test_help_and_version():
    out = run_daemon("--help")
    assert out.returncode == 0
    assert "Usage:" in out.stdout
    for opt in ("--blockdev", "--chardev", "--daemonize", "--export", "--monitor",
                "--nbd-server", "--object", "--pidfile"):
        assert opt in out.stdout, opt
    out = run_daemon("-h")
    assert out.returncode == 0 and "Usage:" in out.stdout
    for flag in ("-V", "--version"):
        out = run_daemon(flag)
        assert out.returncode == 0
        assert "version" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--blockdev", "driver=file,node-name=f0,filename=/nonexistent/x"],
     "Could not open '/nonexistent/x': No such file or directory"),
    (["--blockdev", "driver=null-co,node-name=n0,bogus=1"], "Parameter 'bogus' is unexpected"),
    (["--blockdev", "driver=null-co,node-name=n0", "--export", "type=nbd,id=e,node-name=n0"],
     "NBD server not running"),
    (["--nbd-server", "addr.type=unix"], "Parameter 'addr.path' is missing"),
    (["--monitor", "chardev=nope"], 'chardev "nope" not found'),
])
def test_bad_configuration_exits_with_message(args, message):
    out = run_daemon(*args)
    assert out.returncode == 1, out
    assert message in out.stderr, out.stderr
    # The message names the option that failed.
    assert args[-2] in out.stderr


def test_pidfile_written(workdir, start_daemon):
    pidfile = workdir / "qsd.pid"
    sock = workdir / "qmp.sock"
    d = start_daemon([*harness.monitor_args(sock), "--pidfile", str(pidfile)],
                     wait_unix=[sock])
    deadline = time.monotonic() + 5
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline, "pidfile not written"
        time.sleep(0.01)
    assert int(pidfile.read_text().strip()) == d.pid


def test_daemonize_returns_after_sockets_exist(workdir):
    img = harness.create_image(workdir / "a.raw", 4 * MiB)
    pidfile = workdir / "qsd.pid"
    nbd_sock = workdir / "nbd.sock"
    qmp_sock = workdir / "qmp.sock"
    args = [
        harness.require_daemon_binary(), "--daemonize", "--pidfile", str(pidfile),
        *harness.monitor_args(qmp_sock),
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
        "--export", "type=nbd,id=e0,node-name=f0,name=exp,writable=on",
    ]
    with open(workdir / "daemonize.stderr", "wb") as err:
        rc = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=err, timeout=10).returncode
    pid = int(pidfile.read_text().strip())
    try:
        assert rc == 0
        # Connectable right away, no polling.
        assert harness.unix_connectable(nbd_sock)
        assert harness.unix_connectable(qmp_sock)
        assert pid != os.getpid()
        qemu_io(harness.nbd_uri(nbd_sock, "exp"), "write -P 0x21 0 4k")
    finally:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        gone = harness.wait_pid_gone(pid)
        if not gone:
            os.kill(pid, signal.SIGKILL)
    assert gone, "daemonized process ignored SIGTERM"
    with open(img, "rb") as f:
        assert f.read(4096) == b"\x21" * 4096


def test_daemonize_failure_reported_by_parent(workdir):
    out = run_daemon("--daemonize", "--blockdev",
                     "driver=file,node-name=f0,filename=/nonexistent/x")
    assert out.returncode != 0
    assert "Could not open '/nonexistent/x'" in out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_zero_and_keeps_completed_writes(make_env, sig):
    env = make_env()
    qemu_io(env.uri, "write -P 0x4d 0 1M", "write -P 0x4e 10M 64k")
    env.daemon.signal(sig)
    assert env.daemon.wait() == 0
    with open(env.img, "rb") as f:
        assert f.read(MiB) == b"\x4d" * MiB
        f.seek(10 * MiB)
        assert f.read(64 * 1024) == b"\x4e" * 65536
    assert not harness.unix_connectable(env.nbd_sock)


def test_keyval_double_comma_in_filename(workdir, start_daemon):
    img = harness.create_image(workdir / "a,b.raw", MiB)
    sock = workdir / "qmp.sock"
    escaped = str(img).replace(",", ",,")
    d = start_daemon([*harness.monitor_args(sock),
                      "--blockdev", f"driver=file,node-name=f0,filename={escaped}"],
                     wait_unix=[sock])
    nodes = d.qmp(sock).cmd("query-named-block-nodes")
    assert nodes[0]["file"] == str(img)


def test_keyval_implied_driver_and_dotted_keys(workdir, start_daemon):
    img = harness.create_image(workdir / "a.raw", MiB)
    sock = workdir / "qmp.sock"
    d = start_daemon([*harness.monitor_args(sock),
                      "--blockdev", f"file,node-name=f0,filename={img},cache.direct=on,"
                                    "read-only=on"],
                     wait_unix=[sock])
    f0 = d.qmp(sock).cmd("query-named-block-nodes")[0]
    assert f0["drv"] == "file" and f0["ro"] is True and f0["cache"]["direct"] is True


def test_json_blockdev_and_export(workdir, start_daemon):
    img = harness.create_image(workdir / "a.raw", 2 * MiB)
    sock, nbd_sock = workdir / "qmp.sock", workdir / "nbd.sock"
    blockdev = {"driver": "raw", "node-name": "r0",
                "file": {"driver": "file", "filename": str(img)}}
    d = start_daemon([
        *harness.monitor_args(sock),
        "--blockdev", json.dumps(blockdev),
        "--nbd-server", json.dumps({"addr": {"type": "unix", "path": str(nbd_sock)}}),
        "--export", json.dumps({"type": "nbd", "id": "e0", "node-name": "r0",
                                "name": "j", "writable": True}),
    ], wait_unix=[sock, nbd_sock])
    mon = d.qmp(sock)
    nodes = {n["node-name"]: n for n in mon.cmd("query-named-block-nodes")}
    assert nodes["r0"]["drv"] == "raw"
    qemu_io(harness.nbd_uri(nbd_sock, "j"), "write -P 0x12 0 4k", "read -P 0x12 0 4k")
