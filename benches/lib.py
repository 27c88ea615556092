"""Shared parts of the daemon benchmarks: images, daemons, CPU accounting, tables.

A benchmark compares two storage daemons ("A" and "B", by default qsd and
qemu-storage-daemon) started with identical command lines. Each measurement
starts a fresh daemon, runs one client workload, and stops the daemon, so
the runs alternate A B A B and neither daemon keeps a warm state. Server CPU
time comes from /proc/PID/stat (utime + stime of all threads).

Later benchmarks (qcow2, FUSE, vhost-user) reuse this by passing their own
``Target`` (how to start the daemon and what the client connects to).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024


@dataclass
class DaemonSpec:
    """One side of the comparison: a label and a binary."""

    label: str
    binary: str

    def resolved(self) -> str:
        path = shutil.which(self.binary) if os.sep not in self.binary else self.binary
        if not path or not os.access(path, os.X_OK):
            raise SystemExit(f"daemon binary {self.binary!r} ({self.label}) not found")
        return path


def default_pair() -> tuple[DaemonSpec, DaemonSpec]:
    a = os.environ.get("BENCH_A", str(REPO_ROOT / "target" / "release" / "qsd"))
    b = os.environ.get("BENCH_B", "qemu-storage-daemon")
    return DaemonSpec("A", a), DaemonSpec("B", b)


def bench_parser(doc: str, jobs: Sequence[str], image: str, runtime_type=int,
                 image_help: Optional[str] = None) -> argparse.ArgumentParser:
    """The options every bench takes: the two daemons, the image, its size,
    run length and repeats, the jobs, the file node's options and the
    daemon's CPUs. A bench adds its own (client CPUs, formats...)."""
    a_def, b_def = default_pair()
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default=a_def.binary, help="daemon A (default qsd)")
    p.add_argument("--b", default=b_def.binary, help="daemon B (default qemu-storage-daemon)")
    p.add_argument("--image", default=image, help=image_help)
    p.add_argument("--size", type=int, default=1024 * MiB)
    p.add_argument("--runtime", type=runtime_type, default=10, help="seconds per job run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--jobs", default=",".join(jobs), help="comma-separated job names")
    p.add_argument("--file-opts", default="cache.direct=on",
                   help="extra options of the file node, same for both daemons")
    p.add_argument("--daemon-cpus", default="", help="taskset CPU list for the daemon")
    return p


def selected_jobs(arg: str, known: Sequence[str]) -> list[str]:
    """The jobs named in `--jobs`, refusing unknown names."""
    jobs = [j for j in arg.split(",") if j]
    unknown = [j for j in jobs if j not in known]
    if unknown:
        raise SystemExit(f"unknown jobs {unknown}; known: {list(known)}")
    return jobs


# ---------------------------------------------------------------------------
# Images


def prepare_raw_image(path: Path, size: int) -> Path:
    """A raw image of ``size`` bytes filled with non-zero data, created once.

    A marker file next to it records the size it was filled for, so later
    runs reuse it. Data is written (not left sparse) so reads hit real blocks.
    """
    marker = path.with_name(path.name + ".filled")
    if path.exists() and marker.exists() and marker.read_text().strip() == str(size) \
            and path.stat().st_size == size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    block = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        written = 0
        while written < size:
            n = min(MiB, size - written)
            block[0:8] = written.to_bytes(8, "little")  # make every MiB distinct
            f.write(block[:n])
            written += n
        f.flush()
        os.fsync(f.fileno())
    marker.write_text(str(size))
    return path


# ---------------------------------------------------------------------------
# Daemons


def unix_connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


@dataclass
class Running:
    """A started daemon: process, its socket, and a log of its stderr."""

    proc: subprocess.Popen
    sock: Path
    stderr_path: Path
    started_ns: int
    ready_ns: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process so far."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        # After the ")" the fields start at "state" (field 3); utime is 14, stime 15.
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Target:
    """How to start a daemon for one benchmark and where clients connect.

    ``args(workdir)`` returns the daemon arguments (without the binary) and
    the NBD/vhost socket path to wait for; ``uri(sock)`` the client URI.
    """

    args: Callable[[Path], tuple[list[str], Path]]
    uri: Callable[[Path], str]


