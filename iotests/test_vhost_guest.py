"""vhost-user-blk exports driven by a real Linux guest.

A Debian kernel with its virtio-blk driver boots under qemu-system-x86_64
(TCG) with ``-device vhost-user-blk-pci`` on the daemon's socket and runs a
busybox script: O_DIRECT reads and writes with dd, blkdiscard, fio verify
with libaio; the host then checks the image file (md5 per region and
``qemu-img compare`` against an expected image). Also: two vCPUs with two
queues, daemon restarts under guest I/O (qsd only: it needs
VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), and a read-only export.

The guest comes from iotests/guest/build-guest.sh (see guest_vm.py); a
machine without qemu-system-x86_64 or the guest fails the tests.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
from pathlib import Path

import pytest

import harness
from guest_vm import Guest, GuestResult, VhostBlk, run_guest

MiB = 1024 * 1024
SIZE = 64 * MiB
HOST_PATTERN = (8 * MiB, MiB, 0x5A)      # offset, length, byte written on the host
GUEST_PATTERN_AT = MiB                   # the guest's dd write
DISCARD = (16 * MiB, 4 * MiB)            # pre-filled with 0x33 on the host, discarded
FIO_AT, FIO_SIZE = 32 * MiB, 8 * MiB     # fio randwrite + verify region


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def read_region(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def fio_args(name: str, offset: int, size: int, extra: str = "") -> str:
    """Arguments of a guest fio job: 4k random writes at QD 16 with O_DIRECT
    through libaio, then a crc32c verify of everything written."""
    return (f"--name={name} --filename=/dev/vda --ioengine=libaio --direct=1 "
            f"--iodepth=16 --rw=randwrite --bs=4k --offset={offset} --size={size} "
            f"--verify=crc32c --verify_fatal=1 --thread {extra}")


def fio_report(result: GuestResult, tag: str) -> dict:
    """The JSON report the guest printed between FIO-<tag>-BEGIN/END."""
    m = re.search(rf"FIO-{tag}-BEGIN\n(.*?)\nFIO-{tag}-END", result.output, re.S)
    if not m:
        pytest.fail(f"no fio report {tag} in the guest output:\n{result.output}",
                    pytrace=False)
    text = m.group(1)
    return json.loads(text[text.index("{"):])


# Runs fio ($1 = tag, rest = fio arguments) with a JSON report on the console.
FIO_JSON = r"""
fio_json() {
    tag=$1; shift
    fio "$@" --eta=never --output-format=json --output=/tmp/fio-$tag.json
    rc=$?
    echo "FIO-$tag-BEGIN"; cat /tmp/fio-$tag.json; echo; echo "FIO-$tag-END"
    [ $rc = 0 ] || fail "fio $tag exited with $rc"
}
"""


class VhostDaemon:
    """The daemon under test exporting a raw image over vhost-user-blk."""

    def __init__(self, workdir: Path, writable: bool = True, num_queues: int = 1,
                 file_opts: str = "", size: int = SIZE):
        self.workdir = workdir
        self.file_opts = file_opts
        self.img = harness.create_image(workdir / "disk.raw", size)
        self.sock = workdir / "vhost.sock"
        self.writable = writable
        self.num_queues = num_queues
        self.generation = 0
        self.daemon: harness.Daemon | None = None
        self.history: list[harness.Daemon] = []

    def args(self) -> list[str]:
        return [
            "--blockdev", f"driver=file,node-name=file0,filename={self.img},discard=unmap"
                            f"{self.file_opts}",
            "--blockdev", "driver=raw,node-name=fmt0,file=file0,discard=unmap",
            "--export", f"type=vhost-user-blk,id=vub0,node-name=fmt0,addr.type=unix,"
                        f"addr.path={self.sock},writable={'on' if self.writable else 'off'},"
                        f"num-queues={self.num_queues}",
        ]

    def start(self) -> harness.Daemon:
        self.generation += 1
        d = harness.Daemon(self.args(), self.workdir, f"daemon{self.generation}")
        self.daemon = d.start(wait_unix=[self.sock])
        self.history.append(d)
        return self.daemon

    def stop(self) -> None:
        if self.daemon is not None:
            rc = self.daemon.stop()
            assert rc == 0, f"daemon exited with {rc}:\n{self.daemon.stderr()}"

    def disk(self, reconnect_ms: int = 0) -> VhostBlk:
        return VhostBlk(self.sock, num_queues=self.num_queues, reconnect_ms=reconnect_ms)


def host_fill(img: Path, offset: int, length: int, byte: int) -> None:
    harness.qemu_io(str(img), f"write -q -P {byte:#x} {offset} {length}")


# --------------------------------------------------------------------------
# 1. data paths: read, O_DIRECT write, blkdiscard, fio verify


DATA_SCRIPT = FIO_JSON + r"""
wait_disk vda
echo "SECTORS=$(cat /sys/block/vda/size)"
echo "RO=$(cat /sys/block/vda/ro)"
echo "HOST_PATTERN=$(md5 /dev/vda bs=64k skip=128 count=16 iflag=direct)"
dd if=/test/pattern of=/dev/vda bs=64k seek=16 oflag=direct conv=fsync 2>/tmp/dd.err \
    || { cat /tmp/dd.err; fail "O_DIRECT write"; }
