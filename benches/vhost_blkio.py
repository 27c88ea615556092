#!/usr/bin/env python3
"""vhost-user-blk with a libblkio client, against two storage daemons.

    benches/vhost_blkio.sh [--a BIN] [--b BIN] [--client BIN] [--image PATH]
                           [--size BYTES] [--runtime S] [--repeats N]
                           [--jobs a,b] [--file-opts OPTS] [--iothread]
                           [--daemon-cpus 0] [--client-cpus 1] [--disk-alone]

Each daemon serves a raw image (default 1 GiB in /var/tmp, filled once with
non-zero data) on a file node with the given options (default
cache.direct=on) through ``--export type=vhost-user-blk,...,writable=on,
num-queues=1``. The client is the ``blkio_load`` example of the
qsd-export-vhost-user-blk crate (libblkio's virtio-blk-vhost-user driver,
one queue, buffers in a shared memory region, random non-zero write data):

    cargo build --release --example blkio_load -p qsd-export-vhost-user-blk

Defaults: A = target/release/qsd (or $BENCH_A), B = qemu-storage-daemon
(or $BENCH_B), client = $CARGO_TARGET_DIR (or target)/release/examples/
blkio_load (or $BENCH_BLKIO_LOAD), 10 s per job, 3 repeats alternating
A B A B, a fresh daemon per run. Prints a Markdown table with median IOPS or
MiB/s, the ratio A/B, and server CPU time per I/O (utime + stime of the
daemon from /proc over the client's whole run, connection set-up included).
With --disk-alone, each job is then run by fio alone on the image
(io_uring, O_DIRECT, on the daemon's CPUs): the most any daemon can serve.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lib  # noqa: E402

# name -> (pattern, block size, queue depth, unit of the headline number)
JOBS = {
    "randread-4k-qd1": ("randread", "4k", 1, "IOPS"),
    "randread-4k-qd32": ("randread", "4k", 32, "IOPS"),
    "randwrite-4k-qd1": ("randwrite", "4k", 1, "IOPS"),
    "randwrite-4k-qd32": ("randwrite", "4k", 32, "IOPS"),
    "read-1m-qd8": ("read", "1M", 8, "MiB/s"),
    "write-1m-qd8": ("write", "1M", 8, "MiB/s"),
}




def vhost_target(image: Path, file_opts: str, iothread: bool) -> lib.Target:
    """The raw image exported writable over vhost-user-blk. The QMP monitor is
    set up after the export, so its socket tells when the export listens
    (probing the vhost socket itself would look like a front-end)."""

    def args(workdir: Path) -> tuple[list[str], Path]:
        vsock = workdir / "vhost.sock"
        if vsock.exists():
            vsock.unlink()
        qmp = workdir / "qmp.sock"
        export = (f"type=vhost-user-blk,id=exp0,node-name=fmt0,addr.type=unix,"
                  f"addr.path={vsock},writable=on,num-queues=1")
        return lib.export_args(image, "raw", file_opts, export, iothread, qmp), qmp

    return lib.Target(args, lambda sock: str(sock.parent / "vhost.sock"))


def run_client(client: str, sock: str, job: str, runtime: float, size: int,
               cpus: str) -> dict:
    pattern, bs, qd, _ = JOBS[job]
    pin = ["taskset", "-c", cpus] if cpus else []
    cmd = [*pin, client, sock, pattern, bs, str(qd), str(runtime), str(size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 60)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(spec: lib.DaemonSpec, target: lib.Target, job: str, args) -> lib.Sample:
    unit = JOBS[job][3]
    daemon = lib.start(spec, target, args.workdir, cpus=args.daemon_cpus)
    try:
        cpu0 = daemon.cpu_seconds()
        res = run_client(args.client, target.uri(daemon.sock), job, args.runtime,
                         args.size, args.client_cpus)
        cpu1 = daemon.cpu_seconds()
    finally:
        daemon.stop()
    ios = res["ios"]
    value = res["iops"] if unit == "IOPS" else res["mib_s"]
    cpu_per_io = (cpu1 - cpu0) * 1e6 / ios if ios else float("nan")
    return lib.Sample(value, cpu_per_io)


def parse_args() -> argparse.Namespace:
    p = lib.bench_parser(__doc__, JOBS, "/var/tmp/qsd-bench-vhost.raw", runtime_type=float)
    p.add_argument("--client", default=lib.example_binary("blkio_load", "BENCH_BLKIO_LOAD"),
                   help="the blkio_load binary")
    p.add_argument("--iothread", action="store_true",
                   help="run the export in an iothread object (both daemons)")
    p.add_argument("--client-cpus", default="", help="taskset CPU list for the client")
    lib.add_disk_alone_option(p)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    a, b = lib.DaemonSpec("A", args.a), lib.DaemonSpec("B", args.b)
    a.resolved(), b.resolved()
    if not os.access(args.client, os.X_OK):
        raise SystemExit(f"client {args.client} not found; build it with: cargo build "
                         "--release --example blkio_load -p qsd-export-vhost-user-blk")
    jobs = lib.selected_jobs(args.jobs, JOBS)

    image = lib.prepare_raw_image(Path(args.image), args.size)
    target = vhost_target(image, args.file_opts, args.iothread)
    workdir = args.workdir = lib.workdir()
    load0 = os.getloadavg()[0]
    try:
        results, _ = lib.run_alternating(jobs, lambda j: JOBS[j][3], (a, b), args.repeats,
                                         lambda spec, j: measure(spec, target, j, args))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # Other work on the machine skews the figures; the load average says how much.
    print(f"file options: {args.file_opts or '(none)'}"
          f"{', iothread' if args.iothread else ''}; client: libblkio blkio_load; "
          f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end\n")
    print(lib.markdown_table(results, a, b))
    print("\n" + lib.wake_floor(args.client_cpus, args.daemon_cpus))
    if args.disk_alone:
        fio_jobs = {j: (f"--rw={JOBS[j][0]} --bs={JOBS[j][1]} --iodepth={JOBS[j][2]}", JOBS[j][3])
                    for j in jobs}
        print("\n" + lib.disk_alone(image, fio_jobs, args.runtime, args.daemon_cpus))


if __name__ == "__main__":
    main()
