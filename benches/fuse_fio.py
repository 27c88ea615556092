#!/usr/bin/env python3
"""fio on a FUSE export's mounted file, against two storage daemons.

    benches/fuse_fio.sh [--a BIN] [--b BIN] [--image PATH] [--size BYTES]
                        [--format raw|qcow2] [--runtime S] [--repeats N]
                        [--jobs a,b] [--file-opts OPTS] [--iothread]
                        [--daemon-cpus 0] [--fio-cpus 1] [--disk-alone]

Defaults: A = target/release/qsd (or $BENCH_A), B = qemu-storage-daemon
(or $BENCH_B), a 1 GiB raw image in /var/tmp filled with data on a file
node with cache.direct=on, exported writable over FUSE onto a file in a
scratch directory; fio uses libaio with O_DIRECT on that file, 10 s per job,
3 repeats alternating A B A B. Prints a Markdown table with median IOPS or
MiB/s, the ratio A/B, and server CPU time per I/O (the daemon's threads only;
the kernel's FUSE work on the client side is not counted for either).
`--file-opts cache.direct=off` measures through the host page cache instead,
as a `file` node is opened by default in qemu and qsd.
With --disk-alone (raw only), each job is then run by fio alone on the
image (io_uring, O_DIRECT, on the daemon's CPUs): the most any daemon can
serve.

Needs root (FUSE mounts) and /dev/fuse.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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


def mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def fuse_target(image: Path, fmt: str, file_opts: str, iothread: bool) -> lib.Target:
    """The image's node exported writable over FUSE; the QMP socket (set up
    after the export) tells when the mount is ready."""

    def args(workdir: Path) -> tuple[list[str], Path]:
        mnt = workdir / "mnt"
        mnt.write_bytes(b"")
        qmp = workdir / "qmp.sock"
        export = f"type=fuse,id=exp0,node-name=fmt0,mountpoint={mnt},writable=on"
        return lib.export_args(image, fmt, file_opts, export, iothread, qmp), qmp

    return lib.Target(args, lambda sock: str(sock.parent / "mnt"))


def prepare_image(raw: Path, size: int, fmt: str) -> Path:
    raw = lib.prepare_raw_image(raw, size)
    if fmt == "raw":
        return raw
    q = raw.with_suffix(".qcow2")
    if not q.exists() or q.stat().st_mtime < raw.stat().st_mtime:
        lib.run_quiet(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(q)])
    return q


def run_fio(path: str, opts: str, runtime: int, out: Path, cpus: str = "") -> dict:
    pin = [f"--cpus_allowed={cpus}"] if cpus else []
    cmd = ["fio", *pin, "--name=bench", "--ioengine=libaio", "--direct=1",
           f"--filename={path}", "--time_based", f"--runtime={runtime}",
           "--output-format=json", f"--output={out}", *opts.split()]
    lib.run_quiet(cmd, timeout=runtime + 60)
    job = json.loads(out.read_text())["jobs"][0]
    if job["error"]:
        raise SystemExit(f"fio error {job['error']}: {' '.join(cmd)}")
    return job


def measure(spec: lib.DaemonSpec, target: lib.Target, job: str, args) -> lib.Sample:
    opts, unit = JOBS[job]
    daemon = lib.start(spec, target, args.workdir, cpus=args.daemon_cpus)
    mnt = Path(target.uri(daemon.sock))
    try:
        if not mounted(mnt):
            raise SystemExit(f"{spec.label}: {mnt} is not mounted")
        cpu0 = daemon.cpu_seconds()
        res = run_fio(str(mnt), opts, args.runtime, args.workdir / "fio.json",
                      args.fio_cpus)
        cpu1 = daemon.cpu_seconds()
    finally:
        daemon.stop()
        if mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    ios = res["read"]["total_ios"] + res["write"]["total_ios"]
    value = lib.fio_figure(res, unit)
    cpu_per_io = (cpu1 - cpu0) * 1e6 / ios if ios else float("nan")
    return lib.Sample(value, cpu_per_io)


def main() -> None:
    p = lib.bench_parser(__doc__, JOBS, "/var/tmp/qsd-bench.raw")
    p.add_argument("--format", choices=["raw", "qcow2"], default="raw")
    p.add_argument("--iothread", action="store_true", help="run the export on an iothread")
    p.add_argument("--fio-cpus", default="", help="fio cpus_allowed list")
    lib.add_disk_alone_option(p)
    args = p.parse_args()

    lib.need_tool("fio", "fio")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise SystemExit("FUSE exports need root and /dev/fuse")
    a, b = lib.DaemonSpec("A", args.a), lib.DaemonSpec("B", args.b)
    a.resolved(), b.resolved()
    jobs = lib.selected_jobs(args.jobs, JOBS)

    image = prepare_image(Path(args.image), args.size, args.format)
    target = fuse_target(image, args.format, args.file_opts, args.iothread)
    workdir = args.workdir = lib.workdir()
    try:
        results, _ = lib.run_alternating(jobs, lambda j: JOBS[j][1], (a, b), args.repeats,
                                         lambda spec, j: measure(spec, target, j, args))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(lib.markdown_table(results, a, b))
    print("\n" + lib.wake_floor(args.fio_cpus, args.daemon_cpus))
    if args.disk_alone and args.format == "raw":
        print("\n" + lib.disk_alone(image, {j: JOBS[j] for j in jobs}, args.runtime,
                                     args.daemon_cpus))
    elif args.disk_alone:
        print("\ndisk alone: only measured with --format raw")


if __name__ == "__main__":
    main()