echo "READ_BACK=$(md5 /dev/vda bs=64k skip=16 count=16 iflag=direct)"
echo "DISCARD_MAX=$(cat /sys/block/vda/queue/discard_max_bytes)"
blkdiscard -o $((16 << 20)) -l $((4 << 20)) /dev/vda || fail blkdiscard
echo "DISCARDED=$(md5 /dev/vda bs=64k skip=256 count=64 iflag=direct)"
fio_json data %(fio)s
echo "FIO_REGION=$(md5 /dev/vda bs=1M skip=32 count=8 iflag=direct)"
""" % {"fio": fio_args("data", FIO_AT, FIO_SIZE)}


def expected_image(workdir: Path, img: Path, pattern: bytes) -> Path:
    """What the image must hold after DATA_SCRIPT; the fio region (random
    data only fio knows) is taken from the image once its md5 matched."""
    data = bytearray(SIZE)
    off, length, byte = HOST_PATTERN
    data[off:off + length] = bytes([byte]) * length
    data[GUEST_PATTERN_AT:GUEST_PATTERN_AT + len(pattern)] = pattern
    data[FIO_AT:FIO_AT + FIO_SIZE] = read_region(img, FIO_AT, FIO_SIZE)
    path = workdir / "expected.raw"
    path.write_bytes(bytes(data))
    return path


def check_discarded(img: Path) -> None:
    """The discarded range reads as zeroes and, with discard=unmap on a raw
    file, is a hole in the file."""
    off, length = DISCARD
    assert read_region(img, off, length) == bytes(length), "discarded range is not zero"
    for ext_off, ext_len in harness.file_extents(img):
        assert ext_off + ext_len <= off or ext_off >= off + length, \
            f"discarded range still allocated: extent {ext_off:#x}+{ext_len:#x}"


def test_guest_data_read_write_discard_fio(workdir: Path) -> None:
    vd = VhostDaemon(workdir)
    off, length, byte = HOST_PATTERN
    host_fill(vd.img, off, length, byte)
    host_fill(vd.img, *DISCARD, 0x33)
    pattern = bytes((i * 7 + i // 4096) & 0xFF for i in range(MiB))
    vd.start()

    res = run_guest(workdir, DATA_SCRIPT, disks=[vd.disk()],
                    files={"pattern": pattern}).check()
    vals = res.values()
    vd.stop()

    assert int(vals["SECTORS"]) == SIZE // 512
    assert vals["RO"] == "0"
    assert vals["HOST_PATTERN"] == md5(bytes([byte]) * length)
    assert vals["READ_BACK"] == md5(pattern)
    assert int(vals["DISCARD_MAX"]) > 0, "the guest sees no discard support"
    assert vals["DISCARDED"] == md5(bytes(DISCARD[1]))
    job = fio_report(res, "data")["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == FIO_SIZE
    assert job["read"]["io_bytes"] == FIO_SIZE, "fio did not verify everything it wrote"
    assert vals["FIO_REGION"] == md5(read_region(vd.img, FIO_AT, FIO_SIZE))
    check_discarded(vd.img)
    expected = expected_image(workdir, vd.img, pattern)
    harness.qemu_img("compare", "-q", "-f", "raw", "-F", "raw", str(expected), str(vd.img))


# --------------------------------------------------------------------------
# 2. two vCPUs, two queues


MQ_SCRIPT = FIO_JSON + r"""
wait_disk vda
echo "CPUS=$(grep -c ^processor /proc/cpuinfo)"
echo "QUEUES=$(ls /sys/block/vda/mq | wc -l)"
fio_json mq %(fio)s
# Interrupts per request queue (virtioN-req.Q), summed over the CPUs.
awk '$NF ~ /^virtio[0-9]+-req\./ { n = 0; for (i = 2; i < NF; i++) if ($i ~ /^[0-9]+$/) n += $i;
    sub(/.*-req\./, "", $NF); print "IRQS" $NF "=" n }' /proc/interrupts
