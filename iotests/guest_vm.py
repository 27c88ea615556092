"""Boot a small Linux guest in qemu-system-x86_64 and run a shell script in it.

The guest is built by ``iotests/guest/build-guest.sh`` (Debian's kernel as an
uncompressed vmlinux, a busybox initramfs with the virtio modules and fio)
into ``$QSD_GUEST_CACHE`` (default /var/tmp/qsd-guest). Each boot appends a
second cpio to that initramfs with ``/test/run`` (the caller's script after a
small prelude of helpers) and any extra files; the guest's /init runs it,
prints ``QSD-GUEST-EXIT=<status>`` on the serial console and powers off.

The machine runs under TCG (KVM is not assumed), boots the vmlinux through
PVH, and has its RAM in a shared memfd so that a vhost-user back-end can map
it. ``VhostBlk`` describes one ``vhost-user-blk-pci`` device.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import pytest

GUEST_DIR = Path(__file__).resolve().parent / "guest"
BUILD_SCRIPT = GUEST_DIR / "build-guest.sh"

# Seconds a guest may run before it is killed, unless the caller says.
DEFAULT_TIMEOUT = 120.0
EXIT_RE = re.compile(r"QSD-GUEST-EXIT=(\d+)")

# Sourced by every guest script before the caller's text.
PRELUDE = r"""
fail() { echo "GUEST-FAIL: $*"; exit 1; }
# wait_disk NAME: wait up to 20 s for /dev/NAME (the driver probes
# asynchronously after insmod).
wait_disk() {
    i=0
    while [ ! -b "/dev/$1" ]; do
        i=$((i + 1))
        [ $i -le 200 ] || fail "no /dev/$1; virtio devices: $(ls /sys/bus/virtio/devices)"
        sleep 0.1
    done
}
# md5 FILE [dd options...]: md5 of what dd reads.
md5() { f=$1; shift; dd if="$f" "$@" 2>/dev/null | md5sum | cut -d' ' -f1; }
"""


def guest_cache() -> Path:
    return Path(os.environ.get("QSD_GUEST_CACHE", "/var/tmp/qsd-guest"))


_ready: Optional[tuple[Path, Path]] = None


def guest_image() -> tuple[Path, Path]:
    """(vmlinux, base.cpio), building the guest first if it is missing or
    stale; FAIL the test with instructions when that is not possible."""
    global _ready
    if _ready is not None:
        return _ready
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("tool qemu-system-x86_64 is missing: install package qemu-system-x86 "
                    "from bookworm-backports (scripts/setup-test-deps.sh does)", pytrace=False)
    proc = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, check=False)
    out = guest_cache() / "out"
    vmlinux, cpio = out / "vmlinux", out / "base.cpio"
    if proc.returncode != 0 or not vmlinux.is_file() or not cpio.is_file():
        pytest.fail(f"the test guest is not built and {BUILD_SCRIPT} failed "
                    f"(rc={proc.returncode}); run scripts/setup-test-deps.sh as root\n"
                    f"{proc.stdout}{proc.stderr}", pytrace=False)
    _ready = (vmlinux, cpio)
    return _ready


# --------------------------------------------------------------------------
# A newc cpio writer (the format the kernel unpacks into its rootfs)


def _cpio_entry(name: str, mode: int, data: bytes, ino: int) -> bytes:
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    blob = head + name.encode() + b"\0"
    blob += b"\0" * (-len(blob) % 4)
    blob += data
    blob += b"\0" * (-len(blob) % 4)
    return blob


def cpio_newc(files: Mapping[str, tuple[bytes, int]]) -> bytes:
    """An archive of ``{path: (data, permission bits)}`` with the parent
    directories of every path, ended by the trailer."""
    dirs = sorted({str(p) for name in files for p in Path(name).parents if str(p) != "."})
    out = bytearray()
    ino = 1
    for d in dirs:
        out += _cpio_entry(d, 0o040755, b"", ino)
        ino += 1
    for name, (data, perm) in sorted(files.items()):
        out += _cpio_entry(name, 0o100000 | perm, data, ino)
        ino += 1
    out += _cpio_entry("TRAILER!!!", 0, b"", 0)
    out += b"\0" * (-len(out) % 512)
    return bytes(out)


# --------------------------------------------------------------------------
# The machine


@dataclass
class VhostBlk:
    """One ``-device vhost-user-blk-pci`` on a UNIX socket."""

    socket: Path
    num_queues: int = 1
    # qemu reconnects to the socket this long after the back-end went away;
    # 0 = never (then a lost back-end breaks the device).
    reconnect_ms: int = 0

    def args(self, index: int) -> list[str]:
        chardev = f"socket,id=vhost{index},path={self.socket}"
        if self.reconnect_ms:
            chardev += f",reconnect-ms={self.reconnect_ms}"
        return ["-chardev", chardev,
                "-device", f"vhost-user-blk-pci,chardev=vhost{index},"
                           f"num-queues={self.num_queues},id=vblk{index}"]


@dataclass
class GuestResult:
    """What the guest printed on its console and the script's exit status."""

    output: str
    rc: Optional[int]
    seconds: float

    def values(self) -> dict[str, str]:
        """Every ``KEY=value`` line the script printed (the last one wins)."""
        vals = {}
        for line in self.output.splitlines():
            m = re.fullmatch(r"\s*([A-Z][A-Z0-9_]*)=(\S*)\s*", line)
            if m:
                vals[m.group(1)] = m.group(2)
        return vals

    def check(self) -> "GuestResult":
        """FAIL the test unless the script exited with status 0."""
        if self.rc != 0:
            pytest.fail(f"guest script failed (status {self.rc}) after {self.seconds:.1f}s; "
                        f"console:\n{self.output}", pytrace=False)
        return self


