"""Helpers for the end-to-end tests: start a storage daemon, talk QMP and NBD.

Everything here drives real programs: the daemon under test (``QSD_BINARY``),
qemu-img/qemu-io, libnbd's tools and the ``qemu.qmp`` client library.
The tests must pass against both qsd and qemu-storage-daemon.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import pytest
from qemu.qmp import ExecuteError, QMPClient

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BINARY = REPO_ROOT / "target" / "release" / "qsd"

# How long to wait for a daemon to create its sockets, and for it to exit.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
# Default timeout of a client tool run (qemu-io, nbdinfo, ...).
TOOL_TIMEOUT = 60.0

# Which package provides each client tool (Debian names).
TOOL_PACKAGES = {
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "qemu-storage-daemon": "qemu-utils",
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "nbdsh": "python3-libnbd",
    "fio": "fio",
}

# Daemons started by the current test; conftest prints their stderr when the
# test fails and stops them at teardown.
ACTIVE: list["Daemon"] = []


# --------------------------------------------------------------------------
# Binary selection


def daemon_binary() -> str:
    """Path of the daemon under test: $QSD_BINARY or target/release/qsd."""
    return os.environ.get("QSD_BINARY") or str(DEFAULT_BINARY)


def is_qsd() -> bool:
    """True when the binary under test is qsd, not qemu-storage-daemon.

    $QSD_FLAVOR=qsd|qemu overrides the guess from the file name.
    """
    flavor = os.environ.get("QSD_FLAVOR")
    if flavor:
        return flavor == "qsd"
    return "qemu-storage-daemon" not in Path(daemon_binary()).name


def require_daemon_binary() -> str:
    binary = daemon_binary()
    resolved = shutil.which(binary) if os.sep not in binary else binary
    if not resolved or not os.access(resolved, os.X_OK):
        pytest.fail(
            f"daemon binary {binary!r} is missing or not executable: build it with "
            "'cargo build --release -p qsd' or set QSD_BINARY to a storage daemon",
            pytrace=False,
        )
    return resolved


def require_tool(name: str) -> str:
    """Return the path of a client tool; FAIL the test when it is absent."""
    path = shutil.which(name)
    if path is None:
        pkg = TOOL_PACKAGES.get(name, name)
        pytest.fail(f"tool {name} is missing: install package {pkg}", pytrace=False)
    return path


def nbd_python() -> str:
    """A python interpreter that can import libnbd's ``nbd`` module.

    nbdsh runs ``python3 -m nbd`` from PATH; with pyenv first on PATH that
    python lacks the Debian-packaged module, so we look for one that has it.
    """
    for cand in ("python3", "/usr/bin/python3"):
        exe = shutil.which(cand)
        if exe and subprocess.run([exe, "-c", "import nbd"],
                                  capture_output=True).returncode == 0:
            return exe
    pytest.fail("tool nbdsh is missing: install package python3-libnbd", pytrace=False)


# --------------------------------------------------------------------------
# Running client tools


def run(cmd: Sequence[str], check: bool = True, timeout: float = TOOL_TIMEOUT,
        env: Optional[dict] = None, input: Optional[bytes] = None
        ) -> subprocess.CompletedProcess:
    """Run a command, capture text output; on check failure show everything."""
    if os.sep not in cmd[0]:
        require_tool(cmd[0])
    proc = subprocess.run(list(cmd), capture_output=True, timeout=timeout, env=env,
                          input=input)
    proc.stdout = proc.stdout.decode(errors="replace")
    proc.stderr = proc.stderr.decode(errors="replace")
    if check and proc.returncode != 0:
        pytest.fail(
            f"command failed (rc={proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}",
            pytrace=False,
        )
    return proc


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["qemu-img", *args], check=check)


def create_image(path: Path, size: int, fmt: str = "raw") -> Path:
    qemu_img("create", "-q", "-f", fmt, str(path), str(size))
    return path


def qemu_io(target: str, *cmds: str, fmt: Optional[str] = "raw",
            extra: Sequence[str] = (), check: bool = True) -> subprocess.CompletedProcess:
    """Run qemu-io with one -c per command.

    qemu-io exits 0 even when a command fails, so with ``check`` any line of
    the form "<cmd> failed:" in its output fails the test too.
    """
    argv = ["qemu-io"]
    if fmt:
        argv += ["-f", fmt]
    argv += list(extra)
    for c in cmds:
        argv += ["-c", c]
    argv.append(target)
    proc = run(argv, check=check)
    if check:
        out = proc.stdout + proc.stderr
        bad = [line for line in out.splitlines()
               if "failed:" in line or "Pattern verification failed" in line]
        if bad:
            pytest.fail(f"qemu-io reported errors: {' '.join(argv)}\n{out}", pytrace=False)
    return proc


def nbdsh(uri: str, script: str, base_allocation: bool = False,
          check: bool = True) -> subprocess.CompletedProcess:
    """Run a Python script inside nbdsh connected to ``uri`` (handle ``h``)."""
    require_tool("nbdsh")
    py = nbd_python()
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(py) + os.pathsep + env.get("PATH", "")
    argv = ["nbdsh"]
    if base_allocation:
        argv.append("--base-allocation")
    argv += ["-u", uri, "-c", script]
    return run(argv, check=check, env=env)


def nbd_uri(sock: Path | str, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


# --------------------------------------------------------------------------
# Scratch space and sockets


def scratch_dir() -> Path:
    """A short temporary directory (UNIX socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="qsd-it-", dir="/tmp"))


