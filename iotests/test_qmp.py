"""QMP monitor protocol: greeting, negotiation, framing, errors, events, quit."""

from __future__ import annotations

import pytest

import harness
from harness import RawQmp

# Commands the daemon must offer (issue #1), as in qemu-storage-daemon 10.0.
REQUIRED_COMMANDS = [
    "qmp_capabilities", "query-version", "query-commands", "query-qmp-schema", "quit",
    "blockdev-add", "blockdev-del", "query-named-block-nodes", "query-block",
    "query-blockstats", "block_resize", "object-add", "object-del",
    "nbd-server-start", "nbd-server-stop", "nbd-server-add", "nbd-server-remove",
    "block-export-add", "block-export-del", "query-block-exports",
]


def test_greeting_has_version_and_oob(qmp_only):
    d, sock = qmp_only
    raw = RawQmp(sock)
    try:
        qmp = raw.greeting["QMP"]
        ver = qmp["version"]["qemu"]
        assert {"major", "minor", "micro"} <= set(ver)
        assert all(isinstance(ver[k], int) for k in ("major", "minor", "micro"))
        assert isinstance(qmp["version"]["package"], str)
        assert "oob" in qmp["capabilities"]
    finally:
        raw.close()
    # The library client sees the same greeting.
    mon = d.qmp(sock)
    assert mon.greeting["QMP"]["version"] == qmp["version"]


def test_command_before_negotiation_is_command_not_found(qmp_only):
    _, sock = qmp_only
    raw = RawQmp(sock)
    try:
        reply = raw.command({"execute": "query-version"})
        assert reply["error"]["class"] == "CommandNotFound"
        assert reply["error"]["desc"] == \
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        reply = raw.command({"execute": "qmp_capabilities", "id": "neg"})
        assert reply == {"return": {}, "id": "neg"}
        assert "return" in raw.command({"execute": "query-version"})
    finally:
        raw.close()