class Guest:
    """One qemu-system-x86_64 process running a guest script.

    ``start()`` returns at once; ``wait_for(text)`` polls the console;
    ``wait()`` returns the result once the guest powered off.
    """

    def __init__(self, workdir: Path, script: str, disks: Sequence[VhostBlk] = (),
                 files: Optional[Mapping[str, bytes]] = None, smp: int = 1,
                 mem_mib: int = 512, timeout: float = DEFAULT_TIMEOUT, name: str = "guest"):
        self.workdir = workdir
        self.script = script
        self.disks = list(disks)
        self.files = dict(files or {})
        self.smp = smp
        self.mem_mib = mem_mib
        self.timeout = timeout
        self.console = workdir / f"{name}.console"
        self.stderr_path = workdir / f"{name}.qemu-stderr"
        self.initrd = workdir / f"{name}.initrd"
        self.proc: Optional[subprocess.Popen] = None
        self.started = 0.0
        # What the test did to the guest meanwhile, for failure messages.
        self.notes: list[str] = []

    def _write_initrd(self, base: Path) -> None:
        entries = {"test/run": (("#!/bin/sh\n" + PRELUDE + self.script).encode(), 0o755)}
        for name, data in self.files.items():
            entries["test/" + name] = (data, 0o644)
        with open(self.initrd, "wb") as out, open(base, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
            out.write(cpio_newc(entries))

    def argv(self, vmlinux: Path) -> list[str]:
        mem = f"{self.mem_mib}M"
        argv = ["qemu-system-x86_64",
                "-machine", "q35,accel=tcg,memory-backend=mem", "-cpu", "max",
                "-smp", str(self.smp), "-m", mem,
                # vhost-user needs guest RAM the back-end can mmap.
                "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-serial", f"file:{self.console}",
                "-kernel", str(vmlinux), "-initrd", str(self.initrd),
                "-append", "console=ttyS0 quiet loglevel=3 panic=-1"]
        for i, disk in enumerate(self.disks):
            argv += disk.args(i)
        return argv

    def start(self) -> "Guest":
        vmlinux, base = guest_image()
        self._write_initrd(base)
        self.console.write_bytes(b"")
        with open(self.stderr_path, "wb") as err:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(self.argv(vmlinux), stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err, cwd=self.workdir)
        return self

    def output(self) -> str:
        try:
            return self.console.read_bytes().decode(errors="replace").replace("\r", "")
        except OSError:
            return ""

    def _fail(self, what: str) -> None:
        self.kill()
        stderr = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        notes = "".join(f"\n  {n}" for n in self.notes)
        pytest.fail(f"{what}\nmeanwhile:{notes or ' nothing'}\n"
                    f"qemu: {shlex.join(self.argv(Path('vmlinux')))}\n"
                    f"qemu stderr:\n{stderr}\nconsole:\n{self.output()}", pytrace=False)

    def note(self, text: str) -> None:
        self.notes.append(f"{time.monotonic() - self.started:6.1f}s {text}")

    def remaining(self) -> float:
        return self.timeout - (time.monotonic() - self.started)

    def wait_for(self, text: str) -> None:
        """Poll the console until ``text`` appears; FAIL if qemu exits first
        or the guest's time runs out."""
        assert self.proc is not None
        while text not in self.output():
            if self.proc.poll() is not None:
                self._fail(f"the guest exited (qemu rc={self.proc.returncode}) before "
                           f"printing {text!r}")
            if self.remaining() <= 0:
                self._fail(f"guest timeout: {text!r} not printed within {self.timeout:.0f}s")
            time.sleep(0.05)

    def wait(self) -> GuestResult:
        """Wait until the guest powered off; FAIL on a timeout."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout=max(self.remaining(), 0.1))
        except subprocess.TimeoutExpired:
            self._fail(f"guest timeout: still running after {self.timeout:.0f}s (killed)")
        out = self.output()
        found = EXIT_RE.findall(out)
        if self.proc.returncode != 0 and not found:
            self._fail(f"qemu exited with rc={self.proc.returncode} and no guest exit status")
        rc = int(found[-1]) if found else None
        return GuestResult(out, rc, time.monotonic() - self.started)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_guest(workdir: Path, script: str, **kwargs) -> GuestResult:
    """Boot, run ``script`` (see ``Guest``), power off; return the result."""
    guest = Guest(workdir, script, **kwargs).start()
    try:
        return guest.wait()
    finally:
        guest.kill()
