#!/usr/bin/env python3
"""fio over NBD against two storage daemons serving the same qcow2 image.

    benches/qcow2_fio.sh [--a BIN] [--b BIN] [--image PATH] [--empty PATH]
                         [--size BYTES] [--runtime S] [--repeats N] [--jobs a,b]
                         [--file-opts OPTS] [--qcow2-opts OPTS]
                         [--daemon-cpus 0] [--fio-cpus 1]

Defaults: A = target/release/qsd (or $BENCH_A), B = qemu-storage-daemon
(or $BENCH_B), 10 s per job, 3 repeats alternating A B A B.

Jobs (fio's nbd engine, node chain file -> qcow2 -> NBD export):
- randread-4k-qd32, read-1m, randwrite-4k-qd32: on a fully allocated qcow2
  image (``--image``, made once by ``qemu-img convert`` from a random raw
  file of ``--size`` bytes, 1 GiB by default);
- randwrite-4k-qd32-alloc: into an empty qcow2 image (``--empty``) that is
  created again before every daemon run, so both daemons allocate clusters.

Prints a Markdown table with the median IOPS or MiB/s of each daemon, the
ratio A/B, and server CPU time per I/O.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lib  # noqa: E402
import nbd_fio  # noqa: E402  (reuses its fio runner)


@dataclass
class Job:
    opts: str
    unit: str
    empty: bool  # runs on a freshly created empty image


JOBS = {
    "randread-4k-qd32": Job("--rw=randread --bs=4k --iodepth=32", "IOPS", False),
    "read-1m": Job("--rw=read --bs=1M --iodepth=8", "MiB/s", False),
    "randwrite-4k-qd32-alloc": Job("--rw=randwrite --bs=4k --iodepth=32", "IOPS", True),
    "randwrite-4k-qd32": Job("--rw=randwrite --bs=4k --iodepth=32", "IOPS", False),
}


def qemu_img(*args: str) -> None:
    lib.run_quiet(["qemu-img", *args], timeout=600)


def prepare_allocated(image: Path, size: int) -> Path:
    """A fully allocated qcow2 image converted from a random raw file, made once."""
    src = image.with_name(image.name + ".src.raw")
    marker = image.with_name(image.name + ".made")
    if image.exists() and marker.exists() and marker.read_text().strip() == str(size):
        return image
    lib.prepare_raw_image(src, size)
    tmp = image.with_name(image.name + ".tmp")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(src), str(tmp))
    tmp.rename(image)
    marker.write_text(str(size))
    return image


def create_empty(image: Path, size: int) -> None:
    if image.exists():
        image.unlink()
    qemu_img("create", "-q", "-f", "qcow2", str(image), str(size))


def qcow2_target(image: Path, file_opts: str, qcow2_opts: str,
                 export: str = "exp") -> lib.Target:
    """file -> qcow2 node exported writable over NBD on a UNIX socket."""

    def args(workdir: Path) -> tuple[list[str], Path]:
        sock = workdir / "nbd.sock"
        fopts = f",{file_opts}" if file_opts else ""
        qopts = f",{qcow2_opts}" if qcow2_opts else ""
        return ([
            "--blockdev", f"driver=file,node-name=file0,filename={image}{fopts}",
            "--blockdev", f"driver=qcow2,node-name=fmt0,file=file0{qopts}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", f"type=nbd,id=exp0,node-name=fmt0,name={export},writable=on",
        ], sock)

    return lib.Target(args, lambda sock: f"nbd+unix:///{export}?socket={sock}")


def measure(spec: lib.DaemonSpec, job: Job, args) -> lib.Sample:
    image = args.empty if job.empty else args.image
    if job.empty:
        create_empty(image, args.size)
    target = qcow2_target(image, args.file_opts, args.qcow2_opts)
    daemon = lib.start(spec, target, args.workdir, cpus=args.daemon_cpus)
    try:
        cpu0 = daemon.cpu_seconds()
        res = nbd_fio.run_fio(target.uri(daemon.sock), job.opts, args.runtime,
                              args.workdir / "fio.json", args.fio_cpus)
        cpu1 = daemon.cpu_seconds()
    finally:
        daemon.stop()
    ios = res["read"]["total_ios"] + res["write"]["total_ios"]
    value = lib.fio_figure(res, job.unit)
    cpu_per_io = (cpu1 - cpu0) * 1e6 / ios if ios else float("nan")
    if job.empty:
        # The image must still be valid qcow2 after the daemon's clean exit.
        chk = subprocess.run(["qemu-img", "check", "-q", str(image)], capture_output=True,
                             text=True)
        if chk.returncode != 0:
            raise SystemExit(f"{spec.label}: qemu-img check failed after {job.opts}:\n"
                             f"{chk.stdout}{chk.stderr}")
    return lib.Sample(value, cpu_per_io)


def parse_args() -> argparse.Namespace:
    p = lib.bench_parser(__doc__, JOBS, "/var/tmp/qsd-bench.qcow2",
                         image_help="the allocated image (made once, reused)")
    p.add_argument("--empty", type=Path, default=Path("/var/tmp/qsd-bench-empty.qcow2"),
                   help="the empty image, re-created before every allocating run")
    p.add_argument("--qcow2-opts", default="",
                   help="extra options of the qcow2 node, e.g. l2-cache-size=4M")
    p.add_argument("--fio-cpus", default="", help="fio cpus_allowed list")
    args = p.parse_args()
    args.image = Path(args.image)
    return args


def main() -> None:
    args = parse_args()
    lib.need_tool("fio", "fio")
    lib.need_tool("qemu-img", "qemu-utils")
    if not lib.fio_has_nbd_engine():
        raise SystemExit("fio on this machine has no nbd engine (needs fio built with libnbd)")
    a, b = lib.DaemonSpec("A", args.a), lib.DaemonSpec("B", args.b)
    a.resolved(), b.resolved()
    jobs = lib.selected_jobs(args.jobs, JOBS)

    if any(not JOBS[j].empty for j in jobs):
        prepare_allocated(args.image, args.size)
    args.workdir = lib.workdir()
    try:
        results, _ = lib.run_alternating(jobs, lambda j: JOBS[j].unit, (a, b), args.repeats,
                                         lambda spec, j: measure(spec, JOBS[j], args))
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
        if args.empty.exists():
            args.empty.unlink()
    print(lib.markdown_table(results, a, b))


if __name__ == "__main__":
    main()
