#!/usr/bin/env python3
"""Start-up time and idle memory of two storage daemons with one NBD export.

    benches/idle.sh [--a BIN] [--b BIN] [--runs N]

For each daemon: the time from exec to the NBD socket accepting connections
(median of N starts, default 10) and VmRSS once it is up.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lib  # noqa: E402


def main() -> None:
    a_def, b_def = lib.default_pair()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default=a_def.binary)
    p.add_argument("--b", default=b_def.binary)
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()
    specs = [lib.DaemonSpec("A", args.a), lib.DaemonSpec("B", args.b)]
    for s in specs:
        s.resolved()

    workdir = lib.workdir()
    try:
        image = workdir / "idle.raw"
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "64M"],
                       check=True)
        target = lib.nbd_raw_target(image)
        startup = {s.label: [] for s in specs}
        rss = {s.label: [] for s in specs}
        for _ in range(args.runs):
            for spec in specs:  # alternate A B A B
                d = lib.start(spec, target, workdir)
                startup[spec.label].append((d.ready_ns - d.started_ns) / 1e6)
                time.sleep(0.1)  # let start-up allocations settle
                rss[spec.label].append(d.rss_kib())
                d.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in startup.items()}
    mrss = {k: statistics.median(v) for k, v in rss.items()}
    print(f"A = `{args.a}`, B = `{args.b}`; medians of {args.runs} starts\n")
    print("| metric | A | B | A/B |")
    print("|---|---:|---:|---:|")
    print(f"| exec to NBD socket connectable | {med['A']:.1f} ms | {med['B']:.1f} ms "
          f"| {lib.ratio(med['A'], med['B'])} |")
    print(f"| VmRSS after start | {mrss['A'] / 1024:.1f} MiB | {mrss['B'] / 1024:.1f} MiB "
          f"| {lib.ratio(mrss['A'], mrss['B'])} |")


if __name__ == "__main__":
    main()
