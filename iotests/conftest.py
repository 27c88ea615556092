"""pytest fixtures for the end-to-end tests (see README.md)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pytest

import harness
from harness import Daemon, Monitor

IMAGE_SIZE = 64 * 1024 * 1024
EXPORT = "exp"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "qsd_only: checks a qsd extension that qemu-storage-daemon lacks; "
        "skipped unless the daemon under test is qsd")


def pytest_report_header(config: pytest.Config) -> str:
    flavor = "qsd" if harness.is_qsd() else "qemu-storage-daemon"
    return f"daemon under test: {harness.daemon_binary()} (flavor: {flavor})"


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if harness.is_qsd():
        return
    skip = pytest.mark.skip(reason="qsd-only extension; daemon under test is not qsd")
    for item in items:
        if "qsd_only" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for i, d in enumerate(harness.ACTIVE):
            rep.sections.append((f"daemon {i} stderr ({d.stderr_path})",
                                 d.stderr() or "(empty)"))


@pytest.fixture(autouse=True)
def _stop_daemons():
    """Stop every daemon the test started, whatever happened."""
    yield
    while harness.ACTIVE:
        harness.ACTIVE.pop().stop()


@pytest.fixture
def workdir() -> Path:
    path = harness.scratch_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_daemon(workdir: Path) -> Callable[..., Daemon]:
    """start_daemon(args, wait_unix=[...], wait_tcp=[...], name=...) -> Daemon."""
    counter = [0]

    def _start(args: Sequence[str], wait_unix=(), wait_tcp=(), name: str | None = None
               ) -> Daemon:
        counter[0] += 1
        d = Daemon(args, workdir, name or f"daemon{counter[0]}")
        return d.start(wait_unix=wait_unix, wait_tcp=wait_tcp)

    return _start


@dataclass
class Env:
    """A daemon exporting one raw image over NBD, with a QMP monitor."""

    workdir: Path
    img: Path
    size: int
    daemon: Daemon
    qmp_sock: Path
    nbd_sock: Path
    export: str
    qmp: Monitor
    extra: dict = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return harness.nbd_uri(self.nbd_sock, self.export)


@pytest.fixture
def make_env(workdir: Path, start_daemon) -> Callable[..., Env]:
    """make_env(writable=True, size=..., export_opts="", node_opts="", extra_args=[])."""

    def _make(writable: bool = True, size: int = IMAGE_SIZE, export_opts: str = "",
              node_opts: str = ",discard=unmap", nbd_opts: str = "",
              extra_args: Sequence[str] = (), img: Path | None = None) -> Env:
        if img is None:
            img = harness.create_image(workdir / "disk.raw", size)
        qmp_sock = workdir / "qmp.sock"
        nbd_sock = workdir / "nbd.sock"
        args = [
            *harness.monitor_args(qmp_sock),
            "--blockdev", f"driver=file,node-name=file0,filename={img}{node_opts}",
            "--blockdev", f"driver=raw,node-name=fmt0,file=file0{node_opts}",
            "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}{nbd_opts}",
            "--export", f"type=nbd,id=exp0,node-name=fmt0,name={EXPORT},"
                        f"writable={'on' if writable else 'off'}{export_opts}",
            *extra_args,
        ]
        d = start_daemon(args, wait_unix=[qmp_sock, nbd_sock])
        mon = d.qmp(qmp_sock)
        return Env(workdir, img, size, d, qmp_sock, nbd_sock, EXPORT, mon)

    return _make


@pytest.fixture
def env(make_env) -> Env:
    """The default: a writable 64 MiB raw image exported as 'exp'."""
    return make_env()


@pytest.fixture
def qmp_only(workdir: Path, start_daemon):
    """A daemon with only a QMP monitor; returns (daemon, socket path).

    Nothing is connected yet: a chardev socket serves one client at a time.
    """
    sock = workdir / "qmp.sock"
    d = start_daemon(harness.monitor_args(sock), wait_unix=[sock])
    return d, sock
