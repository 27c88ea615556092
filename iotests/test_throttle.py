"""The ``throttle`` filter over ``throttle-group`` objects.

Rates are measured with fio's nbd engine over the NBD export of a throttle
node (over null-co, so the device itself is never the bottleneck), for 5 s,
and must land within 15% of the configured limit: a 200 IOPS group, the
same group raised to 1000 IOPS with ``qom-set`` while fio runs (no I/O
fails), and two nodes in one group sharing its budget evenly whatever
their queue depths. Then qemu's error messages (bad limits, missing group,
group in use), ``qom-list``/``qom-get``/``qom-set`` paths and properties, and an error
injected below a throttle node reaching the client while the daemon stays
up.

qsd_only: ``query-named-block-nodes`` shows a throttle node's limits in
the ``iops``/``bps`` members (qemu fills them only for legacy per-device
throttling and shows 0).
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import harness
from harness import QmpError

MiB = 1024 * 1024
RUNTIME = 5
TOLERANCE = 0.15


def start(start_daemon, workdir: Path, groups=("throttle-group,id=g0,limits.iops-total=200",),
          nodes: int = 1, group_of=lambda i: "g0", export_opts: str = "", extra=()):
    """A daemon with ``nodes`` throttle nodes over null-co, each exported as
    ``exp<i>``. Returns (daemon, monitor, [uri...])."""
    qmp_sock = workdir / "qmp.sock"
    nbd_sock = workdir / "nbd.sock"
    args = [*harness.monitor_args(qmp_sock), *extra]
    for g in groups:
        args += ["--object", g]
    for i in range(nodes):
        args += [
            "--blockdev", f"driver=null-co,node-name=null{i},size={64 * MiB}",
            "--blockdev", f"driver=throttle,node-name=thr{i},throttle-group={group_of(i)},"
                          f"file=null{i}",
        ]
    args += ["--nbd-server", f"addr.type=unix,addr.path={nbd_sock}"]
    for i in range(nodes):
        args += ["--export", f"type=nbd,id=exp{i},node-name=thr{i},name=exp{i},writable=on"
                             f"{export_opts}"]
    d = start_daemon(args, wait_unix=[qmp_sock, nbd_sock])
    return d, d.qmp(qmp_sock), [harness.nbd_uri(nbd_sock, f"exp{i}") for i in range(nodes)]


def fio_cmd(uri: str, runtime: float, iodepth: int = 4, rw: str = "randread") -> list[str]:
    harness.require_tool("fio")
    return ["fio", "--name=t", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
            f"--iodepth={iodepth}", f"--runtime={runtime}", "--time_based", "--size=64M",
            "--output-format=json"]


def fio_result(proc: subprocess.CompletedProcess | tuple[int, str, str], rw: str = "read"
               ) -> dict:
    rc, out, err = (proc.returncode, proc.stdout, proc.stderr) \
        if isinstance(proc, subprocess.CompletedProcess) else proc
    assert rc == 0, f"fio failed (rc={rc}):\n{out}\n{err}"
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    side = job[rw]
    return {"ios": side["total_ios"], "iops": side["iops"],
            "runtime": side["runtime"] / 1000.0}


def fio(uri: str, runtime: float = RUNTIME, iodepth: int = 4, rw: str = "randread") -> dict:
    proc = harness.run(fio_cmd(uri, runtime, iodepth, rw), check=False,
                       timeout=runtime + 60)
    return fio_result(proc, "write" if "write" in rw else "read")


class Background:
    """fio running in a thread; ``result()`` waits for it."""

    def __init__(self, uri: str, runtime: float, iodepth: int = 4, extra=()):
        self.out: tuple[int, str, str] | None = None
        cmd = fio_cmd(uri, runtime, iodepth) + list(extra)

        def _run() -> None:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 60)
            self.out = (p.returncode, p.stdout, p.stderr)

        self.thread = threading.Thread(target=_run)
        self.thread.start()

    def result(self) -> dict:
        self.thread.join()
        assert self.out is not None
        return fio_result(self.out)


def assert_near(measured: float, expected: float, what: str) -> None:
    print(f"{what}: measured {measured:.1f}, expected {expected}")  # shown with -s
    assert abs(measured - expected) <= TOLERANCE * expected, \
        f"{what}: measured {measured:.1f}, expected {expected} +-{TOLERANCE:.0%}"


def limits(iops_total: int = 0, **kw) -> dict:
    """qemu's full ``limits`` answer: every member, defaults 0 and 1."""
    out = {}
    for kind in ("iops", "bps"):
        for d in ("total", "read", "write"):
            out[f"{kind}-{d}"] = 0
            out[f"{kind}-{d}-max"] = 0
            out[f"{kind}-{d}-max-length"] = 1
    out["iops-size"] = 0
    out["iops-total"] = iops_total
    out.update({k.replace("_", "-"): v for k, v in kw.items()})
    return out