def test_qmp_capabilities_twice_is_command_not_found(qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    err = mon.error("qmp_capabilities")
    assert err.klass == "CommandNotFound"
    assert err.desc == "Capabilities negotiation is already complete, command ignored"


def test_query_version_matches_greeting(qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    ver = mon.cmd("query-version")
    assert ver["qemu"] == mon.greeting["QMP"]["version"]["qemu"]
    assert isinstance(ver["package"], str)


def test_query_commands_lists_required_commands(qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    names = {c["name"] for c in mon.cmd("query-commands")}
    missing = [c for c in REQUIRED_COMMANDS if c not in names]
    assert not missing, f"query-commands lacks {missing}"


@pytest.mark.qsd_only
def test_query_commands_lists_query_iothreads(qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    names = {c["name"] for c in mon.cmd("query-commands")}
    assert "query-iothreads" in names


def test_query_qmp_schema_describes_commands(qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    schema = mon.cmd("query-qmp-schema")
    by_name = {e["name"]: e for e in schema}
    for name in REQUIRED_COMMANDS:
        assert by_name[name]["meta-type"] == "command", name
    assert by_name["BLOCK_EXPORT_DELETED"]["meta-type"] == "event"
    # Every referenced type is defined.
    for entry in schema:
        for key in ("arg-type", "ret-type"):
            if key in entry:
                assert entry[key] in by_name, f"{entry['name']}: {key} {entry[key]}"


@pytest.mark.parametrize("payload, desc_prefix", [
    (b'{"execute": }\n', "JSON parse error"),
    (b'{"execute" "query-version"}\n', "JSON parse error"),
    (b'{"execute": "query-version",,}\n', "JSON parse error"),
])
def test_malformed_json_gets_generic_error_and_monitor_survives(qmp_only, payload,
                                                                desc_prefix):
    _, sock = qmp_only
    raw = RawQmp(sock)
    try:
        raw.command({"execute": "qmp_capabilities"})
        raw.send(payload)
        reply = raw.recv_reply()
        assert reply["error"]["class"] == "GenericError"
        assert reply["error"]["desc"].startswith(desc_prefix), reply
        # Later replies may include more parse errors for the rest of the line;
        # the monitor must still answer a good command, identified by its id.
        raw.send({"execute": "query-version", "id": "after"})
        while True:
            reply = raw.recv_reply()
            if reply.get("id") == "after":
                break
            assert reply["error"]["class"] == "GenericError"
        assert "qemu" in reply["return"]
    finally:
        raw.close()


@pytest.mark.parametrize("msg, desc", [
    (b"[]", "QMP input must be a JSON object"),
    (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
    (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
    (b'{"execute": "query-version", "extra": 1}', "QMP input member 'extra' is unexpected"),
])
def test_bad_message_shape_gets_exact_error(qmp_only, msg, desc):
    _, sock = qmp_only
    raw = RawQmp(sock)
    try:
        raw.command({"execute": "qmp_capabilities"})
        raw.send(msg + b"\n")
        assert raw.recv_reply() == {"error": {"class": "GenericError", "desc": desc}}
    finally:
        raw.close()


def test_unknown_command_is_command_not_found(qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    err = mon.error("no-such-command")
    assert err.klass == "CommandNotFound"
    assert err.desc == "The command no-such-command has not been found"


@pytest.mark.parametrize("args, desc", [
    ({"node-name": "x", "size": "big"}, "Invalid parameter type for 'size', expected: integer"),
    ({"node-name": "x"}, "Parameter 'size' is missing"),
    ({"node-name": "x", "size": 4096, "bogus": 1}, "Parameter 'bogus' is unexpected"),
])
def test_argument_errors_match_qemu(qmp_only, args, desc):
    d, sock = qmp_only
    mon = d.qmp(sock)
    err = mon.error("block_resize", **args)
    assert (err.klass, err.desc) == ("GenericError", desc)


def test_unexpected_argument_to_argless_command(qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    err = mon.error("query-version", x=1)
    assert (err.klass, err.desc) == ("GenericError", "Parameter 'x' is unexpected")


def test_id_is_echoed_verbatim(qmp_only):
    _, sock = qmp_only
    raw = RawQmp(sock)
    try:
        raw.command({"execute": "qmp_capabilities"})
        for ident in ["abc", 42, {"nested": [1, "two"]}, None]:
            reply = raw.command({"execute": "query-version", "id": ident})
            assert reply["id"] == ident
            assert "return" in reply
        reply = raw.command({"execute": "no-such", "id": "err-id"})
        assert reply["id"] == "err-id" and "error" in reply
    finally:
        raw.close()


def test_two_monitors_both_get_events(workdir, start_daemon):
    img = harness.create_image(workdir / "d.raw", 1 << 20)
    socks = [workdir / "m0.sock", workdir / "m1.sock"]
    nbd_sock = workdir / "nbd.sock"
    d = start_daemon([
        *harness.monitor_args(socks[0], "mon0"), *harness.monitor_args(socks[1], "mon1"),
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
        "--export", "type=nbd,id=e0,node-name=f0",
    ], wait_unix=[*socks, nbd_sock])
    mons = [d.qmp(s) for s in socks]
    mons[0].cmd("block-export-del", id="e0")
    for mon in mons:
        ev = mon.event("BLOCK_EXPORT_DELETED")
        assert ev["data"] == {"id": "e0"}
        assert set(ev["timestamp"]) == {"seconds", "microseconds"}


def test_quit_exits_zero(qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    assert mon.cmd("quit") == {}
    assert d.wait() == 0


@pytest.mark.qsd_only
def test_quit_emits_shutdown(qmp_only):
    d, sock = qmp_only
    mon = d.qmp(sock)
    mon.cmd("quit")
    ev = mon.event("SHUTDOWN")
    assert ev["event"] == "SHUTDOWN"
    assert d.wait() == 0
