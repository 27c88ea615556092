#!/usr/bin/env python3
"""fio over NBD against two storage daemons on the same raw image.

    benches/nbd_fio.sh [--a BIN] [--b BIN] [--image PATH] [--size BYTES]
                       [--runtime S] [--repeats N] [--jobs a,b] [--file-opts OPTS]
                       [--daemon-cpus 0] [--fio-cpus 1] [--disk-alone]

Defaults: A = target/release/qsd (or $BENCH_A), B = qemu-storage-daemon
(or $BENCH_B), a 1 GiB image in /var/tmp filled with data, 10 s per job,
3 repeats alternating A B A B. Prints a Markdown table with median IOPS or
MiB/s of each daemon, the ratio A/B, and server CPU time per I/O.
With --disk-alone, each job is then run by fio alone on the image
(io_uring, O_DIRECT, on the daemon's CPUs): the most any daemon can serve.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lib  # noqa: E402

# name -> (fio options, unit of the headline number)
JOBS = {
    "randread-4k-qd1": ("--rw=randread --bs=4k --iodepth=1", "IOPS"),
    "randread-4k-qd32": ("--rw=randread --bs=4k --iodepth=32", "IOPS"),
    "randwrite-4k-qd1": ("--rw=randwrite --bs=4k --iodepth=1", "IOPS"),
    "randwrite-4k-qd32": ("--rw=randwrite --bs=4k --iodepth=32", "IOPS"),
    "read-1m": ("--rw=read --bs=1M --iodepth=8", "MiB/s"),
    "write-1m": ("--rw=write --bs=1M --iodepth=8", "MiB/s"),
}


def run_fio(uri: str, opts: str, runtime: int, out: Path, cpus: str = "") -> dict:
    pin = [f"--cpus_allowed={cpus}"] if cpus else []
    cmd = ["fio", *pin, "--name=bench", "--ioengine=nbd", f"--uri={uri}", "--time_based",
           f"--runtime={runtime}", "--output-format=json",
           f"--output={out}", *opts.split()]
    lib.run_quiet(cmd, timeout=runtime + 60)
    job = json.loads(out.read_text())["jobs"][0]
    if job["error"]:
        raise SystemExit(f"fio error {job['error']}: {' '.join(cmd)}")
    return job


def measure(spec: lib.DaemonSpec, target: lib.Target, job: str, args) -> lib.Sample:
    opts, unit = JOBS[job]
    daemon = lib.start(spec, target, args.workdir, cpus=args.daemon_cpus)
    try:
        cpu0 = daemon.cpu_seconds()
        res = run_fio(target.uri(daemon.sock), opts, args.runtime,
                      args.workdir / "fio.json", args.fio_cpus)
        cpu1 = daemon.cpu_seconds()
    finally:
        daemon.stop()
    # No ramp time: fio's I/O count covers the whole CPU measurement window
    # (which also includes connection set-up, negligible over seconds).
    ios = res["read"]["total_ios"] + res["write"]["total_ios"]
    value = lib.fio_figure(res, unit)
    cpu_per_io = (cpu1 - cpu0) * 1e6 / ios if ios else float("nan")
    return lib.Sample(value, cpu_per_io)


def main() -> None:
    p = lib.bench_parser(__doc__, JOBS, "/var/tmp/qsd-bench.raw")
    p.add_argument("--fio-cpus", default="", help="fio cpus_allowed list")
    lib.add_disk_alone_option(p)
    args = p.parse_args()

    lib.need_tool("fio", "fio")
    if not lib.fio_has_nbd_engine():
        raise SystemExit("fio on this machine has no nbd engine (needs fio built with libnbd)")
    a, b = lib.DaemonSpec("A", args.a), lib.DaemonSpec("B", args.b)
    a.resolved(), b.resolved()
    jobs = lib.selected_jobs(args.jobs, JOBS)

    image = lib.prepare_raw_image(Path(args.image), args.size)
    target = lib.nbd_raw_target(image, args.file_opts)
    workdir = args.workdir = lib.workdir()
    try:
        results, _ = lib.run_alternating(jobs, lambda j: JOBS[j][1], (a, b), args.repeats,
                                         lambda spec, j: measure(spec, target, j, args))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(lib.markdown_table(results, a, b))
    print("\n" + lib.wake_floor(args.fio_cpus, args.daemon_cpus))
    if args.disk_alone:
        print("\n" + lib.disk_alone(image, {j: JOBS[j] for j in jobs}, args.runtime,
                                     args.daemon_cpus))


if __name__ == "__main__":
    main()