# ---------------------------------------------------------------------------
# Rates


def test_throttle_200_iops_measured_over_5s(workdir, start_daemon):
    _, mon, (uri,) = start(start_daemon, workdir)
    r = fio(uri)
    assert_near(r["iops"], 200, "randread IOPS at iops-total=200")
    w = fio(uri, rw="randwrite")
    assert_near(w["iops"], 200, "randwrite IOPS at iops-total=200")
    assert mon.cmd("qom-get", path="g0", property="limits") == limits(200)


def test_throttle_qom_set_changes_rate_live(workdir, start_daemon):
    _, mon, (uri,) = start(start_daemon, workdir)
    # One 7 s fio run logging IOPS per second; the limit goes from 200 to
    # 1000 3.5 s after fio was started. fio's clock starts a little later
    # (up to 1.5 s is fine), so its seconds 0-2 are before the change and
    # 4-6 after it.
    log = workdir / "rate"
    bg = Background(uri, 7, iodepth=8,
                    extra=[f"--write_iops_log={log}", "--log_avg_msec=1000"])
    time.sleep(3.5)
    mon.cmd("qom-set", path="/objects/g0", property="limits", value={"iops-total": 1000})
    r = bg.result()
    samples = {}
    for line in Path(f"{log}_iops.1.log").read_text().splitlines():
        t_ms, value = (int(x) for x in line.split(",")[:2])
        samples[round(t_ms / 1000)] = value
    for sec in (1, 2):
        assert_near(samples[sec], 200, f"IOPS in second {sec} (limit 200)")
    for sec in (5, 6):
        assert_near(samples[sec], 1000, f"IOPS in second {sec} (limit 1000)")
    assert r["ios"] > 3000
    assert mon.cmd("qom-get", path="g0", property="x-iops-total") == 1000
    # And a fresh 5 s run at the new rate.
    assert_near(fio(uri)["iops"], 1000, "randread IOPS at iops-total=1000")


def test_throttle_two_nodes_share_one_group(workdir, start_daemon):
    _, _, (u0, u1) = start(start_daemon, workdir, nodes=2)
    a = Background(u0, RUNTIME, iodepth=4)
    b = Background(u1, RUNTIME, iodepth=4)
    ra, rb = a.result(), b.result()
    assert_near(ra["iops"] + rb["iops"], 200, "sum of two nodes in a 200 IOPS group")
    assert_near(ra["iops"], 100, "node 0's share")
    assert_near(rb["iops"], 100, "node 1's share")


def test_throttle_export_on_iothread(workdir, start_daemon):
    # The group's timers then run on the I/O thread.
    _, _, (uri,) = start(start_daemon, workdir,
                         groups=("throttle-group,id=g0,limits.iops-total=300",),
                         export_opts=",iothread=io0", extra=["--object", "iothread,id=io0"])
    assert_near(fio(uri)["iops"], 300, "randread IOPS at iops-total=300 on an iothread")


def test_throttle_two_groups_are_independent(workdir, start_daemon):
    groups = ("throttle-group,id=g0,limits.iops-total=200",
              "throttle-group,id=g1,x-iops-total=400")
    _, mon, (u0, u1) = start(start_daemon, workdir, groups=groups, nodes=2,
                             group_of=lambda i: f"g{i}")
    a = Background(u0, RUNTIME)
    b = Background(u1, RUNTIME)
    assert_near(a.result()["iops"], 200, "group g0")
    assert_near(b.result()["iops"], 400, "group g1")


def test_throttle_bps_limit(workdir, start_daemon):
    _, _, (uri,) = start(start_daemon, workdir,
                         groups=("throttle-group,id=g0,limits.bps-read=2097152",))
    r = fio(uri)
    # 2 MiB/s in 4 KiB reads = 512 IOPS; writes are not limited.
    assert_near(r["iops"], 512, "4k reads at bps-read=2 MiB/s")
    assert fio(uri, runtime=2, rw="randwrite")["iops"] > 3 * 512


