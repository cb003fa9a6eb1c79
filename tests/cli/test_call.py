"""``ttrpc call`` against our own Interop servers (asyncio and blocking)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import (
    INTEROP,
    INTEROP_PROTO,
    INTEROP_SERVICE,
    REPO,
    STREAMING_SERVICE,
    Cli,
    run_process,
)

ECHO = f"{INTEROP_SERVICE}/Echo"


def test_echo_json(cli: Cli, interop_server: str, interop_set: str) -> None:
    res = cli(
        "call", "--descriptor-set", interop_set, interop_server, ECHO,
        "-d", '{"text": "héllo", "number": 7, "data": "AAE="}',
    )  # fmt: skip
    assert res.code == 0, res.err
    assert res.err == ""
    # protobuf's JSON mapping: int64 as a string, bytes as base64, fields in .proto order.
    assert res.out == '{\n  "data": "AAE=",\n  "text": "héllo",\n  "number": "7"\n}\n'


def test_proto_flag_compiles_with_protoc(cli: Cli, interop_server: str) -> None:
    res = cli(
        "call", "--proto", str(INTEROP_PROTO), "-I", str(INTEROP), interop_server, ECHO,
        "-d", '{"text": "x"}', "--compact",
    )  # fmt: skip
    assert res.code == 0, res.err
    assert json.loads(res.out) == {"data": "", "text": "x", "number": "0"}
    assert res.out.count("\n") == 1


def test_proto_without_include_uses_its_directory(cli: Cli, interop_server: str) -> None:
    res = cli("call", "--proto", str(INTEROP_PROTO), interop_server, ECHO, "--omit-defaults")
    assert (res.code, res.out) == (0, "{}\n"), res.err


def test_output_options(cli: Cli, interop_server: str, interop_set: str) -> None:
    base = ("call", "--descriptor-set", interop_set, interop_server)
    res = cli(*base, f"{INTEROP_SERVICE}/Sleep", "-d", '{"duration_ms": 1}', "--proto-names")
    assert res.code == 0, res.err
    assert list(json.loads(res.out)) == ["slept_ms"]
    res = cli(*base, ECHO, "-d", '{"text": "t", "number": 2}', "-f", "text")
    assert res.code == 0, res.err
    assert res.out == 'text: "t"\nnumber: 2\n'
    res = cli(*base, ECHO, "-f", "text")  # the empty message prints nothing at all
    assert (res.code, res.out) == (0, "")


def test_request_from_stdin_and_file(
    cli: Cli, interop_server: str, interop_set: str, tmp_path: Path
) -> None:
    base = ("call", "--descriptor-set", interop_set, interop_server, ECHO, "--compact")
    res = cli(*base, "-d", "-", stdin='{"text": "from stdin"}\n')
    assert json.loads(res.out)["text"] == "from stdin", res.err
    request = tmp_path / "req.json"
    request.write_text('{"text": "from a file"}')
    res = cli(*base, "-d", f"@{request}")
    assert json.loads(res.out)["text"] == "from a file", res.err
    res = cli(*base, "-d", f"@{tmp_path / 'missing.json'}")
    assert res.code == 66
    assert res.err_lines == [
        f"ttrpc: cannot read {tmp_path / 'missing.json'}: No such file or directory"
    ]


def test_metadata_namespace_and_timeout_are_sent(
    cli: Cli, interop_server: str, interop_set: str
) -> None:
    res = cli(
        "call", "--descriptor-set", interop_set, interop_server, f"{INTEROP_SERVICE}/Metadata",
        "-m", "x-a=1", "-m", "x-a=2=two", "-m", "x-empty=", "-n", "k8s.io", "--timeout", "1m",
    )  # fmt: skip
    assert res.code == 0, res.err
    reply = json.loads(res.out)
    pairs = [(p["key"], p["value"]) for p in reply["pairs"]]
    assert pairs == [
        ("containerd-namespace-ttrpc", "k8s.io"),
        ("x-a", "1"),
        ("x-a", "2=two"),
        ("x-empty", ""),
    ]
    assert reply["hasDeadline"] is True
    assert 50e9 < int(reply["deadlineRemainingNs"]) <= 60e9


def test_no_timeout_sends_no_deadline(cli: Cli, interop_server: str, interop_set: str) -> None:
    res = cli(
        "call", "--descriptor-set", interop_set, interop_server, f"{INTEROP_SERVICE}/Metadata"
    )
    assert json.loads(res.out)["hasDeadline"] is False, res.err


@pytest.mark.parametrize(
    ("code", "name"), [(3, "INVALID_ARGUMENT"), (5, "NOT_FOUND"), (16, "UNAUTHENTICATED")]
)
def test_status_exit_code_and_line(
    cli: Cli, interop_server: str, interop_set: str, code: int, name: str
) -> None:
    res = cli(
        "call", "--descriptor-set", interop_set, interop_server, f"{INTEROP_SERVICE}/Fail",
        "-d", json.dumps({"code": code, "message": "it failed\nbadly"}),
    )  # fmt: skip
    assert res.code == code
    assert res.out == ""
    assert res.err_lines == [f"ttrpc: {name}: it failed badly"]


def test_status_details_are_decoded(cli: Cli, interop_server: str, interop_set: str) -> None:
    res = cli(
        "call", "--descriptor-set", interop_set, interop_server, f"{INTEROP_SERVICE}/Fail",
        "-d", '{"code": 9, "message": "no", "details": ["d1", "d2"]}',
    )  # fmt: skip
    assert res.code == 9
    url = "type.googleapis.com/ttrpc.interop.v1.FailDetail"
    assert res.err_lines == [
        "ttrpc: FAILED_PRECONDITION: no",
        f'ttrpc: detail: {{"@type":"{url}","detail":"d1"}}',
        f'ttrpc: detail: {{"@type":"{url}","detail":"d2"}}',
    ]


def test_unknown_status_code_exits_unknown(cli: Cli, interop_server: str, interop_set: str) -> None:
    res = cli(
        "call", "--descriptor-set", interop_set, interop_server, f"{INTEROP_SERVICE}/Fail",
        "-d", '{"code": 99, "message": "odd"}',
    )  # fmt: skip
    assert (res.code, res.err_lines) == (2, ["ttrpc: 99: odd"])


def test_deadline_exceeded(cli: Cli, interop_server: str, interop_set: str) -> None:
    res = cli(
        "call", "--descriptor-set", interop_set, interop_server, f"{INTEROP_SERVICE}/Sleep",
        "-d", '{"durationMs": 5000}', "-t", "100ms",
    )  # fmt: skip
    assert res.code == 4
    assert res.err_lines == ["ttrpc: DEADLINE_EXCEEDED: context deadline exceeded"]


def test_oversize_response_is_resource_exhausted(
    cli: Cli, interop_server: str, interop_set: str
) -> None:
    res = cli(
        "call", "--descriptor-set", interop_set, interop_server, f"{INTEROP_SERVICE}/Big",
        "-d", '{"length": 5000000}',
    )  # fmt: skip
    assert res.code == 8
    assert len(res.err_lines) == 1 and res.err.startswith("ttrpc: RESOURCE_EXHAUSTED: ")


def test_method_the_server_lacks_is_unimplemented(cli: Cli, interop_server: str) -> None:
    # A built-in service, sent to a server that does not serve it.
    res = cli("call", interop_server, "containerd.task.v2.Task/State", "-d", '{"id": "x"}')
    assert res.code == 12
    assert res.err_lines == ["ttrpc: UNIMPLEMENTED: service containerd.task.v2.Task"]


def test_unreachable_socket(cli: Cli, short_tmp: Path, interop_set: str) -> None:
    address = f"unix://{short_tmp}/nobody-here.sock"
    res = cli("call", "--descriptor-set", interop_set, address, ECHO)
    assert res.code == 14
    assert res.err_lines == [
        f"ttrpc: UNAVAILABLE: cannot connect to {address}: No such file or directory"
    ]
    res = cli("call", "--descriptor-set", interop_set, "unix://@ttrpc-cli-no-such-name", ECHO)
    assert res.code == 14
    assert "Connection refused" in res.err and len(res.err_lines) == 1


def test_socket_that_is_not_listening(cli: Cli, short_tmp: Path, interop_set: str) -> None:
    import socket

    path = short_tmp / "bound-only.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))  # bound, never listening: connect is refused
        res = cli("call", "--descriptor-set", interop_set, str(path), ECHO)
    assert res.code == 14
    assert res.err_lines == [f"ttrpc: UNAVAILABLE: cannot connect to {path}: Connection refused"]


def test_bad_request_json(cli: Cli, interop_set: str) -> None:
    # Bad input fails before any connection is made: the address is never used.
    base = ("call", "--descriptor-set", interop_set, "unix:///nonexistent", ECHO)
    cases = {
        '{"text": ': "ttrpc: bad request JSON: Expecting value at line 1 column 10",
        "[1, 2]": "ttrpc: bad request: ttrpc.interop.v1.EchoRequest is a JSON object ({...}), "
        "not an array",
        '"text"': "ttrpc: bad request: ttrpc.interop.v1.EchoRequest is a JSON object ({...}), "
        "not a string",
    }
    for data, line in cases.items():
        res = cli(*base, "-d", data)
        assert (res.code, res.err_lines) == (65, [line]), data
    res = cli(*base, "-d", '{"txt": "x"}')
    assert res.code == 65 and len(res.err_lines) == 1
    assert res.err.startswith(
        "ttrpc: bad request for ttrpc.interop.v1.EchoRequest: "
        'Message type "ttrpc.interop.v1.EchoRequest" has no field named "txt"'
    )
    res = cli(*base, "-d", '{"number": "many"}')
    assert res.code == 65 and len(res.err_lines) == 1 and "number" in res.err


def test_unknown_service_and_method(cli: Cli, interop_set: str) -> None:
    base = ("call", "--descriptor-set", interop_set, "unix:///nonexistent")
    res = cli(*base, f"{INTEROP_SERVICE}/Ecko")
    assert res.code == 64
    assert res.err_lines == [
        f"ttrpc: unknown method 'Ecko' in service {INTEROP_SERVICE} (did you mean Echo?)"
    ]
    res = cli(*base, "ttrpc.interop.v1.Interopp/Echo")
    assert res.err_lines == [
        f"ttrpc: unknown service 'ttrpc.interop.v1.Interopp' (did you mean {INTEROP_SERVICE}?)"
    ]
    res = cli("call", "unix:///nonexistent", ECHO)  # not built in, and no descriptors given
    assert res.code == 64
    assert res.err_lines == [
        f"ttrpc: unknown service '{INTEROP_SERVICE}' "
        "(give its .proto with --proto FILE -I DIR, or --descriptor-set FILE)"
    ]
    res = cli(*base, "Echo")
    assert res.code == 64
    assert res.err_lines == [
        "ttrpc: invalid method 'Echo': expected SERVICE/METHOD, e.g. containerd.task.v2.Task/State"
    ]


def test_method_spellings(cli: Cli, interop_server: str, interop_set: str) -> None:
    for spec in (ECHO, f"/{ECHO}", f"{INTEROP_SERVICE}.Echo"):
        res = cli("call", "--descriptor-set", interop_set, interop_server, spec, "--compact")
        assert res.code == 0, (spec, res.err)


def test_server_streaming_prints_one_json_document_per_line(
    cli: Cli, interop_server: str, streaming_set: str
) -> None:
    res = cli(
        "call", "--descriptor-set", streaming_set, interop_server, f"{STREAMING_SERVICE}/Count",
        "-d", '{"count": 3, "size": 2}',
    )  # fmt: skip
    assert res.code == 0, res.err
    assert res.out.splitlines() == [
        '{"seq":"0","data":"AAE="}',
        '{"seq":"1","data":"AAE="}',
        '{"seq":"2","data":"AAE="}',
    ]


def test_server_streaming_error_after_messages(
    cli: Cli, interop_server: str, streaming_set: str
) -> None:
    res = cli(
        "call", "--descriptor-set", streaming_set, interop_server, f"{STREAMING_SERVICE}/Count",
        "-d", '{"count": 1, "failCode": 10}',
    )  # fmt: skip
    assert res.code == 10
    assert res.out == '{"seq":"0","data":""}\n'
    assert res.err_lines == ["ttrpc: ABORTED: failed after 1"]


def test_client_streaming_reads_json_lines_from_stdin(
    cli: Cli, interop_server: str, streaming_set: str
) -> None:
    lines = '{"data": "AAE="}\n\n{"seq": 5}\n{"data": "AAEC"}\n'
    res = cli(
        "call", "--descriptor-set", streaming_set, interop_server, f"{STREAMING_SERVICE}/Sum",
        "--compact", stdin=lines,
    )  # fmt: skip
    assert res.code == 0, res.err
    assert res.out == '{"count":"3","bytes":"5"}\n'
    # The same requests from -d (text or @file); none at all is an empty stream.
    res = cli(
        "call", "--descriptor-set", streaming_set, interop_server, f"{STREAMING_SERVICE}/Sum",
        "--compact", "-d", lines,
    )  # fmt: skip
    assert res.out == '{"count":"3","bytes":"5"}\n'
    res = cli(
        "call", "--descriptor-set", streaming_set, interop_server, f"{STREAMING_SERVICE}/Sum",
        "--compact",
    )  # fmt: skip
    assert res.out == '{"count":"0","bytes":"0"}\n'


def test_bidi_echoes_json_lines(cli: Cli, interop_server: str, streaming_set: str) -> None:
    res = cli(
        "call", "--descriptor-set", streaming_set, interop_server, f"{STREAMING_SERVICE}/Echo",
        stdin='{"seq": 1}\n{"seq": 2, "data": "AA=="}\n',
    )  # fmt: skip
    assert res.code == 0, res.err
    assert res.out.splitlines() == ['{"seq":"1","data":""}', '{"seq":"2","data":"AA=="}']


@pytest.mark.parametrize("method", ["Sum", "Echo"])
def test_bad_request_line_in_a_stream(
    cli: Cli, interop_server: str, streaming_set: str, method: str
) -> None:
    res = cli(
        "call", "--descriptor-set", streaming_set, interop_server, f"{STREAMING_SERVICE}/{method}",
        stdin='{"seq": 1}\n{"seq": "x"}\n',
    )  # fmt: skip
    assert res.code == 65
    assert "request on line 2" in res.err


def test_streaming_call_as_a_process(interop_server: str, streaming_set: str) -> None:
    res = run_process(
        "call", "--descriptor-set", streaming_set, interop_server, f"{STREAMING_SERVICE}/Echo",
        stdin='{"seq": 7}\n',
    )  # fmt: skip
    assert (res.code, res.out, res.err) == (0, '{"seq":"7","data":""}\n', "")


def test_proto_that_does_not_compile(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.proto"
    bad.write_text('syntax = "proto3";\nmessage X { strin a = 1; }\n')
    res = cli("list", "--proto", str(bad))
    assert res.code == 65
    assert res.err_lines == [f'ttrpc: cannot compile {bad}: {bad}:2:13: "strin" is not defined.']
    res = cli("list", "--proto", str(tmp_path / "none.proto"))
    assert (res.code, res.err_lines) == (
        66,
        [f"ttrpc: cannot read {tmp_path / 'none.proto'}: no such file or directory"],
    )


def test_usage_errors_exit_64(cli: Cli) -> None:
    for args in (
        ("call", "unix:///x", "a.B/C", "--timeout", "5parsecs"),
        ("call", "unix:///x", "a.B/C", "--timeout", "0s"),
        ("call", "unix:///x"),
        ("call", "unix:///x", "a.B/C", "--format", "xml"),
        ("frobnicate",),
        (),
    ):
        res = cli(*args)
        assert res.code == 64, args
        assert res.err_lines[-1].startswith("ttrpc"), res.err
    res = cli("call", "unix:///x", "containerd.task.v2.Task/State", "-m", "novalue")
    assert (res.code, res.err_lines) == (
        64,
        ["ttrpc: invalid metadata 'novalue': expected KEY=VALUE"],
    )
    res = cli("call", "tcp://host:1", "containerd.task.v2.Task/State")
    assert res.code == 64 and len(res.err_lines) == 1 and "invalid address" in res.err


def test_help_has_examples(cli: Cli) -> None:
    for args in (("--help",), ("call", "--help"), ("shims", "--help")):
        res = cli(*args)
        assert res.code == 0
        assert "examples:" in res.out
    assert "exit codes:" in cli("call", "--help").out


def test_as_a_process_no_traceback(short_tmp: Path, interop_set: str) -> None:
    """Through ``python -m ttrpc.cli``: one line on stderr, the documented exit codes."""
    address = f"unix://{short_tmp}/absent.sock"
    res = run_process("call", address, "containerd.task.v2.Task/State", "-d", '{"id": "x"}')
    assert (res.code, res.out) == (14, "")
    assert res.err_lines == [
        f"ttrpc: UNAVAILABLE: cannot connect to {address}: No such file or directory"
    ]
    res = run_process("call", address, "containerd.task.v2.Task/State", "-d", "{oops")
    assert res.code == 65 and len(res.err_lines) == 1 and "Traceback" not in res.err
    res = run_process("--version")
    assert res.code == 0 and res.out.startswith("ttrpc ")


def test_console_script_is_declared() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["ttrpc"] == "ttrpc.cli:main"