def free_tcp_port() -> int:
    """An ephemeral port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unix_connectable(path: Path | str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def tcp_connectable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def monitor_args(sock: Path | str, ident: str = "mon0") -> list[str]:
    """Command-line arguments for one QMP monitor on a UNIX socket."""
    return ["--chardev", f"socket,id={ident},path={sock},server=on,wait=off",
            "--monitor", f"chardev={ident}"]


# --------------------------------------------------------------------------
# The daemon process


class Daemon:
    """One storage daemon process started with a qemu-storage-daemon command line."""

    def __init__(self, args: Sequence[str], workdir: Path, name: str = "daemon"):
        self.args = [require_daemon_binary(), *args]
        self.workdir = workdir
        self.stderr_path = workdir / f"{name}.stderr"
        self.stdout_path = workdir / f"{name}.stdout"
        self.proc: Optional[subprocess.Popen] = None
        self.returncode: Optional[int] = None
        self.monitors: list[Monitor] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait_unix: Iterable[Path | str] = (),
              wait_tcp: Iterable[tuple[str, int]] = ()) -> "Daemon":
        """Start the process and poll until the given sockets accept connections."""
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir)
        ACTIVE.append(self)
        deadline = time.monotonic() + START_TIMEOUT
        pending_unix = [str(p) for p in wait_unix]
        pending_tcp = list(wait_tcp)
        while pending_unix or pending_tcp:
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                pytest.fail(f"daemon exited during start-up with rc={self.returncode}\n"
                            f"argv: {self.args}\nstderr:\n{self.stderr()}", pytrace=False)
            pending_unix = [p for p in pending_unix if not unix_connectable(p)]
            pending_tcp = [hp for hp in pending_tcp if not tcp_connectable(*hp)]
            if time.monotonic() > deadline:
                pytest.fail(f"daemon sockets not ready after {START_TIMEOUT}s: "
                            f"{pending_unix + pending_tcp}\nstderr:\n{self.stderr()}",
                            pytrace=False)
            time.sleep(0.01)
        return self

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        assert self.proc is not None
        self.returncode = self.proc.wait(timeout=timeout)
        return self.returncode

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self) -> Optional[int]:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT. Returns the exit status."""
        for mon in self.monitors:
            mon.close()
        self.monitors.clear()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        return self.returncode

    def qmp(self, sock: Path | str, negotiate: bool = True) -> "Monitor":
        mon = Monitor(sock, negotiate=negotiate)
        self.monitors.append(mon)
        return mon