def nbd_raw_target(image: Path, file_opts: str = "cache.direct=on",
                   export: str = "exp") -> Target:
    """A raw image on a file node, exported writable over NBD on a UNIX socket."""

    def args(workdir: Path) -> tuple[list[str], Path]:
        sock = workdir / "nbd.sock"
        opts = f",{file_opts}" if file_opts else ""
        return ([
            "--blockdev", f"driver=file,node-name=file0,filename={image}{opts}",
            "--blockdev", "driver=raw,node-name=fmt0,file=file0",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", f"type=nbd,id=exp0,node-name=fmt0,name={export},writable=on",
        ], sock)

    return Target(args, lambda sock: f"nbd+unix:///{export}?socket={sock}")


def export_args(image: Path, fmt: str, file_opts: str, export: str, iothread: bool,
                qmp: Path) -> list[str]:
    """`image` on a file node `file0` (with `file_opts`) under a `fmt` node
    `fmt0`, exported by `export` (its options, without the iothread), then a
    QMP monitor on `qmp`. The monitor is set up after the export, so its
    socket tells when the export is ready. With `iothread`, the export runs
    on iothread `io0`."""
    opts = f",{file_opts}" if file_opts else ""
    io = ",iothread=io0" if iothread else ""
    pre = ["--object", "iothread,id=io0"] if iothread else []
    return [
        *pre,
        "--blockdev", f"driver=file,node-name=file0,filename={image}{opts}",
        "--blockdev", f"driver={fmt},node-name=fmt0,file=file0",
        "--export", f"{export}{io}",
        "--chardev", f"socket,id=mon0,path={qmp},server=on,wait=off",
        "--monitor", "chardev=mon0",
    ]


def start(spec: DaemonSpec, target: Target, workdir: Path,
          timeout: float = 10.0, cpus: str = "") -> Running:
    """Start the daemon and wait (polling) until its socket is connectable.

    ``cpus`` (a taskset list such as "0") pins the daemon, to cut noise.
    """
    args, sock = target.args(workdir)
    if sock.exists():
        sock.unlink()
    err = workdir / f"{spec.label}.stderr"
    t0 = time.monotonic_ns()
    with open(err, "ab") as errf:
        pin = ["taskset", "-c", cpus] if cpus else []
        proc = subprocess.Popen([*pin, spec.resolved(), *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=errf)
    run = Running(proc, sock, err, t0)
    deadline = time.monotonic() + timeout
    while not unix_connectable(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            run.stop()
            raise SystemExit(f"{spec.label} ({spec.binary}) did not start:\n"
                             f"{err.read_text(errors='replace')}")
        time.sleep(0.001)
    run.ready_ns = time.monotonic_ns()
    return run


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="qsd-bench-", dir="/tmp"))


# ---------------------------------------------------------------------------
# Statistics and output


@dataclass
class Sample:
    value: float          # IOPS or MiB/s
    cpu_per_io_us: float  # server CPU microseconds per I/O


@dataclass
class Result:
    job: str
    unit: str
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def median(self, label: str) -> tuple[float, float]:
        s = self.samples.get(label, [])
        if not s:
            return float("nan"), float("nan")
        return (statistics.median(x.value for x in s),
                statistics.median(x.cpu_per_io_us for x in s))


