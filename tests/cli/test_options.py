"""Option values and codecs: durations, metadata, exit codes, JSON in and out."""

from __future__ import annotations

import io

import pytest
from google.protobuf import timestamp_pb2

from ttrpc.cli.codec import OutputOptions, format_message, iter_json_lines, parse_request
from ttrpc.cli.descriptors import Descriptors
from ttrpc.cli.errors import CliError, exit_code_for_status
from ttrpc.cli.options import NAMESPACE_KEY, parse_duration, parse_metadata


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5s", 5.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("250us", 250e-6),
        ("250µs", 250e-6),
        ("10ns", 10e-9),
        ("2", 2.0),
        ("0.25", 0.25),
        ("0", 0.0),
        (".5s", 0.5),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "5x", "-1s", "5s5", "1 s", "1d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_metadata() -> None:
    md = parse_metadata(["A=1", "a=2", "b=x=y", "c="], namespace="default")
    assert md.pairs() == [
        ("a", "1"),
        ("a", "2"),
        ("b", "x=y"),
        ("c", ""),
        (NAMESPACE_KEY, "default"),
    ]
    md = parse_metadata([f"{NAMESPACE_KEY}=one"], namespace="two")  # -n wins
    assert md.pairs() == [(NAMESPACE_KEY, "two")]
    for bad in ("novalue", "=v", " =v"):
        with pytest.raises(ValueError, match="expected KEY=VALUE"):
            parse_metadata([bad])


def test_exit_codes() -> None:
    assert [exit_code_for_status(c) for c in (0, 1, 4, 14, 16)] == [0, 1, 4, 14, 16]
    assert exit_code_for_status(99) == 2
    assert exit_code_for_status(-1) == 2


def test_json_round_trip_with_any_and_enums() -> None:
    ref = Descriptors().find_method("containerd.task.v2.Task/Create")
    pool = ref.source.pool
    request = parse_request(
        '{"id": "c1", "rootfs": [{"type": "overlay", "options": ["ro"]}],'
        ' "options": {"@type": "containerd.runc.v1.Options", "binaryName": "runc"}}',
        ref.request_class(),
        pool,
    )
    out = format_message(request, pool, OutputOptions(compact=True, emit_defaults=False))
    assert out == (
        '{"id":"c1","rootfs":[{"type":"overlay","options":["ro"]}],'
        '"options":{"@type":"containerd.runc.v1.Options","binaryName":"runc"}}'
    )
    state = Descriptors().find_method("containerd.task.v2.Task/State")
    response = state.response_class()(status=2, pid=10)  # type: ignore[call-arg]
    out = format_message(response, state.source.pool, OutputOptions(compact=True))
    # Every field, in .proto order (MessageToDict alone puts the set ones first).
    assert out.startswith('{"id":"","bundle":"","pid":10,"status":"RUNNING","stdin":""')
    proto_names = format_message(response, state.source.pool, OutputOptions(proto_names=True))
    assert '"exit_status": 0' in proto_names and '"exec_id": ""' in proto_names


def test_unknown_any_type_is_reported() -> None:
    ref = Descriptors().find_method("containerd.task.v2.Task/Create")
    request = ref.request_class()()
    options = request.options  # type: ignore[attr-defined]
    options.Pack(timestamp_pb2.Timestamp(seconds=1))
    options.type_url = "example.com/not.a.Known"
    from ttrpc.cli.codec import UnrenderableError

    with pytest.raises(UnrenderableError):
        format_message(request, ref.source.pool, OutputOptions())
    text = format_message(request, ref.source.pool, OutputOptions(format="text"))
    assert 'type_url: "example.com/not.a.Known"' in text


def test_json_lines_for_streams() -> None:
    ref = Descriptors().find_method("containerd.task.v2.Task/State")
    lines = io.StringIO('{"id": "a"}\n\n{"id": "b"}\n{"id": 3}\n')
    messages = iter_json_lines(lines, ref.request_class(), ref.source.pool)
    assert [m.id for m in [next(messages), next(messages)]] == ["a", "b"]  # type: ignore[attr-defined]
    with pytest.raises(
        CliError, match=r"bad request on line 4 for containerd\.task\.v2\.StateRequest"
    ):
        next(messages)