def wait_pid_gone(pid: int, timeout: float = STOP_TIMEOUT) -> bool:
    """Poll until a process that is not our child has gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie still answers kill(0); treat it as gone.
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.02)
    return False


# --------------------------------------------------------------------------
# QMP: a synchronous wrapper around qemu.qmp's async QMPClient


class _Loop:
    """One asyncio loop in a background thread, shared by all monitors.

    Running the loop continuously means events are received while the test
    does other things, and several monitors can be open at once.
    """

    _loop: Optional[asyncio.AbstractEventLoop] = None
    _lock = threading.Lock()

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, daemon=True,
                                 name="qmp-loop").start()
                cls._loop = loop
            return cls._loop

    @classmethod
    def call(cls, coro: Any, timeout: float = 30.0) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, cls.get())
        return fut.result(timeout)


class QmpError(Exception):
    """A QMP error reply: ``klass`` is the error class, ``desc`` the message."""

    def __init__(self, klass: str, desc: str):
        super().__init__(f"{klass}: {desc}")
        self.klass = klass
        self.desc = desc


class Monitor:
    """A negotiated QMP connection (qemu.qmp.QMPClient) used synchronously."""

    def __init__(self, sock: Path | str, negotiate: bool = True):
        self.client = QMPClient("iotest")
        self.client.negotiate = negotiate
        _Loop.call(self.client.connect(str(sock)))
        self.greeting = self.client.greeting._asdict() if self.client.greeting else None

    def cmd(self, command: str, /, **args: Any) -> Any:
        """Execute a command; raise QmpError on an error reply."""
        try:
            return _Loop.call(self.client.execute(command, args or None))
        except ExecuteError as err:
            raise QmpError(err.error.error.class_, err.error.error.desc) from None

    def error(self, command: str, /, **args: Any) -> QmpError:
        """Execute a command that must fail; return its error."""
        try:
            ret = self.cmd(command, **args)
        except QmpError as err:
            return err
        pytest.fail(f"{command} {args} unexpectedly succeeded: {ret}", pytrace=False)

    def raw(self, msg: dict) -> dict:
        """Send a message as-is (own ``id``), return the full reply."""
        return dict(_Loop.call(self.client._raw(msg, assign_id=False)))

    def event(self, name: str, timeout: float = 5.0) -> dict:
        """Wait for the next event called ``name``; earlier others are dropped."""
        async def _get() -> dict:
            while True:
                ev = await self.client.events.get()
                if ev["event"] == name:
                    return dict(ev)
        try:
            return _Loop.call(asyncio.wait_for(_get(), timeout), timeout + 1)
        except (asyncio.TimeoutError, TimeoutError):
            pytest.fail(f"event {name} not received within {timeout}s", pytrace=False)

    def events_now(self) -> list[dict]:
        """Drain the events received so far."""
        async def _drain() -> list:
            return self.client.events.clear()
        return [dict(e) for e in _Loop.call(_drain())]

    def close(self) -> None:
        try:
            _Loop.call(self.client.disconnect(), 5.0)
        except Exception:  # the daemon may be gone already; nothing to clean
            pass


class RawQmp:
    """A QMP connection over a plain socket, for malformed input and pre-negotiation."""

    def __init__(self, sock: Path | str, timeout: float = 5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(sock))
        self.file = self.sock.makefile("rwb")
        self.greeting = self.recv()

    def send(self, data: bytes | dict) -> None:
        if isinstance(data, dict):
            data = json.dumps(data).encode() + b"\n"
        self.file.write(data)
        self.file.flush()

    def recv(self) -> dict:
        line = self.file.readline()
        if not line:
            raise EOFError("QMP connection closed")
        return json.loads(line)

    def recv_reply(self) -> dict:
        """Next message that is not an event."""
        while True:
            msg = self.recv()
            if "event" not in msg:
                return msg

    def command(self, msg: dict) -> dict:
        self.send(msg)
        return self.recv_reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


# --------------------------------------------------------------------------
# A minimal NBD client, for what libnbd will not send (garbage, idle clients)

NBD_MAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
NBD_OPT_GO = 7
NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_FLAG_C_FIXED_NEWSTYLE = 1
NBD_FLAG_C_NO_ZEROES = 2
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_CMD_READ = 0


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def nbd_greeting(sock: socket.socket) -> int:
    """Read the fixed-newstyle greeting; return the handshake flags."""
    hdr = _recv_exact(sock, 18)
    if hdr[:8] != NBD_MAGIC or struct.unpack(">Q", hdr[8:16])[0] != IHAVEOPT:
        raise AssertionError(f"bad NBD greeting {hdr!r}")
    return struct.unpack(">H", hdr[16:18])[0]


def nbd_handshake(sock: socket.socket, export: str) -> tuple[int, int]:
    """Fixed newstyle + NBD_OPT_GO, no structured replies.

    Returns (export size, transmission flags); the socket is then in
    transmission phase.
    """
    nbd_greeting(sock)
    sock.sendall(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", IHAVEOPT, NBD_OPT_GO, len(data)) + data)
    size = flags = None
    while True:
        magic, _opt, rtype, rlen = struct.unpack(">QIII", _recv_exact(sock, 20))
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        payload = _recv_exact(sock, rlen)
        if rtype == NBD_REP_INFO and struct.unpack(">H", payload[:2])[0] == 0:
            size, flags = struct.unpack(">QH", payload[2:12])
        elif rtype == NBD_REP_ACK:
            assert size is not None and flags is not None
            return size, flags
        elif rtype & (1 << 31):
            raise AssertionError(f"NBD_OPT_GO refused: type {rtype:#x} {payload!r}")


def nbd_simple_read(sock: socket.socket, offset: int, length: int, handle: int = 1) -> bytes:
    """One NBD_CMD_READ with a simple reply; return the data."""
    sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_READ, handle,
                             offset, length))
    magic, err, rhandle = struct.unpack(">IIQ", _recv_exact(sock, 16))
    assert magic == NBD_SIMPLE_REPLY_MAGIC and err == 0 and rhandle == handle
    return _recv_exact(sock, length)


def connect_unix(path: Path | str, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


# --------------------------------------------------------------------------
# Data model for byte-for-byte checks


class Model:
    """What the image should contain, kept in a bytearray beside the real file."""

    def __init__(self, size: int, initial: bytes | None = None):
        self.data = bytearray(initial if initial is not None else bytes(size))
        assert len(self.data) == size

    def write(self, offset: int, length: int, byte: int) -> None:
        self.data[offset:offset + length] = bytes([byte]) * length

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, length, 0)

    def check_file(self, path: Path, base: int = 0) -> None:
        with open(path, "rb") as f:
            f.seek(base)
            actual = f.read(len(self.data))
        if actual != self.data:
            first = next(i for i in range(min(len(actual), len(self.data)))
                         if actual[i] != self.data[i]) if len(actual) == len(self.data) \
                else min(len(actual), len(self.data))
            pytest.fail(f"{path} differs from the model at offset {first + base:#x} "
                        f"(file len {len(actual)}, model len {len(self.data)})",
                        pytrace=False)


def file_extents(path: Path) -> list[tuple[int, int]]:
    """Data extents of a sparse file via SEEK_DATA/SEEK_HOLE: [(offset, length)]."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        off = 0
        while off < end:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole - data))
            off = hole
    finally:
        os.close(fd)
    return out