@pytest.mark.qsd_only
def test_throttle_node_limits_in_query(workdir, start_daemon):
    _, mon, _ = start(start_daemon, workdir)
    node = next(n for n in mon.cmd("query-named-block-nodes") if n["node-name"] == "thr0")
    assert (node["iops"], node["bps"], node["group"]) == (200, 0, "g0")
    assert node["drv"] == "throttle"
    mon.cmd("qom-set", path="g0", property="limits", value={"iops-total": 1000})
    node = next(n for n in mon.cmd("query-named-block-nodes") if n["node-name"] == "thr0")
    assert node["iops"] == 1000


def test_throttle_node_query_shape(workdir, start_daemon):
    _, mon, _ = start(start_daemon, workdir)
    node = next(n for n in mon.cmd("query-named-block-nodes") if n["node-name"] == "thr0")
    assert node["backing_file_depth"] == 1
    assert node["image"]["filename"] == (
        'json:{"throttle-group": "g0", "driver": "throttle", '
        '"file": {"driver": "null-co", "size": 67108864}}')
    assert node["image"]["backing-image"]["format"] == "null-co"
    assert "backing_file" not in node


# ---------------------------------------------------------------------------
# Errors


BAD_LIMITS = [
    ({"bps-total": 1000, "bps-read": 5},
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    ({"iops-total": 100, "iops-total-max": 50}, "bps_max/iops_max cannot be lower than bps/iops"),
    ({"iops-total-max-length": 5}, "burst length set without burst rate"),
    ({"iops-total-max": 1000, "iops-total-max-length": 10},
     "bps_max/iops_max require corresponding bps/iops values"),
    ({"iops-size": 512}, "iops size requires an iops value to be set"),
    ({"iops-total": -1}, "bps/iops/max values must be within [0, 1000000000000000]"),
    ({"iops-total-max-length": 1 << 33},
     "iops-total-max-length value must be in the range [0, 4294967295]"),
    ({"iops-total": 1000, "iops-total-max": 10 ** 15, "iops-total-max-length": 2},
     "burst length too high for this burst rate"),
    ({"iops-total": "x"}, "Invalid parameter type for 'limits.iops-total', expected: integer"),
    ({"bogus": 1}, "Parameter 'limits.bogus' is unexpected"),
]


@pytest.mark.parametrize("bad,msg", BAD_LIMITS, ids=[m for _, m in BAD_LIMITS])
def test_throttle_bad_limits_refused(qmp_only, bad, msg):
    d, sock = qmp_only
    mon = d.qmp(sock)
    e = mon.error("object-add", **{"qom-type": "throttle-group", "id": "g1", "limits": bad})
    assert (e.klass, e.desc) == ("GenericError", msg)
    # The same change to a group without limits is refused the same way
    # and leaves the limits as they were.
    mon.cmd("object-add", **{"qom-type": "throttle-group", "id": "g1"})
    e = mon.error("qom-set", path="g1", property="limits", value=bad)
    assert (e.klass, e.desc) == ("GenericError", msg)
    assert mon.cmd("qom-get", path="g1", property="limits") == limits(0)


def test_throttle_x_properties(qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    e = mon.error("object-add", **{"qom-type": "throttle-group", "id": "g1", "x-iops-total": -4})
    assert e.desc == "Property values cannot be negative"
    e = mon.error("object-add", **{"qom-type": "throttle-group", "id": "g1",
                                   "x-iops-total": 200, "x-iops-read": 4})
    assert e.desc == ("bps/iops/max total values and read/write values cannot be used "
                      "at the same time")
    e = mon.error("object-add", **{"qom-type": "throttle-group", "id": "g1",
                                   "x-iops-total-max-length": 0, "x-iops-total-max": 300})
    assert e.desc == "the burst length cannot be 0"
    mon.cmd("object-add", **{"qom-type": "throttle-group", "id": "g1", "x-iops-total": 100,
                             "x-iops-total-max": 200, "x-iops-total-max-length": 5})
    assert mon.cmd("qom-get", path="g1", property="limits") == \
        limits(100, iops_total_max=200, iops_total_max_length=5)
    assert mon.cmd("qom-get", path="g1", property="x-iops-total-max-length") == 5
    e = mon.error("qom-set", path="g1", property="x-iops-total", value=500)
    assert e.desc == "Property cannot be set after initialization"
    # qom-set of limits merges: absent members keep their value.
    mon.cmd("qom-set", path="g1", property="limits", value={})
    mon.cmd("qom-set", path="g1", property="limits", value={"bps-write": 4096})
    assert mon.cmd("qom-get", path="g1", property="limits") == \
        limits(100, iops_total_max=200, iops_total_max_length=5, bps_write=4096)


def test_throttle_command_line_errors(workdir):
    binary = harness.require_daemon_binary()
    cases = [
        (["--object", "throttle-group,id=g0,x-iops-total=200,limits.iops-read=5"],
         "bps/iops/max total values and read/write values cannot be used at the same time"),
        (["--object", "throttle-group,id=g0,limits.iops-total=abc"],
         "Parameter 'limits.iops-total' expects integer"),
        (["--object", "throttle-group,id=g0",
          "--blockdev", "driver=throttle,node-name=t,throttle-group=gx,file.driver=null-co"],
         "Throttle group 'gx' does not exist"),
        (["--blockdev", "driver=throttle,node-name=t,file.driver=null-co"],
         "Parameter 'throttle-group' is missing"),
    ]
    for args, msg in cases:
        p = subprocess.run([binary, *args], capture_output=True, text=True, timeout=20,
                           cwd=workdir)
        assert p.returncode == 1, (args, p.stderr)
        assert p.stderr.strip().endswith(msg), (args, p.stderr)


def test_throttle_missing_group_and_in_use(qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    mon.cmd("object-add", **{"qom-type": "iothread", "id": "io0"})
    mon.cmd("object-add", **{"qom-type": "throttle-group", "id": "g0",
                             "limits": {"iops-total": 100}})
    file = {"driver": "null-co", "size": MiB}
    for group in ("nope", "io0"):
        e = mon.error("blockdev-add", driver="throttle", **{"node-name": "t0",
                      "throttle-group": group, "file": file})
        assert (e.klass, e.desc) == ("GenericError", f"Throttle group '{group}' does not exist")
    e = mon.error("blockdev-add", driver="throttle", **{"node-name": "t0", "file": file})
    assert e.desc == "Parameter 'throttle-group' is missing"
    e = mon.error("blockdev-add", driver="throttle", **{"node-name": "t0", "file": file,
                  "throttle-group": "g0", "limits": {}})
    assert e.desc == "Parameter 'limits' is unexpected"
    mon.cmd("blockdev-add", driver="throttle", **{"node-name": "t0", "throttle-group": "g0",
            "file": file})
    e = mon.error("object-add", **{"qom-type": "throttle-group", "id": "io0"})
    assert e.desc == "attempt to add duplicate property 'io0' to object (type 'container')"
    e = mon.error("object-add", **{"qom-type": "iothread", "id": "g0"})
    assert e.desc == "attempt to add duplicate property 'g0' to object (type 'container')"
    e = mon.error("object-del", id="g0")
    assert (e.klass, e.desc) == ("GenericError", "object 'g0' is in use, can not be deleted")
    mon.cmd("blockdev-del", **{"node-name": "t0"})
    mon.cmd("object-del", id="g0")
    e = mon.error("qom-get", path="g0", property="limits")
    assert (e.klass, e.desc) == ("DeviceNotFound", "Device 'g0' not found")


def test_qom_paths_and_properties(qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    mon.cmd("object-add", **{"qom-type": "throttle-group", "id": "g0",
                             "limits": {"iops-total": 300, "bps-read": 1000}})
    mon.cmd("object-add", **{"qom-type": "iothread", "id": "io0"})
    want = limits(300, bps_read=1000)
    for path in ("g0", "/objects/g0", "objects/g0", "//objects//g0/"):
        assert mon.cmd("qom-get", path=path, property="limits") == want
        assert mon.cmd("qom-get", path=path, property="type") == "throttle-group"
    assert mon.cmd("qom-get", path="g0", property="x-bps-read") == 1000
    assert mon.cmd("qom-get", path="/", property="type") == "container"
    assert mon.cmd("qom-get", path="/objects", property="type") == "container"
    assert mon.cmd("qom-get", path="io0", property="type") == "iothread"
    assert mon.cmd("qom-get", path="io0", property="poll-max-ns") == 32768
    for path in ("nope", "/objects/nope", "/machine", ""):
        e = mon.error("qom-get", path=path, property="type")
        assert (e.klass, e.desc) == ("DeviceNotFound", f"Device '{path}' not found")
    e = mon.error("qom-get", path="g0", property="x-nonexist")
    assert e.desc == "Property 'throttle-group.x-nonexist' not found"
    e = mon.error("qom-get", path="/objects", property="limits")
    assert e.desc == "Property 'container.limits' not found"
    e = mon.error("qom-get", path="io0", property="limits")
    assert e.desc == "Property 'iothread.limits' not found"
    e = mon.error("qom-set", path="g0", property="type", value="x")
    assert e.desc == "Property 'throttle-group.type' is not writable"
    e = mon.error("qom-set", path="g0", property="nope", value=1)
    assert e.desc == "Property 'throttle-group.nope' not found"
    e = mon.error("qom-set", path="g0", property="limits", value=5)
    assert e.desc == "Invalid parameter type for 'limits', expected: object"
    e = mon.error("qom-set", path="nope", property="limits", value={})
    assert (e.klass, e.desc) == ("DeviceNotFound", "Device 'nope' not found")


def test_qom_list_objects_and_properties(qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    mon.cmd("object-add", **{"qom-type": "throttle-group", "id": "g0",
                             "limits": {"iops-total": 300}})
    mon.cmd("object-add", **{"qom-type": "iothread", "id": "io0"})
    mon.cmd("object-add", **{"qom-type": "secret", "id": "s0", "data": "x"})

    def props(path):
        return {p["name"]: p["type"] for p in mon.cmd("qom-list", path=path)}

    root = props("/")
    assert root["type"] == "string" and root["objects"] == "child<container>"
    assert props("/objects") == {"type": "string", "g0": "child<throttle-group>",
                                 "io0": "child<iothread>", "s0": "child<secret>"}
    group = props("g0")
    assert group == props("/objects/g0")
    assert group.pop("type") == "string" and group.pop("limits") == "ThrottleLimits"
    assert len(group) == 19 and set(group.values()) == {"int"}
    assert {"x-iops-total", "x-bps-write-max-length", "x-iops-size"} <= set(group)
    assert props("io0") == {"type": "string", "poll-max-ns": "int", "poll-grow": "int",
                            "poll-shrink": "int", "aio-max-batch": "int",
                            "thread-pool-min": "int", "thread-pool-max": "int"}
    assert props("s0") == {"type": "string", "iv": "string", "keyid": "string",
                           "format": "QCryptoSecretFormat", "file": "string",
                           "data": "string"}
    mon.cmd("object-del", id="g0")
    assert "g0" not in props("/objects")
    for path in ("g0", "/objects/nope", "/machine"):
        e = mon.error("qom-list", path=path)
        assert (e.klass, e.desc) == ("DeviceNotFound", f"Device '{path}' not found")
    e = mon.error("qom-list")
    assert (e.klass, e.desc) == ("GenericError", "Parameter 'path' is missing")


def test_throttle_injected_error_reaches_client(workdir, start_daemon):
    qmp_sock = workdir / "qmp.sock"
    nbd_sock = workdir / "nbd.sock"
    dbg = {"driver": "blkdebug", "node-name": "dbg0", "image": "null0",
           "inject-error": [{"event": "read_aio", "errno": 5, "once": False}]}
    args = [
        *harness.monitor_args(qmp_sock),
        "--object", "throttle-group,id=g0,limits.iops-total=1000",
        "--blockdev", f"driver=null-co,node-name=null0,size={MiB}",
        "--blockdev", json.dumps(dbg),
        "--blockdev", "driver=raw,node-name=raw0,file=dbg0",
        "--blockdev", "driver=throttle,node-name=thr0,throttle-group=g0,file=raw0",
        "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
        "--export", "type=nbd,id=exp0,node-name=thr0,name=exp0,writable=on",
    ]
    d = start_daemon(args, wait_unix=[qmp_sock, nbd_sock])
    mon = d.qmp(qmp_sock)
    uri = harness.nbd_uri(nbd_sock, "exp0")
    # Each connection sees the error; the export and the daemon stay up.
    for _ in range(3):
        out = harness.qemu_io(uri, "read 0 4k", check=False)
        assert "read failed: Input/output error" in out.stdout + out.stderr, out.stdout
    assert mon.cmd("query-version")["qemu"]["major"] == 10
    assert [e["id"] for e in mon.cmd("query-block-exports")] == ["exp0"]


@pytest.mark.qsd_only
def test_throttle_stop_lifts_limits_for_queued_requests(workdir, start_daemon):
    """SIGTERM with 16 requests queued under 1 IOPS: the limits are lifted
    (as qemu lifts them during a drain), so they are answered at once and
    the daemon exits instead of serving them one a second. qemu-storage-
    daemon 10.0.2 keeps waiting here (killed by the harness)."""
    d, _, (uri,) = start(start_daemon, workdir,
                         groups=("throttle-group,id=g0,limits.iops-total=1",))
    bg = Background(uri, runtime=30, iodepth=16)
    time.sleep(1.5)
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    # Generous bound: the point is not waiting ~16 s for the queue.
    assert time.monotonic() - started < 6
    bg.thread.join()