""" % {"fio": fio_args("mq", 0, 4 * MiB, "--numjobs=2 --offset_increment=4M "
                      "--cpus_allowed=0-1 --cpus_allowed_policy=split")}


def test_guest_two_vcpus_two_queues(workdir: Path) -> None:
    vd = VhostDaemon(workdir, num_queues=2)
    vd.start()
    res = run_guest(workdir, MQ_SCRIPT, disks=[vd.disk()], smp=2).check()
    vals = res.values()
    vd.stop()

    assert vals["CPUS"] == "2"
    assert vals["QUEUES"] == "2", "the guest does not see two virtqueues"
    jobs = fio_report(res, "mq")["jobs"]
    assert len(jobs) == 2
    for job in jobs:
        assert job["error"] == 0
        assert job["write"]["io_bytes"] == 4 * MiB
        assert job["read"]["io_bytes"] == 4 * MiB
    # One fio job per CPU, so each queue completed requests (with an
    # interrupt of its own).
    for q in (0, 1):
        irqs = vals.get(f"IRQS{q}", "")
        assert irqs.isdigit() and int(irqs) > 0, f"queue {q} carried no request: {vals}"


# --------------------------------------------------------------------------
# 3. the daemon restarts (SIGTERM, then SIGKILL) during guest I/O


ROUNDS = 8
ROUND_SIZE = 8 * MiB
# Daemon restarts: (round, signal). SIGTERM lets the daemon finish its
# requests; SIGKILL loses the ones it had popped, which the next daemon must
# resubmit (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) or the guest hangs.
# A SIGKILL finds requests in the daemon only now and then (the TCG guest is
# the bottleneck: about one kill in six), hence several.
RESTARTS = ((1, signal.SIGTERM),) + tuple((r, signal.SIGKILL) for r in range(2, 7))
# Mixed request sizes at a deep queue: more requests in flight at a kill,
# completing out of order.
ROUND_FIO = ("--name=r$i --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=32 "
             "--rw=randwrite --bsrange=4k-256k --offset=$((i * %(size)d)) --size=%(size)d "
             "--verify=crc32c --verify_fatal=1 --thread" % {"size": ROUND_SIZE})
RECONNECT_SCRIPT = FIO_JSON + r"""
writes() { awk '$3 == "vda" { print $8 }' /proc/diskstats; }
wait_disk vda
i=0
while [ $i -lt %(rounds)d ]; do
    before=$(writes)
    fio_json r$i %(fio)s &
    pid=$!
    # Tell the host once this round's writes reach the device.
    while [ "$(writes)" = "$before" ] && kill -0 $pid 2>/dev/null; do sleep 0.02; done
    echo "ROUND-$i-IO"
    wait $pid || fail "round $i"
    echo "REGION$i=$(md5 /dev/vda bs=1M skip=$((i * %(mib)d)) count=%(mib)d iflag=direct)"
    i=$((i + 1))
done
# Everything written before, across the restarts, still verifies.
i=0
while [ $i -lt %(rounds)d ]; do
    fio %(fio)s --verify_only >/tmp/v.log 2>&1 \
        || { cat /tmp/v.log; fail "round $i no longer verifies"; }
    i=$((i + 1))