def run_alternating(jobs: Sequence[str], unit_of: Callable[[str], str],
                    specs: Sequence[DaemonSpec], repeats: int,
                    measure_one: Callable[[DaemonSpec, str], Optional[Sample]],
                    ) -> tuple[list[Result], set[tuple[str, str]]]:
    """Run every job ``repeats`` times, the daemons taking turns (A B A B),
    and print each sample to stderr. ``measure_one`` returns None when a
    daemon cannot run a job; that job is then skipped for that daemon.
    Returns the results and the (job, label) pairs that were skipped."""
    results, unsupported = [], set()
    for job in jobs:
        res = Result(job, unit_of(job))
        for rep in range(repeats):
            for spec in specs:
                if (job, spec.label) in unsupported:
                    continue
                s = measure_one(spec, job)
                if s is None:
                    unsupported.add((job, spec.label))
                    continue
                res.samples.setdefault(spec.label, []).append(s)
                print(f"{job} run {rep + 1} {spec.label}: {s.value:,.0f} {res.unit}, "
                      f"{s.cpu_per_io_us:.1f} µs CPU/IO", file=sys.stderr)
        results.append(res)
    return results, unsupported


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def markdown_table(results: Sequence[Result], a: DaemonSpec, b: DaemonSpec) -> str:
    lines = [
        f"A = `{a.binary}`, B = `{b.binary}`; medians of "
        f"{max((len(r.samples.get(a.label, [])) for r in results), default=0)} runs each",
        "",
        "| job | A | B | A/B | A CPU µs/IO | B CPU µs/IO | CPU A/B |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        va, ca = r.median(a.label)
        vb, cb = r.median(b.label)
        lines.append(f"| {r.job} | {va:,.0f} {r.unit} | {vb:,.0f} {r.unit} | {ratio(va, vb)} "
                     f"| {ca:.1f} | {cb:.1f} | {ratio(ca, cb)} |")
    return "\n".join(lines)


def example_binary(name: str, env: str) -> str:
    """The release build of cargo example `name`, or the path in $`env`."""
    if os.environ.get(env):
        return os.environ[env]
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
    return str(target / "release" / "examples" / name)


def wake_floor(client_cpus: str, daemon_cpus: str) -> str:
    """One line giving this machine's floor for a queue-depth-1 exchange
    between the client's CPU and the daemon's: an eventfd ping-pong between
    two threads pinned there (the `wake_floor` example of qsd-rt, or
    $BENCH_WAKE_FLOOR). On a virtual machine a cross-CPU wake-up is costly,
    and at QD 1 that cost is most of both daemons' time and CPU per I/O."""
    tool = example_binary("wake_floor", "BENCH_WAKE_FLOOR")
    if not os.access(tool, os.X_OK):
        return ("wake-up floor: not measured (build it with: cargo build --release "
                "--example wake_floor -p qsd-rt)")

    def first(cpus: str, default: str) -> str:
        return cpus.replace("-", ",").split(",")[0] or default

    client, server = first(client_cpus, "1"), first(daemon_cpus, "0")
    proc = subprocess.run([tool, client, server, "20000"], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        return f"wake-up floor: not measured ({proc.stderr.strip()})"
    f = json.loads(proc.stdout.strip().splitlines()[-1])
    return (f"wake-up floor (eventfd ping-pong, CPU {client} <-> CPU {server}, no I/O): "
            f"{f['us_per_round_trip']:.1f} µs per round trip "
            f"({f['round_trips_per_s']:,.0f}/s), "
            f"{f['server_cpu_us_per_round_trip']:.1f} µs CPU on the daemon's side")


def fio_figure(job: dict, unit: str) -> float:
    """The headline figure of one fio job's JSON result: IOPS, or MiB/s,
    reads and writes together."""
    if unit == "IOPS":
        return job["read"]["iops"] + job["write"]["iops"]
    return (job["read"]["bw_bytes"] + job["write"]["bw_bytes"]) / MiB


def add_disk_alone_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disk-alone", action="store_true",
                   help="also run each job with fio alone on the image (io_uring, O_DIRECT, "
                        "on the daemon's CPUs): the most any daemon can serve")


def disk_alone(image: Path, jobs: dict[str, tuple[str, str]], runtime: float,
               cpus: str) -> str:
    """A table of what the disk itself does for each job: fio on `image`
    with io_uring and O_DIRECT, pinned like the daemon. `jobs` maps a job
    name to its fio options (rw, bs, iodepth) and the unit of its figure.
    No daemon can serve more than this; at QD1 a daemon adds at least the
    wake-up floor to each request on top of it."""
    lines = [f"disk alone (fio on `{image}`, io_uring, O_DIRECT"
             f"{', CPU ' + cpus if cpus else ''}):", "",
             "| job | disk alone |", "|---|---:|"]
    pin = ["taskset", "-c", cpus] if cpus else []
    for name, (opts, unit) in jobs.items():
        cmd = [*pin, "fio", "--name=disk", f"--filename={image}", "--ioengine=io_uring",
               "--direct=1", "--time_based", f"--runtime={int(runtime * 1000)}ms",
               "--output-format=json", *opts.split()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 60)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
        job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
        lines.append(f"| {name} | {fio_figure(job, unit):,.0f} {unit} |")
    return "\n".join(lines)


def need_tool(name: str, package: str) -> None:
    if shutil.which(name) is None:
        raise SystemExit(f"tool {name} is missing: install package {package}")


def fio_has_nbd_engine() -> bool:
    out = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True)
    return any(line.strip() == "nbd" for line in out.stdout.splitlines())


def run_quiet(cmd: Sequence[str], timeout: Optional[float] = None) -> None:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
