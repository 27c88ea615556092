#!/usr/bin/env python3
"""fio over NBD against two storage daemons serving LUKS-encrypted images.

    benches/luks_fio.sh [--a BIN] [--b BIN] [--image PATH] [--size BYTES]
                        [--runtime S] [--repeats N] [--jobs a,b] [--file-opts OPTS]
                        [--daemon-cpus 0] [--fio-cpus 1]

Defaults: A = target/release/qsd (or $BENCH_A), B = qemu-storage-daemon
(or $BENCH_B), 1 GiB images in /var/tmp, 10 s per job, 3 repeats
alternating A B A B.

Jobs (fio's nbd engine):
- luks-*: file -> luks (aes-256-xts-plain64, qemu's default) -> NBD export;
- qcow2luks-*: file -> qcow2 with ``encrypt.format=luks`` -> NBD export.
Each in read-1m, write-1m (QD8), randread-4k-qd32 and randwrite-4k-qd32.
Images are made once with ``qemu-img convert`` from random data, so every
block is allocated and encrypted. A daemon that refuses an image (it fails
to start) is reported as "unsupported" for that job.

Prints a Markdown table with the median IOPS or MiB/s of each daemon, the
ratio A/B, and server CPU time per I/O.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lib  # noqa: E402
import nbd_fio  # noqa: E402  (reuses its fio runner)

PASSPHRASE = "qsd-bench-passphrase"
SECRET = f"secret,id=sec0,data={PASSPHRASE}"

PATTERNS = {
    "read-1m": ("--rw=read --bs=1M --iodepth=8", "MiB/s"),
    "write-1m": ("--rw=write --bs=1M --iodepth=8", "MiB/s"),
    "randread-4k-qd32": ("--rw=randread --bs=4k --iodepth=32", "IOPS"),
    "randwrite-4k-qd32": ("--rw=randwrite --bs=4k --iodepth=32", "IOPS"),
}
FORMATS = ("luks", "qcow2luks")
JOBS = {f"{fmt}-{pat}": (fmt, *PATTERNS[pat]) for fmt in FORMATS for pat in PATTERNS}


def prepare(image: Path, fmt: str, size: int) -> Path:
    """An encrypted image converted from random data, made once."""
    marker = image.with_name(image.name + ".made")
    if image.exists() and marker.exists() and marker.read_text().strip() == str(size):
        return image
    src = lib.prepare_raw_image(image.with_name("qsd-bench-luks-src.raw"), size)
    if fmt == "luks":
        out_fmt, opts = "luks", "key-secret=sec0,iter-time=10"
    else:
        out_fmt, opts = "qcow2", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
    tmp = image.with_name(image.name + ".tmp")
    lib.run_quiet(["qemu-img", "convert", "--object", SECRET, "-f", "raw", "-O", out_fmt,
                   "-o", opts, str(src), str(tmp)], timeout=1200)
    tmp.rename(image)
    marker.write_text(str(size))
    return image


def target(image: Path, fmt: str, file_opts: str, export: str = "exp") -> lib.Target:
    """file -> luks (or qcow2 with LUKS) exported writable over NBD."""

    def args(workdir: Path) -> tuple[list[str], Path]:
        sock = workdir / "nbd.sock"
        opts = f",{file_opts}" if file_opts else ""
        fmt_node = ("driver=luks,node-name=fmt0,file=file0,key-secret=sec0" if fmt == "luks"
                    else "driver=qcow2,node-name=fmt0,file=file0,"
                         "encrypt.format=luks,encrypt.key-secret=sec0")
        return ([
            "--object", SECRET,
            "--blockdev", f"driver=file,node-name=file0,filename={image}{opts}",
            "--blockdev", fmt_node,
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", f"type=nbd,id=exp0,node-name=fmt0,name={export},writable=on",
        ], sock)

    return lib.Target(args, lambda sock: f"nbd+unix:///{export}?socket={sock}")


def measure(spec: lib.DaemonSpec, tgt: lib.Target, job: str, args) -> lib.Sample | None:
    """One run; None when the daemon refuses the image."""
    _, opts, unit = JOBS[job]
    try:
        daemon = lib.start(spec, tgt, args.workdir, cpus=args.daemon_cpus)
    except SystemExit as e:
        why = (str(e).strip().splitlines() or ["daemon did not start"])[-1]
        print(f"{job} {spec.label}: unsupported ({why})", file=sys.stderr)
        return None
    try:
        cpu0 = daemon.cpu_seconds()
        res = nbd_fio.run_fio(tgt.uri(daemon.sock), opts, args.runtime,
                              args.workdir / "fio.json", args.fio_cpus)
        cpu1 = daemon.cpu_seconds()
    finally:
        daemon.stop()
    ios = res["read"]["total_ios"] + res["write"]["total_ios"]
    value = lib.fio_figure(res, unit)
    cpu_per_io = (cpu1 - cpu0) * 1e6 / ios if ios else float("nan")
    return lib.Sample(value, cpu_per_io)


def table(results: list[lib.Result], unsupported: set, a: lib.DaemonSpec,
          b: lib.DaemonSpec) -> str:
    """lib's table, with "unsupported" where a daemon refused the image."""
    lines = lib.markdown_table(results, a, b).splitlines()
    out = lines[:4]
    for r, line in zip(results, lines[4:]):
        cells = []
        for spec in (a, b):
            value, cpu = r.median(spec.label)
            if (r.job, spec.label) in unsupported:
                cells.append(("unsupported", "-"))
            else:
                cells.append((f"{value:,.0f} {r.unit}", f"{cpu:.1f}"))
        if any(c[0] == "unsupported" for c in cells):
            line = (f"| {r.job} | {cells[0][0]} | {cells[1][0]} | n/a "
                    f"| {cells[0][1]} | {cells[1][1]} | n/a |")
        out.append(line)
    return "\n".join(out)


def main() -> None:
    p = lib.bench_parser(__doc__, JOBS, "/var/tmp/qsd-bench",
                         image_help="image path prefix (.luks and .qcow2 are appended)")
    p.add_argument("--fio-cpus", default="", help="fio cpus_allowed list")
    args = p.parse_args()

    lib.need_tool("fio", "fio")
    lib.need_tool("qemu-img", "qemu-utils")
    if not lib.fio_has_nbd_engine():
        raise SystemExit("fio on this machine has no nbd engine (needs fio built with libnbd)")
    a, b = lib.DaemonSpec("A", args.a), lib.DaemonSpec("B", args.b)
    a.resolved(), b.resolved()
    jobs = lib.selected_jobs(args.jobs, JOBS)

    targets = {}
    for fmt in sorted({JOBS[j][0] for j in jobs}):
        ext = "luks" if fmt == "luks" else "qcow2luks.qcow2"
        image = prepare(Path(f"{args.image}.{ext}"), fmt, args.size)
        targets[fmt] = target(image, fmt, args.file_opts)
    workdir = args.workdir = lib.workdir()
    try:
        results, unsupported = lib.run_alternating(
            jobs, lambda j: JOBS[j][2], (a, b), args.repeats,
            lambda spec, j: measure(spec, targets[JOBS[j][0]], j, args))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(results, unsupported, a, b))


if __name__ == "__main__":
    main()