done
echo VERIFY-ALL-OK
""" % {"rounds": ROUNDS, "fio": ROUND_FIO, "mib": ROUND_SIZE // MiB}


def restart_during_round(vd: VhostDaemon, guest: Guest, rnd: int, sig: int) -> None:
    """Once round ``rnd``'s writes reach the device, stop the daemon with
    ``sig`` and start a new one on the same socket while the guest waits."""
    guest.wait_for(f"ROUND-{rnd}-IO")
    assert vd.daemon is not None
    name = signal.Signals(sig).name
    guest.note(f"round {rnd}: {name} to the daemon (pid {vd.daemon.pid})")
    vd.daemon.signal(sig)
    vd.daemon.wait()
    if f"FIO-r{rnd}-END" in guest.output():
        pytest.fail(f"round {rnd} ended before the daemon was stopped; make rounds longer",
                    pytrace=False)
    vd.start()
    guest.note(f"round {rnd}: new daemon (pid {vd.daemon.pid}) listening")


def resubmitted(vd: VhostDaemon) -> list[int]:
    """How many requests each qsd took over from its predecessor (qsd logs
    it at level info; qemu-storage-daemon does not)."""
    return [int(n) for d in vd.history
            for n in re.findall(r"resubmitting (\d+) requests", d.stderr())]


@pytest.mark.qsd_only
def test_guest_reconnect_daemon_restart(workdir: Path, monkeypatch) -> None:
    """qsd only: qemu-storage-daemon does not offer INFLIGHT_SHMFD and, now
    and then, a restart of it loses requests and hangs the guest."""
    monkeypatch.setenv("QSD_LOG", "info")
    # O_DIRECT on the image: requests take longer in the daemon and complete
    # out of order, so a restart finds some in flight.
    vd = VhostDaemon(workdir, file_opts=",cache.direct=on", size=ROUNDS * ROUND_SIZE)
    vd.start()
    guest = Guest(workdir, RECONNECT_SCRIPT, disks=[vd.disk(reconnect_ms=200)],
                  timeout=100).start()
    try:
        for rnd, sig in RESTARTS:
            restart_during_round(vd, guest, rnd, sig)
        res = guest.wait().check()
    finally:
        guest.kill()
    vd.stop()

    print(f"requests resubmitted after restarts: {resubmitted(vd) or 'none seen'}")
    assert "VERIFY-ALL-OK" in res.output
    vals = res.values()
    for i in range(ROUNDS):
        job = fio_report(res, f"r{i}")["jobs"][0]
        assert job["error"] == 0, f"round {i}: fio error {job['error']}"
        assert job["write"]["io_bytes"] == ROUND_SIZE, f"round {i} did not write all"
        assert job["read"]["io_bytes"] == ROUND_SIZE, f"round {i} did not verify all"
        assert vals[f"REGION{i}"] == md5(read_region(vd.img, i * ROUND_SIZE, ROUND_SIZE)), \
            f"round {i}: the image differs from what the guest read"


# --------------------------------------------------------------------------
# 4. read-only export


RO_SCRIPT = r"""
wait_disk vda
echo "RO=$(cat /sys/block/vda/ro)"
echo "HOST_PATTERN=$(md5 /dev/vda bs=64k skip=128 count=16 iflag=direct)"
if dd if=/test/pattern of=/dev/vda bs=64k seek=16 oflag=direct 2>/tmp/dd.err; then
    echo WRITE=ok
else
    echo WRITE=failed; cat /tmp/dd.err
fi
if blkdiscard -o 0 -l 1048576 /dev/vda 2>/tmp/bd.err; then
    echo DISCARD=ok
else
    echo DISCARD=failed; cat /tmp/bd.err
fi
"""


def test_guest_readonly_export_refuses_writes(workdir: Path) -> None:
    vd = VhostDaemon(workdir, writable=False)
    off, length, byte = HOST_PATTERN
    host_fill(vd.img, off, length, byte)
    host_fill(vd.img, 0, MiB, 0x11)
    before = md5(vd.img.read_bytes())
    vd.start()

    res = run_guest(workdir, RO_SCRIPT, disks=[vd.disk()],
                    files={"pattern": b"\xee" * MiB}).check()
    vals = res.values()
    vd.stop()

    assert vals["RO"] == "1", "the guest does not see a read-only disk"
    assert vals["HOST_PATTERN"] == md5(bytes([byte]) * length)
    assert vals["WRITE"] == "failed"
    assert vals["DISCARD"] == "failed"
    assert md5(vd.img.read_bytes()) == before, "the read-only image changed"
